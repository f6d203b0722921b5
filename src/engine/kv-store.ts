import { Tensor } from 'onnxruntime-node';
import type { DeviceTensor } from '../runtime/capi-session.js';
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
/**
 * A tensor a run is fed or writes: a host Tensor, or memory the C-API runner allocated (a
 * DeviceTensor: CUDA memory on cuda, onnxruntime's own host memory on cpu). Only the gqa store's
 * cache views are ever DeviceTensors, and only with capiKvBuffers (engine/device-kv.ts), which the
 * worker pairs with the C-API runner.
 */
export type KvTensor = Tensor | DeviceTensor;
/** host feeds (everything but a gqa store's cache views) */
export type Feeds = Record<string, Tensor>;
/** a step's feeds: host tensors, and the store's cache views of type V (DeviceTensor with capiKvBuffers) */
export type StepFeeds<V extends KvTensor = Tensor> = Record<string, Tensor | V>;

/** positions [0, len) of one slot, every layer: one prompt prefilled for several rows (OpenAI's `n`) */
export interface KvPrefix {
  readonly len: number;
}

export interface KvStore<V extends KvTensor = Tensor> {
  readonly contract: EngineKv;
  /** the cache is the runtime's own memory (capiKvBuffers: device memory on cuda), so its views never cross (transfer.ts deviceCache) */
  readonly runtimeMemory: boolean;
  /** bytes the cache holds */
  readonly bytes: number;
  /** a slot for a new row (its handle until `release`); throws when every slot is held */
  acquire(): number;
  release(slot: number): void;
  /** makes room for positions [0, len) in every slot (GqaKv copies held rows into larger buffers: async) */
  reserve(len: number): void | Promise<void>;
  /**
   * The order a decode step over `slots` must run its rows in (indices into `slots`): the resident
   * store takes any order; GqaKv needs row b to be the b-th slot of one contiguous range and may
   * move rows to make it so.
   */
  order(slots: readonly number[]): number[] | Promise<number[]>;
  /** the cache's feeds of a step: row b in slots[b] with lens[b] cached tokens and S new ones */
  step(slots: readonly number[], lens: readonly number[], S: number): StepFeeds<V>;
  /**
   * The outputs of a run with `feeds` that the runtime must write into pre-allocated tensors (its
   * `fetches`); empty for the resident store, whose graph outputs only the new keys and values.
   */
  bound(feeds: Readonly<StepFeeds<V>>): Record<string, Tensor | V>;
  /** after the run: what the graph returned for row b goes to positions [starts[b], starts[b] + S) */
  write(outputs: Readonly<Record<string, Tensor>>, slots: readonly number[], starts: readonly number[], S: number): void;
  snapshot(slot: number, len: number): KvPrefix | Promise<KvPrefix>;
  /** writes a snapshot into positions [0, prefix.len) of `slot`; call `reserve` first */
  restore(prefix: KvPrefix, slot: number): void | Promise<void>;
  /** frees a snapshot no one will restore any more (device memory is not garbage-collected) */
  drop(prefix: KvPrefix): void;
  /** one slot's keys or values of one layer as [kvHeads, len, headDim] (tests, debugging) */
  read(layer: number, which: 'key' | 'value', slot: number, len: number): ModelArray | Promise<ModelArray>;
  /** frees the cache's buffers; the store is unusable after */
  dispose(): void;
}

/**
 * Where GqaKv's buffers live and how they are copied: the default holds typed arrays in host
 * memory (onnxruntime-node wraps them); the C-API runner supplies memory of its own
 * (capiKvBuffers, engine/device-kv.ts: CUDA memory on cuda). Every tensor here is
 * [slots, kvHeads, ctx, headDim]. Copies happen only when rows move, the cache grows, or a prefix
 * is snapshotted/restored — never per step — so they may be asynchronous runs of the runtime.
 */
export interface KvBuffers<B extends KvTensor = KvTensor> {
  /**
   * true when the buffers are the runtime's own memory (DeviceTensors), bound to a run without
   * any copy whatever the provider; false for host typed arrays, which onnxruntime-node copies to
   * a CUDA device per run (transfer.ts counts the cache accordingly)
   */
  readonly runtimeMemory: boolean;
  allocate(dtype: ModelDtype, dims: readonly number[]): B;
  /** slots [from, to) of `buffer` as a tensor sharing its memory */
  view(buffer: B, from: number, to: number): B;
  /**
   * positions [0, len) of every head of src's slot `srcSlot` into dst's slot `dstSlot` (ctx may
   * differ), for every pair of `moves`; as one batch, so a runner can copy them in few runs
   */
  copy(moves: readonly KvCopy<B>[], len: number): void | Promise<void>;
  /** a buffer's whole contents in host memory */
  download(buffer: B): ModelArray | Promise<ModelArray>;
  /** frees a buffer made by `allocate`, and every view of it (no-op for garbage-collected memory) */
  dispose(buffer: B): void;
}

export interface KvCopy<B> {
  readonly src: B;
  readonly srcSlot: number;
  readonly dst: B;
  readonly dstSlot: number;
}

/** the checks every KvBuffers.copy makes: `len` positions fit both buffers, slots in range */
export function checkKvCopy(src: readonly number[], srcSlot: number, dst: readonly number[], dstSlot: number, len: number): void {
  const [srcSlots, heads, srcCtx, hd] = src as [number, number, number, number];
  const [dstSlots, dstHeads, dstCtx, dstHd] = dst as [number, number, number, number];
  if (heads !== dstHeads || hd !== dstHd) throw new Error(`a KV copy between buffers of [${src.join(', ')}] and [${dst.join(', ')}]: heads or head size differ`);
  if (!Number.isInteger(len) || len < 0 || len > srcCtx || len > dstCtx) throw new Error(`${len} positions do not fit buffers of ${srcCtx} and ${dstCtx}`);
  if (srcSlot < 0 || srcSlot >= srcSlots || dstSlot < 0 || dstSlot >= dstSlots) throw new Error(`KV copy from slot ${srcSlot} of ${srcSlots} into slot ${dstSlot} of ${dstSlots}: out of range`);
}

export const hostKvBuffers: KvBuffers<Tensor> = {
  runtimeMemory: false,
  allocate(dtype, dims) {
    return new Tensor(tensorType(dtype), allocModel(dtype, dims.reduce((a, b) => a * b, 1)), dims);
  },
  view(buffer, from, to) {
    const [slots, heads, ctx, hd] = buffer.dims as [number, number, number, number];
    if (from < 0 || to > slots || from >= to) throw new Error(`slots [${from}, ${to}) are not inside a buffer of ${slots}`);
    const per = heads * ctx * hd;
    return new Tensor(buffer.type as 'float32' | 'float16', hostData(buffer).subarray(from * per, to * per), [to - from, heads, ctx, hd]);
  },
  copy(moves, len) {
    for (const { src, srcSlot, dst, dstSlot } of moves) {
      checkKvCopy(src.dims, srcSlot, dst.dims, dstSlot, len);
      const [, heads, srcCtx, hd] = src.dims as [number, number, number, number];
      const dstCtx = dst.dims[2]!;
      const s = hostData(src);
      const d = hostData(dst);
      for (let h = 0; h < heads; h++) {
        const from = (srcSlot * heads + h) * srcCtx * hd;
        d.set(s.subarray(from, from + len * hd), (dstSlot * heads + h) * dstCtx * hd);
      }
    }
  },
  download: hostData,
  dispose() {},
};

function hostData(t: Tensor): ModelArray {
  const d = t.data as unknown;
  if (!(d instanceof Float32Array) && !(d instanceof Uint16Array)) throw new Error('a host KV buffer holds a Float32Array or Uint16Array');
  return d;
}

interface GqaPrefix<B> extends KvPrefix {
  readonly keys: readonly B[];
  readonly values: readonly B[];
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
export class GqaKv<B extends KvTensor = Tensor> implements KvStore<B> {
  readonly contract = 'gqa' as const;
  get runtimeMemory(): boolean {
    return this.buffers.runtimeMemory;
  }
  private readonly keys: B[] = [];
  private readonly values: B[] = [];
  /** handle → physical slot, -1 when free */
  private readonly at: number[];
  /** physical slot → handle, -1 when free (the scratch slot is never held) */
  private readonly holder: number[];
  /** cached positions per handle (from `write`), so a move copies only those */
  private readonly lens: number[];
  private readonly scratch: number;
  /** the snapshots this store made and has not dropped (a prefix is restored only into its own store) */
  private readonly prefixes = new Set<GqaPrefix<B>>();
  private cap: number;
  /** slot moves made by `order` (tests: they must stay one per ended request, not per step) */
  moves = 0;

  constructor(
    readonly shape: KvShape,
    readonly slots: number,
    /** the context length: no slot ever holds more */
    readonly maxLen: number,
    private readonly buffers: KvBuffers<B>,
    initialCapacity = INITIAL_CAPACITY,
  ) {
    if (!Number.isInteger(slots) || slots < 1) throw new Error(`a KV cache needs at least one slot, got ${slots}`);
    this.scratch = slots;
    this.at = new Array<number>(slots).fill(-1);
    this.holder = new Array<number>(slots + 1).fill(-1);
    this.lens = new Array<number>(slots).fill(0);
    this.cap = Math.max(1, Math.min(initialCapacity, maxLen));
    // Fresh buffers hold whatever the allocator left there (onnxruntime's allocator does not zero
    // them). That never reaches attention: GroupQueryAttention reads a row's positions
    // [0, seqlens_k] only, which are the ones earlier steps (or a copy) wrote, plus this step's.
    for (let l = 0; l < shape.layers; l++) {
      this.keys.push(this.allocate(this.cap));
      this.values.push(this.allocate(this.cap));
    }
  }

  private allocate(cap: number): B {
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

  async reserve(len: number): Promise<void> {
    if (len > this.maxLen) throw new Error(`${len} positions do not fit a context of ${this.maxLen}`);
    if (len <= this.cap) return;
    let cap = this.cap;
    while (cap < len) cap *= 2;
    cap = Math.min(cap, this.maxLen);
    const keys = this.keys.map(() => this.allocate(cap));
    const values = this.values.map(() => this.allocate(cap));
    try {
      // one batch per length: a runner copies each batch in a few runs, not one per slot and layer
      const byLen = new Map<number, KvCopy<B>[]>();
      this.holder.forEach((h, slot) => {
        const n = h >= 0 ? this.lens[h]! : 0;
        if (n === 0) return;
        const batch = byLen.get(n) ?? [];
        for (let l = 0; l < this.shape.layers; l++) {
          batch.push({ src: this.keys[l]!, srcSlot: slot, dst: keys[l]!, dstSlot: slot }, { src: this.values[l]!, srcSlot: slot, dst: values[l]!, dstSlot: slot });
        }
        byLen.set(n, batch);
      });
      for (const [n, batch] of byLen) await this.buffers.copy(batch, n);
    } catch (e) {
      for (const b of [...keys, ...values]) this.buffers.dispose(b);
      throw e;
    }
    for (const b of [...this.keys, ...this.values]) this.buffers.dispose(b);
    this.keys.splice(0, this.keys.length, ...keys);
    this.values.splice(0, this.values.length, ...values);
    this.cap = cap;
  }

  async order(handles: readonly number[]): Promise<number[]> {
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
        await this.move(other, free >= 0 ? free : this.scratch);
      }
      await this.move(h, to);
      if (other >= 0 && this.at[other] === this.scratch) await this.move(other, from);
    }
    return handles.map((_, i) => i).sort((a, b) => this.at[handles[a]!]! - this.at[handles[b]!]!);
  }

  private async move(handle: number, to: number): Promise<void> {
    const from = this.slotOf(handle);
    const len = this.lens[handle]!;
    if (len > 0) await this.buffers.copy(this.layerCopies(this.keys, from, this.keys, to).concat(this.layerCopies(this.values, from, this.values, to)), len);
    this.holder[from] = -1;
    this.holder[to] = handle;
    this.at[handle] = to;
    this.moves++;
  }

  /** one copy per layer: slot `srcSlot` of src[l] into slot `dstSlot` of dst[l] */
  private layerCopies(src: readonly B[], srcSlot: number, dst: readonly B[], dstSlot: number): KvCopy<B>[] {
    return src.map((s, l) => ({ src: s, srcSlot, dst: dst[l]!, dstSlot }));
  }

  private slotOf(handle: number): number {
    const s = this.at[handle];
    if (s === undefined || s < 0) throw new Error(`KV slot ${handle} is not held`);
    return s;
  }

  step(handles: readonly number[], lens: readonly number[], S: number): StepFeeds<B> {
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
    const feeds: StepFeeds<B> = { [KV_SEQLENS]: new Tensor('int32', seqlens, [n]), [KV_TOTAL]: new Tensor('int32', Int32Array.of(total), []) };
    for (let l = 0; l < this.shape.layers; l++) {
      feeds[kvCacheKeyName(l)] = this.buffers.view(this.keys[l]!, first, first + n);
      feeds[kvCacheValueName(l)] = this.buffers.view(this.values[l]!, first, first + n);
    }
    return feeds;
  }

  /** each present output is the very tensor fed as its past: onnxruntime sees one pointer and writes in place */
  bound(feeds: Readonly<StepFeeds<B>>): Record<string, Tensor | B> {
    const out: Record<string, Tensor | B> = {};
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

  /** a buffer of one slot holding `len` positions (at least one: a zero-size tensor has no memory to bind) */
  private single(len: number): B {
    return this.buffers.allocate(this.shape.dtype, [1, this.shape.kvHeads, Math.max(1, len), this.shape.headDim]);
  }

  async snapshot(handle: number, len: number): Promise<KvPrefix> {
    const from = this.slotOf(handle);
    const keys = this.keys.map(() => this.single(len));
    const values = this.values.map(() => this.single(len));
    const prefix: GqaPrefix<B> = { len, keys, values };
    try {
      await this.buffers.copy(this.layerCopies(this.keys, from, keys, 0).concat(this.layerCopies(this.values, from, values, 0)), len);
    } catch (e) {
      for (const b of [...keys, ...values]) this.buffers.dispose(b);
      throw e;
    }
    this.prefixes.add(prefix);
    return prefix;
  }

  async restore(prefix: KvPrefix, handle: number): Promise<void> {
    const own = this.own(prefix);
    const to = this.slotOf(handle);
    await this.reserve(own.len);
    await this.buffers.copy(this.layerCopies(own.keys, 0, this.keys, to).concat(this.layerCopies(own.values, 0, this.values, to)), own.len);
    this.lens[handle] = own.len;
  }

  drop(prefix: KvPrefix): void {
    const own = this.own(prefix);
    this.prefixes.delete(own);
    for (const b of [...own.keys, ...own.values]) this.buffers.dispose(b);
  }

  private own(prefix: KvPrefix): GqaPrefix<B> {
    for (const p of this.prefixes) if (p === prefix) return p;
    throw new Error('a KV snapshot of another store (or one already dropped)');
  }

  async read(layer: number, which: 'key' | 'value', handle: number, len: number): Promise<ModelArray> {
    const src = (which === 'key' ? this.keys : this.values)[layer];
    if (!src) throw new Error(`the cache has no layer ${layer}`);
    const t = this.single(len);
    try {
      await this.buffers.copy([{ src, srcSlot: this.slotOf(handle), dst: t, dstSlot: 0 }], len);
      const data = await this.buffers.download(t);
      return data.subarray(0, this.shape.kvHeads * len * this.shape.headDim);
    } finally {
      this.buffers.dispose(t);
    }
  }

  dispose(): void {
    for (const p of this.prefixes) this.drop(p);
    for (const b of [...this.keys, ...this.values]) this.buffers.dispose(b);
    this.keys.length = 0;
    this.values.length = 0;
  }
}

/**
 * The store for a graph's contract (manifest.kv). `buffers` places GqaKv's cache (default: host
 * typed arrays); the resident store always lives in host memory.
 */
export function kvStoreFor(manifest: Pick<Manifest, 'kv' | 'architecture' | 'dtype'>, slots: number, maxLen: number, opts?: { initialCapacity?: number }): KvStore;
export function kvStoreFor<B extends KvTensor>(manifest: Pick<Manifest, 'kv' | 'architecture' | 'dtype'>, slots: number, maxLen: number, opts: { initialCapacity?: number; buffers?: KvBuffers<B> }): KvStore<B | Tensor>;
export function kvStoreFor<B extends KvTensor>(manifest: Pick<Manifest, 'kv' | 'architecture' | 'dtype'>, slots: number, maxLen: number, opts: { initialCapacity?: number; buffers?: KvBuffers<B> } = {}): KvStore<B | Tensor> {
  const a = manifest.architecture;
  const shape: KvShape = { layers: a.numLayers, kvHeads: a.numKvHeads, headDim: a.headDim, dtype: manifest.dtype };
  if (manifest.kv === 'gqa') return opts.buffers ? new GqaKv(shape, slots, maxLen, opts.buffers, opts.initialCapacity) : new GqaKv(shape, slots, maxLen, hostKvBuffers, opts.initialCapacity);
  if (manifest.kv === 'resident') return new ResidentKv(shape, slots, maxLen, opts.initialCapacity);
  throw new Error(`this graph was built with the ${manifest.kv ?? 'concat'} KV contract; the engine serves graphs built with kv: resident or gqa (rebuild the model)`);
}
