import { Tensor } from 'onnxruntime-node';
import { pastKeyName, pastValueName, type Manifest, type ModelDtype } from '../model/manifest.js';
import { allocModel, modelScalar, tensorType, type ModelArray } from './dtype.js';
import type { BatchKv, KvShape, SeqKv } from './kv.js';

/**
 * Feeds for one run of the graph (DESIGN.md "The model graph contract"): token ids, positions,
 * the additive attention bias that expresses both causality and left padding, the past KV, and
 * every LoRA target's A/B.
 */
export type Feeds = Record<string, Tensor>;

/** One adapter module in the model's dtype: A [in, rank], B [rank, out] (scale folded into B). */
export interface LoraModule {
  rank: number;
  A: ModelArray;
  B: ModelArray;
}

/** An adapter version resident in the worker; `modules` is indexed like manifest.loraTargets. */
export interface ResidentAdapter {
  readonly versionId: string;
  readonly modules: readonly (LoraModule | null)[];
}

export function kvShapeOf(manifest: Manifest): KvShape {
  const a = manifest.architecture;
  return { layers: a.numLayers, kvHeads: a.numKvHeads, headDim: a.headDim, dtype: manifest.dtype };
}

export class FeedBuilder {
  private readonly dtype: ModelDtype;
  private readonly type: 'float32' | 'float16';
  private readonly kv: KvShape;
  private readonly mask: number;
  /** r = 0 for every target: exact, and the same as a graph without LoRA */
  private readonly baseLora: Feeds;
  /** batch-1 (broadcast) feeds of each adapter, built once and shared by every step that can use them */
  private readonly single = new WeakMap<ResidentAdapter, Feeds>();
  private lastRows: readonly (ResidentAdapter | null)[] = [];
  private lastLora: Feeds | null = null;

  /** graphs built without LoRA inputs (manifest.lora false) get no LoRA feeds at all */
  private readonly targets: Manifest['loraTargets'];

  constructor(manifest: Manifest) {
    this.targets = manifest.lora ? manifest.loraTargets : [];
    this.dtype = manifest.dtype;
    this.type = tensorType(manifest.dtype);
    this.kv = kvShapeOf(manifest);
    this.mask = modelScalar(manifest.dtype, manifest.maskValue);
    this.baseLora = {};
    for (const t of this.targets) {
      this.baseLora[t.inputA] = this.tensor(allocModel(this.dtype, 0), [1, t.inFeatures, 0]);
      this.baseLora[t.inputB] = this.tensor(allocModel(this.dtype, 0), [1, 0, t.outFeatures]);
    }
  }

  private tensor(data: ModelArray, dims: number[]): Tensor {
    return new Tensor(this.type, data, dims);
  }

  /** LoRA feeds of a batch-1 run (a prefill chunk). */
  loraForOne(adapter: ResidentAdapter | null): Feeds {
    if (!adapter) return this.baseLora;
    let f = this.single.get(adapter);
    if (!f) {
      f = {};
      this.targets.forEach((t, i) => {
        const m = adapter.modules[i];
        f![t.inputA] = m ? this.tensor(m.A, [1, t.inFeatures, m.rank]) : this.baseLora[t.inputA];
        f![t.inputB] = m ? this.tensor(m.B, [1, m.rank, t.outFeatures]) : this.baseLora[t.inputB];
      });
      this.single.set(adapter, f);
    }
    return f;
  }

  /**
   * LoRA feeds of a decode step, one entry per row. One adapter (or none) for all rows → the
   * batch-1 tensors broadcast over the batch, nothing copied. Mixed rows → per-row [rows, in, r]
   * / [rows, r, out] with r the largest rank of the step for that target, smaller ranks and rows
   * without the module zero-padded (zero columns add nothing). Reused while the rows' adapters
   * stay the same.
   */
  loraForRows(rows: readonly (ResidentAdapter | null)[]): Feeds {
    if (this.lastLora && sameRefs(rows, this.lastRows)) return this.lastLora;
    const first = rows[0] ?? null;
    const feeds = rows.every((r) => r === first) ? this.loraForOne(first) : this.gather(rows);
    this.lastRows = [...rows];
    this.lastLora = feeds;
    return feeds;
  }

  private gather(rows: readonly (ResidentAdapter | null)[]): Feeds {
    const f: Feeds = {};
    const n = rows.length;
    this.targets.forEach((t, i) => {
      const mods = rows.map((r) => r?.modules[i] ?? null);
      const r = mods.reduce((m, x) => Math.max(m, x?.rank ?? 0), 0);
      if (r === 0) {
        f[t.inputA] = this.baseLora[t.inputA];
        f[t.inputB] = this.baseLora[t.inputB];
        return;
      }
      const inF = t.inFeatures;
      const outF = t.outFeatures;
      const A = allocModel(this.dtype, n * inF * r);
      const B = allocModel(this.dtype, n * r * outF);
      mods.forEach((m, b) => {
        if (!m) return;
        if (m.rank === r) {
          A.set(m.A, b * inF * r);
        } else {
          for (let k = 0; k < inF; k++) A.set(m.A.subarray(k * m.rank, (k + 1) * m.rank), (b * inF + k) * r);
        }
        B.set(m.B, b * r * outF);
      });
      f[t.inputA] = this.tensor(A, [n, inF, r]);
      f[t.inputB] = this.tensor(B, [n, r, outF]);
    });
    return f;
  }

  /** Forget the cached decode composition (its adapters may be freed). */
  resetRows(): void {
    this.lastRows = [];
    this.lastLora = null;
  }

  /** A prefill chunk: tokens at positions [start, start + n) on top of `seq` (start tokens). */
  prefill(tokens: readonly number[], seq: SeqKv, adapter: ResidentAdapter | null): Feeds {
    const n = tokens.length;
    const start = seq.len;
    const total = start + n;
    const ids = new BigInt64Array(n);
    const pos = new BigInt64Array(n);
    for (let i = 0; i < n; i++) {
      ids[i] = BigInt(tokens[i]);
      pos[i] = BigInt(start + i);
    }
    // causal: query i (at position start + i) sees keys 0 … start + i
    const bias = allocModel(this.dtype, n * total);
    for (let i = 0; i < n; i++) bias.fill(this.mask, i * total + start + i + 1, (i + 1) * total);
    const feeds: Feeds = {
      input_ids: new Tensor('int64', ids, [1, n]),
      position_ids: new Tensor('int64', pos, [1, n]),
      attention_bias: this.tensor(bias, [1, 1, n, total]),
      ...this.loraForOne(adapter),
    };
    const { kvHeads: H, headDim: D } = this.kv;
    seq.layers.forEach((l, i) => {
      feeds[pastKeyName(i)] = this.tensor(l.key, [1, H, start, D]);
      feeds[pastValueName(i)] = this.tensor(l.value, [1, H, start, D]);
    });
    return feeds;
  }

  /** A decode step: one token per row, each at its own next position, padding masked. */
  decode(tokens: readonly number[], kv: BatchKv, adapters: readonly (ResidentAdapter | null)[]): Feeds {
    const n = tokens.length;
    const total = kv.past + 1;
    const ids = new BigInt64Array(n);
    const pos = new BigInt64Array(n);
    const bias = allocModel(this.dtype, n * total);
    for (let b = 0; b < n; b++) {
      ids[b] = BigInt(tokens[b]);
      pos[b] = BigInt(kv.lens[b]);
      bias.fill(this.mask, b * total, b * total + kv.pad(b));
    }
    const feeds: Feeds = {
      input_ids: new Tensor('int64', ids, [n, 1]),
      position_ids: new Tensor('int64', pos, [n, 1]),
      attention_bias: this.tensor(bias, [n, 1, 1, total]),
      ...this.loraForRows(adapters),
    };
    const { kvHeads: H, headDim: D } = this.kv;
    kv.layers.forEach((l, i) => {
      feeds[pastKeyName(i)] = this.tensor(l.key, [n, H, kv.past, D]);
      feeds[pastValueName(i)] = this.tensor(l.value, [n, H, kv.past, D]);
    });
    return feeds;
  }
}

function sameRefs<T>(a: readonly T[], b: readonly T[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
