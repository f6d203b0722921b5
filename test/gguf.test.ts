import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { embeddedModelFiles } from '../src/model/embedded.js';
import { llama3RopeFactors, permuteRows, writeCheckpointGguf } from '../bench/gguf/convert.js';
import { bool, f32, str, u32, type MetadataValue } from '../bench/gguf/format.js';
import { fromHalf, toHalf } from '../bench/gguf/half.js';
import { dequantizeQ4_0, dequantizeQ8_0, encodeTensor, quantizeQ4_0, quantizeQ8_0 } from '../bench/gguf/quants.js';
import { parseHeader, readHeader, readTensorBytes } from '../bench/gguf/reader.js';
import { writeGguf } from '../bench/gguf/writer.js';
import { randomCheckpoint, Rng, tinyArchitecture } from './helpers/random-checkpoint.js';

/**
 * The GGUF writer against ggml's definitions, with expected bytes worked out by hand from
 * ggml-quants.c's reference quantizers (not from the code under test), and a write → read-back
 * of headers, metadata and tensor data.
 */

const tokenizerJson = embeddedModelFiles().get('tokenizer.json')!.toString('utf8');

let dir: string;
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'loraserve-gguf-'));
});
afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('fp16 (block scales)', () => {
  it('rounds to nearest even, keeps subnormals, overflows to infinity', () => {
    expect(toHalf(1)).toBe(0x3c00);
    expect(toHalf(-2)).toBe(0xc000);
    expect(toHalf(65504)).toBe(0x7bff);
    expect(toHalf(65520)).toBe(0x7c00); // halfway above the largest half rounds up to infinity
    expect(toHalf(2 ** -24)).toBe(0x0001);
    expect(toHalf(2 ** -26)).toBe(0x0000);
    expect(toHalf(1 + 2 ** -11)).toBe(0x3c00); // tie → even mantissa 0
    expect(toHalf(1 + 3 * 2 ** -11)).toBe(0x3c02); // tie → even mantissa 2
    expect(fromHalf(0x3555)).toBeCloseTo(1 / 3, 3);
    for (const h of [0x0001, 0x03ff, 0x0400, 0x3c00, 0x7bff, 0xbc01]) expect(toHalf(fromHalf(h))).toBe(h);
  });
});

describe('Q8_0 blocks', () => {
  it('encodes a hand-computed block: d = max|x| / 127, q = roundf(x / d), ties away from zero', () => {
    const x = new Float32Array(32);
    x.set([127, -127, 2.5, -2.5, 0.4, -0.6, 63.5, 1]);
    const b = quantizeQ8_0(x);
    expect(b.length).toBe(34);
    // d = 127 / 127 = 1 → fp16 0x3c00, little-endian
    expect([b[0], b[1]]).toEqual([0x00, 0x3c]);
    expect(Array.from(new Int8Array(b.buffer, 2, 8))).toEqual([127, -127, 3, -3, 0, -1, 64, 1]);
    expect(Array.from(new Int8Array(b.buffer, 10, 24))).toEqual(new Array(24).fill(0));
    expect(Array.from(dequantizeQ8_0(b, 32).subarray(0, 8))).toEqual([127, -127, 3, -3, 0, -1, 64, 1]);
  });

  it('an all-zero block has d = 0 and zero quants', () => {
    expect(Array.from(quantizeQ8_0(new Float32Array(32)))).toEqual(new Array(34).fill(0));
  });

  it('re-quantizing dequantized values gives the same bytes; error ≤ d/2 per value', () => {
    const rng = new Rng(5);
    const x = rng.array(32 * 64, 3);
    const q = quantizeQ8_0(x);
    const y = dequantizeQ8_0(q, x.length);
    expect(Buffer.from(quantizeQ8_0(y)).equals(Buffer.from(q))).toBe(true);
    const view = new DataView(q.buffer);
    for (let i = 0; i < 64; i++) {
      const d = fromHalf(view.getUint16(i * 34, true));
      // the scale is rounded to fp16: allow its relative error (2^-11) times the largest |q|
      for (let j = 0; j < 32; j++) expect(Math.abs(x[i * 32 + j] - y[i * 32 + j])).toBeLessThanOrEqual(d / 2 + 127 * d * 2 ** -11);
    }
  });

  it('refuses a length that is not whole blocks', () => {
    expect(() => quantizeQ8_0(new Float32Array(33))).toThrow(/multiple of 32/);
  });
});

describe('Q4_0 blocks', () => {
  it('encodes a hand-computed block: d = (signed max) / -8, q = min(15, trunc(x/d + 8.5)), j | (j+16) << 4', () => {
    const x = new Float32Array(32);
    // the largest magnitude is -16 → d = 2, id = 0.5
    x.set([-16, 14, 15, 1, -1, 0, 3]);
    x.set([2, -3, 16 * 0.999, 5], 16);
    const b = quantizeQ4_0(x);
    expect(b.length).toBe(18);
    expect([b[0], b[1]]).toEqual([0x00, 0x40]); // fp16(2)
    // low nibbles: -16→0, 14→15, 15→min(15,16)=15, 1→9, -1→8, 0→8, 3→10 (9.5+... trunc(10)=10)
    // high nibbles: 2→9, -3→trunc(7)=7, 15.984→15, 5→trunc(11)=11, then zeros → 8
    const expected = [0 | (9 << 4), 15 | (7 << 4), 15 | (15 << 4), 9 | (11 << 4), 8 | (8 << 4), 8 | (8 << 4), 10 | (8 << 4)];
    expect(Array.from(b.subarray(2, 9))).toEqual(expected);
    for (let j = 7; j < 16; j++) expect(b[2 + j]).toBe(8 | (8 << 4));
    const y = dequantizeQ4_0(b, 32);
    expect(Array.from(y.subarray(0, 7))).toEqual([-16, 14, 14, 2, 0, 0, 4]);
    expect(Array.from(y.subarray(16, 20))).toEqual([2, -2, 14, 6]);
  });

  it('a positive maximum gets a negative d: +16 is level 0, -16 clamps to level 15 (= -14)', () => {
    const x = new Float32Array(32);
    x[0] = 16;
    x[1] = -16;
    const b = quantizeQ4_0(x);
    expect([b[0], b[1]]).toEqual([0x00, 0xc0]); // fp16(-2)
    expect(b[2] & 0x0f).toBe(0);
    expect(b[3] & 0x0f).toBe(15);
    expect(Array.from(dequantizeQ4_0(b, 32).subarray(0, 2))).toEqual([16, -14]);
  });

  it('re-quantizing dequantized values gives the same bytes', () => {
    const x = new Rng(6).array(32 * 64, 1);
    const q = quantizeQ4_0(x);
    expect(Buffer.from(quantizeQ4_0(dequantizeQ4_0(q, x.length))).equals(Buffer.from(q))).toBe(true);
  });
});

describe('GGUF container', () => {
  it('writes a header and data that read back: metadata of every written type, shapes innermost first, 32-byte aligned data', async () => {
    const md = new Map<string, MetadataValue>([
      ['general.architecture', str('llama')],
      ['general.alignment', u32(32)],
      ['x.f', f32(0.25)],
      ['x.b', bool(true)],
      ['x.i', { type: 'i32', value: -7 }],
      ['x.s', { type: 'array', of: 'string', value: ['a', 'ü b', ''] }],
      ['x.a', { type: 'array', of: 'i32', value: [1, -2, 3] }],
      ['x.fa', { type: 'array', of: 'f32', value: [0.5, -1.5] }],
    ]);
    const rng = new Rng(3);
    const values = [rng.array(3 * 5, 1), rng.array(2 * 64, 1), rng.array(96, 1)];
    const tensors = [
      { name: 'a', shape: [3, 5], type: 'F32' as const },
      { name: 'b', shape: [2, 64], type: 'Q8_0' as const },
      { name: 'c', shape: [96], type: 'Q4_0' as const },
    ];
    const path = join(dir, 'container.gguf');
    const size = await writeGguf(path, md, tensors, (i) => encodeTensor(tensors[i].type, values[i]));
    const bytes = await readFile(path);
    expect(bytes.length).toBe(size);
    expect(bytes.toString('latin1', 0, 4)).toBe('GGUF');
    const h = parseHeader(bytes);
    expect(h.version).toBe(3);
    expect(h.metadata.get('general.architecture')).toBe('llama');
    expect(h.metadata.get('x.f')).toBe(0.25);
    expect(h.metadata.get('x.b')).toBe(true);
    expect(h.metadata.get('x.i')).toBe(-7);
    expect(h.metadata.get('x.s')).toEqual(['a', 'ü b', '']);
    expect(h.metadata.get('x.a')).toEqual([1, -2, 3]);
    expect(h.metadata.get('x.fa')).toEqual([0.5, -1.5]);
    expect(h.tensors.map((t) => [t.name, t.shape, t.type, t.bytes])).toEqual([
      ['a', [3, 5], 'F32', 60],
      ['b', [2, 64], 'Q8_0', 4 * 34],
      ['c', [96], 'Q4_0', 3 * 18],
    ]);
    // dims are stored innermost first: tensor a's row length 5 comes before its 3 rows
    const info = Buffer.alloc(8 + 1 + 4 + 16);
    info.writeBigUInt64LE(1n, 0);
    info.write('a', 8);
    info.writeUInt32LE(2, 9);
    info.writeBigUInt64LE(5n, 13);
    info.writeBigUInt64LE(3n, 21);
    expect(bytes.indexOf(info)).toBeGreaterThan(0);
    expect(h.dataStart % 32).toBe(0);
    for (const [i, t] of h.tensors.entries()) {
      expect(t.offset % 32).toBe(0);
      expect(Buffer.from(await readTensorBytes(path, t)).equals(Buffer.from(encodeTensor(tensors[i].type, values[i])))).toBe(true);
    }
    const f = new Float32Array(Uint8Array.from(bytes.subarray(h.tensors[0].offset, h.tensors[0].offset + 60)).buffer);
    expect(Array.from(f)).toEqual(Array.from(values[0]));
  });

  it('refuses rows that are not whole blocks, duplicate names, wrong data sizes', async () => {
    const md = new Map<string, MetadataValue>();
    await expect(writeGguf(join(dir, 'bad1.gguf'), md, [{ name: 'w', shape: [2, 48], type: 'Q4_0' }], () => new Uint8Array(0))).rejects.toThrow(/48 values is not a whole number of 32-value blocks/);
    await expect(writeGguf(join(dir, 'bad2.gguf'), md, [{ name: 'w', shape: [4], type: 'F32' }, { name: 'w', shape: [4], type: 'F32' }], () => new Uint8Array(16))).rejects.toThrow(/tensor w twice/);
    await expect(writeGguf(join(dir, 'bad3.gguf'), md, [{ name: 'w', shape: [4], type: 'F32' }], () => new Uint8Array(12))).rejects.toThrow(/has 12 bytes, its F32 shape needs 16/);
    await expect(writeGguf(join(dir, 'bad4.gguf'), new Map([['n', u32(-1)]]), [], () => new Uint8Array(0))).rejects.toThrow(/not a u32/);
  });
});

describe('checkpoint → GGUF (llama.cpp names and metadata)', () => {
  it('permutes q/k rows per head from (i, i + d/2) pairs to (2i, 2i + 1)', () => {
    // 1 head of 4 rows, row length 1: rows [r0 r1 r2 r3] → [r0 r2 r1 r3]
    expect(Array.from(permuteRows(Float32Array.from([10, 11, 12, 13]), 1, 1))).toEqual([10, 12, 11, 13]);
    // 2 heads of 4 rows of length 2
    const w = Float32Array.from({ length: 16 }, (_, i) => i);
    expect(Array.from(permuteRows(w, 2, 2))).toEqual([0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]);
  });

  it('llama3 rope factors: 1 at short wavelengths, factor at long ones, smooth in between', () => {
    const a = tinyArchitecture({ headDim: 64, hiddenSize: 128, numHeads: 2, ropeTheta: 500000, rope: { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 } });
    const f = llama3RopeFactors(a);
    expect(f.length).toBe(32);
    expect(f[0]).toBe(1);
    expect(f[31]).toBe(32);
    // wavelength 2π·θ^(2k/d) between 2048 and 8192: 1 / ((1 − s)/32 + s), s = (8192/λ − 1)/3
    for (let k = 0; k < 32; k++) {
      const lambda = 2 * Math.PI * 500000 ** ((2 * k) / 64);
      if (lambda < 2048 || lambda > 8192) continue;
      const s = (8192 / lambda - 1) / 3;
      expect(f[k]).toBeCloseTo(1 / ((1 - s) / 32 + s), 5);
    }
  });

  it('qwen2 Q4_0: names, types (norms and biases F32), tied output omitted, tokenizer padded to the vocabulary', async () => {
    const a = tinyArchitecture({ family: 'qwen2', vocabSize: 576, intermediateSize: 96, attentionBias: true, tieWordEmbeddings: true, bosTokenId: 507, eosTokenIds: [508] });
    const path = join(dir, 'qwen2.gguf');
    const w = await writeCheckpointGguf(randomCheckpoint(a, 11), tokenizerJson, path, 'Q4_0');
    const h = await readHeader(path);
    expect(h.metadata.get('general.architecture')).toBe('qwen2');
    expect(h.metadata.get('general.file_type')).toBe(2);
    expect(h.metadata.get('qwen2.block_count')).toBe(a.numLayers);
    expect(h.metadata.get('qwen2.attention.head_count_kv')).toBe(a.numKvHeads);
    expect(h.metadata.get('qwen2.rope.dimension_count')).toBe(a.headDim);
    expect(h.metadata.get('qwen2.attention.layer_norm_rms_epsilon')).toBeCloseTo(1e-5, 10);
    expect(h.metadata.get('tokenizer.ggml.model')).toBe('gpt2');
    const tokens = h.metadata.get('tokenizer.ggml.tokens') as string[];
    const types = h.metadata.get('tokenizer.ggml.token_type') as number[];
    expect(tokens.length).toBe(576);
    expect(tokens[256]).toBe('he');
    expect([tokens[507], types[507]]).toEqual(['<|begin_of_text|>', 3]);
    expect([tokens[575], types[575]]).toEqual(['[PAD575]', 5]);
    expect(types[0]).toBe(1);
    expect((h.metadata.get('tokenizer.ggml.merges') as string[])[0]).toBe('h e');
    expect(h.metadata.get('tokenizer.ggml.bos_token_id')).toBe(507);
    const names = h.tensors.map((t) => t.name);
    expect(names).not.toContain('output.weight');
    expect(names.length).toBe(1 + a.numLayers * 12 + 1);
    const type = (n: string) => h.tensors.find((t) => t.name === n)?.type;
    expect(type('token_embd.weight')).toBe('Q4_0');
    expect(type('blk.0.attn_q.weight')).toBe('Q4_0');
    expect(type('blk.1.ffn_down.weight')).toBe('Q4_0');
    expect(type('blk.0.attn_q.bias')).toBe('F32');
    expect(type('blk.0.attn_norm.weight')).toBe('F32');
    expect(type('output_norm.weight')).toBe('F32');
    expect(h.tensors.find((t) => t.name === 'blk.0.ffn_gate.weight')?.shape).toEqual([96, 64]);
    expect(w.types.get('blk.0.ffn_up.weight')).toBe('Q4_0');
  });

  it('llama: a weight whose rows are not whole blocks stays F32; unsupported models are refused by name', async () => {
    const a = tinyArchitecture({ vocabSize: 576, intermediateSize: 80, tieWordEmbeddings: false, bosTokenId: 507, eosTokenIds: [508] });
    const w = await writeCheckpointGguf(randomCheckpoint(a, 12), tokenizerJson, join(dir, 'llama.gguf'), 'Q8_0');
    expect(w.types.get('blk.0.ffn_down.weight')).toBe('F32'); // rows of 80
    expect(w.types.get('blk.0.ffn_up.weight')).toBe('Q8_0'); // rows of 64
    expect(w.types.get('output.weight')).toBe('Q8_0');
    const gemma = tinyArchitecture({ family: 'gemma2', normPlusOne: true });
    await expect(writeCheckpointGguf(randomCheckpoint(gemma, 1), tokenizerJson, join(dir, 'g.gguf'), 'F32')).rejects.toThrow(/Gemma features, family gemma2 not supported/);
    const small = tinyArchitecture({ vocabSize: 100 });
    await expect(writeCheckpointGguf(randomCheckpoint(small, 1), tokenizerJson, join(dir, 's.gguf'), 'F32')).rejects.toThrow(/past the model's vocabulary of 100/);
  });
});
