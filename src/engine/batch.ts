import { Tensor } from 'onnxruntime-node';
import type { EngineEmbedding } from '../adapters/convert.js';
import { hasRowEmbeddings, type Manifest, type ModelDtype } from '../model/manifest.js';
import { allocModel, tensorType, type ModelArray } from './dtype.js';
import type { KvShape } from './kv.js';
import type { Feeds, KvStore, KvTensor, StepFeeds } from './kv-store.js';
import { LoraVectorFeeds, type LoraVectors } from './lora-vectors.js';
import { embedFeedsFor, neutralEmbedFeeds, type EmbedFeeds } from './embed-rows.js';

/**
 * Feeds for one run of the engine's graph (resident or gqa KV contract): token ids, positions,
 * every LoRA target's A/B, the per-row embedding inputs, and what the KV store feeds (views of the
 * cache and O(rows) lengths). Nothing here grows with the context: the mask is built inside the
 * graph (resident) or by GroupQueryAttention (gqa) from the lengths.
 */
export type { Feeds };

/** One adapter module in the model's dtype: A [in, rank], B [rank, out] (scale folded into B), maybe DoRA's factor and lora_B's bias. */
export interface LoraModule extends LoraVectors {
  rank: number;
  A: ModelArray;
  B: ModelArray;
}

/** An adapter version resident in the worker; `modules` is indexed like manifest.loraTargets. */
export interface ResidentAdapter {
  readonly versionId: string;
  readonly modules: readonly (LoraModule | null)[];
  /** embedding LoRA, trainable tokens, saved embed_tokens / lm_head (embed-rows.ts, head.ts) */
  readonly embedding?: EngineEmbedding | null;
}

export function kvShapeOf(manifest: Manifest): KvShape {
  const a = manifest.architecture;
  return { layers: a.numLayers, kvHeads: a.numKvHeads, headDim: a.headDim, dtype: manifest.dtype };
}

/** One target's A/B for mixed decode steps: capRows × capRank allocated, rows × rank live. */
interface SlotBuffers {
  A: ModelArray;
  B: ModelArray;
  capRows: number;
  capRank: number;
  /** the rank the live rows are laid out with; 0 → the last step fed the base (nothing live) */
  rank: number;
}

/** Row b of a [rows, in, r] / [rows, r, out] pair: the module zero-padded to r, or all zeros. */
function writeSlot(s: SlotBuffers, b: number, r: number, inF: number, outF: number, m: LoraModule | null): void {
  const a0 = b * inF * r;
  const b0 = b * r * outF;
  if (!m) {
    s.A.fill(0, a0, a0 + inF * r);
    s.B.fill(0, b0, b0 + r * outF);
    return;
  }
  if (m.rank === r) {
    s.A.set(m.A, a0);
  } else {
    s.A.fill(0, a0, a0 + inF * r);
    for (let k = 0; k < inF; k++) s.A.set(m.A.subarray(k * m.rank, (k + 1) * m.rank), a0 + k * r);
  }
  s.B.set(m.B, b0);
  if (m.rank < r) s.B.fill(0, b0 + m.rank * outF, b0 + r * outF);
}

export class FeedBuilder {
  private readonly dtype: ModelDtype;
  private readonly type: 'float32' | 'float16';
  /** r = 0 for every target: exact, and the same as a graph without LoRA */
  private readonly baseLora: Feeds;
  /** batch-1 (broadcast) feeds of each adapter, built once and shared by every step that can use them */
  private readonly single = new WeakMap<ResidentAdapter, Feeds>();
  private lastRows: readonly (ResidentAdapter | null)[] = [];
  private lastLora: Feeds | null = null;
  /** per target (indexed like targets): the mixed-step buffers, allocated on first use */
  private readonly slots: (SlotBuffers | undefined)[] = [];
  /** the adapter written into each live slot row (every target with rank > 0 agrees) */
  private held: readonly (ResidentAdapter | null)[] = [];

  /** graphs built without LoRA inputs (manifest.lora false) get no LoRA feeds at all */
  private readonly targets: Manifest['loraTargets'];
  private readonly vectors: LoraVectorFeeds;
  /** the graph's per-row embedding inputs at their neutral values; null when it has none */
  private readonly neutralEmbed: EmbedFeeds | null;
  private readonly hidden: number;
  /** the base's vocabulary: ids at or above it (an adapter's added tokens) are gathered as 0, their rows come from embed_rows */
  private readonly vocab: number;

  /** @param maxBatch rows the mixed-step buffers are sized for (they grow if a step has more) */
  constructor(
    manifest: Manifest,
    private readonly maxBatch = 1,
  ) {
    this.targets = manifest.lora ? manifest.loraTargets : [];
    this.dtype = manifest.dtype;
    this.type = tensorType(manifest.dtype);
    this.hidden = manifest.architecture.hiddenSize;
    this.vocab = manifest.architecture.vocabSize;
    this.neutralEmbed = hasRowEmbeddings(manifest) ? neutralEmbedFeeds(manifest.dtype, this.hidden) : null;
    this.baseLora = {};
    for (const t of this.targets) {
      this.baseLora[t.inputA] = this.tensor(allocModel(this.dtype, 0), [1, t.inFeatures, 0]);
      this.baseLora[t.inputB] = this.tensor(allocModel(this.dtype, 0), [1, 0, t.outFeatures]);
    }
    this.vectors = new LoraVectorFeeds(manifest, this.targets);
    this.vectors.single(null, this.baseLora);
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
      this.vectors.single(adapter.modules, f);
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

  /**
   * Mixed rows, assembled incrementally: each target keeps one A and one B buffer sized for
   * maxBatch rows at its padded rank, laid out [rows, in, r] / [rows, r, out] so the live rows are
   * a prefix and the tensors are views of it. A row is (re)written only when the adapter in its
   * slot changes (it joined, or rows after a leaver shifted down: the scheduler compacts in
   * order) or when the target's step rank changes (the layout changes: every row). Each write
   * defines the whole slice, zeros included, so nothing depends on what a slot held before.
   */
  private gather(rows: readonly (ResidentAdapter | null)[]): Feeds {
    const f: Feeds = {};
    const n = rows.length;
    // what the slots hold is unknown until every target has been written (a throw midway)
    const held = this.held;
    this.held = [];
    this.targets.forEach((t, i) => {
      let r = 0;
      for (const row of rows) r = Math.max(r, row?.modules[i]?.rank ?? 0);
      let s = this.slots[i];
      if (r === 0) {
        if (s) s.rank = 0;
        f[t.inputA] = this.baseLora[t.inputA];
        f[t.inputB] = this.baseLora[t.inputB];
        return;
      }
      let all = !s || s.rank !== r;
      if (!s || n > s.capRows || r > s.capRank) {
        const capRows = Math.max(n, this.maxBatch, s?.capRows ?? 0);
        // geometric, so a run of slightly larger ranks does not reallocate each time
        const capRank = !s ? r : r > s.capRank ? Math.max(r, 2 * s.capRank) : s.capRank;
        s = {
          A: allocModel(this.dtype, capRows * t.inFeatures * capRank),
          B: allocModel(this.dtype, capRows * capRank * t.outFeatures),
          capRows,
          capRank,
          rank: r,
        };
        this.slots[i] = s;
        all = true;
      }
      s.rank = r;
      for (let b = 0; b < n; b++) {
        if (all || held[b] !== rows[b]) writeSlot(s, b, r, t.inFeatures, t.outFeatures, rows[b]?.modules[i] ?? null);
      }
      f[t.inputA] = this.tensor(s.A.subarray(0, n * t.inFeatures * r), [n, t.inFeatures, r]);
      f[t.inputB] = this.tensor(s.B.subarray(0, n * r * t.outFeatures), [n, r, t.outFeatures]);
    });
    this.vectors.rows(rows, f);
    // only live rows are remembered: a freed adapter is never kept alive by a stale slot
    this.held = [...rows];
    return f;
  }

  /** Forget the cached decode composition (its adapters may be freed). */
  resetRows(): void {
    this.lastRows = [];
    this.lastLora = null;
    this.held = [];
  }

  /** The step's per-row embedding inputs (embed-rows.ts); nothing for a graph without them. */
  private embedRows(tokens: readonly (readonly number[])[], adapters: readonly (ResidentAdapter | null)[]): Partial<EmbedFeeds> {
    if (!this.neutralEmbed) {
      if (adapters.some((a) => a?.embedding)) throw new Error('this model graph has no per-row embedding inputs (rebuild it with LoRA inputs and the resident KV contract)');
      return {};
    }
    return embedFeedsFor(tokens, adapters, this.dtype, this.hidden) ?? this.neutralEmbed;
  }

  /** A prefill chunk of the row in `slot`: tokens at positions [start, start + n) after its `start` cached ones. */
  prefill<V extends KvTensor = Tensor>(tokens: readonly number[], slot: number, start: number, kv: KvStore<V>, adapter: ResidentAdapter | null): StepFeeds<V> {
    const n = tokens.length;
    const ids = new BigInt64Array(n);
    const pos = new BigInt64Array(n);
    for (let i = 0; i < n; i++) {
      ids[i] = BigInt(tokens[i]! < this.vocab ? tokens[i]! : 0);
      pos[i] = BigInt(start + i);
    }
    return {
      input_ids: new Tensor('int64', ids, [1, n]),
      position_ids: new Tensor('int64', pos, [1, n]),
      ...this.loraForOne(adapter),
      ...this.embedRows([tokens], [adapter]),
      ...kv.step([slot], [start], n),
    };
  }

  /**
   * A decode step: one token per row, row b in slot slots[b] with lens[b] cached tokens (in the
   * order the store asked for: KvStore.order). Each row attends to its own length only.
   */
  decode<V extends KvTensor = Tensor>(tokens: readonly number[], slots: readonly number[], lens: readonly number[], kv: KvStore<V>, adapters: readonly (ResidentAdapter | null)[]): StepFeeds<V> {
    const n = tokens.length;
    const ids = new BigInt64Array(n);
    const pos = new BigInt64Array(n);
    for (let b = 0; b < n; b++) {
      ids[b] = BigInt(tokens[b]! < this.vocab ? tokens[b]! : 0);
      pos[b] = BigInt(lens[b]);
    }
    return {
      input_ids: new Tensor('int64', ids, [n, 1]),
      position_ids: new Tensor('int64', pos, [n, 1]),
      ...this.loraForRows(adapters),
      ...this.embedRows(
        tokens.map((t) => [t]),
        adapters,
      ),
      ...kv.step(slots, lens, 1),
    };
  }
}

function sameRefs<T>(a: readonly T[], b: readonly T[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
