import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { toEngineWeights, transpose } from '../src/adapters/convert.js';
import { readAdapterFolder } from '../src/adapters/folder.js';
import { AdapterIngest, moduleScales } from '../src/adapters/ingest.js';
import type { Problem, ValidationReport } from '../src/adapters/report.js';
import { ADAPTER_SAFETENSORS_LIMITS, DEFAULT_SAFETENSORS_LIMITS, encodeSafetensors, parseHeader, type TensorToWrite } from '../src/adapters/safetensors.js';
import { sameBaseModel, validateAdapter, type AdapterInput, type ModelFacts } from '../src/adapters/validate.js';
import type { Architecture, Projection } from '../src/model/architecture.js';
import { PROJECTIONS, projectionDims } from '../src/model/architecture.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { encodeValues, FIXTURE_CONFIGS, makePeftTensors, peftConfig, peftFixturesExist, readFixtureConfig, smallArch, writeAdapterFolder, type PeftTensor } from './helpers/adapter-fixtures.js';

const ARCH = smallArch();
const MODEL: ModelFacts = { architecture: ARCH, loraTargets: loraTargetsFor(ARCH), modelId: 'small-llama' };
const LIMITS = { maxLoraRank: 64, strictBaseModel: false };

/** Real safetensors bytes → the header the validator sees (the same path readHeader takes). */
function input(config: Record<string, unknown> | string | null, tensors: PeftTensor[] | null, opts: { values?: boolean; dtype?: TensorToWrite['dtype'] } = {}): AdapterInput {
  let header = null;
  let headerProblems: Problem[] = [];
  if (tensors) {
    const dtype = opts.dtype ?? 'F32';
    const bytes = encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype, shape: t.shape, data: dtype === 'F32' ? t.data : dtype === 'F16' || dtype === 'BF16' ? encodeValues(t.data, dtype) : new Uint8Array(t.data.length * 4) })));
    const n = Number(bytes.readBigUInt64LE(0));
    const parsed = parseHeader('adapter_model.safetensors', bytes.subarray(8, 8 + n), bytes.byteLength);
    header = parsed.header;
    headerProblems = parsed.problems;
  }
  return {
    configText: config === null ? null : typeof config === 'string' ? config : JSON.stringify(config),
    weightsFile: 'adapter_model.safetensors',
    header,
    headerProblems,
    values: opts.values && tensors ? new Map(tensors.map((t) => [t.name, t.data])) : undefined,
  };
}

const codes = (r: ValidationReport) => r.errors.map((p) => p.code);
const only = (r: ValidationReport, code: string) => [...r.errors, ...r.warnings].filter((p) => p.code === code);
const QV: Projection[] = ['q_proj', 'v_proj'];

describe('an adapter that fits', () => {
  const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 1 });
  const report = validateAdapter(input(peftConfig(), tensors, { values: true }), MODEL, LIMITS);

  it('passes with no problems', () => {
    expect(report.errors).toEqual([]);
    expect(report.warnings).toEqual([]);
    expect(report.ok).toBe(true);
  });

  it('lists every targeted module with its rank, alpha, scale and tensors', () => {
    expect(report.modules).toHaveLength(ARCH.numLayers * 2);
    const m = report.modules.find((x) => x.module === 'model.layers.2.self_attn.v_proj')!;
    expect(m).toEqual({
      module: 'model.layers.2.self_attn.v_proj',
      layer: 2,
      projection: 'v_proj',
      rank: 8,
      alpha: 16,
      scale: 2,
      rankKey: 'r',
      alphaKey: 'lora_alpha',
      tensorA: 'base_model.model.model.layers.2.self_attn.v_proj.lora_A.weight',
      tensorB: 'base_model.model.model.layers.2.self_attn.v_proj.lora_B.weight',
      // measured from the values (test/effect.test.ts checks them); no base weights here
      deltaNorm: expect.any(Number),
      relativeNorm: null,
    });
  });

  it('summarises config and file', () => {
    // q: A [8, 24] + B [24, 8]; v: A [8, 24] + B [12, 8] (2 kv heads × 6)
    const perLayer = 8 * 24 + 24 * 8 + 8 * 24 + 12 * 8;
    expect(report.summary).toEqual({ peftType: 'LORA', baseModel: 'test/small-llama', r: 8, loraAlpha: 16, useRslora: false, targetedModules: 6, tensors: 12, parameters: 3 * perLayer });
  });

  it('accepts adapter-name segments and F16 / BF16 files', () => {
    const named = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 1, adapterName: 'default' });
    expect(validateAdapter(input(peftConfig(), named), MODEL, LIMITS).ok).toBe(true);
    expect(validateAdapter(input(peftConfig(), tensors, { dtype: 'F16' }), MODEL, LIMITS).ok).toBe(true);
    expect(validateAdapter(input(peftConfig(), tensors, { dtype: 'BF16' }), MODEL, LIMITS).ok).toBe(true);
  });
});

describe('shape and rank problems', () => {
  it('shape_mismatch: the seed’s sentence, with tensor, module, expected and actual', () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 2, shapeOverride: ({ part, projection, layer }) => (part === 'B' && projection === 'q_proj' && layer === 0 ? [16, 8] : undefined) });
    const report = validateAdapter(input(peftConfig(), tensors), MODEL, LIMITS);
    expect(report.ok).toBe(false);
    expect(report.errors).toHaveLength(1);
    expect(report.errors[0]).toEqual({
      code: 'shape_mismatch',
      severity: 'error',
      file: 'adapter_model.safetensors',
      tensor: 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight',
      module: 'model.layers.0.self_attn.q_proj',
      expected: [24, 8],
      actual: [16, 8],
      message: "model.layers.0.self_attn.q_proj.lora_B.weight has shape [16, 8]; this model's q_proj has out_features 24, so [24, 8] was expected. The adapter was probably trained on a model of another size or a pruned variant.",
    });
  });

  it('a model of another size fails on every tensor whose features differ', () => {
    const bigger = smallArch({ hiddenSize: 32 });
    const tensors = makePeftTensors(bigger, { r: 8, targets: ['q_proj', 'down_proj'], seed: 3 });
    const report = validateAdapter(input(peftConfig({ target_modules: ['q_proj', 'down_proj'] }), tensors), MODEL, LIMITS);
    // q_proj: A in 32≠24 (out 24 = 4 heads × 6 is unchanged); down_proj: B out 32≠24. One per layer each.
    const sm = only(report, 'shape_mismatch');
    expect(sm.map((p) => p.tensor).sort()).toEqual(
      [0, 1, 2].flatMap((l) => [`base_model.model.model.layers.${l}.self_attn.q_proj.lora_A.weight`, `base_model.model.model.layers.${l}.mlp.down_proj.lora_B.weight`]).sort(),
    );
    expect(sm.find((p) => p.tensor!.includes('q_proj'))!.message).toContain('in_features 24, so [8, 24] was expected');
  });

  it('rank_mismatch names the rank_pattern key or r that decided', () => {
    const config = peftConfig({ r: 8, rank_pattern: { 'layers.1.self_attn.q_proj': 4 } });
    // tensors trained with rank 8 everywhere: layer 1 q_proj disagrees with the pattern
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 4 });
    const report = validateAdapter(input(config, tensors), MODEL, LIMITS);
    const rm = only(report, 'rank_mismatch');
    expect(rm.map((p) => p.tensor)).toEqual(['base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight', 'base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight']);
    expect(rm[0]).toMatchObject({ key: 'layers.1.self_attn.q_proj', expected: 4, actual: 8, module: 'model.layers.1.self_attn.q_proj' });
    expect(rm[0]!.message).toContain('rank_pattern key "layers.1.self_attn.q_proj" = 4');
    expect(codes(report)).toEqual(['rank_mismatch', 'rank_mismatch']);

    const wrongR = validateAdapter(input(peftConfig({ r: 16 }), makePeftTensors(ARCH, { r: 8, targets: ['q_proj'], seed: 4, layers: [0] })), MODEL, LIMITS);
    expect(only(wrongR, 'rank_mismatch')[0]).toMatchObject({ key: 'r', expected: 16, actual: 8 });
  });

  it('tensors following rank_pattern / alpha_pattern pass and carry their scales', () => {
    const config = peftConfig({ r: 8, lora_alpha: 16, use_rslora: true, rank_pattern: { 'layers.1.self_attn.q_proj': 4 }, alpha_pattern: { v_proj: 32 } });
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 5, rankFor: (m) => (m === 'model.layers.1.self_attn.q_proj' ? 4 : 8) });
    const report = validateAdapter(input(config, tensors), MODEL, LIMITS);
    expect(report.ok).toBe(true);
    const get = (n: string) => report.modules.find((m) => m.module === n)!;
    expect(get('model.layers.1.self_attn.q_proj')).toMatchObject({ rank: 4, scale: 8, rankKey: 'layers.1.self_attn.q_proj' });
    expect(get('model.layers.0.self_attn.q_proj').scale).toBeCloseTo(16 / Math.sqrt(8), 12);
    expect(get('model.layers.0.self_attn.v_proj')).toMatchObject({ alpha: 32, alphaKey: 'v_proj' });
  });

  it('an unmatched rank_pattern key is a warning; the adapter still passes', () => {
    const report = validateAdapter(input(peftConfig({ rank_pattern: { 'layers.7.self_attn.q_proj': 4 } }), makePeftTensors(ARCH, { r: 8, targets: QV, seed: 6 })), MODEL, LIMITS);
    expect(report.ok).toBe(true);
    expect(report.warnings.map((w) => [w.code, w.key])).toEqual([['rank_pattern_unmatched', 'layers.7.self_attn.q_proj']]);
  });

  it('rank_too_large against MAX_LORA_RANK, once per deciding key', () => {
    const report = validateAdapter(input(peftConfig({ r: 8 }), makePeftTensors(ARCH, { r: 8, targets: QV, seed: 7 })), MODEL, { maxLoraRank: 4, strictBaseModel: false });
    expect(codes(report)).toEqual(['rank_too_large']);
    expect(report.errors[0]).toMatchObject({ key: 'r', actual: 8, expected: '<= 4' });
    expect(report.errors[0]!.message).toContain('6 modules');
  });
});

describe('presence problems', () => {
  it('model.language_model.* keys → no_modules_matched naming both prefixes, not a flood', () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 8, modulePrefix: 'model.language_model.' });
    const report = validateAdapter(input(peftConfig(), tensors), MODEL, LIMITS);
    expect(codes(report)).toEqual(['no_modules_matched']);
    const p = report.errors[0]!;
    expect(p.actual).toEqual(['model.language_model.layers']);
    expect(p.expected).toEqual(['model.layers']);
    expect(p.message).toContain('"model.language_model.layers"');
    expect(p.message).toContain('"model.layers"');
  });

  it('a config that targets nothing in the model → no_modules_matched', () => {
    const report = validateAdapter(input(peftConfig({ target_modules: ['W_pack'] }), makePeftTensors(ARCH, { r: 8, targets: QV, seed: 9 })), MODEL, LIMITS);
    expect(codes(report)).toContain('no_modules_matched');
    expect(report.ok).toBe(false);
  });

  it('a file with no LoRA tensors → no_modules_matched', () => {
    const report = validateAdapter(input(peftConfig(), []), MODEL, LIMITS);
    expect(codes(report)).toEqual(['no_modules_matched']);
  });

  it('A without B, and a targeted module with no tensors → missing_tensor each', () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 10 }).filter((t) => t.name !== 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight' && !t.name.includes('layers.2.self_attn.v_proj'));
    const report = validateAdapter(input(peftConfig(), tensors), MODEL, LIMITS);
    expect(codes(report)).toEqual(['missing_tensor', 'missing_tensor']);
    expect(report.errors.map((p) => [p.module, p.tensor])).toEqual([
      ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.q_proj.lora_B.weight'],
      ['model.layers.2.self_attn.v_proj', undefined],
    ]);
    expect(report.errors[0]!.expected).toEqual([24, 8]);
    expect(report.errors[1]!.expected).toEqual({ lora_A: [8, 24], lora_B: [12, 8] });
  });

  it('tensors for untargeted or absent modules → unexpected_tensor; duplicates too', () => {
    const extra = makePeftTensors(smallArch({ numLayers: 5 }), { r: 8, targets: ['q_proj', 'v_proj', 'up_proj'], seed: 11, layers: [0, 4] });
    const base = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 11 }).filter((t) => !t.name.includes('layers.0.'));
    const dup = makePeftTensors(ARCH, { r: 8, targets: ['q_proj'], seed: 12, layers: [1], adapterName: 'other' }).slice(0, 1);
    const report = validateAdapter(input(peftConfig(), [...extra, ...base, ...dup]), MODEL, LIMITS);
    const ut = only(report, 'unexpected_tensor');
    expect(ut.map((p) => p.module).sort()).toEqual(
      [
        'model.layers.0.mlp.up_proj',
        'model.layers.0.mlp.up_proj',
        'model.layers.4.self_attn.q_proj',
        'model.layers.4.self_attn.q_proj',
        'model.layers.4.self_attn.v_proj',
        'model.layers.4.self_attn.v_proj',
        'model.layers.4.mlp.up_proj',
        'model.layers.4.mlp.up_proj',
        'model.layers.1.self_attn.q_proj',
      ].sort(),
    );
    expect(ut.find((p) => p.module === 'model.layers.0.mlp.up_proj')!.message).toContain('does not target');
    expect(ut.find((p) => p.module === 'model.layers.4.mlp.up_proj')!.message).toContain('does not have');
    expect(ut.find((p) => p.module === 'model.layers.1.self_attn.q_proj')!.message).toContain('second lora_A');
    expect(codes(report).every((c) => c === 'unexpected_tensor')).toBe(true);
  });

  it('missing files: config, weights, and a pickle-only folder', () => {
    const noConfig = validateAdapter(input(null, makePeftTensors(ARCH, { r: 8, targets: QV, seed: 13 })), MODEL, LIMITS);
    expect(noConfig.errors.map((p) => [p.code, p.file])).toEqual([['missing_file', 'adapter_config.json']]);
    const noWeights = validateAdapter(input(peftConfig(), null), MODEL, LIMITS);
    expect(noWeights.errors.map((p) => [p.code, p.file])).toEqual([['missing_file', 'adapter_model.safetensors']]);
    const pickle = validateAdapter({ ...input(peftConfig(), null), otherFiles: ['adapter_model.bin', 'README.md'] }, MODEL, LIMITS);
    expect(pickle.errors).toHaveLength(1);
    expect(pickle.errors[0]!.message).toMatch(/pickle.*never loaded/);
    expect(pickle.errors[0]!.hint).toContain('safe_serialization=True');
  });

  it('invalid config: reported, and the tensors are still checked against the model', () => {
    const tensors = makePeftTensors(smallArch({ hiddenSize: 32 }), { r: 8, targets: ['q_proj'], seed: 14, layers: [0] });
    const report = validateAdapter(input('{"r": 8,', tensors), MODEL, LIMITS);
    expect(codes(report)).toEqual(['invalid_config', 'shape_mismatch']);
    expect(report.errors[1]).toMatchObject({ expected: [8, 24], actual: [8, 32] });
  });
});

describe('features that cannot be served', () => {
  const ok = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 15 });
  const unsupported = (overrides: Record<string, unknown>, tensors = ok) => {
    const r = validateAdapter(input(peftConfig(overrides), tensors), MODEL, LIMITS);
    expect(r.ok).toBe(false);
    return only(r, 'unsupported_feature');
  };

  it('modules_to_save, AdaLoRA, bias, target_parameters, fan_in_fan_out (DoRA and lora_bias: variants-validate.test.ts)', () => {
    // a classification head is not part of generation; embed_tokens / lm_head copies are served (embedding-parts.test.ts)
    expect(unsupported({ modules_to_save: ['lm_head', 'score'] })[0]).toMatchObject({ key: 'modules_to_save', actual: ['score'] });
    expect(unsupported({ modules_to_save: ['classifier'] })[0]!.hint).toContain('modules_to_save');
    const ada = unsupported({ peft_type: 'ADALORA' });
    expect(ada[0]!.message).toContain('AdaLoRA');
    expect(ada[0]!.hint).toContain('merge_and_unload');
    expect(unsupported({ bias: 'all' })[0]!.key).toBe('bias');
    expect(unsupported({ target_parameters: ['experts.gate_up_proj'] })[0]!.key).toBe('target_parameters');
    expect(unsupported({ fan_in_fan_out: true })[0]!.hint).toContain('fan_in_fan_out=false');
  });

  it('lm_head LoRA is refused; embed_tokens LoRA is checked, not refused (embedding-parts.test.ts)', () => {
    expect(unsupported({ target_modules: ['q_proj', 'v_proj', 'lm_head'] })[0]!.module).toBe('lm_head');
    const targeted = validateAdapter(input(peftConfig({ target_modules: ['q_proj', 'v_proj', 'embed_tokens'] }), ok), MODEL, LIMITS);
    expect(codes(targeted)).toEqual(['missing_tensor', 'missing_tensor']);
    expect(targeted.errors[0]!.module).toBe('model.embed_tokens');
    const emb = [{ name: 'base_model.model.model.embed_tokens.lora_embedding_A', shape: [8, 64], data: new Float32Array(512) }];
    const untargeted = validateAdapter(input(peftConfig(), [...ok, ...emb]), MODEL, LIMITS);
    expect(untargeted.errors.map((e) => [e.code, e.tensor])).toEqual([['unexpected_tensor', emb[0]!.name]]);
  });

  it.each([
    ['pissa', 'PiSSA'],
    ['pissa_niter_16', 'PiSSA'],
    ['olora', 'OLoRA'],
    ['corda', 'CorDA'],
    ['loftq', 'LoftQ'],
  ])('init_lora_weights %s → base_modifying_init', (init, name) => {
    const r = validateAdapter(input(peftConfig({ init_lora_weights: init }), ok), MODEL, LIMITS);
    expect(codes(r)).toEqual(['base_modifying_init']);
    const p = r.errors[0]!;
    expect(p.actual).toBe(init);
    if (name === 'LoftQ') expect(p.message).toContain('quantised');
    else {
      expect(p.message).toContain(name);
      expect(p.hint).toContain('path_initial_model_for_weight_conversion');
    }
  });

  it.each([true, false, 'gaussian', 'eva', 'orthogonal'])('init_lora_weights %s is fine', (init) => {
    expect(validateAdapter(input(peftConfig({ init_lora_weights: init }), ok), MODEL, LIMITS).ok).toBe(true);
  });
});

describe('values, dtypes, base model', () => {
  it('NaN / Inf → non_finite naming the tensor and the count', () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 16 });
    const t = tensors[3]!;
    t.data[0] = NaN;
    t.data[5] = Infinity;
    t.data[7] = -Infinity;
    const r = validateAdapter(input(peftConfig(), tensors, { values: true }), MODEL, LIMITS);
    expect(codes(r)).toEqual(['non_finite']);
    expect(r.errors[0]).toMatchObject({ tensor: t.name, actual: 3, expected: 0 });
    expect(r.errors[0]!.message).toContain('1 NaN, 2 ±Inf');
  });

  it('integer tensors → bad_dtype', () => {
    const r = validateAdapter(input(peftConfig(), makePeftTensors(ARCH, { r: 8, targets: ['q_proj'], seed: 17, layers: [0] }), { dtype: 'I32' }), MODEL, LIMITS);
    expect(only(r, 'bad_dtype')).toHaveLength(2);
  });

  it('base_model_mismatch: a warning, or an error when strict', () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 18 });
    const cfg = peftConfig({ base_model_name_or_path: 'mistralai/Mistral-7B-v0.1' });
    const lax = validateAdapter(input(cfg, tensors), MODEL, LIMITS);
    expect(lax.ok).toBe(true);
    expect(lax.warnings.map((w) => w.code)).toEqual(['base_model_mismatch']);
    const strict = validateAdapter(input(cfg, tensors), MODEL, { maxLoraRank: 64, strictBaseModel: true });
    expect(codes(strict)).toEqual(['base_model_mismatch']);
    expect(sameBaseModel('meta-llama/Llama-2-13b-hf', 'Llama-2-13b-hf')).toBe(true);
    expect(sameBaseModel('/data/models/TinyLlama-1.1B-Chat-v1.0/', 'tinyllama-1.1b-chat-v1.0')).toBe(true);
    expect(sameBaseModel('meta-llama/Llama-2-13b-hf', 'Llama-2-7b-hf')).toBe(false);
  });

  it('collects every problem at once', () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 19, shapeOverride: ({ part, layer, projection }) => (layer === 0 && part === 'B' && projection === 'v_proj' ? [99, 8] : undefined) }).filter((t) => !t.name.includes('layers.2.self_attn.q_proj.lora_A'));
    tensors[0]!.data[0] = NaN;
    const r = validateAdapter(input(peftConfig({ target_parameters: ['experts.gate_up_proj'], init_lora_weights: 'olora', rank_pattern: { nothing: 2 }, base_model_name_or_path: 'other/model' }), tensors, { values: true }), MODEL, { maxLoraRank: 4, strictBaseModel: false });
    expect(new Set(codes(r))).toEqual(new Set(['unsupported_feature', 'base_modifying_init', 'rank_too_large', 'shape_mismatch', 'missing_tensor', 'non_finite']));
    expect(new Set(r.warnings.map((w) => w.code))).toEqual(new Set(['rank_pattern_unmatched', 'base_model_mismatch']));
  });
});

describe.skipIf(!peftFixturesExist)('real PEFT configs with made-up tensors', () => {
  // per config: a small architecture of the config's family and the projections it targets
  const cases: Record<(typeof FIXTURE_CONFIGS)[number], { arch: Architecture; targets: Projection[] }> = {
    'tinyllama-1.1b-chat.adapter_config.json': { arch: smallArch(), targets: [...PROJECTIONS] },
    'llama-3.2-1b.adapter_config.json': { arch: smallArch({ numKvHeads: 1 }), targets: [...PROJECTIONS] },
    'qwen2.5-vl-regex-targets.adapter_config.json': { arch: smallArch({ family: 'qwen2', attentionBias: true }), targets: [...PROJECTIONS] },
    'mistral-7b-old-nulls.adapter_config.json': { arch: smallArch({ family: 'mistral' }), targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj'] },
  };

  it.each(FIXTURE_CONFIGS)('%s: fitting tensors pass, a wider model’s tensors fail', async (name) => {
    const { text, json } = await readFixtureConfig(name);
    const { arch, targets } = cases[name];
    const model: ModelFacts = { architecture: arch, loraTargets: loraTargetsFor(arch), modelId: String(json.base_model_name_or_path) };
    const r = json.r as number;
    const fit = validateAdapter(input(text, makePeftTensors(arch, { r, targets, seed: 20 })), model, LIMITS);
    expect(fit.errors).toEqual([]);
    expect(fit.ok).toBe(true);
    expect(fit.modules).toHaveLength(arch.numLayers * targets.length);
    expect(fit.modules.every((m) => m.scale === (json.lora_alpha as number) / r)).toBe(true);

    const wide = { ...arch, hiddenSize: arch.hiddenSize + 8 };
    const bad = validateAdapter(input(text, makePeftTensors(wide, { r, targets, seed: 20 })), model, LIMITS);
    expect(bad.ok).toBe(false);
    // every targeted projection reads or writes the hidden size: one mismatch per module
    expect(only(bad, 'shape_mismatch')).toHaveLength(arch.numLayers * targets.length);
  });
});

describe('conversion to the engine layout', () => {
  it('A = A_peftᵀ, B = scale·B_peftᵀ, and x·A·B equals x·(scale·B_peft·A_peft)ᵀ', () => {
    const config = peftConfig({ r: 4, lora_alpha: 12, target_modules: ['k_proj'] });
    const tensors = makePeftTensors(ARCH, { r: 4, targets: ['k_proj'], seed: 21 });
    const report = validateAdapter(input(config, tensors), MODEL, LIMITS);
    expect(report.ok).toBe(true);
    const values = new Map(tensors.map((t) => [t.name, t.data]));
    const w = toEngineWeights(report, values, MODEL);
    expect(w.modules.size).toBe(3);
    const { inFeatures: inF, outFeatures: outF } = projectionDims(ARCH, 'k_proj');
    const m = w.modules.get('model.layers.1.self_attn.k_proj')!;
    const Ap = values.get('base_model.model.model.layers.1.self_attn.k_proj.lora_A.weight')!;
    const Bp = values.get('base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight')!;
    expect(m.rank).toBe(4);
    expect(m.A.length).toBe(inF * 4);
    expect(m.B.length).toBe(4 * outF);
    // element checks: A[i][j] = Ap[j][i]; B[j][o] = 3 · Bp[o][j]
    expect(m.A[5 * 4 + 2]).toBe(Ap[2 * inF + 5]);
    expect(m.B[1 * outF + 7]).toBeCloseTo(3 * Bp[7 * 4 + 1]!, 6);
    // the delta through the engine layout vs the merged PEFT delta ΔW = scale · B·A ([out, in])
    const x = Array.from({ length: inF }, (_, i) => Math.sin(i + 1));
    for (let o = 0; o < outF; o++) {
      let engine = 0;
      for (let j = 0; j < 4; j++) {
        let xa = 0;
        for (let i = 0; i < inF; i++) xa += x[i]! * m.A[i * 4 + j]!;
        engine += xa * m.B[j * outF + o]!;
      }
      let merged = 0;
      for (let i = 0; i < inF; i++) {
        let dw = 0;
        for (let j = 0; j < 4; j++) dw += Bp[o * 4 + j]! * Ap[j * inF + i]!;
        merged += x[i]! * 3 * dw;
      }
      expect(engine).toBeCloseTo(merged, 5);
    }
    expect(w.bytes).toBe(3 * 4 * (inF * 4 + 4 * outF));
  });

  it('transpose of a known matrix', () => {
    expect([...transpose(new Float32Array([1, 2, 3, 4, 5, 6]), 2, 3)]).toEqual([1, 4, 2, 5, 3, 6]);
    expect([...transpose(new Float32Array([1, 2, 3, 4, 5, 6]), 3, 2, 2)]).toEqual([2, 6, 10, 4, 8, 12]);
  });

  it('refuses a failing report', () => {
    const report = validateAdapter(input(peftConfig(), null), MODEL, LIMITS);
    expect(() => toEngineWeights(report, new Map(), MODEL)).toThrow(/did not pass/);
  });
});

describe('readAdapterFolder (files on disk)', () => {
  let root: string;
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'loraserve-validate-'));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it('reads, validates and converts an F16 adapter', async () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 22 });
    const { dir } = await writeAdapterFolder(join(root, 'f16'), { config: peftConfig(), tensors, dtype: 'F16' });
    const { report, weights } = await readAdapterFolder(dir, MODEL, LIMITS);
    expect(report.ok).toBe(true);
    expect(weights!.modules.size).toBe(6);
    const m = weights!.modules.get('model.layers.0.self_attn.q_proj')!;
    const Ap = tensors.find((t) => t.name.endsWith('layers.0.self_attn.q_proj.lora_A.weight'))!.data;
    // fp16 keeps ~3 decimal digits of values in [-0.5, 0.5)
    expect(m.A[3 * 8 + 1]).toBeCloseTo(Ap[1 * 24 + 3]!, 3);
  });

  it('NaN in a file on disk → non_finite, no weights', async () => {
    const tensors = makePeftTensors(ARCH, { r: 8, targets: QV, seed: 23 });
    tensors[1]!.data[2] = NaN;
    const { dir } = await writeAdapterFolder(join(root, 'nan'), { config: peftConfig(), tensors, dtype: 'BF16' });
    const { report, weights } = await readAdapterFolder(dir, MODEL, LIMITS);
    expect(codes(report)).toEqual(['non_finite']);
    expect(report.errors[0]!.tensor).toBe(tensors[1]!.name);
    expect(weights).toBeNull();
  });

  it('readValues: false skips values and conversion', async () => {
    const { dir } = await writeAdapterFolder(join(root, 'novalues'), { config: peftConfig(), tensors: makePeftTensors(ARCH, { r: 8, targets: QV, seed: 24 }) });
    const { report, weights } = await readAdapterFolder(dir, MODEL, LIMITS, { readValues: false });
    expect(report.ok).toBe(true);
    expect(weights).toBeNull();
  });

  describe('every header corruption surfaces as corrupt_file', () => {
    const good = () => encodeSafetensors(makePeftTensors(ARCH, { r: 8, targets: ['q_proj'], seed: 25, layers: [0] }).map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data })));
    /** rewrites the JSON header (same length, padded with spaces) */
    const withHeader = (mutate: (h: Record<string, { dtype: string; shape: number[]; data_offsets: number[] }>) => void) => {
      const bytes = good();
      const n = Number(bytes.readBigUInt64LE(0));
      const h = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8'));
      mutate(h);
      let json = JSON.stringify(h);
      expect(json.length).toBeLessThanOrEqual(n + 16);
      const out = Buffer.alloc(8);
      json = json.padEnd(Math.max(n, json.length), ' ');
      out.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
      return Buffer.concat([out, Buffer.from(json), bytes.subarray(8 + n)]);
    };
    const A = 'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight';
    const B = 'base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight';
    const cases: [string, () => Buffer][] = [
      ['a file shorter than 8 bytes', () => Buffer.from([1, 2, 3])],
      ['a header length beyond the file', () => { const b = good(); b.writeBigUInt64LE(BigInt(b.length)); return b; }],
      ['a header length over the cap', () => { const b = good(); b.writeBigUInt64LE(2n ** 40n); return b; }],
      ['a header that is not JSON', () => { const b = good(); b.write('!', 8); return b; }],
      ['a header that is a JSON array', () => { const j = '[1]     '; const p = Buffer.alloc(8); p.writeBigUInt64LE(8n); return Buffer.concat([p, Buffer.from(j)]); }],
      ['dtype × shape ≠ byte length', () => withHeader((h) => { h[A]!.shape = [8, 25]; })],
      ['offsets beyond the data', () => withHeader((h) => { const [s, e] = h[B]!.data_offsets as [number, number]; h[B]!.data_offsets = [s + 1000, e + 1000]; })],
      ['overlapping tensors', () => withHeader((h) => { const len = h[B]!.data_offsets[1]! - h[B]!.data_offsets[0]!; h[B]!.data_offsets = [0, len]; })],
      ['a negative shape', () => withHeader((h) => { h[A]!.shape = [-8, 24]; })],
      ['reversed offsets', () => withHeader((h) => { h[A]!.data_offsets = [10, 0]; })],
      ['bytes after the last tensor', () => Buffer.concat([good(), Buffer.alloc(4096, 7)])],
      ['a gap between tensors', () => {
        // the same tensors with 8 unclaimed bytes inserted before the second one
        const bytes = good();
        const n = Number(bytes.readBigUInt64LE(0));
        const h = JSON.parse(bytes.subarray(8, 8 + n).toString('utf8')) as Record<string, { data_offsets: number[] }>;
        const [first, second] = [A, B].sort((x, y) => h[x]!.data_offsets[0]! - h[y]!.data_offsets[0]!) as [string, string];
        const split = h[first]!.data_offsets[1]!;
        h[second]!.data_offsets = h[second]!.data_offsets.map((o) => o + 8);
        const json = Buffer.from(JSON.stringify(h));
        const prefix = Buffer.alloc(8);
        prefix.writeBigUInt64LE(BigInt(json.length));
        const data = bytes.subarray(8 + n);
        return Buffer.concat([prefix, json, data.subarray(0, split), Buffer.alloc(8), data.subarray(split)]);
      }],
    ];
    it.each(cases)('%s', async (label, make) => {
      const dir = join(root, `corrupt-${label.replace(/[^a-z0-9]+/gi, '-')}`);
      await writeAdapterFolder(dir, { config: peftConfig({ target_modules: ['q_proj'], layers_to_transform: [0] }), tensors: null });
      await writeFile(join(dir, 'adapter_model.safetensors'), make());
      const { report, weights } = await readAdapterFolder(dir, MODEL, LIMITS);
      expect(report.ok).toBe(false);
      expect(codes(report)).toContain('corrupt_file');
      // nothing else is blamed on the corrupt tensor itself
      expect(codes(report).filter((c) => c !== 'corrupt_file' && c !== 'missing_tensor')).toEqual([]);
      expect(weights).toBeNull();
    });
  });
});

describe('hostile configs and headers: bounded answers (issue 11)', () => {
  const qv = () => makePeftTensors(ARCH, { r: 8, targets: QV, seed: 41 });
  const maxAbs = (v: Float32Array) => v.reduce((m, x) => Math.max(m, Math.abs(x)), 0);

  it.each([
    ['lora_alpha 1e308 (scale·B overflows float32)', 1e308],
    ['lora_alpha 1e30 (finite weights, but their square is not)', 1e30],
  ])('%s → non_finite naming the module and lora_alpha', (_label, alpha) => {
    const tensors = qv();
    const report = validateAdapter(input(peftConfig({ lora_alpha: alpha }), tensors, { values: true }), MODEL, LIMITS);
    const p = only(report, 'non_finite');
    expect(report.ok).toBe(false);
    expect(p).toHaveLength(1);
    // the module with the largest |B|, and the product the engine would hold
    const bs = tensors.filter((t) => t.name.includes('lora_B'));
    const worst = bs.reduce((a, b) => (maxAbs(b.data) > maxAbs(a.data) ? b : a));
    expect(p[0]).toMatchObject({ key: 'lora_alpha', tensor: worst.name, module: worst.name.replace('base_model.model.', '').replace('.lora_B.weight', '') });
    expect(p[0]!.actual).toBeCloseTo((maxAbs(worst.data) * alpha) / 8, -Math.log10((maxAbs(worst.data) * alpha) / 8) + 5);
    expect(p[0]!.message).toContain(`these ${bs.length} modules`);
  });

  it('the bound follows the dtype the engine runs in: fp16 refuses what fp32 holds', () => {
    const tensors = qv();
    const alpha = 2e6; // max|B| ≈ 0.5 → scale·B ≈ 1.2e5: over 65504, far under float32's bound
    const fp32 = validateAdapter(input(peftConfig({ lora_alpha: alpha }), tensors, { values: true }), MODEL, LIMITS);
    const fp16 = validateAdapter(input(peftConfig({ lora_alpha: alpha }), tensors, { values: true }), { ...MODEL, dtype: 'fp16' }, LIMITS);
    expect(fp32.ok).toBe(true);
    expect(codes(fp16)).toEqual(['non_finite']);
    expect(fp16.errors[0]!.message).toContain('float16');
    // a normal adapter is far from either bound
    expect(validateAdapter(input(peftConfig(), tensors, { values: true }), { ...MODEL, dtype: 'fp16' }, LIMITS).ok).toBe(true);
  });

  it('an alpha_pattern key that sets an overflowing scale is the key named; the maxima counted in the stream serve as well', () => {
    const tensors = qv();
    const streamed = new Map(tensors.filter((t) => t.name.includes('lora_B')).map((t) => [t.name, maxAbs(t.data)]));
    const inp = { ...input(peftConfig({ alpha_pattern: { 'layers.2.self_attn.v_proj': 1e35 } }), tensors), maxAbs: streamed };
    const report = validateAdapter(inp, MODEL, LIMITS);
    expect(codes(report)).toEqual(['non_finite']);
    expect(report.errors[0]).toMatchObject({ key: 'layers.2.self_attn.v_proj', module: 'model.layers.2.self_attn.v_proj' });
    expect(report.errors[0]!.hint).toContain('alpha_pattern');
  });

  it('the maxima measured while the upload streams in (B scaled on the way, or not) give the same answer', () => {
    const tensors = qv();
    const bytes = encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data })));
    const cfg = peftConfig({ lora_alpha: 1e30 });
    for (const scales of [moduleScales(JSON.stringify(cfg), MODEL.loraTargets), undefined]) {
      const ing = new AdapterIngest({ loraTargets: MODEL.loraTargets, maxRank: 64, maxBytes: 1 << 30, file: 'adapter_model.safetensors', scales });
      ing.push(bytes);
      const res = ing.finish()!;
      expect(res.keptAll).toBe(true);
      for (const t of tensors.filter((x) => x.name.includes('lora_B'))) expect(res.maxAbs.get(t.name)! / maxAbs(t.data)).toBeCloseTo(1, 6);
      const report = validateAdapter({ ...input(cfg, tensors), nonFinite: res.nonFinite, maxAbs: res.maxAbs }, MODEL, LIMITS);
      expect(codes(report)).toEqual(['non_finite']);
    }
    // a decode that had to leave a fitting tensor out says so: the caller reads the file instead
    const small = new AdapterIngest({ loraTargets: MODEL.loraTargets, maxRank: 64, maxBytes: 1000, file: 'adapter_model.safetensors' });
    small.push(bytes);
    expect(small.finish()!.keptAll).toBe(false);
  });

  it('an AdaLoRA config (rank_pattern of boolean masks) → one unsupported_feature naming AdaLoRA, no dump', () => {
    // as PEFT's AdaLoraModel saves it: lora_E per module, rank_pattern = kept-rank masks per lora_E
    const initR = 12;
    const masks: Record<string, boolean[]> = {};
    const tensors: PeftTensor[] = [];
    for (const t of loraTargetsFor(ARCH)) {
      masks[`base_model.model.${t.name}.lora_E`] = Array.from({ length: initR }, (_, i) => i % 3 !== 0);
      tensors.push({ name: `base_model.model.${t.name}.lora_A`, shape: [initR, t.inFeatures], data: new Float32Array(initR * t.inFeatures) });
      tensors.push({ name: `base_model.model.${t.name}.lora_B`, shape: [t.outFeatures, initR], data: new Float32Array(initR * t.outFeatures) });
      tensors.push({ name: `base_model.model.${t.name}.lora_E`, shape: [initR, 1], data: new Float32Array(initR) });
    }
    const config = { peft_type: 'ADALORA', task_type: 'CAUSAL_LM', r: 8, lora_alpha: 32, init_r: initR, target_r: 8, tinit: 200, tfinal: 1000, deltaT: 10, beta1: 0.85, beta2: 0.85, orth_reg_weight: 0.5, total_step: 5000, target_modules: [...PROJECTIONS], rank_pattern: masks, base_model_name_or_path: 'small-llama' };
    expect(JSON.stringify(config).length).toBeGreaterThan(1000);
    const report = validateAdapter(input(config, tensors), MODEL, LIMITS);
    expect(codes(report)).toEqual(['unsupported_feature']);
    expect(report.errors[0]).toMatchObject({ key: 'peft_type', actual: 'ADALORA' });
    expect(report.errors[0]!.message).toContain('AdaLoRA');
    expect(report.errors[0]!.hint).toMatch(/merge_and_unload[\s\S]*peft_type "LORA"/);
    expect(JSON.stringify(report.errors).length).toBeLessThan(1500);
    expect(report.summary.tensors).toBe(tensors.length);
  });

  it('other PEFT methods are named the same way (IA3, LoHa)', () => {
    for (const type of ['IA3', 'LOHA']) {
      const report = validateAdapter(input({ peft_type: type, target_modules: ['k_proj'], feedforward_modules: ['down_proj'] }, qv()), MODEL, LIMITS);
      expect(codes(report)).toEqual(['unsupported_feature']);
      expect(report.errors[0]!.message).toContain(type);
    }
  });

  it('wrong types in a huge rank_pattern: a bounded number of invalid_config problems, each short', () => {
    const rp = Object.fromEntries(Array.from({ length: 500 }, (_, i) => [`layers.${i}.self_attn.q_proj`, Array(50).fill(true)]));
    const report = validateAdapter(input({ r: 8, lora_alpha: 16, target_modules: ['q_proj'], rank_pattern: rp }, qv()), MODEL, LIMITS);
    const p = only(report, 'invalid_config');
    expect(p.length).toBeLessThanOrEqual(21);
    expect(p.at(-1)!.message).toMatch(/480 more values/);
    expect(JSON.stringify(p).length).toBeLessThan(10_000);
  });

  it('unexpected_tensor quotes a bounded excerpt of a 196-entry target_modules', () => {
    const list = Array.from({ length: 196 }, (_, i) => `model.layers.${i}.self_attn.q_proj`);
    const report = validateAdapter(input(peftConfig({ target_modules: list }), qv()), MODEL, LIMITS);
    const p = only(report, 'unexpected_tensor');
    expect(p.length).toBe(6); // the v_proj A and B of 3 layers
    for (const q of p) {
      expect(q.message).toContain('model.layers.0.self_attn.q_proj');
      expect(q.message).toMatch(/characters\)/);
      expect(q.message.length).toBeLessThan(400);
    }
  });

  it('no_modules_matched quotes a bounded excerpt of target_modules', () => {
    const list = Array.from({ length: 5000 }, (_, i) => `transformer.h.${i}.attn.c_attn`);
    const report = validateAdapter(input(peftConfig({ target_modules: list }), qv()), MODEL, LIMITS);
    const p = only(report, 'no_modules_matched')[0]!;
    expect(p.message.length).toBeLessThan(600);
    expect(JSON.stringify(p.actual).length).toBeLessThan(600);
  });

  describe('safetensors headers', () => {
    // as an upload is read (folder.ts, ingest.ts): the adapter limits
    const header = (json: string, dataBytes = 0) => parseHeader('adapter_model.safetensors', Buffer.from(json), 8 + Buffer.byteLength(json) + dataBytes, ADAPTER_SAFETENSORS_LIMITS);
    const entry = (shape: string, end = 4) => `{"dtype":"F32","shape":${shape},"data_offsets":[0,${end}]}`;

    it('a tensor named twice (JSON.parse would keep the last) → corrupt_file naming it', () => {
      const r = header(`{"a.lora_A.weight":${entry('[1]')},"a.lora_A.weight":${entry('[1]')}}`, 4);
      expect(r.header).toBeNull();
      expect(r.problems).toHaveLength(1);
      expect(r.problems[0]).toMatchObject({ code: 'corrupt_file', tensor: 'a.lora_A.weight' });
      expect(r.problems[0]!.message).toContain('twice');
      // the same name spelled with an escape is the same name
      expect(header(`{"ab":${entry('[1]')},"a\\u0062":${entry('[1]')}}`, 4).problems[0]!.message).toContain('twice');
      // and a key repeated inside one entry is as ambiguous
      expect(header(`{"t":{"dtype":"F32","dtype":"F16","shape":[1],"data_offsets":[0,4]}}`, 4).problems[0]!.message).toMatch(/key "dtype" of t twice/);
      // distinct names pass
      expect(header(`{"a":${entry('[1]')},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}`, 8).problems).toEqual([]);
    });

    it('a shape with more dimensions than a LoRA tensor has is refused while scanning, before it is built', () => {
      const dims = 900_000; // 1.8 MB of "1,": under the 2 MiB cap
      const r = header(`{"t":${entry(`[${'1,'.repeat(dims)}1]`)}}`, 4);
      expect(r.problems).toHaveLength(1);
      expect(r.problems[0]).toMatchObject({ code: 'corrupt_file', tensor: 't' });
      expect(r.problems[0]!.message).toMatch(/more than 4 values/);
      expect(JSON.stringify(r.problems).length).toBeLessThan(600);
      // a 3-D shape is no corruption: the validator says a LoRA matrix is 2-D
      expect(header(`{"t":${entry('[1,1,1]')}}`, 4).problems).toEqual([]);
      // model checkpoints (the operator's files) keep the format's wider bounds: a Conv3d patch embedding is 5-D
      const conv3d = '{"t":{"dtype":"F32","shape":[1,1,1,1,1],"data_offsets":[0,4]}}';
      expect(parseHeader('model.safetensors', Buffer.from(conv3d), 8 + conv3d.length + 4, DEFAULT_SAFETENSORS_LIMITS).problems).toEqual([]);
    });

    it('nesting deeper than the format is refused', () => {
      const r = header(`{"t":{"dtype":"F32","shape":[[[[[1]]]]],"data_offsets":[0,4]}}`, 4);
      expect(r.problems[0]!.message).toMatch(/nested deeper/);
    });

    it('a tensor name of 5000 characters and 5000 bad entries: every echoed value bounded', () => {
      const long = `${'x'.repeat(5000)}.lora_A.weight`;
      const bad = Array.from({ length: 5000 }, (_, i) => `"t${i}":{"dtype":"Q4_K${'!'.repeat(100)}","shape":[1],"data_offsets":[0,4]}`).join(',');
      const json = `{${JSON.stringify(long)}:${entry('[1]')},${bad}}`;
      const parsed = header(json, 4);
      const report = validateAdapter({ configText: JSON.stringify(peftConfig()), weightsFile: 'adapter_model.safetensors', header: parsed.header, headerProblems: parsed.problems }, MODEL, LIMITS);
      const longName = only(report, 'corrupt_file').find((p) => p.message.includes('characters'))!;
      expect(longName.message.length).toBeLessThan(500);
      expect(only(report, 'bad_dtype')).toHaveLength(51);
      expect(only(report, 'bad_dtype').at(-1)!.message).toMatch(/4950 more bad_dtype problems/);
      expect(JSON.stringify(report).length).toBeLessThan(40_000);
    });

    it('a header over the 2 MiB cap is refused from its length prefix alone', async () => {
      const root = await mkdtemp(join(tmpdir(), 'loraserve-cap-'));
      try {
        const { dir } = await writeAdapterFolder(join(root, 'a'), { config: peftConfig(), tensors: null });
        const names = Array.from({ length: 24_000 }, (_, i) => `"base_model.model.model.layers.${i}.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[0,24],"data_offsets":[0,0]}`);
        const json = Buffer.from(`{${names.join(',')}}`);
        expect(json.length).toBeGreaterThan(2 * 1024 * 1024);
        const prefix = Buffer.alloc(8);
        prefix.writeBigUInt64LE(BigInt(json.length));
        await writeFile(join(dir, 'adapter_model.safetensors'), Buffer.concat([prefix, json]));
        const { report } = await readAdapterFolder(dir, MODEL, LIMITS);
        expect(codes(report)).toContain('corrupt_file');
        expect(report.errors.find((p) => p.code === 'corrupt_file')!.message).toMatch(/over the 2097152-byte cap/);
      } finally {
        await rm(root, { recursive: true, force: true });
      }
    });
  });
});
