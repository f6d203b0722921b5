import { describe, expect, it } from 'vitest';
import { FeedBuilder, type Feeds, type ResidentAdapter } from '../src/engine/batch.js';
import { allocModel, type ModelArray } from '../src/engine/dtype.js';
import { loraBiasInput, loraMagnitudeInput, loraTargetsFor, type LoraTarget, type Manifest, type ModelDtype } from '../src/model/manifest.js';
import { tinyArchitecture } from './helpers/random-checkpoint.js';

/**
 * Mixed-adapter decode feeds are assembled incrementally (slot buffers reused across steps, only
 * changed rows rewritten). Whatever sequence of joins, leaves, reorders and rank changes led to a
 * composition, its feeds must equal, element for element, the feeds assembled from nothing by
 * the layout rule written out here independently: per target r = the largest rank among the
 * rows, row b's A [in, r] / B [r, out] the module zero-padded, rows without it all zeros, and
 * batch-1 feeds of the adapter (or the base) when every row shares one.
 */

function manifestOf(dtype: ModelDtype): Manifest {
  const arch = tinyArchitecture({ numLayers: 2 });
  return {
    manifestVersion: 1,
    builderVersion: 'test',
    sourceHash: 'x',
    modelId: 'unit',
    architecture: arch,
    dtype,
    logits: 'last',
    lora: true,
    maskValue: -1e9,
    files: { graph: 'model.onnx', weights: 'model.onnx.data' },
    loraTargets: loraTargetsFor(arch),
  };
}

function modelArrayOf(manifest: Manifest, v: number[]): ModelArray {
  const out = allocModel(manifest.dtype, v.length);
  out.set(v);
  return out;
}

/** deterministic, so a failure replays */
class Lcg {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    this.s = (Math.imul(this.s, 1664525) + 1013904223) >>> 0;
    return this.s / 2 ** 32;
  }
  int(n: number): number {
    return Math.floor(this.next() * n);
  }
}

/** Values are nonzero and distinct per adapter, so a stale or misplaced slice shows. */
function adapterOf(manifest: Manifest, id: string, rankOf: (t: LoraTarget, i: number) => number, seed: number): ResidentAdapter {
  return {
    versionId: id,
    modules: manifest.loraTargets.map((t, i) => {
      const rank = rankOf(t, i);
      if (rank === 0) return null;
      const A = allocModel(manifest.dtype, t.inFeatures * rank);
      const B = allocModel(manifest.dtype, rank * t.outFeatures);
      // fp16 arrays hold raw bits: any nonzero 16-bit pattern below the NaN range will do
      for (let k = 0; k < A.length; k++) A[k] = manifest.dtype === 'fp16' ? 1 + ((seed * 31 + k) % 30000) : seed + k / 1000;
      for (let k = 0; k < B.length; k++) B[k] = manifest.dtype === 'fp16' ? 1 + ((seed * 17 + k) % 30000) : -(seed + k / 1000);
      return { rank, A, B };
    }),
  };
}

/** The layout rule, element by element, from the rows alone. */
function reference(manifest: Manifest, rows: readonly (ResidentAdapter | null)[]): Map<string, { dims: number[]; data: number[] }> {
  const out = new Map<string, { dims: number[]; data: number[] }>();
  const shared = rows.every((r) => r === rows[0]);
  manifest.loraTargets.forEach((t, i) => {
    const mods = (shared ? [rows[0]] : rows).map((r) => r?.modules[i] ?? null);
    const n = mods.length;
    const r = shared ? (mods[0]?.rank ?? 0) : Math.max(0, ...mods.map((m) => m?.rank ?? 0));
    const n0 = r === 0 ? 1 : n;
    const A = new Array<number>(n0 * t.inFeatures * r).fill(0);
    const B = new Array<number>(n0 * r * t.outFeatures).fill(0);
    if (r > 0) {
      mods.forEach((m, b) => {
        if (!m) return;
        for (let k = 0; k < t.inFeatures; k++) for (let j = 0; j < m.rank; j++) A[(b * t.inFeatures + k) * r + j] = m.A[k * m.rank + j];
        for (let j = 0; j < m.rank; j++) for (let o = 0; o < t.outFeatures; o++) B[(b * r + j) * t.outFeatures + o] = m.B[j * t.outFeatures + o];
      });
    }
    out.set(t.inputA, { dims: [n0, t.inFeatures, r], data: A });
    out.set(t.inputB, { dims: [n0, r, t.outFeatures], data: B });
    // DoRA factors (neutral 1) and lora_B biases (neutral 0): [rows, 1, out] when some row has one, the
    // adapter's own [1, 1, out] when every row shares it, else the neutral [1, 1, 1]
    const one = manifest.dtype === 'fp16' ? 0x3c00 : 1;
    for (const [which, name, neutral] of [['factor', loraMagnitudeInput(t), one], ['bias', loraBiasInput(t), 0]] as const) {
      const vs = mods.map((m) => m?.[which] ?? null);
      if (!vs.some((v) => v !== null)) {
        out.set(name, { dims: [1, 1, 1], data: [neutral] });
        continue;
      }
      const data = new Array<number>(vs.length * t.outFeatures).fill(neutral);
      vs.forEach((v, b) => v && v.forEach((x, o) => (data[b * t.outFeatures + o] = x)));
      out.set(name, { dims: [vs.length, 1, t.outFeatures], data });
    }
  });
  return out;
}

function expectMatches(manifest: Manifest, feeds: Feeds, rows: readonly (ResidentAdapter | null)[], label: string): void {
  const want = reference(manifest, rows);
  expect(Object.keys(feeds).sort()).toEqual([...want.keys()].sort());
  for (const [name, w] of want) {
    const got = feeds[name];
    expect(got.dims, `${label}: ${name} dims`).toEqual(w.dims);
    expect(got.type).toBe(manifest.dtype === 'fp16' ? 'float16' : 'float32');
    const data = got.data as ModelArray;
    expect(data.length, `${label}: ${name} length`).toBe(w.data.length);
    for (let k = 0; k < w.data.length; k++) {
      if (data[k] !== w.data[k]) throw new Error(`${label}: ${name}[${k}] is ${data[k]}, expected ${w.data[k]}`);
    }
  }
}

describe.each(['fp32', 'fp16'] as const)('incremental mixed-row LoRA feeds (%s)', (dtype) => {
  const manifest = manifestOf(dtype);
  const targets = manifest.loraTargets;
  const q0 = targets.findIndex((t) => t.module === 'q_proj');
  // rank 4 everywhere; a rank-8 adapter on some targets (forces a larger step rank there);
  // a sparse one with rank 2 on half the targets; one with rank 6 on one target only
  const X = adapterOf(manifest, 'X', () => 4, 1);
  const Y = adapterOf(manifest, 'Y', () => 4, 2);
  const Big = adapterOf(manifest, 'Big', (_, i) => (i % 3 === 0 ? 8 : 4), 3);
  const Sparse = adapterOf(manifest, 'Sparse', (_, i) => (i % 2 === 0 ? 2 : 0), 4);
  const One = adapterOf(manifest, 'One', (_, i) => (i === q0 ? 6 : 0), 5);
  // DoRA factors on every target; a lora_B bias on every other one
  const vector = (seed: number) => (t: LoraTarget) => Array.from({ length: t.outFeatures }, (_, o) => (manifest.dtype === 'fp16' ? 1 + ((seed * 17 + o) % 30000) : seed + o / 100));
  const withVectors = (a: ResidentAdapter, factor: boolean, bias: boolean): ResidentAdapter => ({
    versionId: `${a.versionId}+v`,
    modules: a.modules.map((m, i) => m && { ...m, ...(factor && { factor: modelArrayOf(manifest, vector(7 + i)(targets[i]!)) }), ...(bias && i % 2 === 0 && { bias: modelArrayOf(manifest, vector(9 + i)(targets[i]!)) }) }),
  });
  const Dora = withVectors(adapterOf(manifest, 'Dora', () => 4, 6), true, false);
  const Biased = withVectors(adapterOf(manifest, 'Biased', (_, i) => (i % 2 === 0 ? 3 : 0), 8), false, true);
  const pool: (ResidentAdapter | null)[] = [X, Y, Big, Sparse, One, Dora, Biased, null];

  it('joins at the end, leaves in the middle, rank growth and shrink, broadcast in between: always the from-scratch layout', () => {
    const f = new FeedBuilder(manifest, 4);
    const script: (ResidentAdapter | null)[][] = [
      [X],
      [X, Y], // join (mixed from here)
      [X, Y, null], // a base row joins
      [X, Y, null, Big], // a larger rank arrives on a third of the targets: those relaid out
      [X, null, Big], // a middle row leaves: later rows shift down
      [X, null], // the rank-8 row leaves: the step rank shrinks back to 4
      [X, null, Sparse, One], // smaller ranks padded, targets only One has
      [null, Sparse, One], // the first row leaves
      [One, One], // all rows share one adapter: batch-1 feeds
      [Sparse, One, Big, X, Y], // more rows than the buffers were sized for: they grow
      [Sparse, One, Big, X, Y], // unchanged: the same feeds object
      [Y, X, Big, One, Sparse], // reversed order
      [null, null], // the base for all
      [X, Y],
      [X, Dora, null], // DoRA factors for one row: ones for the others
      [Dora, Biased], // factors and biases in one step
      [Dora, Dora], // shared: the adapter's own [1, 1, out] vectors
      [Biased, X],
    ];
    let previous: Feeds | null = null;
    script.forEach((rows, step) => {
      const feeds = f.loraForRows(rows);
      expectMatches(manifest, feeds, rows, `step ${step}`);
      // and what a fresh builder assembles from nothing
      expectMatches(manifest, new FeedBuilder(manifest, 4).loraForRows(rows), rows, `step ${step} (fresh)`);
      if (step === 10) expect(feeds).toBe(previous);
      previous = feeds;
    });
  });

  it('reuses its buffers: joins and leaves at one rank allocate nothing new', () => {
    const f = new FeedBuilder(manifest, 4);
    const t = targets[q0];
    const a1 = f.loraForRows([X, Y])[t.inputA].data as ModelArray;
    const a2 = f.loraForRows([X, Y, null, Sparse])[t.inputA].data as ModelArray;
    const a3 = f.loraForRows([Y, Sparse])[t.inputA].data as ModelArray;
    expect(a2.buffer).toBe(a1.buffer);
    expect(a3.buffer).toBe(a1.buffer);
    // the views cover the live rows only
    expect(a3.length).toBe(2 * t.inFeatures * 4);
    expect(a3.byteOffset).toBe(0);
  });

  it('random compositions after random compositions (seeded)', () => {
    const rng = new Lcg(dtype === 'fp16' ? 7 : 11);
    const f = new FeedBuilder(manifest, 3);
    let rows: (ResidentAdapter | null)[] = [];
    for (let step = 0; step < 60; step++) {
      const op = rng.int(4);
      if ((op === 0 || rows.length === 0) && rows.length < 6) rows = [...rows, pool[rng.int(pool.length)]];
      else if (op === 1 && rows.length > 1) {
        const gone = rng.int(rows.length);
        rows = rows.filter((_, i) => i !== gone);
      }
      else if (op === 2) rows = rows.map(() => pool[rng.int(pool.length)]);
      else if (rows.length > 0) rows = [...rows.slice(1), rows[0]];
      f.loraForRows(rows);
      if (rng.int(8) === 0) f.resetRows();
      expectMatches(manifest, f.loraForRows(rows), rows, `random step ${step} [${rows.map((r) => r?.versionId ?? '-').join(' ')}]`);
    }
  });
});
