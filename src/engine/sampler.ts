/**
 * Token selection from one row's logits. Pure: the only state is the request's own PRNG, so a
 * request with a seed draws the same tokens whatever else shares its batch.
 *
 * Logprobs are reported from the model's distribution (log-softmax of the raw logits), not from
 * the temperature/top-k/top-p-shaped one — as vLLM and the OpenAI API do — so they stay
 * comparable across sampling settings.
 */

import { DescendingWalk, nucleusEdge, type Edge } from './nucleus.js';

export interface SamplingParams {
  /** 0 → greedy (argmax; ties go to the lowest token id) */
  temperature: number;
  /** 0 → off */
  topK: number;
  /** 1 → off */
  topP: number;
  /** how many of the most likely tokens to report with each token (0 → none) */
  topLogprobs: number;
}

export interface TokenLogprob {
  token: number;
  logprob: number;
}

export interface Sampled {
  token: number;
  /** log-probability of `token` under the model's (unshaped) distribution */
  logprob: number;
  /** the `topLogprobs` most likely tokens, most likely first; absent when not asked for */
  top?: TokenLogprob[];
}

/** A uniform [0, 1) source. */
export type Rng = () => number;

/**
 * xoshiro128** seeded through splitmix64 from any safe integer (negative seeds are taken modulo
 * 2^64), so nearby seeds give unrelated streams.
 */
export function seededRng(seed: number): Rng {
  let x = BigInt.asUintN(64, BigInt(Math.trunc(seed)));
  const next64 = (): bigint => {
    x = BigInt.asUintN(64, x + 0x9e3779b97f4a7c15n);
    let z = x;
    z = BigInt.asUintN(64, (z ^ (z >> 30n)) * 0xbf58476d1ce4e5b9n);
    z = BigInt.asUintN(64, (z ^ (z >> 27n)) * 0x94d049bb133111ebn);
    return z ^ (z >> 31n);
  };
  const a = next64();
  const b = next64();
  const s = new Uint32Array([Number(a & 0xffffffffn), Number(a >> 32n), Number(b & 0xffffffffn), Number(b >> 32n)]);
  if ((s[0] | s[1] | s[2] | s[3]) === 0) s[0] = 1;
  return () => {
    const result = Math.imul(rotl(Math.imul(s[1], 5), 7), 9) >>> 0;
    const t = s[1] << 9;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 11);
    return result / 4294967296;
  };
}

function rotl(v: number, k: number): number {
  return (v << k) | (v >>> (32 - k));
}

/** A seed for requests that bring none. */
export function randomSeed(): number {
  return Math.floor(Math.random() * 2 ** 52);
}

export function isGreedy(p: Pick<SamplingParams, 'temperature'>): boolean {
  return p.temperature <= 0;
}

/** The largest logit (NaN never is). */
function maxOf(logits: ArrayLike<number>): number {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  return max;
}

/** Below this, exp(d) < 2^-53 (exp(-37) ≈ 8.5e-17 < 1.1e-16), a wide margin over exp's rounding. */
const NEGLIGIBLE_EXPONENT = -37;

/**
 * Σ exp(l - max) in id order, in float64: the normalizer of the reported logprobs. `first` is the
 * first id holding `max`; its term is exp(0) = 1, so from there on the sum is ≥ 1, and a term
 * under 2^-53 (less than half an ulp of any sum ≥ 1) leaves it unchanged to the last bit: such
 * terms are skipped without calling exp. Before `first` every term is added.
 */
function expSum(logits: ArrayLike<number>, max: number, first: number): number {
  let sum = 0;
  const exact = logits[first] === max ? first + 1 : logits.length;
  for (let i = 0; i < exact; i++) sum += Math.exp(logits[i] - max);
  for (let i = exact; i < logits.length; i++) {
    const d = logits[i] - max;
    // written so that a NaN still reaches the sum, as it always did
    if (!(d < NEGLIGIBLE_EXPONENT)) sum += Math.exp(d);
  }
  return sum;
}

/** The first id holding the largest logit (ties to the lowest id). */
function argmax(logits: ArrayLike<number>): number {
  let best = 0;
  let bestV = logits[0];
  for (let i = 1; i < logits.length; i++) {
    const v = logits[i];
    if (v > bestV) {
      best = i;
      bestV = v;
    }
  }
  return best;
}

/** The n largest logits, largest first, ties to the lower id. */
export function topN(logits: ArrayLike<number>, n: number): number[] {
  const k = Math.min(n, logits.length);
  if (k <= 0) return [];
  const ids: number[] = [];
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i];
    if (ids.length === k && v <= logits[ids[k - 1]]) continue;
    let j = ids.length < k ? ids.length : k - 1;
    if (ids.length < k) ids.push(i);
    while (j > 0 && logits[ids[j - 1]] < v) {
      ids[j] = ids[j - 1];
      j--;
    }
    ids[j] = i;
  }
  return ids;
}

/** Per-token weights, reused across calls (one sampler per thread). */
let scratch = new Float64Array(0);

/**
 * Draws from softmax(logits / T) restricted by top-k, then top-p (the smallest most-likely set
 * whose mass reaches p, ties at its edge to the lower id). The kept set is described by a cutoff
 * weight and how many tokens exactly at the cutoff it includes, and the draw walks the vocabulary
 * in id order, so a given (logits, u) always picks the same token and nothing but the candidates'
 * weights needs sorting. Also returns Σ weights, which at T = 1 is the logprobs' normalizer.
 */
function drawShaped(logits: ArrayLike<number>, p: SamplingParams, u: number, max: number): { token: number; sum: number } {
  const V = logits.length;
  const invT = 1 / p.temperature;
  if (scratch.length < V) scratch = new Float64Array(V);
  const w = scratch;
  let sum = 0;
  for (let i = 0; i < V; i++) sum += w[i] = Math.exp((logits[i] - max) * invT);
  const useTopK = p.topK > 0 && p.topK < V;
  const useTopP = p.topP > 0 && p.topP < 1;

  let edge: Edge = { cutoff: -1, atCutoff: 0, mass: sum };
  if (useTopK) {
    // the k largest, largest first; top-p then measures against their mass
    const ids = topN(logits, p.topK);
    let total = 0;
    for (const i of ids) total += w[i];
    const walk = new DescendingWalk();
    const target = useTopP ? p.topP * total : Infinity;
    let keep = 0;
    while (keep < ids.length && !walk.done) walk.step(w[ids[keep++]], target);
    // the k are in logit order: count the weights equal to the cutoff wherever they stand
    let atCutoff = 0;
    for (let j = 0; j < keep; j++) if (w[ids[j]] === walk.last) atCutoff++;
    edge = { cutoff: walk.last, atCutoff, mass: walk.acc };
  } else if (useTopP) {
    // a token below (1 - p) / V of the mass can never be in the nucleus (all such tokens
    // together hold less than 1 - p), so only the rest are candidates
    edge = nucleusEdge(logits, w, max, invT, ((1 - p.topP) / V) * sum, p.topP * sum);
  }

  let target = u * edge.mass;
  let last = -1;
  let ties = edge.atCutoff;
  const cutoff = edge.cutoff;
  for (let i = 0; i < V; i++) {
    const x = w[i];
    if (x < cutoff || (x === cutoff && ties-- <= 0)) continue;
    last = i;
    target -= x;
    if (target < 0) return { token: i, sum };
  }
  return { token: last >= 0 ? last : argmax(logits), sum };
}

/**
 * Picks the next token from one row's logits. Exactly one number is drawn from `rng` per sampled
 * (non-greedy) token, none for greedy ones.
 *
 * The reported logprob is l − max − log Σ exp(l − max), the sum taken in id order; greedy finds
 * the token and the max in one pass, and at T = 1 the draw's own weights are the sum's terms, so
 * the row is exponentiated once.
 */
export function sample(logits: ArrayLike<number>, p: SamplingParams, rng: Rng): Sampled {
  let token: number;
  let sum: number;
  const first = argmax(logits);
  const top = logits[first];
  // the first of the largest is the max, unless it is a NaN at id 0 (argmax never moves past one)
  const max = top === top ? top : maxOf(logits);
  if (isGreedy(p)) {
    token = first;
    sum = expSum(logits, max, first);
  } else {
    const drawn = drawShaped(logits, p, rng(), max);
    token = drawn.token;
    // (l - max) * 1 is l - max exactly: the same terms in the same order
    sum = p.temperature === 1 ? drawn.sum : expSum(logits, max, first);
  }
  const logSum = Math.log(sum);
  const out: Sampled = { token, logprob: logits[token] - max - logSum };
  if (p.topLogprobs > 0) {
    out.top = topN(logits, p.topLogprobs).map((t) => ({ token: t, logprob: logits[t] - max - logSum }));
  }
  return out;
}
