import { Tensor } from 'onnxruntime-node';
import { kvCacheKeyName, kvCacheValueName, kvPresentKeyName, kvPresentValueName, KV_SEQLENS, KV_TOTAL, type EngineKv, type Manifest, type ModelDtype } from '../model/manifest.js';
import { allocModel, tensorType, type ModelArray } from './dtype.js';
import { INITIAL_CAPACITY, ResidentKv, type KvShape } from './kv.js';

/**
 * The engine's KV cache behind one interface, whichever contract the graph was built with
 * (manifest.kv): `ResidentKv` (engine/kv.ts, plain-ops attention, the graph returns only the new
 * keys/values and JS writes them back) or `GqaKv` (below, GroupQueryAttention writes the cache in
 * place). The engine core and the probe speak only this.
 *
 * A row is known by the slot `acquire` gave it, for its whole life; where its keys physically
 * sit is the store's business (GqaKv moves rows, see there).
 */
export type Feeds = Record<string, Tensor>;

/** positions [0, len) of one slot, every layer: one prompt prefilled for several rows (OpenAI's `n`) */
export interface KvPrefix {
  readonly len: number;
}

export interface KvStore {
  readonly contract: EngineKv;
  /** bytes the cache holds */
  readonly bytes: number;
  /** a slot for a new row (its handle until `release`); throws when every slot is held */
  acquire(): number;
  release(slot: number): void;
  /** makes room for positions [0, len) in every slot */
  reserve(len: number): void;
  /**
   * The order a decode step over `slots` must run its rows in (indices into `slots`): the resident
   * store takes any order; GqaKv needs row b to be the b-th slot of one contiguous range and may
   * move rows to make it so.
   */
  order(slots: readonly number[]): number[];
  /** the cache's feeds of a step: row b in slots[b] with lens[b] cached tokens and S new ones */
  step(slots: readonly number[], lens: readonly number[], S: number): Feeds;
  /**
   * The outputs of a run with `feeds` that the runtime must write into pre-allocated tensors (its
   * `fetches`); empty for the resident store, whose graph outputs only the new keys and values.
   */
  bound(feeds: Readonly<Feeds>): Record<string, Tensor>;
  /** after the run: what the graph returned for row b goes to positions [starts[b], starts[b] + S) */
  write(outputs: Readonly<Record<string, Tensor>>, slots: readonly number[], starts: readonly number[], S: number): void;
  snapshot(slot: number, len: number): KvPrefix;
  /** writes a snapshot into positions [0, prefix.len) of `slot`; call `reserve` first */
  restore(prefix: KvPrefix, slot: number): void;
  /** one slot's keys or values of one layer as [kvHeads, len, headDim] (tests, debugging) */
  read(layer: number, which: 'key' | 'value', slot: number, len: number): ModelArray;
}

/**
 * Where GqaKv's buffers live and how they are copied: the default holds typed arrays in host
 * memory (onnxruntime-node wraps them); a runner with device memory (the C-API runner) supplies
 * its own. Every tensor here is [slots, kvHeads, ctx, headDim].
 */
export interface KvBuffers {
  allocate(dtype: ModelDtype, dims: readonly number[]): Tensor;
  /** slots [from, to) of `buffer` as a tensor sharing its memory */
  view(buffer: Tensor, from: number, to: number): Tensor;
  /** positions [0, len) of every head of src's slot `srcSlot` into dst's slot `dstSlot` (ctx may differ) */
  copy(src: Tensor, srcSlot: number, dst: Tensor, dstSlot: number, len: number): void;
}

export const hostKvBuffers: KvBuffers = {
  allocate(dtype, dims) {
    return new Tensor(tensorType(dtype), allocModel(dtype, dims.reduce((a, b) => a * b, 1)), dims);
  },
  view(buffer, from, to) {
    const [slots, heads, ctx, hd] = buffer.dims as [number, number, number, number];
    if (from < 0 || to > slots || from >= to) throw new Error(`slots [${from}, ${to}) are not inside a buffer of ${slots}`);
    const per = heads * ctx * hd;
    return new Tensor(buffer.type as 'float32' | 'float16', hostData(buffer).subarray(from * per, to * per), [to - from, heads, ctx, hd]);
  },
  copy(src, srcSlot, dst, dstSlot, len) {
    const [, heads, srcCtx, hd] = src.dims as [number, number, number, number];
    const dstCtx = dst.dims[2]!;
    if (len > srcCtx || len > dstCtx) throw new Error(`${len} positions do not fit buffers of ${srcCtx} and ${dstCtx}`);
    const s = hostData(src);
    const d = hostData(dst);
    for (let h = 0; h < heads; h++) {
      const from = ((srcSlot * heads + h) * srcCtx) * hd;
      d.set(s.subarray(from, from + len * hd), ((dstSlot * heads + h) * dstCtx) * hd);
    }
  },
};

function hostData(t: Tensor): ModelArray {
  const d = t.data as unknown;
  if (!(d instanceof Float32Array) && !(d instanceof Uint16Array)) throw new Error('a host KV buffer holds a Float32Array or Uint16Array');
  return d;
}

class GqaPrefix implements KvPrefix {
  constructor(
    readonly len: number,
    readonly keys: readonly Tensor[],
    readonly values: readonly Tensor[],
  ) {}
}

/**
 * The cache of the `gqa` contract (graph/gqa.ts): per layer one key and one value buffer
 * [slots + 1, kvHeads, capacity, headDim], allocated through `buffers`. A step hands
 * GroupQueryAttention a view of the slots it runs as both past and present, and the op writes the
 * step's keys and values into it; nothing is written back from JS.
 *
 * Capacity: allocated once at `initialCapacity` (default 256 positions, or the whole context) and
 * doubled up to the context length when a step needs more (each held slot's cached positions
 * copied over, amortised O(1) per token) — as ResidentKv does, because the whole context at once
 * is MAX_BATCH × max_position_embeddings per layer: tens of GB for a 128k-context model. Pass
 * `initialCapacity = maxLen` for one allocation for the engine's life. (Through onnxruntime-node
 * each step also copies the bound buffers back whole, so that copy follows the capacity too.)
 *
 * Slot-major, so a step's view must be one contiguous range of slots, row b in its b-th slot:
 * - a prefill chunk (batch 1) is the row's own slot, wherever it is;
 * - a decode step over n rows is slots [0, n). `order` makes it so: a running row whose slot is at
 *   or above n moves into a slot below n that no running row holds. Rows never move otherwise, so
 *   the copies are one per request that ends (the last-placed row fills its hole), plus one when a
 *   prompt prefilled into a hole must step aside; never one per step. A copy moves only the row's
 *   cached positions. The extra slot at the end is scratch for the swap when no free slot is left.
 *
 * Handles (what `acquire` returns) stay fixed for a row's life; `at` maps them to physical slots.
 */
export class GqaKv implements KvStore {
  readonly contract = 'gqa' as const;
  private readonly keys: Tensor[] = [];
  private readonly values: Tensor[] = [];
  /** handle → physical slot, -1 when free */
  private readonly at: number[];
  /** physical slot → handle, -1 when free (the scratch slot is never held) */
  private readonly holder: number[];
  /** cached positions per handle (from `write`), so a move copies only those */
  private readonly lens: number[];
  private readonly scratch: number;
  private cap: number;
  /** slot moves made by `order` (tests: they must stay one per ended request, not per step) */
  moves = 0;

  constructor(
    readonly shape: KvShape,
    readonly slots: number,
    /** the context length: no slot ever holds more */
    readonly maxLen: number,
    private readonly buffers: KvBuffers = hostKvBuffers,
    initialCapacity = INITIAL_CAPACITY,
  ) {
    if (!Number.isInteger(slots) || slots < 1) throw new Error(`a KV cache needs at least one slot, got ${slots}`);
    this.scratch = slots;
    this.at = new Array<number>(slots).fill(-1);
    this.holder = new Array<number>(slots + 1).fill(-1);
    this.lens = new Array<number>(slots).fill(0);
    this.cap = Math.max(1, Math.min(initialCapacity, maxLen));
    for (let l = 0; l < shape.layers; l++) {
      this.keys.push(this.allocate(this.cap));
      this.values.push(this.allocate(this.cap));
    }
  }

  private allocate(cap: number): Tensor {
    return this.buffers.allocate(this.shape.dtype, [this.slots + 1, this.shape.kvHeads, cap, this.shape.headDim]);
  }

  /** positions per slot currently allocated */
  get capacity(): number {
    return this.cap;
  }

  get bytes(): number {
    const per = (this.slots + 1) * this.shape.kvHeads * this.cap * this.shape.headDim * (this.shape.dtype === 'fp16' ? 2 : 4);
    return per * this.shape.layers * 2;
  }

  acquire(): number {
    const handle = this.at.indexOf(-1);
    if (handle < 0) throw new Error(`all ${this.slots} KV slots are in use`);
    // the lowest free slot: with no holes that is the one just above the running rows, where a
    // prompt can join the decode batch without moving
    const slot = this.holder.findIndex((h, s) => h < 0 && s < this.scratch);
    this.at[handle] = slot;
    this.holder[slot] = handle;
    this.lens[handle] = 0;
    return handle;
  }

  release(handle: number): void {
    const slot = this.at[handle];
    if (slot === undefined || slot < 0) return;
    this.holder[slot] = -1;
    this.at[handle] = -1;
    this.lens[handle] = 0;
  }

  reserve(len: number): void {
    if (len > this.maxLen) throw new Error(`${len} positions do not fit a context of ${this.maxLen}`);
    if (len <= this.cap) return;
    let cap = this.cap;
    while (cap < len) cap *= 2;
    cap = Math.min(cap, this.maxLen);
    const grow = (old: Tensor) => {
      const next = this.allocate(cap);
      this.holder.forEach((h, slot) => {
        if (h >= 0 && this.lens[h]! > 0) this.buffers.copy(old, slot, next, slot, this.lens[h]!);
      });
      return next;
    };
    for (let l = 0; l < this.shape.layers; l++) {
      this.keys[l] = grow(this.keys[l]!);
      this.values[l] = grow(this.values[l]!);
    }
    this.cap = cap;
  }

  order(handles: readonly number[]): number[] {
    const n = handles.length;
    const inStep = new Set(handles);
    for (const h of handles) {
      const from = this.slotOf(h);
      if (from < n) continue;
      // there is one: fewer than n of the step's rows sit below n while this one does not
      const to = this.holder.findIndex((o, s) => s < n && !inStep.has(o));
      if (to < 0) throw new Error(`the step's ${n} rows are not ${n} distinct held slots`);
      const other = this.holder[to]!;
      if (other >= 0) {
        // a row outside the step (mid-prefill) sits there: to a free slot, or swap through scratch
        const free = this.holder.findIndex((o, s) => o < 0 && s >= n && s < this.scratch);
        this.move(other, free >= 0 ? free : this.scratch);
      }
      this.move(h, to);
      if (other >= 0 && this.at[other] === this.scratch) this.move(other, from);
    }
    return handles.map((_, i) => i).sort((a, b) => this.at[handles[a]!]! - this.at[handles[b]!]!);
  }

  private move(handle: number, to: number): void {
    const from = this.slotOf(handle);
    const len = this.lens[handle]!;
    if (len > 0) {
      for (let l = 0; l < this.shape.layers; l++) {
        this.buffers.copy(this.keys[l]!, from, this.keys[l]!, to, len);
        this.buffers.copy(this.values[l]!, from, this.values[l]!, to, len);
      }
    }
    this.holder[from] = -1;
    this.holder[to] = handle;
    this.at[handle] = to;
    this.moves++;
  }

  private slotOf(handle: number): number {
    const s = this.at[handle];
    if (s === undefined || s < 0) throw new Error(`KV slot ${handle} is not held`);
    return s;
  }

  step(handles: readonly number[], lens: readonly number[], S: number): Feeds {
    const n = handles.length;
    const first = this.slotOf(handles[0]!);
    handles.forEach((h, b) => {
      if (this.slotOf(h) !== first + b) throw new Error('the rows of a GroupQueryAttention step must sit in consecutive slots (call order first)');
    });
    if (n > 1 && S > 1 && lens.some((l) => l > 0)) throw new Error('a step with more than one token per row and a cached past must have one row (GroupQueryAttention)');
    const seqlens = new Int32Array(n);
    let total = 0;
    lens.forEach((len, b) => {
      if (len + S > this.cap) throw new Error(`positions up to ${len + S} are beyond the cache's ${this.cap} (call reserve first)`);
      seqlens[b] = len + S - 1;
      total = Math.max(total, len + S);
    });
    const feeds: Feeds = { [KV_SEQLENS]: new Tensor('int32', seqlens, [n]), [KV_TOTAL]: new Tensor('int32', Int32Array.of(total), []) };
    for (let l = 0; l < this.shape.layers; l++) {
      feeds[kvCacheKeyName(l)] = this.buffers.view(this.keys[l]!, first, first + n);
      feeds[kvCacheValueName(l)] = this.buffers.view(this.values[l]!, first, first + n);
    }
    return feeds;
  }

  /** each present output is the very tensor fed as its past: onnxruntime sees one pointer and writes in place */
  bound(feeds: Readonly<Feeds>): Record<string, Tensor> {
    const out: Record<string, Tensor> = {};
    for (let l = 0; l < this.shape.layers; l++) {
      const k = feeds[kvCacheKeyName(l)];
      const v = feeds[kvCacheValueName(l)];
      if (!k || !v) throw new Error(`the step has no ${kvCacheKeyName(l)} feed`);
      out[kvPresentKeyName(l)] = k;
      out[kvPresentValueName(l)] = v;
    }
    return out;
  }

  /** the op already wrote the keys and values; only the lengths are recorded */
  write(_outputs: Readonly<Record<string, Tensor>>, handles: readonly number[], starts: readonly number[], S: number): void {
    handles.forEach((h, b) => {
      this.slotOf(h);
      this.lens[h] = starts[b]! + S;
    });
  }

  snapshot(handle: number, len: number): KvPrefix {
    const from = this.slotOf(handle);
    const dims = [1, this.shape.kvHeads, Math.max(1, len), this.shape.headDim];
    const take = (src: Tensor) => {
      const t = this.buffers.allocate(this.shape.dtype, dims);
      this.buffers.copy(src, from, t, 0, len);
      return t;
    };
    return new GqaPrefix(len, this.keys.map(take), this.values.map(take));
  }

  restore(prefix: KvPrefix, handle: number): void {
    if (!(prefix instanceof GqaPrefix)) throw new Error('a KV snapshot of another store');
    const to = this.slotOf(handle);
    this.reserve(prefix.len);
    for (let l = 0; l < this.shape.layers; l++) {
      this.buffers.copy(prefix.keys[l]!, 0, this.keys[l]!, to, prefix.len);
      this.buffers.copy(prefix.values[l]!, 0, this.values[l]!, to, prefix.len);
    }
    this.lens[handle] = prefix.len;
  }

  read(layer: number, which: 'key' | 'value', handle: number, len: number): ModelArray {
    const t = this.buffers.allocate(this.shape.dtype, [1, this.shape.kvHeads, Math.max(1, len), this.shape.headDim]);
    this.buffers.copy((which === 'key' ? this.keys : this.values)[layer]!, this.slotOf(handle), t, 0, len);
    return hostData(t).subarray(0, this.shape.kvHeads * len * this.shape.headDim);
  }
}

/**
 * The store for a graph's contract (manifest.kv). `buffers` places GqaKv's cache (default: host
 * typed arrays); the resident store always lives in host memory.
 */
export function kvStoreFor(manifest: Pick<Manifest, 'kv' | 'architecture' | 'dtype'>, slots: number, maxLen: number, opts: { initialCapacity?: number; buffers?: KvBuffers } = {}): KvStore {
  const a = manifest.architecture;
  const shape: KvShape = { layers: a.numLayers, kvHeads: a.numKvHeads, headDim: a.headDim, dtype: manifest.dtype };
  if (manifest.kv === 'gqa') return new GqaKv(shape, slots, maxLen, opts.buffers, opts.initialCapacity);
  if (manifest.kv === 'resident') return new ResidentKv(shape, slots, maxLen, opts.initialCapacity);
  throw new Error(`this graph was built with the ${manifest.kv ?? 'concat'} KV contract; the engine serves graphs built with kv: resident or gqa (rebuild the model)`);
}
