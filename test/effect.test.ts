import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { readAdapterFolder } from '../src/adapters/folder.js';
import { AdapterIngest, moduleScales } from '../src/adapters/ingest.js';
import type { ModuleReport, Problem, ValidationReport } from '../src/adapters/report.js';
import type { ModelFacts } from '../src/adapters/validate.js';
import type { Architecture, Projection } from '../src/model/architecture.js';
import { buildModel } from '../src/model/build.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { runCheck } from '../src/cli/check.js';
import { openCheckpoint, readArchitecture } from '../src/model/checkpoint/index.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { makePeftTensors, peftConfig, smallArch, writeAdapterFolder, writeBaseConfig, type PeftTensor } from './helpers/adapter-fixtures.js';
import { randomCheckpoint, type MemoryCheckpoint } from './helpers/random-checkpoint.js';
import { tempRoot } from './engine-setup.js';

/**
 * Issue 17, from real files: each broken-training case is written as PEFT would save it
 * (adapter_config.json + adapter_model.safetensors) and read through the same folder reader the
 * server uses. Every deltaNorm is checked against ‖scale·B·A‖_F formed densely here; every
 * relativeNorm against ‖W‖_F of the checkpoint's own weight.
 */

const ARCH: Architecture = smallArch({ numLayers: 4 });
const QV: Projection[] = ['q_proj', 'v_proj'];
const LIMITS = { maxLoraRank: 64, strictBaseModel: false };

let root: { dir: string; remove: () => Promise<void> };
let ck: MemoryCheckpoint;
let MODEL: ModelFacts;
let n = 0;

beforeAll(async () => {
  root = await tempRoot('effect');
  ck = randomCheckpoint(ARCH, 5);
  const built = await buildModel(ck, { outDir: join(root.dir, 'models'), dtype: 'fp32', logits: 'last' });
  MODEL = { architecture: ARCH, loraTargets: built.manifest.loraTargets, modelId: 'small-llama' };
});
afterAll(async () => {
  await root?.remove();
});

async function check(config: Record<string, unknown>, tensors: PeftTensor[], limits: { allowNoEffect?: boolean } = {}): Promise<ValidationReport> {
  const { dir } = await writeAdapterFolder(join(root.dir, `a${n++}`), { config, tensors });
  return (await readAdapterFolder(dir, MODEL, { ...LIMITS, ...limits })).report;
}

const problems = (r: ValidationReport, code: string): Problem[] => [...r.errors, ...r.warnings].filter((p) => p.code === code);
const zeroed = (tensors: PeftTensor[], part: 'A' | 'B', layers?: number[]) =>
  tensors.map((t) => (t.name.includes(`lora_${part}.`) && (!layers || layers.some((l) => t.name.includes(`.layers.${l}.`))) ? { ...t, data: new Float32Array(t.data.length) } : t));

/** ‖scale·B·A‖_F, dense: B [out, r] · A [r, in] formed entry by entry in float64 */
function denseDeltaNorm(tensors: PeftTensor[], module: string, scale: number): number {
  const A = tensors.find((t) => t.name.endsWith(`${module}.lora_A.weight`))!;
  const B = tensors.find((t) => t.name.endsWith(`${module}.lora_B.weight`))!;
  const [r, inF] = A.shape as [number, number];
  const outF = B.shape[0]!;
  let s = 0;
  for (let o = 0; o < outF; o++) {
    for (let i = 0; i < inF; i++) {
      let d = 0;
      for (let k = 0; k < r; k++) d += B.data[o * r + k]! * A.data[k * inF + i]!;
      s += (scale * d) ** 2;
    }
  }
  return Math.sqrt(s);
}

function denseWeightNorm(module: string): number {
  const w = ck.tensor(`${module}.weight`)!.read();
  let s = 0;
  for (const x of w) s += x * x;
  return Math.sqrt(s);
}

const relErr = (a: number, b: number) => Math.abs(a - b) / Math.abs(b);

describe('the graph build caches ‖W‖_F of every LoRA target', () => {
  it('in the manifest, equal to the norm of the checkpoint weight', () => {
    expect(MODEL.loraTargets).toHaveLength(ARCH.numLayers * 7);
    for (const t of MODEL.loraTargets) expect(relErr(t.weightNorm!, denseWeightNorm(t.name))).toBeLessThan(1e-12);
  });
});

describe('a normal adapter', () => {
  const tensors = makePeftTensors(ARCH, { r: 4, targets: ['q_proj', 'v_proj', 'down_proj'], seed: 3, scale: 0.2 });
  let report: ValidationReport;
  beforeAll(async () => {
    report = await check(peftConfig({ r: 4, lora_alpha: 8, target_modules: ['q_proj', 'v_proj', 'down_proj'] }), tensors);
  });

  it('passes with no effect warnings', () => {
    expect(report.errors).toEqual([]);
    expect(report.warnings).toEqual([]);
  });

  it('deltaNorm = ‖scale·B·A‖_F formed densely (1e-6 relative); relativeNorm = deltaNorm / ‖W‖_F', () => {
    expect(report.modules).toHaveLength(ARCH.numLayers * 3);
    for (const m of report.modules) {
      const dense = denseDeltaNorm(tensors, m.module, 2);
      expect(dense).toBeGreaterThan(0);
      expect(relErr(m.deltaNorm!, dense)).toBeLessThan(1e-6);
      expect(relErr(m.relativeNorm!, dense / denseWeightNorm(m.module))).toBeLessThan(1e-6);
    }
  });

  it('rank-pattern ranks and rslora scales are measured with the module own rank and scale', async () => {
    const cfg = peftConfig({ r: 4, lora_alpha: 8, use_rslora: true, rank_pattern: { v_proj: 2 }, target_modules: QV });
    const t = makePeftTensors(ARCH, { r: 4, targets: QV, seed: 9, rankFor: (m) => (m.endsWith('v_proj') ? 2 : 4) });
    const r = await check(cfg, t);
    expect(r.errors).toEqual([]);
    for (const m of r.modules) {
      const scale = 8 / Math.sqrt(m.module.endsWith('v_proj') ? 2 : 4);
      expect(m.scale).toBe(scale);
      expect(relErr(m.deltaNorm!, denseDeltaNorm(t, m.module, scale))).toBeLessThan(1e-6);
    }
  });
});

describe('no_effect: every module changes nothing → an error with the cause and its count', () => {
  const base = () => makePeftTensors(ARCH, { r: 4, targets: QV, seed: 4 });
  const total = ARCH.numLayers * 2;

  it('lora_B all zeros (PEFT saved before training updated B)', async () => {
    const r = await check(peftConfig({ r: 4, target_modules: QV }), zeroed(base(), 'B'));
    expect(r.ok).toBe(false);
    expect(r.errors.map((p) => p.code)).toEqual(['no_effect']);
    const p = r.errors[0]!;
    expect(p.message).toContain(`all ${total} modules have lora_B = 0`);
    expect(p.message).toMatch(/PEFT initialises lora_B to zero/);
    expect(p.actual).toEqual({ modules: total, lora_B: total });
    for (const m of r.modules) expect(m.deltaNorm).toBe(0);
  });

  it('lora_alpha 0', async () => {
    const r = await check(peftConfig({ r: 4, lora_alpha: 0, target_modules: QV }), base());
    expect(r.errors.map((p) => p.code)).toEqual(['no_effect']);
    expect(r.errors[0]!.message).toContain(`all ${total} modules have scale 0 from lora_alpha = 0`);
    expect(r.errors[0]!.key).toBe('lora_alpha');
    expect(r.errors[0]!.actual).toEqual({ modules: total, alpha: total });
  });

  it('alpha_pattern entries 0 for every module: both keys named', async () => {
    const r = await check(peftConfig({ r: 4, lora_alpha: 16, alpha_pattern: { q_proj: 0, v_proj: 0 }, target_modules: QV }), base());
    expect(r.errors.map((p) => p.code)).toEqual(['no_effect']);
    expect(r.errors[0]!.message).toContain(`all ${total} modules have scale 0 from alpha_pattern["q_proj"] = 0, alpha_pattern["v_proj"] = 0`);
  });

  it('lora_A all zeros', async () => {
    const r = await check(peftConfig({ r: 4, target_modules: QV }), zeroed(base(), 'A'));
    expect(r.errors.map((p) => p.code)).toEqual(['no_effect']);
    expect(r.errors[0]!.message).toContain(`all ${total} modules have lora_A = 0`);
  });

  it('mixed causes are each counted', async () => {
    const t = zeroed(zeroed(base(), 'B', [0, 1]), 'A', [2, 3]);
    const r = await check(peftConfig({ r: 4, target_modules: QV }), t);
    expect(r.errors[0]!.message).toContain(`4 of ${total} modules have lora_B = 0 (layers 0–1)`);
    expect(r.errors[0]!.message).toContain(`4 of ${total} modules have lora_A = 0 (layers 2–3)`);
  });

  it('with allow_no_effect the same adapter passes, the problem kept as a warning', async () => {
    const r = await check(peftConfig({ r: 4, target_modules: QV }), zeroed(base(), 'B'), { allowNoEffect: true });
    expect(r.ok).toBe(true);
    expect(r.errors).toEqual([]);
    expect(r.warnings.map((p) => p.code)).toEqual(['no_effect']);
  });
});

describe('no_effect_modules: some modules change nothing → a warning that counts and names them', () => {
  it('half the layers with lora_B = 0: "14 of 28 … layers 2–3 were not trained", names bounded to 8', async () => {
    const all: Projection[] = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'];
    const t = zeroed(makePeftTensors(ARCH, { r: 4, targets: all, seed: 6 }), 'B', [2, 3]);
    const r = await check(peftConfig({ r: 4, target_modules: all }), t);
    expect(r.ok).toBe(true);
    const [p] = problems(r, 'no_effect_modules');
    expect(p!.severity).toBe('warning');
    const zero = r.modules.filter((m) => m.layer >= 2).map((m) => m.module);
    expect(zero).toHaveLength(14);
    expect(p!.message).toBe(`14 of 28 modules change nothing: 14 of 28 modules have lora_B = 0: layers 2–3 were not trained. The first 8: ${zero.slice(0, 8).join(', ')}, ….`);
    expect(p!.actual).toEqual(zero.slice(0, 8));
    expect(r.modules.filter((m) => m.layer < 2).every((m) => m.deltaNorm! > 0)).toBe(true);
  });

  it('an alpha_pattern entry 0 names its key', async () => {
    const r = await check(peftConfig({ r: 4, alpha_pattern: { v_proj: 0 }, target_modules: QV }), makePeftTensors(ARCH, { r: 4, targets: QV, seed: 7 }));
    const [p] = problems(r, 'no_effect_modules');
    expect(p!.message).toContain('4 of 8 modules have scale 0 from alpha_pattern["v_proj"] = 0');
  });
});

describe('large_delta: a module that outweighs its base weight', () => {
  it('relativeNorm > 1 → a warning naming the modules and the key that set their scale', async () => {
    const t = makePeftTensors(ARCH, { r: 4, targets: QV, seed: 8, scale: 0.5 });
    const r = await check(peftConfig({ r: 4, lora_alpha: 4000, target_modules: QV }), t);
    expect(r.ok).toBe(true);
    const big = r.modules.filter((m) => m.relativeNorm! > 1);
    expect(big.length).toBe(r.modules.length);
    const [p] = problems(r, 'large_delta');
    expect(p!.key).toBe('lora_alpha');
    expect(p!.message).toMatch(/^8 modules would outweigh the base weight/);
    expect(p!.message).toContain('lora_alpha = 4000 / r = 4 → scale 1000');
    expect((p!.actual as { module: string }[]).map((x) => x.module)).toEqual(big.map((m) => m.module));
  });

  it('an ordinary scale gives none', async () => {
    const r = await check(peftConfig({ r: 4, lora_alpha: 8, target_modules: QV }), makePeftTensors(ARCH, { r: 4, targets: QV, seed: 8, scale: 0.05 }));
    expect(problems(r, 'large_delta')).toEqual([]);
    expect(Math.max(...r.modules.map((m) => m.relativeNorm!))).toBeLessThan(1);
  });
});

describe('a tensor of shape [0]', () => {
  it('keeps shape_mismatch and names the likely cause: an unconsolidated DeepSpeed ZeRO-3 save', async () => {
    const t = makePeftTensors(ARCH, { r: 4, targets: QV, seed: 2, shapeOverride: ({ part }) => (part === 'B' ? [0] : undefined) });
    const r = await check(peftConfig({ r: 4, target_modules: QV }), t);
    const shape = r.errors.filter((p) => p.code === 'shape_mismatch');
    expect(shape).toHaveLength(ARCH.numLayers * 2);
    expect(shape[0]!.message).toMatch(/has shape \[0\].*unconsolidated DeepSpeed ZeRO-3 save/);
    expect(shape[0]!.hint).toMatch(/stage3_gather_16bit_weights_on_model_save/);
  });
});

describe('the upload stream path measures the same deltas as the file read back', () => {
  async function viaStream(config: Record<string, unknown>, tensors: PeftTensor[], configFirst: boolean): Promise<ModuleReport[]> {
    const { dir, weightsPath } = await writeAdapterFolder(join(root.dir, `s${n++}`), { config, tensors });
    const bytes = await readFile(weightsPath);
    const ingest = new AdapterIngest({ loraTargets: MODEL.loraTargets, maxRank: 64, maxBytes: 1 << 24, file: 'adapter_model.safetensors', scales: configFirst ? moduleScales(JSON.stringify(config), MODEL.loraTargets) : undefined });
    for (let at = 0; at < bytes.length; at += 777) ingest.push(bytes.subarray(at, at + 777));
    const ingested = ingest.finish();
    expect(ingested).not.toBeNull();
    const res = await readAdapterFolder(dir, MODEL, LIMITS, { readValues: true, ingested });
    expect(res.source).toBe('stream');
    return res.report.modules;
  }

  for (const configFirst of [false, true]) {
    it(`with the scale ${configFirst ? 'folded in on the way' : 'folded in afterwards'}`, async () => {
      const cfg = peftConfig({ r: 4, lora_alpha: 12, target_modules: QV });
      const t = makePeftTensors(ARCH, { r: 4, targets: QV, seed: 21 });
      const modules = await viaStream(cfg, t, configFirst);
      for (const m of modules) expect(relErr(m.deltaNorm!, denseDeltaNorm(t, m.module, 3))).toBeLessThan(1e-6);
    });
  }

  it('a stream-scaled lora_alpha 0 is still attributed to alpha, not to lora_B', async () => {
    const cfg = peftConfig({ r: 4, lora_alpha: 0, target_modules: QV });
    const { dir, weightsPath } = await writeAdapterFolder(join(root.dir, `s${n++}`), { config: cfg, tensors: makePeftTensors(ARCH, { r: 4, targets: QV, seed: 22 }) });
    const ingest = new AdapterIngest({ loraTargets: MODEL.loraTargets, maxRank: 64, maxBytes: 1 << 24, file: 'adapter_model.safetensors', scales: moduleScales(JSON.stringify(cfg), MODEL.loraTargets) });
    ingest.push(await readFile(weightsPath));
    const r = (await readAdapterFolder(dir, MODEL, LIMITS, { readValues: true, ingested: ingest.finish() })).report;
    expect(r.errors.map((p) => p.code)).toEqual(['no_effect']);
    expect(r.errors[0]!.message).toContain('modules have scale 0 from lora_alpha = 0');
  });
});

describe('without the base weights (loraserve check: targets from config.json alone)', () => {
  it('deltaNorm is measured, relativeNorm is null and no large_delta is claimed', async () => {
    const offline: ModelFacts = { ...MODEL, loraTargets: loraTargetsFor(ARCH) };
    const t = makePeftTensors(ARCH, { r: 4, targets: QV, seed: 8 });
    const { dir } = await writeAdapterFolder(join(root.dir, `o${n++}`), { config: peftConfig({ r: 4, lora_alpha: 4000, target_modules: QV }), tensors: t });
    const r = (await readAdapterFolder(dir, offline, LIMITS)).report;
    for (const m of r.modules) {
      expect(relErr(m.deltaNorm!, denseDeltaNorm(t, m.module, 1000))).toBeLessThan(1e-6);
      expect(m.relativeNorm).toBeNull();
    }
    expect(problems(r, 'large_delta')).toEqual([]);
  });
});

describe('loraserve check', () => {
  const run = async (argv: string[]) => {
    let out = '';
    let err = '';
    const code = await runCheck(argv, { stdout: (s) => (out += s), stderr: (s) => (err += s), env: {} });
    return { code, out, err };
  };

  it('with a config.json base: deltaNorm yes, relativeNorm not measured (said so); no_effect exits 1 unless --allow-no-effect', async () => {
    const base = await writeBaseConfig(join(root.dir, 'cfg-base'), ARCH);
    const { dir } = await writeAdapterFolder(join(root.dir, `c${n++}`), { config: peftConfig({ r: 4, target_modules: QV }), tensors: zeroed(makePeftTensors(ARCH, { r: 4, targets: QV, seed: 30 }), 'B') });
    const refused = await run(['--base', base, dir]);
    expect(refused.code).toBe(1);
    expect(refused.out).toMatch(/^error {3}no_effect .*all 8 modules have lora_B = 0/m);
    const allowed = await run(['--base', base, dir, '--allow-no-effect']);
    expect(allowed.code).toBe(0);
    expect(allowed.out).toMatch(/^warning no_effect/m);
    expect(allowed.out).toContain('relativeNorm not measured: --base has no weights');
    expect(allowed.out).toContain('The probe effect (KL, max Δlog p) needs the served graph');
  });

  it('with a model folder that holds the weights: relativeNorm from them', async () => {
    const model = await ensureEmbeddedModel(join(root.dir, 'embedded'));
    const { architecture } = await readArchitecture(model);
    const t = makePeftTensors(architecture, { r: 4, targets: QV, seed: 31 });
    const { dir } = await writeAdapterFolder(join(root.dir, `c${n++}`), { config: peftConfig({ r: 4, lora_alpha: 8, target_modules: QV }), tensors: t });
    const res = await run(['--base', model, dir, '--json']);
    expect(res.code).toBe(0);
    const report = JSON.parse(res.out) as ValidationReport;
    expect(report.effect).toBeUndefined();
    const ck = await openCheckpoint(model);
    for (const m of report.modules) {
      expect(relErr(m.deltaNorm!, denseDeltaNorm(t, m.module, 2))).toBeLessThan(1e-6);
      const w = ck.tensor(`${m.module}.weight`)!.read();
      expect(relErr(m.relativeNorm!, m.deltaNorm! / Math.sqrt(w.reduce((s, x) => s + x * x, 0)))).toBeLessThan(1e-9);
    }
    expect((await run(['--base', model, dir])).out).toMatch(/relativeNorm \(÷ ‖W‖_F of the base weight\) [0-9.e-]+ … [0-9.e-]+/);
  });
});
