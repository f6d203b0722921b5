import type { ModelDtype } from '../model/manifest.js';
import { allocModel, type ModelArray } from './dtype.js';

/**
 * KV caches as plain arrays in the graph's layout, [batch, kvHeads, past, headDim] per layer for
 * keys and for values.
 *
 * A decode batch holds rows of different lengths left-padded to a common `past`: row b's `lens[b]`
 * real tokens sit at the right end, positions [past - lens[b], past), and attention_bias masks the
 * padding. A step's `present` outputs (past + 1 long) become the next step's past as they are;
 * only a change of rows (one joins after prefill, one leaves) copies the caches, and that copy
 * also trims padding that every row shares.
 */
export interface KvShape {
  layers: number;
  kvHeads: number;
  headDim: number;
  dtype: ModelDtype;
}

export interface LayerKv {
  key: ModelArray;
  value: ModelArray;
}

/** One sequence's cache as its batch-1 prefill left it: [1, kvHeads, len, headDim]. */
export interface SeqKv {
  len: number;
  layers: LayerKv[];
}

export function emptySeqKv(shape: KvShape): SeqKv {
  const layers: LayerKv[] = [];
  for (let l = 0; l < shape.layers; l++) layers.push({ key: allocModel(shape.dtype, 0), value: allocModel(shape.dtype, 0) });
  return { len: 0, layers };
}

/** Where a row of a newly composed batch takes its cache from. */
export type KvSource = { batchRow: number } | { seq: SeqKv };

export class BatchKv {
  private constructor(
    readonly shape: KvShape,
    /** common length of every row, padding included */
    readonly past: number,
    /** real tokens of each row */
    readonly lens: number[],
    readonly layers: LayerKv[],
  ) {}

  get rows(): number {
    return this.lens.length;
  }

  /** Left padding of row b. */
  pad(b: number): number {
    return this.past - this.lens[b];
  }

  get realTokens(): number {
    let n = 0;
    for (const l of this.lens) n += l;
    return n;
  }

  /**
   * A new batch whose row i comes from `sources[i]`: a row of `from`, or a sequence that finished
   * prefill. Its past is the longest row, so padding common to all rows disappears.
   */
  static compose(shape: KvShape, from: BatchKv | null, sources: readonly KvSource[]): BatchKv {
    const lens = sources.map((s) => ('seq' in s ? s.seq.len : rowLen(from, s.batchRow)));
    const past = lens.reduce((a, b) => Math.max(a, b), 0);
    const { kvHeads: H, headDim: D } = shape;
    const layers: LayerKv[] = [];
    for (let l = 0; l < shape.layers; l++) {
      const key = allocModel(shape.dtype, sources.length * H * past * D);
      const value = allocModel(shape.dtype, sources.length * H * past * D);
      sources.forEach((s, b) => {
        const len = lens[b];
        let src: LayerKv;
        let srcRow: number;
        let srcPast: number;
        if ('seq' in s) {
          src = s.seq.layers[l];
          srcRow = 0;
          srcPast = s.seq.len;
        } else {
          src = from!.layers[l];
          srcRow = s.batchRow;
          srcPast = from!.past;
        }
        for (let h = 0; h < H; h++) {
          const so = ((srcRow * H + h) * srcPast + (srcPast - len)) * D;
          const d = ((b * H + h) * past + (past - len)) * D;
          key.set(src.key.subarray(so, so + len * D), d);
          value.set(src.value.subarray(so, so + len * D), d);
        }
      });
      layers.push({ key, value });
    }
    return new BatchKv(shape, past, lens, layers);
  }

  /** After a decode step: the presents ([rows, H, past + 1, D]) are the new cache, no copy. */
  advance(presents: LayerKv[]): BatchKv {
    const expected = this.rows * this.shape.kvHeads * (this.past + 1) * this.shape.headDim;
    for (const p of presents) {
      if (p.key.length !== expected || p.value.length !== expected) {
        throw new Error(`present has ${p.key.length} elements, expected ${expected}`);
      }
    }
    return new BatchKv(
      this.shape,
      this.past + 1,
      this.lens.map((n) => n + 1),
      presents,
    );
  }
}

function rowLen(from: BatchKv | null, row: number): number {
  if (!from || row < 0 || row >= from.rows) throw new Error(`no row ${row} in the running batch`);
  return from.lens[row];
}
