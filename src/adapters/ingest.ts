import { Transform } from 'node:stream';
import type { LoraTarget } from '../model/manifest.js';
import { parseTensorKey } from './keys.js';
import { parsePeftConfig } from './peft-config.js';
import { resolveModules } from './resolve.js';
import { ADAPTER_SAFETENSORS_LIMITS, checkHeaderEntries, decodeHeaderJson, DTYPE_BYTES, f16ToF32, isFloatDtype, type FloatDtype, type SafetensorsHeader, type SafetensorsLimits, type TensorHeader } from './safetensors.js';
import type { NonFiniteCount } from './validate.js';

/**
 * adapter_model.safetensors decoded while it streams in, so that accepting an upload does not read
 * the file back, scan it and transpose it after the last byte has arrived.
 *
 * The decoder sees the same bytes as the file on disk. It parses the header as soon as it is
 * complete, then, per tensor as its bytes pass: counts NaN/±Inf of every float tensor, and writes
 * the lora_A / lora_B tensors of the model's LoRA targets straight into the engine's layout
 * (A [in, r], B [r, out]: PEFT's [r, in] / [out, r] transposed, see convert.ts). B is multiplied by
 * its module's scale on the way when adapter_config.json arrived first (`scales`); otherwise the
 * scale is folded in afterwards.
 *
 * It decides nothing: the validator still judges the adapter from the stored file's header and
 * these counts. Whatever it cannot handle (a header that does not parse or breaks a bound, a stream
 * longer or shorter than the header says, a tensor of a shape no target has) makes it give up or
 * skip that tensor, and the caller falls back to reading the file, which reports the precise
 * problem. Only tensors of shape [r, in] / [out, r] of a target with r ≤ maxRank are kept, at most
 * maxBytes in all, in one block reserved when the header is complete; the kernel maps its pages as
 * the values are written, so resident memory follows the bytes that actually arrived.
 */

export interface IngestedWeights {
  /** the header as the stream carried it (the caller compares it with the stored file's) */
  header: SafetensorsHeader;
  /** lora_A / lora_B tensors of LoRA targets, keyed by tensor key, in the engine's layout */
  engineLayout: Map<string, Float32Array>;
  /** the scale each kept lora_B was multiplied by (absent: 1, unscaled) */
  scaled: Map<string, number>;
  /** NaN/±Inf counts of every float tensor (key absent = nothing counted: the tensor was empty) */
  nonFinite: Map<string, NonFiniteCount>;
  /** largest |value| of each kept lora_B as the file holds it (before the scale): the overflow check's input */
  maxAbs: Map<string, number>;
  /**
   * false when a LoRA tensor that fits the model was left out for maxBytes: the validator then
   * lacks its largest value, so the caller reads the file instead
   */
  keptAll: boolean;
}

export interface IngestOptions {
  loraTargets: readonly LoraTarget[];
  /** tensors with a larger rank are counted but not kept (the validator rejects them) */
  maxRank: number;
  /** most bytes of engine-layout arrays one upload may hold */
  maxBytes: number;
  /** the file name used in header problems */
  file: string;
  /** module name → scale, from an adapter_config.json that arrived before the weights */
  scales?: ReadonlyMap<string, number>;
  limits?: SafetensorsLimits;
}

interface Sink {
  dtype: FloatDtype | null;
  elementBytes: number;
  counts: NonFiniteCount;
  /** engine-layout destination; null = count only */
  dst: Float32Array | null;
  /** multiplies every stored value (lora_B's scale) */
  scale: number;
  /** source [rows, cols] row-major; element (i, j) goes to dst[j * rows + i] */
  rows: number;
  cols: number;
  i: number;
  j: number;
  carry: Uint8Array;
  carryLength: number;
}

/**
 * Module name → scale as the validator will resolve it (rank_pattern, alpha_pattern, rslora), for
 * the targeted modules; undefined when the config does not parse (the validator will say why).
 */
export function moduleScales(configText: string, targets: readonly LoraTarget[]): Map<string, number> | undefined {
  try {
    const { config } = parsePeftConfig(configText);
    if (!config) return undefined;
    const resolved = resolveModules(config, targets);
    return new Map(resolved.modules.filter((m) => m.targeted).map((m) => [m.target.name, m.scale]));
  } catch {
    // only an optimisation: whatever went wrong, the validator meets it again and reports it
    return undefined;
  }
}

const BF16_SCRATCH = new Uint32Array(1);
const BF16_VIEW = new Float32Array(BF16_SCRATCH.buffer);

function decode(dtype: FloatDtype, dv: DataView, offset: number): number {
  if (dtype === 'F32') return dv.getFloat32(offset, true);
  if (dtype === 'F16') return f16ToF32(dv.getUint16(offset, true));
  BF16_SCRATCH[0] = dv.getUint16(offset, true) << 16;
  return BF16_VIEW[0]!;
}

let scratch = new Float32Array(16 * 1024);

/** `count` float32 values at `bytes[at…]`: a view when aligned, else a copy into a reused scratch array. */
function float32View(bytes: Uint8Array, at: number, count: number): Float32Array {
  const offset = bytes.byteOffset + at;
  if (offset % 4 === 0) return new Float32Array(bytes.buffer, offset, count);
  if (scratch.length < count) scratch = new Float32Array(count);
  new Uint8Array(scratch.buffer, 0, count * 4).set(bytes.subarray(at, at + count * 4));
  return scratch.subarray(0, count);
}

export class AdapterIngest {
  private phase: 'prefix' | 'header' | 'data' | 'off' = 'prefix';
  private readonly pending: Uint8Array[] = [];
  private pendingBytes = 0;
  private headerLength = 0;
  private header: SafetensorsHeader | null = null;
  /** tensors with data, in file order */
  private order: TensorHeader[] = [];
  private current = 0;
  private tensorPos = 0;
  private sink: Sink | null = null;
  private received = 0;
  private readonly keptShape = new Map<string, { rows: number; cols: number; scale: number }>();
  private readonly engineLayout = new Map<string, Float32Array>();
  private readonly nonFinite = new Map<string, NonFiniteCount>();
  private readonly scaled = new Map<string, number>();
  private keptAll = true;
  private readonly targets: Map<string, LoraTarget>;
  /** why the decoder gave up; null while it has not */
  reason: string | null = null;

  constructor(private readonly opts: IngestOptions) {
    this.targets = new Map(opts.loraTargets.map((t) => [t.name, t]));
  }

  /** A pass-through stream that feeds every chunk to this decoder. */
  tap(): Transform {
    return new Transform({
      transform: (chunk: Buffer, _enc, cb) => {
        try {
          this.push(chunk);
        } catch (e) {
          // the decoder only saves work: the upload goes on, and the file is read back instead
          this.giveUp(`the decoder failed: ${(e as Error).message}`);
        }
        cb(null, chunk);
      },
    });
  }

  push(chunk: Uint8Array): void {
    this.received += chunk.byteLength;
    let at = 0;
    while (at < chunk.byteLength && !this.gaveUp()) {
      if (this.phase === 'data') {
        at = this.consumeData(chunk, at);
        continue;
      }
      const want = (this.phase === 'prefix' ? 8 : this.headerLength) - this.pendingBytes;
      const take = Math.min(want, chunk.byteLength - at);
      this.pending.push(chunk.subarray(at, at + take));
      this.pendingBytes += take;
      at += take;
      if (take === want) this.completePending();
    }
  }

  /** The decoded file, or null when the decoder gave up or the stream ended early (see `reason`). */
  finish(): IngestedWeights | null {
    if (this.phase !== 'off') {
      const expected = this.header ? this.header.fileSize : null;
      if (expected === null || this.received !== expected) this.giveUp(`the stream carried ${this.received} bytes; the header accounts for ${expected ?? 'an unread header'}`);
    }
    if (this.phase === 'off' || !this.header) return null;
    return { header: this.header, engineLayout: this.engineLayout, scaled: this.scaled, nonFinite: this.nonFinite, maxAbs: this.maxAbsOfB(), keptAll: this.keptAll };
  }

  /**
   * One pass over the kept lora_B arrays once the stream has ended (they are a fraction of the
   * upload). A B scaled on the way holds fp32(x · scale): an overflow there is ±Inf, and stays one.
   */
  private maxAbsOfB(): Map<string, number> {
    const out = new Map<string, number>();
    for (const [name, { scale }] of this.keptShape) {
      if (parseTensorKey(name).part !== 'B' || scale === 0) continue;
      const v = this.engineLayout.get(name)!;
      let max = 0;
      for (let i = 0; i < v.length; i++) {
        const a = Math.abs(v[i]!);
        // NaN fails the comparison: non-finite values are counted and reported on their own
        if (a > max) max = a;
      }
      out.set(name, max / Math.abs(scale));
    }
    return out;
  }

  private gaveUp(): boolean {
    return this.phase === 'off';
  }

  private giveUp(reason: string): void {
    this.phase = 'off';
    this.reason = reason;
    this.engineLayout.clear();
    this.nonFinite.clear();
    this.scaled.clear();
    this.keptShape.clear();
    this.keptAll = false;
    this.sink = null;
    this.pending.length = 0;
  }

  private takePending(): Uint8Array {
    const out = this.pending.length === 1 ? this.pending[0]! : Buffer.concat(this.pending);
    this.pending.length = 0;
    this.pendingBytes = 0;
    return out;
  }

  private completePending(): void {
    const bytes = this.takePending();
    const limits = this.opts.limits ?? ADAPTER_SAFETENSORS_LIMITS;
    if (this.phase === 'prefix') {
      const n = new DataView(bytes.buffer, bytes.byteOffset, 8).getBigUint64(0, true);
      if (n < 2n || n > BigInt(limits.maxHeaderBytes)) return this.giveUp(`header length ${n} is out of bounds`);
      this.headerLength = Number(n);
      this.phase = 'header';
      return;
    }
    // decoded once; the first check learns where the data section ends, the second checks against it
    const decoded = decodeHeaderJson(this.opts.file, bytes, limits);
    if ('problem' in decoded) return this.giveUp('the header does not parse');
    const loose = checkHeaderEntries(this.opts.file, decoded.json, this.headerLength, Number.MAX_SAFE_INTEGER, limits);
    if (!loose.header) return this.giveUp('the header does not parse');
    const dataBytes = loose.header.tensors.reduce((m, t) => Math.max(m, t.end), 0);
    const exact = checkHeaderEntries(this.opts.file, decoded.json, this.headerLength, 8 + this.headerLength + dataBytes, limits);
    if (!exact.header || exact.problems.length) return this.giveUp(`the header has problems: ${exact.problems[0]?.message ?? 'unparsable'}`);
    this.header = exact.header;
    this.order = exact.header.tensors.filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
    if (this.plan(this.order)) this.phase = 'data';
  }

  /**
   * Which tensors are kept, in one block for the whole adapter (so that its memory is one mapping
   * that an unload returns whole, not arrays scattered between the upload's transient buffers).
   * The block is reserved here; its pages become resident only as tensor bytes are written.
   */
  private plan(tensors: readonly TensorHeader[]): boolean {
    const kept: [TensorHeader, number, number, number][] = [];
    let total = 0;
    for (const t of tensors) {
      if (!isFloatDtype(t.dtype) || t.shape.length !== 2) continue;
      const key = parseTensorKey(t.name);
      const target = key.kind === 'lora' && key.module ? this.targets.get(key.module) : undefined;
      if (!target) continue;
      const [rows, cols] = t.shape as [number, number];
      const rank = key.part === 'A' ? rows : cols;
      const fits = key.part === 'A' ? cols === target.inFeatures : rows === target.outFeatures;
      if (!fits || rank < 1 || rank > this.opts.maxRank) continue;
      if (total + rows * cols * 4 > this.opts.maxBytes) {
        this.keptAll = false;
        continue;
      }
      kept.push([t, rows, cols, key.part === 'B' ? (this.opts.scales?.get(target.name) ?? 1) : 1]);
      total += rows * cols * 4;
    }
    let block: Float32Array;
    try {
      block = new Float32Array(total / 4);
    } catch {
      this.giveUp(`could not reserve ${total} bytes for the engine layout`);
      return false;
    }
    let at = 0;
    for (const [t, rows, cols, scale] of kept) {
      this.engineLayout.set(t.name, block.subarray(at, at + rows * cols));
      if (scale !== 1) this.scaled.set(t.name, scale);
      this.keptShape.set(t.name, { rows, cols, scale });
      at += rows * cols;
    }
    return true;
  }

  private sinkFor(t: TensorHeader): Sink {
    const dtype = isFloatDtype(t.dtype) ? t.dtype : null;
    const base = { dtype, elementBytes: DTYPE_BYTES[t.dtype]!, counts: { nan: 0, inf: 0 }, dst: null, scale: 1, rows: 0, cols: 0, i: 0, j: 0, carry: new Uint8Array(4), carryLength: 0 };
    const shape = this.keptShape.get(t.name);
    return shape ? { ...base, ...shape, dst: this.engineLayout.get(t.name)! } : base;
  }

  private consumeData(chunk: Uint8Array, at: number): number {
    const t = this.order[this.current];
    if (!t) {
      this.giveUp('the stream is longer than the header says');
      return chunk.byteLength;
    }
    this.sink ??= this.sinkFor(t);
    const take = Math.min(t.end - t.begin - this.tensorPos, chunk.byteLength - at);
    if (this.sink.dtype) this.decodeInto(this.sink, chunk.subarray(at, at + take));
    this.tensorPos += take;
    if (this.tensorPos === t.end - t.begin) {
      if (this.sink.dtype) this.nonFinite.set(t.name, this.sink.counts);
      this.sink = null;
      this.tensorPos = 0;
      this.current++;
    }
    return at + take;
  }

  private decodeInto(s: Sink, bytes: Uint8Array): void {
    let at = 0;
    const size = s.elementBytes;
    if (s.carryLength > 0) {
      const take = Math.min(size - s.carryLength, bytes.byteLength);
      s.carry.set(bytes.subarray(0, take), s.carryLength);
      s.carryLength += take;
      at = take;
      if (s.carryLength < size) return;
      this.store(s, decode(s.dtype!, new DataView(s.carry.buffer), 0));
      s.carryLength = 0;
    }
    const whole = Math.floor((bytes.byteLength - at) / size);
    const dtype = s.dtype!;
    const dst = s.dst;
    let nan = 0;
    let inf = 0;
    if (dst && dtype === 'F32') {
      // the common case on a faster path: typed-array reads, one source row's run at a time
      const src = float32View(bytes, at, whole);
      const rows = s.rows;
      const cols = s.cols;
      const scale = s.scale;
      let i = s.i;
      let j = s.j;
      for (let e = 0; e < whole; ) {
        const run = Math.min(cols - j, whole - e);
        let o = j * rows + i;
        for (let k = e; k < e + run; k++, o += rows) {
          const x = src[k]!;
          // x − x is 0 for every finite x, NaN for NaN and ±Inf
          if (x - x !== 0) {
            if (x !== x) nan++;
            else inf++;
          }
          dst[o] = x * scale;
        }
        e += run;
        j += run;
        if (j === cols) {
          j = 0;
          i++;
        }
      }
      s.i = i;
      s.j = j;
    } else if (dst) {
      const dv = new DataView(bytes.buffer, bytes.byteOffset + at, whole * size);
      const rows = s.rows;
      const cols = s.cols;
      const scale = s.scale;
      let i = s.i;
      let j = s.j;
      for (let e = 0; e < whole; e++) {
        const x = decode(dtype, dv, e * size);
        if (x !== x) nan++;
        else if (x === Infinity || x === -Infinity) inf++;
        // x × scale rounded once to float32, as convert.ts's transpose() does
        dst[j * rows + i] = x * scale;
        if (++j === cols) {
          j = 0;
          i++;
        }
      }
      s.i = i;
      s.j = j;
    } else {
      const dv = new DataView(bytes.buffer, bytes.byteOffset + at, whole * size);
      for (let e = 0; e < whole; e++) {
        const x = decode(dtype, dv, e * size);
        if (x !== x) nan++;
        else if (x === Infinity || x === -Infinity) inf++;
      }
    }
    s.counts.nan += nan;
    s.counts.inf += inf;
    at += whole * size;
    if (at < bytes.byteLength) {
      s.carry.set(bytes.subarray(at), 0);
      s.carryLength = bytes.byteLength - at;
    }
  }

  private store(s: Sink, x: number): void {
    if (x !== x) s.counts.nan++;
    else if (x === Infinity || x === -Infinity) s.counts.inf++;
    if (s.dst) {
      s.dst[s.j * s.rows + s.i] = x * s.scale;
      if (++s.j === s.cols) {
        s.j = 0;
        s.i++;
      }
    }
  }
}
