import { Tensor } from 'onnxruntime-node';
import { kvCacheKeyName, kvCacheValueName, kvNewKeyName, kvNewValueName, KV_LENS, KV_ROWS, type ModelDtype } from '../model/manifest.js';
import { allocModel, tensorType, type ModelArray } from './dtype.js';
import type { Feeds, KvPrefix, KvStore } from './kv-store.js';

/**
 * The KV cache of every slot, resident for the engine's life (DESIGN.md "Engine"): per layer one
 * key and one value buffer laid out [capacity, slots, kvHeads, headDim] — position-major, so the
 * prefix [0, past) that a step attends to is one contiguous view that onnxruntime wraps without
 * copying (measured: onnxruntime-node wraps an input typed array's memory as the OrtValue's data).
 * A request holds one slot from its first prefill chunk to its end; its tokens sit at positions
 * [0, len) of that slot, so no row's cache ever moves when others join or leave. A step writes
 * only its own new keys and values (`kv_new.*`, O(rows)) at [len, len + S).
 *
 * Capacity grows by doubling up to the context length rather than being allocated whole up front:
 * a 32k-context model at MAX_BATCH 8 would otherwise pin gigabytes that short requests never use.
 * Position-major makes a grow one contiguous copy of the used prefix, amortised O(1) per token.
 */
export interface KvShape {
  layers: number;
  kvHeads: number;
  headDim: number;
  dtype: ModelDtype;
}

export const INITIAL_CAPACITY = 256;

/** Positions [0, len) of one slot, every layer, each [len, kvHeads, headDim]: see ResidentKv.snapshot. */
class ResidentPrefix implements KvPrefix {
  constructor(
    readonly len: number,
    readonly keys: readonly ModelArray[],
    readonly values: readonly ModelArray[],
  ) {}
}

export class ResidentKv implements KvStore {
  readonly contract = 'resident' as const;
  /** host typed arrays, always */
  readonly runtimeMemory = false;
  private readonly keys: ModelArray[] = [];
  private readonly values: ModelArray[] = [];
  private cap: number;
  /** elements of one position of one slot */
  private readonly width: number;
  /** which slots are held */
  private readonly held: boolean[];

  constructor(
    readonly shape: KvShape,
    readonly slots: number,
    /** the context length: no slot ever holds more */
    readonly maxLen: number,
    initialCapacity = INITIAL_CAPACITY,
  ) {
    if (!Number.isInteger(slots) || slots < 1) throw new Error(`a KV cache needs at least one slot, got ${slots}`);
    this.width = shape.kvHeads * shape.headDim;
    this.cap = Math.max(1, Math.min(initialCapacity, maxLen));
    this.held = new Array<boolean>(slots).fill(false);
    for (let l = 0; l < shape.layers; l++) {
      this.keys.push(allocModel(shape.dtype, this.cap * slots * this.width));
      this.values.push(allocModel(shape.dtype, this.cap * slots * this.width));
    }
  }

  /** positions per slot currently allocated */
  get capacity(): number {
    return this.cap;
  }

  get bytes(): number {
    return this.keys.reduce((n, k) => n + k.byteLength, 0) * 2;
  }

  /** The lowest free slot; throws when every slot is held (the scheduler admits at most `slots`). */
  acquire(): number {
    const s = this.held.indexOf(false);
    if (s < 0) throw new Error(`all ${this.slots} KV slots are in use`);
    this.held[s] = true;
    return s;
  }

  release(slot: number): void {
    this.held[slot] = false;
  }

  /** Makes room for positions [0, len) in every slot. */
  reserve(len: number): void {
    if (len > this.maxLen) throw new Error(`${len} positions do not fit a context of ${this.maxLen}`);
    if (len <= this.cap) return;
    let cap = this.cap;
    while (cap < len) cap *= 2;
    cap = Math.min(cap, this.maxLen);
    const used = this.cap * this.slots * this.width;
    for (let l = 0; l < this.shape.layers; l++) {
      const k = allocModel(this.shape.dtype, cap * this.slots * this.width);
      const v = allocModel(this.shape.dtype, cap * this.slots * this.width);
      k.set(this.keys[l].subarray(0, used));
      v.set(this.values[l].subarray(0, used));
      this.keys[l] = k;
      this.values[l] = v;
    }
    this.cap = cap;
  }

  /** any order: kv_rows says which slot each row is */
  order(slots: readonly number[]): number[] {
    return slots.map((_, i) => i);
  }

  /** kv_rows, kv_lens and the cache up to the longest row's length */
  step(slots: readonly number[], lens: readonly number[], _S: number): Feeds {
    const rows = BigInt64Array.from(slots, (s) => BigInt(s));
    const kvLens = BigInt64Array.from(lens, (l) => BigInt(l));
    return {
      [KV_ROWS]: new Tensor('int64', rows, [slots.length]),
      [KV_LENS]: new Tensor('int64', kvLens, [slots.length]),
      ...this.feeds(Math.max(0, ...lens)),
    };
  }

  bound(): Record<string, Tensor> {
    return {};
  }

  /** The cache inputs of a step attending to positions [0, past): views, nothing copied. */
  feeds(past: number): Record<string, Tensor> {
    if (past > this.cap) throw new Error(`past ${past} is beyond the cache's ${this.cap} positions`);
    const n = past * this.slots * this.width;
    const dims = [past, this.slots, this.shape.kvHeads, this.shape.headDim];
    const type = tensorType(this.shape.dtype);
    const feeds: Record<string, Tensor> = {};
    for (let l = 0; l < this.shape.layers; l++) {
      feeds[kvCacheKeyName(l)] = new Tensor(type, this.keys[l].subarray(0, n), dims);
      feeds[kvCacheValueName(l)] = new Tensor(type, this.values[l].subarray(0, n), dims);
    }
    return feeds;
  }

  /**
   * Stores a step's `kv_new.*` outputs ([rows, S, kvHeads, headDim]): row b's S tokens go to
   * positions [starts[b], starts[b] + S) of slot slots[b]. Call `reserve` first.
   */
  write(outputs: Readonly<Record<string, Tensor>>, slots: readonly number[], starts: readonly number[], S: number): void {
    const w = this.width;
    for (let l = 0; l < this.shape.layers; l++) {
      const k = newData(outputs, kvNewKeyName(l), this.shape.dtype);
      const v = newData(outputs, kvNewValueName(l), this.shape.dtype);
      if (k.length !== slots.length * S * w || v.length !== k.length) {
        throw new Error(`${kvNewKeyName(l)} has ${k.length} elements, expected ${slots.length * S * w}`);
      }
      for (let b = 0; b < slots.length; b++) {
        if (starts[b] + S > this.cap) throw new Error(`slot ${slots[b]}: positions up to ${starts[b] + S} are beyond the cache's ${this.cap}`);
        for (let s = 0; s < S; s++) {
          const from = (b * S + s) * w;
          const to = ((starts[b] + s) * this.slots + slots[b]) * w;
          this.keys[l].set(k.subarray(from, from + w), to);
          this.values[l].set(v.subarray(from, from + w), to);
        }
      }
    }
  }

  /** A copy of positions [0, len) of `slot` (one prompt prefilled for several rows: OpenAI's `n`). */
  snapshot(slot: number, len: number): KvPrefix {
    const w = this.width;
    const copy = (src: ModelArray) => {
      const out = allocModel(this.shape.dtype, len * w);
      for (let p = 0; p < len; p++) out.set(src.subarray((p * this.slots + slot) * w, (p * this.slots + slot + 1) * w), p * w);
      return out;
    };
    return new ResidentPrefix(len, this.keys.map(copy), this.values.map(copy));
  }

  /** host arrays: the garbage collector frees a snapshot */
  drop(): void {}

  /** host arrays: nothing to free by hand */
  dispose(): void {}

  /** Writes a snapshot into positions [0, prefix.len) of `slot`. Call `reserve` first. */
  restore(prefix: KvPrefix, slot: number): void {
    if (!(prefix instanceof ResidentPrefix)) throw new Error('a KV snapshot of another store');
    if (prefix.len > this.cap) throw new Error(`a prefix of ${prefix.len} positions is beyond the cache's ${this.cap}`);
    const w = this.width;
    for (let l = 0; l < this.shape.layers; l++) {
      for (let p = 0; p < prefix.len; p++) {
        const to = (p * this.slots + slot) * w;
        this.keys[l].set(prefix.keys[l]!.subarray(p * w, (p + 1) * w), to);
        this.values[l].set(prefix.values[l]!.subarray(p * w, (p + 1) * w), to);
      }
    }
  }

  /** The cached keys (or values) of one slot and layer as [kvHeads, len, headDim] (tests and debugging). */
  read(layer: number, which: 'key' | 'value', slot: number, len: number): ModelArray {
    const src = which === 'key' ? this.keys[layer] : this.values[layer];
    const { kvHeads: H, headDim: D } = this.shape;
    const out = allocModel(this.shape.dtype, H * len * D);
    for (let p = 0; p < len; p++) {
      for (let h = 0; h < H; h++) {
        const from = ((p * this.slots + slot) * H + h) * D;
        out.set(src.subarray(from, from + D), (h * len + p) * D);
      }
    }
    return out;
  }
}

function newData(outputs: Readonly<Record<string, Tensor>>, name: string, dtype: ModelDtype): ModelArray {
  const t = outputs[name];
  if (!t) throw new Error(`the graph returned no output ${name}`);
  const d = t.data;
  if (dtype === 'fp16' ? !(d instanceof Uint16Array) : !(d instanceof Float32Array)) throw new Error(`output ${name} is not ${tensorType(dtype)}`);
  return d as ModelArray;
}
