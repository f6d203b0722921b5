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
  /** a shape may not have more dimensions than this (checked while scanning, before it is built) */
  maxDims: number;
}

/**
 * What an uploaded adapter's header may hold. 2 MiB of header: PEFT writes about 135 bytes per tensor: 80 layers × 7 projections × (A, B) is
 * 150 KB, Llama 3.1 405B's 126 layers 240 KB, and DoRA vectors or biases add a third at most, so
 * the cap leaves a margin of 8× over the largest model this server serves. Parsing is linear in
 * the header, and this bounds what one upload's header may hold the event loop for (about 0.1 s
 * for a full 2 MiB on a busy 2-core machine). The reference implementation's cap is 100 MB, for
 * whole models.
 */
export const ADAPTER_SAFETENSORS_LIMITS: SafetensorsLimits = { maxHeaderBytes: 2 * 1024 * 1024, maxTensors: 100_000, maxDims: 4 };

/** Model checkpoints (the operator's files, not uploads): the reference implementation's 100 MB, 8 dimensions. */
export const DEFAULT_SAFETENSORS_LIMITS: SafetensorsLimits = { maxHeaderBytes: 100 * 1024 * 1024, maxTensors: 100_000, maxDims: 8 };

/**
 * A LoRA tensor has 2 dimensions (lora_A, lora_B), a convolution's 4 (maxDims of an adapter);
 * data_offsets has 2. A longer array in the header is refused while it is scanned, before anything
 * is built from it.
 */
/** top-level object → tensor entry → shape / data_offsets */
const MAX_HEADER_DEPTH = 3;
/** Real tensor names are under 200 characters; longer ones are refused, not echoed. */
export const MAX_TENSOR_NAME = 1024;

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

const nameExcerpt = (name: string) => (name.length <= 120 ? name : `${name.slice(0, 120)}… (${name.length} characters)`);

/**
 * One linear pass over the header text before JSON.parse, for what JSON.parse would hide or pay
 * for: a key given twice in one object (JSON.parse keeps the last; a file with two entries for one
 * tensor is ambiguous), an array longer than any field of the format (a shape of 45 million
 * dimensions cost 3.6 GB to parse), nesting deeper than the format, more entries than the limit.
 * Returns the problem, or null when the header is well-formed or is not JSON at all (JSON.parse
 * then says where).
 */
export function scanHeaderJson(file: string, text: string, limits: SafetensorsLimits): Problem | null {
  type Frame = { array: boolean; count: number; keys: Set<string> | null; expectKey: boolean; key: string | null };
  const stack: Frame[] = [];
  let tensor: string | null = null;
  let i = 0;
  const n = text.length;
  const elementOf = (parent: Frame | undefined): Problem | null => {
    if (!parent?.array) return null;
    parent.count++;
    if (parent.count <= limits.maxDims) return null;
    const where = tensor === null ? file : nameExcerpt(tensor);
    return corrupt(file, `${where}: its ${JSON.stringify(parent.key ?? '?')} lists more than ${limits.maxDims} values (the rest was not read); a shape has at most ${limits.maxDims} dimensions here (a LoRA matrix has 2), and data_offsets has 2.`, { tensor: tensor === null ? undefined : nameExcerpt(tensor), expected: `<= ${limits.maxDims} values` });
  };
  while (i < n) {
    const c = text.charCodeAt(i);
    if (c === 0x20 || c === 0x0a || c === 0x0d || c === 0x09 || c === 0x3a /* : */) {
      i++;
      continue;
    }
    const top = stack[stack.length - 1];
    if (c === 0x7b /* { */ || c === 0x5b /* [ */) {
      const bad = elementOf(top);
      if (bad) return bad;
      if (stack.length >= MAX_HEADER_DEPTH) return corrupt(file, `${file} has a header nested deeper than the safetensors format (${MAX_HEADER_DEPTH} levels).`);
      const key = top && !top.array ? top.key : null;
      stack.push({ array: c === 0x5b, count: 0, keys: c === 0x7b ? new Set() : null, expectKey: c === 0x7b, key });
      i++;
      continue;
    }
    if (c === 0x7d /* } */ || c === 0x5d /* ] */) {
      stack.pop();
      if (stack.length === 1) tensor = null;
      i++;
      continue;
    }
    if (c === 0x2c /* , */) {
      if (top && !top.array) top.expectKey = true;
      i++;
      continue;
    }
    if (c === 0x22 /* " */) {
      let j = i + 1;
      let escaped = false;
      while (j < n) {
        const d = text.charCodeAt(j);
        if (d === 0x5c) {
          escaped = true;
          j += 2;
          continue;
        }
        if (d === 0x22) break;
        j++;
      }
      if (j >= n) return null;
      if (top && !top.array && top.expectKey) {
        let key: string;
        try {
          key = escaped ? (JSON.parse(text.slice(i, j + 1)) as string) : text.slice(i + 1, j);
        } catch {
          return null;
        }
        if (top.keys!.has(key)) {
          const what = stack.length === 1 ? `tensor ${nameExcerpt(key)}` : `the key ${JSON.stringify(nameExcerpt(key))} of ${tensor === null ? 'an entry' : nameExcerpt(tensor)}`;
          return corrupt(file, `${file} names ${what} twice in its header; a JSON reader keeps only the last one, so which ${stack.length === 1 ? 'weights were' : 'value was'} meant is ambiguous.`, { tensor: nameExcerpt(stack.length === 1 ? key : (tensor ?? key)) });
        }
        top.keys!.add(key);
        top.key = key;
        top.expectKey = false;
        if (stack.length === 1) {
          tensor = key;
          if (top.keys!.size > limits.maxTensors + 1) return corrupt(file, `${file} lists more than ${limits.maxTensors} tensors.`, { expected: `<= ${limits.maxTensors}` });
        }
      } else {
        const bad = elementOf(top);
        if (bad) return bad;
      }
      i = j + 1;
      continue;
    }
    // a number, true, false or null
    const bad = elementOf(top);
    if (bad) return bad;
    while (i < n) {
      const d = text.charCodeAt(i);
      if (d === 0x2c || d === 0x7d || d === 0x5d || d === 0x20 || d === 0x0a || d === 0x0d || d === 0x09 || d === 0x3a) break;
      i++;
    }
  }
  return null;
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
  const decoded = decodeHeaderJson(file, headerBytes, limits);
  if ('problem' in decoded) return { header: null, problems: [decoded.problem] };
  return checkHeaderEntries(file, decoded.json, headerBytes.byteLength, fileSize, limits);
}

/** The header bytes → its JSON object, after scanHeaderJson has let it through. */
export function decodeHeaderJson(file: string, headerBytes: Uint8Array, limits: SafetensorsLimits = DEFAULT_SAFETENSORS_LIMITS): { json: Record<string, unknown> } | { problem: Problem } {
  let json: unknown;
  try {
    const text = new TextDecoder('utf-8', { fatal: true }).decode(headerBytes);
    const refused = scanHeaderJson(file, text, limits);
    if (refused) return { problem: refused };
    json = JSON.parse(text);
  } catch (e) {
    return { problem: corrupt(file, `${file} has a header that is not valid UTF-8 JSON (${(e as Error).message.slice(0, 200)}).`) };
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    return { problem: corrupt(file, `${file} has a header that is not a JSON object.`) };
  }
  return { json: json as Record<string, unknown> };
}

/** Pure: every entry of a decoded header checked against a file of `fileSize` bytes. */
export function checkHeaderEntries(file: string, json: Record<string, unknown>, headerLength: number, fileSize: number, limits: SafetensorsLimits = DEFAULT_SAFETENSORS_LIMITS): HeaderResult {
  const dataStart = 8 + headerLength;
  const dataSize = fileSize - dataStart;
  const problems: Problem[] = [];
  const tensors: TensorHeader[] = [];
  let metadata: Record<string, string> | null = null;
  const entries = Object.entries(json);
  if (entries.length > limits.maxTensors + 1) {
    return { header: null, problems: [corrupt(file, `${file} lists ${entries.length} tensors, over the limit of ${limits.maxTensors}.`, { expected: `<= ${limits.maxTensors}`, actual: entries.length })] };
  }
  for (const [name, raw] of entries) {
    if (name.length > MAX_TENSOR_NAME) {
      problems.push(corrupt(file, `${file} has a tensor name of ${name.length} characters (${nameExcerpt(name)}); real names are under 200, and over ${MAX_TENSOR_NAME} the file is refused.`, { tensor: nameExcerpt(name) }));
      continue;
    }
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
      const shown = typeof dtype === 'string' ? dtype.slice(0, 40) : typeof dtype;
      problems.push(error({ code: 'bad_dtype', file, tensor: name, actual: shown, expected: Object.keys(DTYPE_BYTES), message: `${name} has dtype ${JSON.stringify(shown)}, which is not a safetensors dtype.` }));
      continue;
    }
    if (!Array.isArray(shape) || !shape.every(isNonNegInt) || shape.length > limits.maxDims) {
      problems.push(corrupt(file, `${name} has shape ${String(JSON.stringify(shape)).slice(0, 120)}; a shape is a list of at most ${limits.maxDims} non-negative integers.`, { tensor: name, actual: Array.isArray(shape) ? shape.slice(0, limits.maxDims) : typeof shape }));
      continue;
    }
    if (!Array.isArray(offsets) || offsets.length !== 2 || !offsets.every(isNonNegInt) || offsets[0] > offsets[1]) {
      problems.push(corrupt(file, `${name} has data_offsets ${String(JSON.stringify(offsets)).slice(0, 120)}; expected [begin, end] with 0 <= begin <= end.`, { tensor: name, actual: Array.isArray(offsets) ? offsets.slice(0, 2) : typeof offsets }));
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
