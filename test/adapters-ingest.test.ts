import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AdapterIngest, moduleScales, type IngestedWeights } from '../src/adapters/ingest.js';
import { transpose } from '../src/adapters/convert.js';
import { readAdapterFolder } from '../src/adapters/folder.js';
import { encodeSafetensors, toFloat32 } from '../src/adapters/safetensors.js';
import { countNonFinite, type ModelFacts } from '../src/adapters/validate.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { encodeValues, makePeftTensors, peftConfig, seededRandom, smallArch, writeAdapterFolder, type PeftTensor } from './helpers/adapter-fixtures.js';

/**
 * The stream decoder must give exactly what reading the stored file gives: the same engine-layout
 * values (bit for bit), the same NaN/Inf counts, the same report; and it must give up, not guess,
 * on any stream it cannot account for.
 */

const arch = smallArch();
const model: ModelFacts = { architecture: arch, loraTargets: loraTargetsFor(arch), modelId: 'test/model' };
const limits = { maxLoraRank: 64, strictBaseModel: false };
const ALL = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;

type Dtype = 'F32' | 'F16' | 'BF16';

/** the bits of a float array (a view into a larger block compares only its own elements) */
const u32 = (a: Float32Array) => new Uint32Array(a.buffer, a.byteOffset, a.length);

function fileBytes(tensors: PeftTensor[], dtype: Dtype): Uint8Array {
  return encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype, shape: t.shape, data: encodeValues(t.data, dtype) })), { format: 'pt' });
}

/** Feeds `bytes` in chunks whose sizes come from `sizes` (cycled). */
function ingest(bytes: Uint8Array, sizes: (i: number) => number, opts: Partial<ConstructorParameters<typeof AdapterIngest>[0]> = {}): { ingest: AdapterIngest; result: IngestedWeights | null } {
  const ing = new AdapterIngest({ loraTargets: model.loraTargets, maxRank: 64, maxBytes: 1 << 30, file: 'adapter_model.safetensors', ...opts });
  for (let at = 0, i = 0; at < bytes.byteLength; i++) {
    const n = Math.max(1, sizes(i));
    ing.push(bytes.subarray(at, at + n));
    at += n;
  }
  return { ingest: ing, result: ing.finish() };
}

const random = seededRandom(7);
const CHUNKINGS: [string, (i: number) => number][] = [
  ['one chunk', () => 1 << 30],
  ['1-byte chunks', () => 1],
  ['random 1–97-byte chunks', () => 1 + Math.floor(random() * 97)],
  ['65536-byte chunks (busboy)', () => 65536],
];

describe('AdapterIngest: the same values as reading the file', () => {
  const ranks = new Map([
    ['model.layers.0.self_attn.q_proj', 1],
    ['model.layers.1.mlp.down_proj', 5],
  ]);
  const tensors = makePeftTensors(arch, { r: 3, targets: ALL, rankFor: (m) => ranks.get(m) ?? 3, seed: 11 });
  // non-finite values in places that straddle chunk boundaries in the random chunking
  tensors[2]!.data[0] = Number.NaN;
  tensors[2]!.data[7] = Number.POSITIVE_INFINITY;
  tensors[5]!.data[tensors[5]!.data.length - 1] = Number.NEGATIVE_INFINITY;

  for (const dtype of ['F32', 'F16', 'BF16'] as const) {
    const bytes = fileBytes(tensors, dtype);
    for (const [label, sizes] of CHUNKINGS) {
      it(`${dtype}, ${label}: every target tensor transposed bit for bit, every NaN/Inf counted`, () => {
        const { ingest: ing, result } = ingest(bytes, sizes);
        expect(ing.reason).toBeNull();
        expect(result).not.toBeNull();
        expect(result!.engineLayout.size).toBe(tensors.length);
        for (const t of tensors) {
          const header = result!.header.tensors.find((h) => h.name === t.name)!;
          const values = toFloat32(dtype, bytes.subarray(result!.header.dataStart + header.begin, result!.header.dataStart + header.end));
          const [rows, cols] = t.shape as [number, number];
          const want = transpose(values, rows, cols);
          const got = result!.engineLayout.get(t.name)!;
          expect(u32(got)).toEqual(u32(want));
          expect(result!.nonFinite.get(t.name)).toEqual(countNonFinite(values));
        }
        expect(result!.nonFinite.get(tensors[2]!.name)).toEqual({ nan: 1, inf: 1 });
      });
    }
  }

  it('keeps only tensors of a shape some target has, counts the others', () => {
    const odd: PeftTensor[] = [
      ...tensors.slice(0, 2),
      // not a LoRA key
      { name: 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight.x', shape: [5, 3], data: new Float32Array(15).fill(Number.NaN) },
      // the seed's case: lora_B rows ≠ the target's out_features (trained on another model size)
      { name: 'base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight', shape: [arch.hiddenSize + 1, 3], data: new Float32Array((arch.hiddenSize + 1) * 3) },
      // rank over maxRank
      { name: 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight', shape: [65, arch.hiddenSize], data: new Float32Array(65 * arch.hiddenSize) },
      { name: 'base_model.model.model.embed_tokens.weight', shape: [4, 4], data: new Float32Array(16).fill(Number.POSITIVE_INFINITY) },
    ];
    const { result } = ingest(fileBytes(odd, 'F32'), () => 333);
    expect([...result!.engineLayout.keys()].sort()).toEqual([odd[0]!.name, odd[1]!.name].sort());
    expect(result!.nonFinite.get(odd[2]!.name)).toEqual({ nan: 15, inf: 0 });
    expect(result!.nonFinite.get(odd[5]!.name)).toEqual({ nan: 0, inf: 16 });
    expect(result!.nonFinite.get(odd[3]!.name)).toEqual({ nan: 0, inf: 0 });
  });

  it('stops keeping arrays at maxBytes (the rest is still counted)', () => {
    const bytes = fileBytes(tensors, 'F32');
    const first = tensors[0]!.data.byteLength + tensors[1]!.data.byteLength;
    const { result } = ingest(bytes, () => 4096, { maxBytes: first });
    expect(result!.engineLayout.size).toBe(2);
    expect(result!.nonFinite.size).toBe(tensors.length);
  });
});

describe('AdapterIngest gives up on streams it cannot account for', () => {
  const tensors = makePeftTensors(arch, { r: 2, targets: ['q_proj'], seed: 3 });
  const bytes = fileBytes(tensors, 'F32');
  const cases: [string, Uint8Array][] = [
    ['truncated by one byte', bytes.subarray(0, bytes.byteLength - 1)],
    ['truncated inside the header', bytes.subarray(0, 20)],
    ['one byte appended', Buffer.concat([bytes, Buffer.from([0])])],
    ['a header length of 2^40', (() => {
      const b = Buffer.from(bytes);
      b.writeBigUInt64LE(1n << 40n, 0);
      return b;
    })()],
    ['a header that is not JSON', (() => {
      const b = Buffer.from(bytes);
      b[8] = 0x5b;
      b[9] = 0x7d;
      return b;
    })()],
    ['empty', new Uint8Array(0)],
  ];
  for (const [label, b] of cases) {
    it(label, () => {
      const { ingest: ing, result } = ingest(b, () => 17);
      expect(result).toBeNull();
      expect(ing.reason).toMatch(/./);
    });
  }

  it('a header whose offsets leave a gap', () => {
    const header = JSON.stringify({ 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight': { dtype: 'F32', shape: [1, 1], data_offsets: [4, 8] } });
    const prefix = Buffer.alloc(8);
    prefix.writeBigUInt64LE(BigInt(header.length), 0);
    const { ingest: ing, result } = ingest(Buffer.concat([prefix, Buffer.from(header), Buffer.alloc(8)]), () => 5);
    expect(result).toBeNull();
    expect(ing.reason).toMatch(/no tensor claims/);
  });
});

describe('readAdapterFolder with the streamed decode = without it', () => {
  let root: string;
  beforeAll(async () => {
    root = await mkdtemp(path.join(os.tmpdir(), 'loraserve-ingest-'));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  const cases: [string, Record<string, unknown>, (t: PeftTensor[]) => void, Dtype][] = [
    ['rank_pattern, alpha_pattern and rslora', peftConfig({ r: 4, lora_alpha: 8, target_modules: [...ALL], rank_pattern: { down_proj: 2 }, alpha_pattern: { 'layers.1.self_attn.q_proj': 3 }, use_rslora: true }), () => {}, 'F32'],
    ['bf16 values', peftConfig({ r: 4, lora_alpha: 16, target_modules: [...ALL] }), () => {}, 'BF16'],
    ['a NaN and an Inf (rejected, same report)', peftConfig({ r: 4, lora_alpha: 16, target_modules: [...ALL] }), (t) => {
      t[3]!.data[1] = Number.NaN;
      t[8]!.data[0] = Number.NEGATIVE_INFINITY;
    }, 'F16'],
  ];
  for (const [label, config, spoil, dtype] of cases) {
    it(label, async () => {
      const rankPattern = (config.rank_pattern ?? {}) as Record<string, number>;
      const tensors = makePeftTensors(arch, { r: config.r as number, targets: ALL, rankFor: (m) => (m.endsWith('down_proj') && rankPattern.down_proj) || (config.r as number), seed: 5 });
      spoil(tensors);
      const dir = path.join(root, label.replace(/\W+/g, '-'));
      const { weightsPath } = await writeAdapterFolder(dir, { config, tensors, dtype });
      const bytes = fileBytes(tensors, dtype);
      await writeFile(weightsPath, bytes);

      const plain = await readAdapterFolder(dir, model, limits);
      const scales = moduleScales(JSON.stringify(config), model.loraTargets)!;
      expect(new Set(scales.values()).size).toBeGreaterThan(label.startsWith('rank_pattern') ? 2 : 0);
      // config after the weights (scale folded afterwards), config first (folded in the stream), and a
      // stream scaled by factors the report does not confirm (must fall back to reading the file)
      const wrong = new Map([...scales].map(([k, v]) => [k, v * 2]));
      for (const [how, opts] of [['config after', {}], ['config first', { scales }], ['wrong scales', { scales: wrong }]] as const) {
        const { result } = ingest(bytes, () => 65536, opts);
        const streamed = await readAdapterFolder(dir, model, limits, { readValues: true, ingested: result });
        // a B scaled on the way was rounded to float32 once more: its delta norm may differ in the last bits
        const norms = (r: typeof plain.report) => r.modules.map((m) => m.deltaNorm!);
        const withoutNorms = (r: typeof plain.report) => ({ ...r, modules: r.modules.map(({ deltaNorm: _d, relativeNorm: _r, ...m }) => m) });
        expect(withoutNorms(streamed.report), how).toEqual(withoutNorms(plain.report));
        norms(streamed.report).forEach((x, i) => {
          const p = norms(plain.report)[i]!;
          if (p === null) expect(x, how).toBeNull();
          else expect(Math.abs(x - p) / p, how).toBeLessThan(1e-6);
        });
        if (!plain.weights) {
          expect(plain.report.ok).toBe(false);
          expect(plain.report.errors.filter((e) => e.code === 'non_finite')).toHaveLength(2);
          expect(streamed.weights).toBeNull();
          continue;
        }
        expect(streamed.weights!.bytes).toBe(plain.weights.bytes);
        expect([...streamed.weights!.modules.keys()]).toEqual([...plain.weights.modules.keys()]);
        for (const [module, w] of plain.weights.modules) {
          const s = streamed.weights!.modules.get(module)!;
          expect(s.rank).toBe(w.rank);
          expect(u32(s.A), `${how} ${module} A`).toEqual(u32(w.A));
          expect(u32(s.B), `${how} ${module} B`).toEqual(u32(w.B));
          const m = plain.report.modules.find((x) => x.module === module)!;
          // the decoder's own arrays were handed over (nothing read back), except after a wrong scale
          expect(s.B === result!.engineLayout.get(m.tensorB!), how).toBe(how !== 'wrong scales');
        }
      }
    });
  }

  it('a stored file that differs from the stream is read from disk, not trusted', async () => {
    const config = peftConfig({ r: 2, lora_alpha: 4, target_modules: ['q_proj'] });
    const tensors = makePeftTensors(arch, { r: 2, targets: ['q_proj'], seed: 9 });
    const dir = path.join(root, 'changed');
    await writeAdapterFolder(dir, { config, tensors });
    const { result } = ingest(fileBytes(makePeftTensors(arch, { r: 2, targets: ['q_proj', 'v_proj'], seed: 9 }), 'F32'), () => 4096);
    const plain = await readAdapterFolder(dir, model, limits);
    const streamed = await readAdapterFolder(dir, model, limits, { readValues: true, ingested: result });
    expect(streamed.report).toEqual(plain.report);
    for (const [module, w] of plain.weights!.modules) expect(streamed.weights!.modules.get(module)!.B).toEqual(w.B);
  });
});
