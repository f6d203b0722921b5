/**
 * The edge of the top-p nucleus, found without sorting every candidate. The sampler (sampler.ts)
 * must choose exactly what a full sort of the candidates would (test/sampler-exact.test.ts): on a
 * 151,936-id row at T = 1 and p = 0.9 nearly every id can be a candidate, and sorting them all
 * cost more than the rest of the draw.
 */

/** Band numbers and gathered weights, reused across calls (one sampler per thread). */
let bandOf = new Uint8Array(0);
let gathered = new Float64Array(0);

/** What the draw keeps: every weight above `cutoff`, the first `atCutoff` tokens exactly at it; `mass` is their sum. */
export interface Edge {
  cutoff: number;
  atCutoff: number;
  mass: number;
}

/**
 * Sums weights handed to it in descending order until the sum reaches `target` (never, for
 * `target` = Infinity): the kept prefix, its last weight and how many equal weights end it. The
 * state lives across calls so that several descending runs can be walked as one.
 */
export class DescendingWalk {
  acc = 0;
  last = Number.NaN;
  /** how many weights equal to `last` end the walk (all of them, when the weights come sorted) */
  run = 0;
  done = false;

  /** walks an ascending-sorted array from its end: its weights in descending order */
  walkAscending(sorted: Float64Array, target: number): void {
    for (let j = sorted.length - 1; j >= 0 && !this.done; j--) this.step(sorted[j], target);
  }

  step(x: number, target: number): void {
    this.acc += x;
    if (x === this.last) this.run++;
    else {
      this.last = x;
      this.run = 1;
    }
    if (this.acc >= target) this.done = true;
  }

  edge(): Edge {
    return { cutoff: this.last, atCutoff: this.run, mass: this.acc };
  }
}

/** Bands the top-p candidates are sorted in (at most 255: a band number fits a byte, 255 = not a candidate). */
const BANDS = 64;
const NOT_CANDIDATE = 255;

/**
 * The top-p edge over the candidates (weights ≥ `floor`): the same cutoff, tie count and mass as
 * sorting all of them in descending order and summing down to `target`, but only the bands the
 * walk reaches are sorted. Band b holds the weights in [low[b], low[b - 1]) (low[-1] = ∞, the
 * last band reaches down to 0), so every weight of a band is ≥ every weight of a later one and
 * the bands sorted one after another are the full descending order. The lows are
 * exp(−(b + 1) · span / BANDS) with span = −ln floor; a weight's band is first guessed from the
 * exponent it was computed from, then settled by comparing the weight itself with the lows (so
 * the order never depends on how exp rounds). The bands to sort are picked from their masses
 * (summed in another order, so only a guess: the exact walk goes on into the later bands when
 * the guess falls short by a rounding).
 */
export function nucleusEdge(
  logits: ArrayLike<number>,
  w: Float64Array,
  max: number,
  invT: number,
  floor: number,
  target: number,
  /** how many bands the first sort takes; default: as many as the band masses say (tests force fewer to run the walk on into the rest) */
  firstBands?: number,
): Edge {
  const V = logits.length;
  if (bandOf.length < V) bandOf = new Uint8Array(V);
  const bands = bandOf;
  const span = Math.max(-Math.log(floor), 1e-9);
  const scale = BANDS / span;
  const low = new Float64Array(BANDS);
  for (let b = 0; b < BANDS - 1; b++) low[b] = Math.exp(-((b + 1) * span) / BANDS);
  const bandMass = new Float64Array(BANDS);
  const bandCount = new Uint32Array(BANDS);
  for (let i = 0; i < V; i++) {
    const x = w[i];
    if (x >= floor) {
      const guess = -((logits[i] - max) * invT) * scale;
      let b = guess < BANDS - 1 ? guess | 0 : BANDS - 1;
      while (x < low[b]) b++;
      while (b > 0 && x >= low[b - 1]) b--;
      bands[i] = b;
      bandMass[b] += x;
      bandCount[b]++;
    } else bands[i] = NOT_CANDIDATE;
  }
  let last = 0;
  for (let guess = 0; last < BANDS - 1; last++) {
    guess += bandMass[last];
    if (guess >= target) break;
  }
  if (firstBands !== undefined) last = Math.min(last, Math.max(0, firstBands - 1));
  const walk = new DescendingWalk();
  // the guessed bands, then (rarely) all the others
  for (const [lo, hi] of [
    [0, last],
    [last + 1, BANDS - 1],
  ] as const) {
    if (lo > hi) break;
    let n = 0;
    for (let b = lo; b <= hi; b++) n += bandCount[b];
    if (gathered.length < n) gathered = new Float64Array(Math.max(n, 1024));
    const run = gathered.subarray(0, n);
    let k = 0;
    for (let i = 0; i < V; i++) {
      const b = bands[i];
      if (b >= lo && b <= hi) run[k++] = w[i];
    }
    walk.walkAscending(run.sort(), target);
    if (walk.done) break;
  }
  return walk.edge();
}
