import { open } from 'node:fs/promises';
import { GGUF_ALIGNMENT, GGUF_MAGIC, VALUE_TYPE } from './format.js';
import { GGML_TYPE, tensorBytes, type GgmlTypeName } from './quants.js';

/**
 * Reads a GGUF header back (tests and checks; the bench itself only writes): metadata as plain
 * values, tensor infos with their absolute file offsets. Written from the same spec as the
 * writer, but decoding every value type the spec names, so a file from another writer reads too.
 */

export type ReadValue = number | bigint | boolean | string | ReadValue[];

export interface ReadTensor {
  name: string;
  /** PyTorch order (outermost first) */
  shape: number[];
  type: GgmlTypeName;
  /** absolute offset of the data in the file */
  offset: number;
  bytes: number;
}

export interface GgufHeader {
  version: number;
  metadata: Map<string, ReadValue>;
  tensors: ReadTensor[];
  dataStart: number;
}

class Cursor {
  at = 0;
  constructor(private readonly buf: Buffer) {}
  private need(n: number): void {
    if (this.at + n > this.buf.length) throw new RangeError('GGUF header runs past the bytes read');
  }
  u8(): number {
    this.need(1);
    return this.buf[this.at++];
  }
  u16(): number {
    this.need(2);
    const v = this.buf.readUInt16LE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32LE(this.at);
    this.at += 4;
    return v;
  }
  i32(): number {
    this.need(4);
    const v = this.buf.readInt32LE(this.at);
    this.at += 4;
    return v;
  }
  u64(): bigint {
    this.need(8);
    const v = this.buf.readBigUInt64LE(this.at);
    this.at += 8;
    return v;
  }
  small(): number {
    const v = this.u64();
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`GGUF: count ${v} too large`);
    return Number(v);
  }
  string(): string {
    const n = this.small();
    this.need(n);
    const s = this.buf.toString('utf8', this.at, this.at + n);
    this.at += n;
    return s;
  }
  value(type: number): ReadValue {
    switch (type) {
      case VALUE_TYPE.u8:
        return this.u8();
      case VALUE_TYPE.i8:
        return (this.u8() << 24) >> 24;
      case VALUE_TYPE.u16:
        return this.u16();
      case VALUE_TYPE.i16:
        return (this.u16() << 16) >> 16;
      case VALUE_TYPE.u32:
        return this.u32();
      case VALUE_TYPE.i32:
        return this.i32();
      case VALUE_TYPE.f32: {
        this.need(4);
        const v = this.buf.readFloatLE(this.at);
        this.at += 4;
        return v;
      }
      case VALUE_TYPE.bool:
        return this.u8() !== 0;
      case VALUE_TYPE.string:
        return this.string();
      case VALUE_TYPE.array: {
        const of = this.u32();
        const n = this.small();
        const out: ReadValue[] = [];
        for (let i = 0; i < n; i++) out.push(this.value(of));
        return out;
      }
      case VALUE_TYPE.u64:
        return this.u64();
      case VALUE_TYPE.i64: {
        this.need(8);
        const v = this.buf.readBigInt64LE(this.at);
        this.at += 8;
        return v;
      }
      case VALUE_TYPE.f64: {
        this.need(8);
        const v = this.buf.readDoubleLE(this.at);
        this.at += 8;
        return v;
      }
      default:
        throw new Error(`GGUF: unknown value type ${type}`);
    }
  }
}

const TYPE_NAMES = new Map<number, GgmlTypeName>(Object.entries(GGML_TYPE).map(([k, v]) => [v, k as GgmlTypeName]));

export function parseHeader(buf: Buffer): GgufHeader {
  const c = new Cursor(buf);
  if (c.u32() !== GGUF_MAGIC) throw new Error('not a GGUF file (magic)');
  const version = c.u32();
  if (version !== 3) throw new Error(`GGUF version ${version}; only 3 is read`);
  const nTensors = c.small();
  const nKv = c.small();
  const metadata = new Map<string, ReadValue>();
  for (let i = 0; i < nKv; i++) {
    const key = c.string();
    metadata.set(key, c.value(c.u32()));
  }
  const alignment = metadata.get('general.alignment') ?? GGUF_ALIGNMENT;
  if (typeof alignment !== 'number') throw new Error('GGUF: general.alignment is not a number');
  const infos: Omit<ReadTensor, 'offset'>[] = [];
  const rel: number[] = [];
  for (let i = 0; i < nTensors; i++) {
    const name = c.string();
    const nDims = c.u32();
    const dims: number[] = [];
    for (let d = 0; d < nDims; d++) dims.push(c.small());
    const typeId = c.u32();
    const type = TYPE_NAMES.get(typeId);
    if (!type) throw new Error(`GGUF: tensor ${name} has ggml type ${typeId}, which this reader does not know`);
    rel.push(c.small());
    const shape = dims.reverse();
    infos.push({ name, shape, type, bytes: tensorBytes(type, shape.reduce((x, y) => x * y, 1)) });
  }
  const dataStart = Math.ceil(c.at / alignment) * alignment;
  return { version, metadata, dataStart, tensors: infos.map((t, i) => ({ ...t, offset: dataStart + rel[i] })) };
}

/** Reads and parses the header of a file, reading more of it until the header fits. */
export async function readHeader(path: string): Promise<GgufHeader> {
  const fh = await open(path, 'r');
  try {
    const size = (await fh.stat()).size;
    for (let n = 1 << 20; ; n *= 4) {
      const len = Math.min(n, size);
      const buf = Buffer.alloc(len);
      await fh.read(buf, 0, len, 0);
      try {
        return parseHeader(buf);
      } catch (e) {
        if (!(e instanceof RangeError) || len === size) throw e;
      }
    }
  } finally {
    await fh.close();
  }
}

export async function readTensorBytes(path: string, t: ReadTensor): Promise<Uint8Array> {
  const fh = await open(path, 'r');
  try {
    const buf = Buffer.alloc(t.bytes);
    await fh.read(buf, 0, t.bytes, t.offset);
    return new Uint8Array(buf.buffer, buf.byteOffset, buf.byteLength);
  } finally {
    await fh.close();
  }
}
