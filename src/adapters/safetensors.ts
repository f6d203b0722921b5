import { open } from 'node:fs/promises';
import { error, type Problem } from './report.js';

/**
 * Bounded reader for the safetensors format: 8-byte little-endian header length, a JSON header
 * `{name: {dtype, shape, data_offsets: [begin, end]}, "__metadata__": {...}}`, then the data.
 * Nothing in the file is trusted: the header length, every offset and every byte count is checked
 * against the file's real size before anything is read. Parsing is pure; I/O is at the edges.
 */

export const DTYPE_BYTES: Readonly<Record<string, number>> = {
  F64: 8, F32: 4, F16: 2, BF16: 2, F8_E4M3: 1, F8_E5M2: 1,
  I64: 8, I32: 4, I16: 2, I8: 1, U64: 8, U32: 4, U16: 2, U8: 1, BOOL: 1,
};

/** dtypes whose values we can turn into float32 weights */
export const FLOAT_DTYPES = ['F32', 'F16', 'BF16'] as const;
export type FloatDtype = (typeof FLOAT_DTYPES)[number];
export const isFloatDtype = (d: string): d is FloatDtype => (FLOAT_DTYPES as readonly string[]).includes(d);

export interface TensorHeader {
  name: string;
  dtype: string;
  shape: number[];
  /** offsets relative to the start of the data section */
  begin: number;
  end: number;
}

export interface SafetensorsHeader {
  headerLength: number;
  /** absolute file offset of the data section */
  dataStart: number;
  fileSize: number;
  tensors: TensorHeader[];
  metadata: Record<string, string> | null;
}

export interface SafetensorsLimits {
  /** the JSON header may not be larger than this many bytes */
  maxHeaderBytes: number;
  /** the file may not hold more tensors than this */
  maxTensors: number;
}

export const DEFAULT_SAFETENSORS_LIMITS: SafetensorsLimits = { maxHeaderBytes: 100 * 1024 * 1024, maxTensors: 100_000 };

export type HeaderResult = { header: SafetensorsHeader | null; problems: Problem[] };

const corrupt = (file: string, message: string, extra: Partial<Problem> = {}): Problem =>
  error({ code: 'corrupt_file', file, message, ...extra });

/** Reads and checks the 8-byte length prefix; returns the header length or a problem. */
export function checkHeaderLength(file: string, prefix: Uint8Array, fileSize: number, limits: SafetensorsLimits): number | Problem {
  if (fileSize < 8 || prefix.byteLength < 8) {
    return corrupt(file, `${file} is ${fileSize} bytes long; a safetensors file starts with an 8-byte header length, so it is truncated or not safetensors.`, { expected: '>= 8 bytes', actual: fileSize });
  }
  const n = new DataView(prefix.buffer, prefix.byteOffset, 8).getBigUint64(0, true);
  if (n > BigInt(limits.maxHeaderBytes)) {
    return corrupt(file, `${file} declares a ${n}-byte JSON header, over the ${limits.maxHeaderBytes}-byte cap; the file is corrupt or hostile.`, { expected: `<= ${limits.maxHeaderBytes}`, actual: n.toString() });
  }
  if (n > BigInt(fileSize - 8)) {
    return corrupt(file, `${file} declares a ${n}-byte header but only ${fileSize - 8} bytes follow the length prefix: the file is truncated.`, { expected: `<= ${fileSize - 8}`, actual: Number(n) });
  }
  if (n < 2n) {
    return corrupt(file, `${file} declares a ${n}-byte header; at least "{}" is required.`, { actual: Number(n) });
  }
  return Number(n);
}

function isNonNegInt(v: unknown): v is number {
  return typeof v === 'number' && Number.isSafeInteger(v) && v >= 0;
}

/**
 * Pure: parses the JSON header bytes and checks every entry against the data section's size.
 * Collects every problem (unknown dtype, bad shape, byte count ≠ dtype × shape, offsets outside the
 * data or overlapping another tensor) instead of stopping at the first.
 */
export function parseHeader(file: string, headerBytes: Uint8Array, fileSize: number, limits: SafetensorsLimits = DEFAULT_SAFETENSORS_LIMITS): HeaderResult {
  const headerLength = headerBytes.byteLength;
  const dataStart = 8 + headerLength;
  const dataSize = fileSize - dataStart;
  let json: unknown;
  try {
    json = JSON.parse(new TextDecoder('utf-8', { fatal: true }).decode(headerBytes));
  } catch (e) {
    return { header: null, problems: [corrupt(file, `${file} has a header that is not valid UTF-8 JSON (${(e as Error).message}).`)] };
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    return { header: null, problems: [corrupt(file, `${file} has a header that is not a JSON object.`)] };
  }
  const problems: Problem[] = [];
  const tensors: TensorHeader[] = [];
  let metadata: Record<string, string> | null = null;
  const entries = Object.entries(json as Record<string, unknown>);
  if (entries.length > limits.maxTensors + 1) {
    return { header: null, problems: [corrupt(file, `${file} lists ${entries.length} tensors, over the limit of ${limits.maxTensors}.`, { expected: `<= ${limits.maxTensors}`, actual: entries.length })] };
  }
  for (const [name, raw] of entries) {
    if (name === '__metadata__') {
      if (raw !== null && typeof raw === 'object' && !Array.isArray(raw) && Object.values(raw).every((v) => typeof v === 'string')) {
        metadata = raw as Record<string, string>;
      } else {
        problems.push(corrupt(file, `${file}: __metadata__ must map strings to strings.`));
      }
      continue;
    }
    if (raw === null || typeof raw !== 'object') {
      problems.push(corrupt(file, `${file}: header entry ${name} is not an object.`, { tensor: name }));
      continue;
    }
    const { dtype, shape, data_offsets: offsets } = raw as Record<string, unknown>;
    if (typeof dtype !== 'string' || !(dtype in DTYPE_BYTES)) {
      problems.push(error({ code: 'bad_dtype', file, tensor: name, actual: dtype, expected: Object.keys(DTYPE_BYTES), message: `${name} has dtype ${JSON.stringify(dtype)}, which is not a safetensors dtype.` }));
      continue;
    }
    if (!Array.isArray(shape) || !shape.every(isNonNegInt) || shape.length > 8) {
      problems.push(corrupt(file, `${name} has shape ${JSON.stringify(shape)}; a shape is a list of at most 8 non-negative integers.`, { tensor: name, actual: shape }));
      continue;
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegInt) || offsets[0] > offsets[1]) {
      problems.push(corrupt(file, `${name} has data_offsets ${JSON.stringify(offsets)}; expected [begin, end] with 0 <= begin <= end.`, { tensor: name, actual: offsets }));
      continue;
    }
    const [begin, end] = offsets as [number, number];
    const count = (shape as number[]).reduce((a, b) => a * b, 1);
    const want = count * DTYPE_BYTES[dtype]!;
    if (!Number.isSafeInteger(want) || want !== end - begin) {
      problems.push(corrupt(file, `${name} is ${dtype} ${JSON.stringify(shape)}, which takes ${want} bytes, but its data_offsets span ${end - begin} bytes.`, { tensor: name, expected: want, actual: end - begin }));
      continue;
    }
    if (end > dataSize) {
      problems.push(corrupt(file, `${name} ends at data offset ${end} but the file holds only ${Math.max(dataSize, 0)} data bytes: the file is truncated or the offsets lie.`, { tensor: name, expected: `<= ${Math.max(dataSize, 0)}`, actual: end }));
      continue;
    }
    tensors.push({ name, dtype, shape: shape as number[], begin, end });
  }
  const sorted = [...tensors].filter((t) => t.end > t.begin).sort((a, b) => a.begin - b.begin);
  // as in the reference implementation, the tensors must cover the data section exactly: bytes
  // that no tensor claims (a gap, or a tail after the last tensor) are where a lying file hides data
  let covered = 0;
  for (let i = 0; i < sorted.length; i++) {
    const cur = sorted[i]!;
    const prev = sorted[i - 1];
    if (prev && cur.begin < prev.end) {
      problems.push(corrupt(file, `${cur.name} (bytes ${cur.begin}-${cur.end}) overlaps ${prev.name} (bytes ${prev.begin}-${prev.end}).`, { tensor: cur.name, actual: [cur.begin, cur.end] }));
    } else if (cur.begin > covered) {
      problems.push(corrupt(file, `${file} has ${cur.begin - covered} bytes that no tensor claims before ${cur.name} (data bytes ${covered}-${cur.begin}).`, { tensor: cur.name, expected: covered, actual: cur.begin }));
    }
    covered = Math.max(covered, cur.end);
  }
  if (problems.length === 0 && dataSize > covered) {
    problems.push(corrupt(file, `${file} has ${dataSize - covered} bytes after the last tensor that no tensor claims: the file was appended to, or its header lies.`, { expected: covered, actual: dataSize }));
  }
  return { header: { headerLength, dataStart, fileSize, tensors, metadata }, problems };
}

/** Reads only the header of a safetensors file (never the data), with every bound checked. */
export async function readHeader(path: string, limits: SafetensorsLimits = DEFAULT_SAFETENSORS_LIMITS, label = path): Promise<HeaderResult> {
  const fh = await open(path, 'r');
  try {
    const fileSize = (await fh.stat()).size;
    const prefix = Buffer.alloc(8);
    await fh.read(prefix, 0, Math.min(8, fileSize), 0);
    const n = checkHeaderLength(label, prefix, fileSize, limits);
    if (typeof n !== 'number') return { header: null, problems: [n] };
    const buf = Buffer.alloc(n);
    const { bytesRead } = await fh.read(buf, 0, n, 8);
    if (bytesRead !== n) return { header: null, problems: [corrupt(label, `${label}: could read only ${bytesRead} of ${n} header bytes.`)] };
    return parseHeader(label, buf, fileSize, limits);
  } finally {
    await fh.close();
  }
}

/** float16 → float32, exact */
export function f16ToF32(h: number): number {
  const s = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 0x1f;
  const f = h & 0x3ff;
  if (e === 0) return s * f * 2 ** -24;
  if (e === 31) return f ? NaN : s * Infinity;
  return s * (1 + f / 1024) * 2 ** (e - 15);
}

/** Converts raw little-endian tensor bytes of a float dtype to float32. */
export function toFloat32(dtype: FloatDtype, bytes: Uint8Array): Float32Array {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  switch (dtype) {
    case 'F32': {
      // copying into a fresh buffer also fixes alignment (offsets need not be multiples of 4)
      const out = new Float32Array(bytes.byteLength / 4);
      new Uint8Array(out.buffer).set(bytes);
      return out;
    }
    case 'F16': {
      const out = new Float32Array(bytes.byteLength / 2);
      for (let i = 0; i < out.length; i++) out[i] = f16ToF32(dv.getUint16(i * 2, true));
      return out;
    }
    case 'BF16': {
      const out = new Float32Array(bytes.byteLength / 2);
      const u32 = new Uint32Array(out.buffer);
      for (let i = 0; i < out.length; i++) u32[i] = dv.getUint16(i * 2, true) << 16;
      return out;
    }
  }
}

/** Reads one tensor's bytes (already bounds-checked by parseHeader) from an open file. */
export async function readTensorBytes(path: string, header: SafetensorsHeader, t: TensorHeader): Promise<Uint8Array> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(t.end - t.begin);
    const { bytesRead } = await fh.read(buf, 0, buf.byteLength, header.dataStart + t.begin);
    if (bytesRead !== buf.byteLength) throw new Error(`${path}: short read of ${t.name}`);
    return buf;
  } finally {
    await fh.close();
  }
}

export interface TensorToWrite {
  name: string;
  dtype: 'F32' | 'F16' | 'BF16' | 'I64' | 'I32' | 'U8';
  shape: number[];
  /** raw little-endian bytes, or float32 values when dtype is F32 */
  data: Uint8Array | Float32Array;
}

/** Encodes tensors as a safetensors file (used by `init` and by tests that build adapters). */
export function encodeSafetensors(tensors: TensorToWrite[], metadata: Record<string, string> | null = null): Buffer {
  const header: Record<string, unknown> = {};
  if (metadata) header.__metadata__ = metadata;
  let offset = 0;
  const chunks: Uint8Array[] = [];
  for (const t of tensors) {
    const bytes = t.data instanceof Float32Array ? new Uint8Array(t.data.buffer, t.data.byteOffset, t.data.byteLength) : t.data;
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + bytes.byteLength] };
    chunks.push(bytes);
    offset += bytes.byteLength;
  }
  let json = JSON.stringify(header);
  // the data section is conventionally 8-byte aligned; pad the header with spaces
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += ' ';
  const jsonBytes = Buffer.from(json, 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(jsonBytes.byteLength));
  return Buffer.concat([prefix, jsonBytes, ...chunks]);
}
