import { describe, expect, it } from 'vitest';
import { sample, seededRng, type Rng, type Sampled, type SamplingParams } from '../src/engine/sampler.js';
import { nucleusEdge, type Edge } from '../src/engine/nucleus.js';

/**
 * The sampler was rewritten for speed (greedy in one pass before the normalizer, the T = 1 draw's
 * weights reused as the normalizer's terms, normalizer terms under 2^-53 skipped once the sum is
 * ≥ 1, top-p sorting only the bands of candidates its walk reaches). Its choices and logprobs must stay bit for bit those of the algorithm it replaced, so
 * that a seeded request answers exactly what it answered before. `reference` below is that
 * algorithm, kept verbatim (commit 4bee344, src/engine/sampler.ts) as this test's oracle.
 */

// ── the previous sampler, verbatim ─────────────────────────────────────────────────────────────

function refLogNormalizer(logits: ArrayLike<number>): { max: number; logSum: number } {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i] > max) max = logits[i];
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i] - max);
  return { max, logSum: Math.log(sum) };
}

function refArgmax(logits: ArrayLike<number>): number {
  let best = 0;
  for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
  return best;
}

function refTopN(logits: ArrayLike<number>, n: number): number[] {
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

function refDrawShaped(logits: ArrayLike<number>, p: SamplingParams, u: number): number {
  const V = logits.length;
  const invT = 1 / p.temperature;
  let max = -Infinity;
  for (let i = 0; i < V; i++) if (logits[i] > max) max = logits[i];
  const w = new Float64Array(V);
  let sum = 0;
  for (let i = 0; i < V; i++) sum += w[i] = Math.exp((logits[i] - max) * invT);
  const useTopK = p.topK > 0 && p.topK < V;
  const useTopP = p.topP > 0 && p.topP < 1;

  let cutoff = -1;
  let atCutoff = 0;
  let mass = sum;
  if (useTopK || useTopP) {
    let desc: Float64Array;
    let total: number;
    if (useTopK) {
      desc = Float64Array.from(refTopN(logits, p.topK), (i) => w[i]);
      total = desc.reduce((a, b) => a + b, 0);
    } else {
      const floor = ((1 - p.topP) / V) * sum;
      const cand: number[] = [];
      for (let i = 0; i < V; i++) if (w[i] >= floor) cand.push(w[i]);
      desc = Float64Array.from(cand).sort().reverse();
      total = sum;
    }
    let keep = desc.length;
    if (useTopP) {
      let acc = 0;
      for (let j = 0; j < desc.length; j++) {
        acc += desc[j];
        if (acc >= p.topP * total) {
          keep = j + 1;
          break;
        }
      }
    }
    cutoff = desc[keep - 1];
    atCutoff = 0;
    mass = 0;
    for (let j = 0; j < keep; j++) {
      mass += desc[j];
      if (desc[j] === cutoff) atCutoff++;
    }
  }

  let target = u * mass;
  let last = -1;
  let ties = atCutoff;
  for (let i = 0; i < V; i++) {
    const x = w[i];
    if (x < cutoff || (x === cutoff && ties-- <= 0)) continue;
    last = i;
    target -= x;
    if (target < 0) return i;
  }
  return last >= 0 ? last : refArgmax(logits);
}

function reference(logits: ArrayLike<number>, p: SamplingParams, rng: Rng): Sampled {
  const token = p.temperature <= 0 ? refArgmax(logits) : refDrawShaped(logits, p, rng());
  const { max, logSum } = refLogNormalizer(logits);
  const out: Sampled = { token, logprob: logits[token] - max - logSum };
  if (p.topLogprobs > 0) {
    out.top = refTopN(logits, p.topLogprobs).map((t) => ({ token: t, logprob: logits[t] - max - logSum }));
  }
  return out;
}

// ── logit rows of the shapes that matter ───────────────────────────────────────────────────────

type Shape = 'flat' | 'wide' | 'peaked' | 'lm' | 'ties' | 'plateau' | 'far';
const SHAPES: Shape[] = ['flat', 'wide', 'peaked', 'lm', 'ties', 'plateau', 'far'];

function gaussian(g: Rng): number {
  return Math.sqrt(-2 * Math.log(1 - g())) * Math.cos(2 * Math.PI * g());
}

/** float32 rows, as the model's logits are */
function row(shape: Shape, V: number, g: Rng): Float32Array {
  const out = new Float32Array(V);
  for (let i = 0; i < V; i++) {
    switch (shape) {
      case 'flat': // near-uniform: almost every id is a top-p candidate
        out[i] = (g() - 0.5) * 0.5;
        break;
      case 'wide':
        out[i] = (g() - 0.5) * 24;
        break;
      case 'peaked': // a few ids hold most of the mass
        out[i] = gaussian(g) * 2 + (g() < 5 / V ? 15 + g() * 5 : 0);
        break;
      case 'lm': // heavy upper tail, as a trained head's logits
        out[i] = gaussian(g) * 2.5 - 3 + (g() < 0.01 ? 8 * g() : 0);
        break;
      case 'ties': // coarse values: many exact ties, also at the nucleus's edge
        out[i] = Math.round(gaussian(g) * 3) / 2;
        break;
      case 'plateau': // one value shared by a block of the top ids, the rest well below
        out[i] = g() < 0.2 ? 4 : gaussian(g);
        break;
      case 'far': // a range of ~100: many terms of the normalizer fall below 2^-53 of the max's
        out[i] = gaussian(g) * 20;
        break;
    }
  }
  return out;
}

const TEMPERATURES = [0, 0.25, 0.7, 1, 1.3, 2.5];
const TOP_P = [1, 0.05, 0.5, 0.8, 0.9, 0.95, 0.999];

function topKs(V: number): number[] {
  return [0, 1, 3, 40, V - 1, V, V + 7].filter((k) => k >= 0);
}

/** the same call on both samplers, each with its own copy of the seeded stream */
function both(logits: Float32Array, p: SamplingParams, seed: number): { got: Sampled; want: Sampled; draws: [number, number] } {
  const counted = (): { rng: Rng; n: () => number } => {
    const r = seededRng(seed);
    let n = 0;
    return { rng: () => (n++, r()), n: () => n };
  };
  const a = counted();
  const b = counted();
  const got = sample(logits, p, a.rng);
  const want = reference(logits, p, b.rng);
  return { got, want, draws: [a.n(), b.n()] };
}

function sameBits(a: Sampled, b: Sampled): boolean {
  if (a.token !== b.token || !Object.is(a.logprob, b.logprob)) return false;
  if ((a.top === undefined) !== (b.top === undefined)) return false;
  if (!a.top || !b.top) return true;
  return a.top.length === b.top.length && a.top.every((t, i) => t.token === b.top![i].token && Object.is(t.logprob, b.top![i].logprob));
}

describe('sampler: bit for bit the previous algorithm', () => {
  it('on many rows, shapes, settings and seeds (small and mid vocabularies)', () => {
    const g = seededRng(2024);
    let cases = 0;
    let sampledAwayFromArgmax = 0;
    const mismatches: string[] = [];
    for (const V of [1, 2, 3, 7, 64, 513, 4099]) {
      for (const shape of SHAPES) {
        for (let r = 0; r < (V > 1000 ? 1 : 3); r++) {
          const logits = row(shape, V, g);
          for (const temperature of TEMPERATURES) {
            for (const topP of TOP_P) {
              for (const topK of topKs(V)) {
                const p: SamplingParams = { temperature, topP, topK, topLogprobs: cases % 3 === 0 ? 5 : 0 };
                const seed = Math.floor(g() * 2 ** 40);
                const { got, want, draws } = both(logits, p, seed);
                cases++;
                if (want.token !== refArgmax(logits)) sampledAwayFromArgmax++;
                if (!sameBits(got, want) || draws[0] !== draws[1]) {
                  if (mismatches.length < 5) mismatches.push(`V ${V} ${shape} row ${r} ${JSON.stringify(p)} seed ${seed}: got ${JSON.stringify(got)} (${draws[0]} draws), want ${JSON.stringify(want)} (${draws[1]})`);
                }
              }
            }
          }
        }
      }
    }
    expect(mismatches).toEqual([]);
    // the cases really sample (not only argmax): the draw and its edge are exercised
    expect(cases).toBeGreaterThan(10_000);
    expect(sampledAwayFromArgmax).toBeGreaterThan(cases / 8);
  });

  it('on a Qwen2.5-sized vocabulary (151,936 ids), including the views the engine passes', () => {
    const g = seededRng(151936);
    const V = 151_936;
    const mismatches: string[] = [];
    let cases = 0;
    for (const shape of SHAPES) {
      const full = row(shape, V + 64, g);
      // the engine samples a subarray (the tokenizer's ids) of the padded head's row
      const logits = full.subarray(0, V);
      const settings: Partial<SamplingParams>[] = [
        { temperature: 0 },
        { temperature: 1 },
        { temperature: 0.7 },
        { temperature: 1, topP: 0.9 },
        { temperature: 0.6, topP: 0.95 },
        { temperature: 1.3, topP: 0.5 },
        { temperature: 1, topP: 0.999 },
        { temperature: 0.8, topK: 40 },
        { temperature: 1, topK: 50, topP: 0.9 },
        { temperature: 0, topLogprobs: 20 },
      ];
      for (const s of settings) {
        for (let k = 0; k < 3; k++) {
          const p: SamplingParams = { temperature: 1, topK: 0, topP: 1, topLogprobs: 0, ...s };
          const seed = Math.floor(g() * 2 ** 40);
          const { got, want, draws } = both(logits, p, seed);
          cases++;
          if (!sameBits(got, want) || draws[0] !== draws[1]) {
            if (mismatches.length < 5) mismatches.push(`${shape} ${JSON.stringify(p)} seed ${seed}: got ${got.token} ${got.logprob}, want ${want.token} ${want.logprob}`);
          }
        }
      }
    }
    expect(mismatches).toEqual([]);
    expect(cases).toBe(SHAPES.length * 30);
  });

  it('a row repeated through one seeded stream draws the same sequence', () => {
    // the scratch buffers are reused across calls: a longer row, then a shorter one, must not leak
    const g = seededRng(77);
    const rows = [4099, 7, 513, 2, 4099].map((V, i) => row(SHAPES[i % SHAPES.length], V, g));
    const p: SamplingParams = { temperature: 0.9, topK: 0, topP: 0.9, topLogprobs: 2 };
    const a = seededRng(5);
    const b = seededRng(5);
    for (let t = 0; t < 200; t++) {
      const logits = rows[t % rows.length];
      expect(sameBits(sample(logits, p, a), reference(logits, p, b)), `step ${t}`).toBe(true);
    }
  });

  it('finds the top-p edge of a full descending sort, also when the first bands it sorts fall short', () => {
    const g = seededRng(31337);
    let cases = 0;
    let pastFirstBand = 0;
    const mismatches: string[] = [];
    for (const V of [2, 5, 300, 4099]) {
      for (const shape of SHAPES) {
        for (let r = 0; r < 3; r++) {
          const logits = row(shape, V, g);
          for (const T of [0.25, 1, 2.5]) {
            const invT = 1 / T;
            let max = -Infinity;
            for (const l of logits) if (l > max) max = l;
            const w = Float64Array.from(logits, (l) => Math.exp((l - max) * invT));
            let sum = 0;
            for (const x of w) sum += x;
            for (const p of TOP_P.filter((q) => q < 1)) {
              const floor = ((1 - p) / V) * sum;
              const want = refEdge(w, floor, p * sum);
              // band 0 holds the weights ≥ exp(−span / 64): an edge below that is found in a later sort
              if (want.cutoff < Math.exp(Math.log(floor) / 64)) pastFirstBand++;
              for (const first of [undefined, 1, 2]) {
                const got = nucleusEdge(logits, w, max, invT, floor, p * sum, first);
                cases++;
                if (!(Object.is(got.cutoff, want.cutoff) && got.atCutoff === want.atCutoff && Object.is(got.mass, want.mass)) && mismatches.length < 5) {
                  mismatches.push(`V ${V} ${shape} T ${T} p ${p} first ${first}: got ${JSON.stringify(got)}, want ${JSON.stringify(want)}`);
                }
              }
            }
          }
        }
      }
    }
    expect(mismatches).toEqual([]);
    expect(pastFirstBand).toBeGreaterThan(cases / 3 / 10);
  });
});

/** the previous sampler's top-p edge: every candidate sorted, summed down to the target */
function refEdge(w: Float64Array, floor: number, target: number): Edge {
  const desc = Float64Array.from(w.filter((x) => x >= floor)).sort().reverse();
  let keep = desc.length;
  let acc = 0;
  for (let j = 0; j < desc.length; j++) {
    acc += desc[j];
    if (acc >= target) {
      keep = j + 1;
      break;
    }
  }
  const cutoff = desc[keep - 1];
  let atCutoff = 0;
  let mass = 0;
  for (let j = 0; j < keep; j++) {
    mass += desc[j];
    if (desc[j] === cutoff) atCutoff++;
  }
  return { cutoff, atCutoff, mass };
}
