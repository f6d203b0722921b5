import { open } from 'node:fs/promises';
import { GGUF_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, VALUE_TYPE, type MetadataValue, type TensorInfo } from './format.js';
import { GGML_TYPE, tensorBytes } from './quants.js';

/** Growable little-endian byte buffer for the header. */
class Bytes {
  private buf = Buffer.alloc(1 << 16);
  length = 0;
  private room(n: number): void {
    if (this.length + n <= this.buf.length) return;
    const next = Buffer.alloc(Math.max(this.buf.length * 2, this.length + n));
    this.buf.copy(next, 0, 0, this.length);
    this.buf = next;
  }
  u32(v: number): void {
    this.room(4);
    this.buf.writeUInt32LE(v, this.length);
    this.length += 4;
  }
  i32(v: number): void {
    this.room(4);
    this.buf.writeInt32LE(v, this.length);
    this.length += 4;
  }
  u64(v: number): void {
    this.room(8);
    this.buf.writeBigUInt64LE(BigInt(v), this.length);
    this.length += 8;
  }
  f32(v: number): void {
    this.room(4);
    this.buf.writeFloatLE(v, this.length);
    this.length += 4;
  }
  u8(v: number): void {
    this.room(1);
    this.buf[this.length++] = v;
  }
  string(s: string): void {
    const b = Buffer.from(s, 'utf8');
    this.u64(b.length);
    this.room(b.length);
    b.copy(this.buf, this.length);
    this.length += b.length;
  }
  pad(alignment: number): void {
    while (this.length % alignment !== 0) this.u8(0);
  }
  bytes(): Buffer {
    return this.buf.subarray(0, this.length);
  }
}

function writeValue(b: Bytes, v: MetadataValue): void {
  switch (v.type) {
    case 'u32':
      b.u32(VALUE_TYPE.u32);
      b.u32(v.value);
      return;
    case 'i32':
      b.u32(VALUE_TYPE.i32);
      b.i32(v.value);
      return;
    case 'f32':
      b.u32(VALUE_TYPE.f32);
      b.f32(v.value);
      return;
    case 'bool':
      b.u32(VALUE_TYPE.bool);
      b.u8(v.value ? 1 : 0);
      return;
    case 'string':
      b.u32(VALUE_TYPE.string);
      b.string(v.value);
      return;
    case 'array':
      b.u32(VALUE_TYPE.array);
      b.u32(VALUE_TYPE[v.of]);
      b.u64(v.value.length);
      if (v.of === 'string') for (const s of v.value) b.string(s);
      else if (v.of === 'i32') for (const x of v.value) b.i32(x);
      else for (const x of v.value) b.f32(x);
      return;
  }
}

function checkValue(key: string, v: MetadataValue): void {
  const int = (x: number, lo: number, hi: number) => Number.isInteger(x) && x >= lo && x <= hi;
  if (v.type === 'u32' && !int(v.value, 0, 0xffffffff)) throw new Error(`GGUF metadata ${key}: ${v.value} is not a u32`);
  if (v.type === 'i32' && !int(v.value, -0x80000000, 0x7fffffff)) throw new Error(`GGUF metadata ${key}: ${v.value} is not an i32`);
  if (v.type === 'array' && v.of === 'i32') for (const x of v.value) if (!int(x, -0x80000000, 0x7fffffff)) throw new Error(`GGUF metadata ${key}: element ${x} is not an i32`);
}

/** The header bytes (through the padding before the data section) and each tensor's data offset. */
export function encodeHeader(metadata: ReadonlyMap<string, MetadataValue>, tensors: readonly TensorInfo[]): { header: Buffer; offsets: number[]; dataBytes: number } {
  const b = new Bytes();
  b.u32(GGUF_MAGIC);
  b.u32(GGUF_VERSION);
  b.u64(tensors.length);
  b.u64(metadata.size);
  for (const [key, v] of metadata) {
    if (key === 'general.alignment' && !(v.type === 'u32' && v.value === GGUF_ALIGNMENT)) throw new Error(`this writer aligns to ${GGUF_ALIGNMENT}; general.alignment must be u32 ${GGUF_ALIGNMENT}`);
    checkValue(key, v);
    b.string(key);
    writeValue(b, v);
  }
  const offsets: number[] = [];
  const names = new Set<string>();
  let offset = 0;
  for (const t of tensors) {
    if (names.has(t.name)) throw new Error(`GGUF: tensor ${t.name} twice`);
    names.add(t.name);
    if (t.shape.length < 1 || t.shape.length > 4 || t.shape.some((d) => !Number.isInteger(d) || d < 1)) throw new Error(`GGUF: tensor ${t.name} has shape [${t.shape.join(', ')}]`);
    b.string(t.name);
    b.u32(t.shape.length);
    for (const d of [...t.shape].reverse()) b.u64(d);
    b.u32(GGML_TYPE[t.type]);
    b.u64(offset);
    offsets.push(offset);
    // rows are whole blocks: ne[0] (the last PyTorch dim) must be a multiple of the block size
    const row = t.shape[t.shape.length - 1];
    tensorBytes(t.type, row);
    offset += tensorBytes(t.type, t.shape.reduce((x, y) => x * y, 1));
    offset = Math.ceil(offset / GGUF_ALIGNMENT) * GGUF_ALIGNMENT;
  }
  b.pad(GGUF_ALIGNMENT);
  return { header: b.bytes(), offsets, dataBytes: offset };
}

/**
 * Writes a GGUF file tensor by tensor: `data(i)` is called once per tensor, in order, and must
 * return exactly that tensor's bytes, so a 2 GB model never sits in memory at once.
 */
export async function writeGguf(path: string, metadata: ReadonlyMap<string, MetadataValue>, tensors: readonly TensorInfo[], data: (index: number) => Uint8Array | Promise<Uint8Array>): Promise<number> {
  const { header, offsets, dataBytes } = encodeHeader(metadata, tensors);
  const fh = await open(path, 'w');
  try {
    await fh.write(header);
    let at = 0;
    for (const [i, t] of tensors.entries()) {
      const bytes = await data(i);
      const want = tensorBytes(t.type, t.shape.reduce((x, y) => x * y, 1));
      if (bytes.byteLength !== want) throw new Error(`GGUF: tensor ${t.name} has ${bytes.byteLength} bytes, its ${t.type} shape needs ${want}`);
      if (at < offsets[i]) await fh.write(Buffer.alloc(offsets[i] - at));
      await fh.write(bytes);
      at = offsets[i] + bytes.byteLength;
    }
    if (at < dataBytes) await fh.write(Buffer.alloc(dataBytes - at));
    await fh.sync();
  } finally {
    await fh.close();
  }
  return header.byteLength + dataBytes;
}
