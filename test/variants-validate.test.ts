import { describe, expect, it } from 'vitest';
import { toEngineWeights } from '../src/adapters/convert.js';
import { doraFactor, servedWeight } from '../src/adapters/dora.js';
import type { ValidationReport } from '../src/adapters/report.js';
import { encodeSafetensors, parseHeader } from '../src/adapters/safetensors.js';
import { validateAdapter, type AdapterInput, type ModelFacts } from '../src/adapters/validate.js';
import { projectionDims } from '../src/model/architecture.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { makePeftTensors, peftConfig, smallArch, type PeftTensor } from './helpers/adapter-fixtures.js';
import { rowNorms } from './reference/peft-merge.js';

/**
 * Validation of DoRA (use_dora, lora_magnitude_vector [out]) and lora_bias (lora_B.bias [out]):
 * accepted in PEFT's names, every misfit a precise problem, and the no-effect check still right
 * when the delta B·A is zero but the variant changes the output.
 */

const ARCH = smallArch();
const MODEL: ModelFacts = { architecture: ARCH, loraTargets: loraTargetsFor(ARCH), modelId: 'small-llama' };
const LIMITS = { maxLoraRank: 64, strictBaseModel: false };
const QV = ['q_proj', 'v_proj'] as const;
const Q_OUT = projectionDims(ARCH, 'q_proj').outFeatures;
const V_OUT = projectionDims(ARCH, 'v_proj').outFeatures;

function input(config: Record<string, unknown>, tensors: PeftTensor[]): AdapterInput {
  const bytes = encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data })));
  const n = Number(bytes.readBigUInt64LE(0));
  const parsed = parseHeader('adapter_model.safetensors', bytes.subarray(8, 8 + n), bytes.byteLength);
  return { configText: JSON.stringify(config), weightsFile: 'adapter_model.safetensors', header: parsed.header, headerProblems: parsed.problems, values: new Map(tensors.map((t) => [t.name, t.data])) };
}

const lora = (seed = 1) => makePeftTensors(ARCH, { r: 8, targets: [...QV], seed });
const outOf = (module: string) => (module.endsWith('q_proj') ? Q_OUT : V_OUT);
const modulesOf = (tensors: PeftTensor[]) => [...new Set(tensors.map((t) => t.name.replace(/^base_model\.model\./, '').replace(/\.lora_[AB]\.weight$/, '')))];
/** one vector per module: `suffix` after the module name (PEFT: lora_magnitude_vector, lora_B.bias) */
const vectors = (tensors: PeftTensor[], suffix: string, fill = 0.5, shapeOf = (out: number) => [out]) =>
  modulesOf(tensors).map((m) => {
    const shape = shapeOf(outOf(m));
    return { name: `base_model.model.${m}.${suffix}`, shape, data: new Float32Array(shape.reduce((a, b) => a * b, 1)).fill(fill) };
  });
const codes = (r: ValidationReport) => r.errors.map((p) => p.code);

describe('DoRA', () => {
  it("accepted in PEFT's saved names (lora_magnitude_vector, no .weight), with the magnitude keys in the module report", () => {
    const t = lora();
    const r = validateAdapter(input(peftConfig({ use_dora: true }), [...t, ...vectors(t, 'lora_magnitude_vector')]), MODEL, LIMITS);
    expect(r.errors).toEqual([]);
    expect(r.modules).toHaveLength(6);
    expect(r.modules[0]!.tensorMagnitude).toBe(`base_model.model.${r.modules[0]!.module}.lora_magnitude_vector`);
    // the converter carries the magnitude as saved, for the engine to divide by ‖W + s·B·A‖
    const w = toEngineWeights(r, new Map([...t, ...vectors(t, 'lora_magnitude_vector')].map((x) => [x.name, x.data])), MODEL);
    expect(w.modules.get(r.modules[0]!.module)!.magnitude).toEqual(new Float32Array(Q_OUT).fill(0.5));
  });

  it.each(['lora_magnitude_vector.weight', 'lora_magnitude_vector.default.weight', 'lora_magnitude_vector.default'])('also %s (a model.state_dict() name, with or without the adapter name)', (suffix) => {
    const t = lora();
    const r = validateAdapter(input(peftConfig({ use_dora: true }), [...t, ...vectors(t, suffix)]), MODEL, LIMITS);
    expect(r.errors).toEqual([]);
    expect(r.modules.every((m) => m.tensorMagnitude?.endsWith(suffix))).toBe(true);
  });

  it('a magnitude of the wrong length: shape_mismatch naming the tensor, expected vs actual, and the likely cause', () => {
    const t = lora();
    const mags = vectors(t, 'lora_magnitude_vector', 0.5, (out) => [out + 8]);
    const r = validateAdapter(input(peftConfig({ use_dora: true }), [...t, ...mags]), MODEL, LIMITS);
    const p = r.errors.filter((e) => e.code === 'shape_mismatch');
    expect(p).toHaveLength(6);
    expect(p[0]).toMatchObject({ tensor: mags[0]!.name, expected: [Q_OUT], actual: [Q_OUT + 8] });
    expect(p[0]!.message).toContain(`out_features ${Q_OUT}`);
    expect(p[0]!.message).toMatch(/another size or a pruned variant/);
    // a 2-D magnitude (e.g. another tool's layout)
    const flat = validateAdapter(input(peftConfig({ use_dora: true }), [...t, ...vectors(t, 'lora_magnitude_vector', 0.5, (out) => [out, 1])]), MODEL, LIMITS);
    expect(flat.errors.find((e) => e.code === 'shape_mismatch')!.message).toMatch(/It is 2-D/);
    // and nothing reports the module as missing its magnitude on top
    expect(codes(r)).not.toContain('missing_tensor');
  });

  it('use_dora without magnitudes: missing_tensor per module; magnitudes without use_dora: unexpected_tensor naming use_dora', () => {
    const t = lora();
    const missing = validateAdapter(input(peftConfig({ use_dora: true }), t), MODEL, LIMITS);
    expect(codes(missing)).toEqual(Array(6).fill('missing_tensor'));
    expect(missing.errors[0]).toMatchObject({ key: 'use_dora', expected: [Q_OUT] });
    const silent = validateAdapter(input(peftConfig({}), [...t, ...vectors(t, 'lora_magnitude_vector')]), MODEL, LIMITS);
    expect(codes(silent)).toEqual(Array(6).fill('unexpected_tensor'));
    expect(silent.errors[0]!.hint).toContain('"use_dora": true');
  });

  it('non-finite magnitudes: non_finite naming the tensor', () => {
    const t = lora();
    const mags = vectors(t, 'lora_magnitude_vector');
    mags[1]!.data[3] = Number.NaN;
    const r = validateAdapter(input(peftConfig({ use_dora: true }), [...t, ...mags]), MODEL, LIMITS);
    expect(r.errors).toMatchObject([{ code: 'non_finite', tensor: mags[1]!.name }]);
  });

  it('lora_B = 0 is not "no effect" under DoRA: m / ‖W‖ still rescales every row', () => {
    const t = lora();
    for (const x of t) if (x.name.includes('lora_B')) x.data.fill(0);
    const plain = validateAdapter(input(peftConfig({}), t), MODEL, LIMITS);
    expect(codes(plain)).toEqual(['no_effect']);
    const dora = validateAdapter(input(peftConfig({ use_dora: true }), [...t, ...vectors(t, 'lora_magnitude_vector')]), MODEL, LIMITS);
    expect(dora.errors).toEqual([]);
    expect(dora.warnings.map((w) => w.code)).not.toContain('no_effect_modules');
  });

  it('DoRA on embed_tokens stays a precise refusal', () => {
    const t = lora();
    const emb = { name: 'base_model.model.model.embed_tokens.lora_magnitude_vector', shape: [ARCH.hiddenSize], data: new Float32Array(ARCH.hiddenSize).fill(1) };
    const r = validateAdapter(input(peftConfig({ use_dora: true }), [...t, ...vectors(t, 'lora_magnitude_vector'), emb]), MODEL, LIMITS);
    expect(r.errors).toMatchObject([{ code: 'unsupported_feature', tensor: emb.name }]);
  });

  it('use_dora with lora_bias, which PEFT refuses: invalid_config', () => {
    const t = lora();
    const r = validateAdapter(input(peftConfig({ use_dora: true, lora_bias: true }), [...t, ...vectors(t, 'lora_magnitude_vector'), ...vectors(t, 'lora_B.bias')]), MODEL, LIMITS);
    expect(r.errors).toMatchObject([{ code: 'invalid_config', key: 'lora_bias' }]);
  });
});

describe('lora_bias', () => {
  it('accepted; the converter folds the scale into the bias as PEFT forward does (lora_B(x) · scaling)', () => {
    const t = lora();
    const biases = vectors(t, 'lora_B.bias', 0.25);
    const r = validateAdapter(input(peftConfig({ lora_bias: true, lora_alpha: 32 }), [...t, ...biases]), MODEL, LIMITS);
    expect(r.errors).toEqual([]);
    const m = r.modules[0]!;
    expect(m.tensorBias).toBe(biases[0]!.name);
    const w = toEngineWeights(r, new Map([...t, ...biases].map((x) => [x.name, x.data])), MODEL);
    expect(w.modules.get(m.module)!.bias).toEqual(new Float32Array(Q_OUT).fill(0.25 * m.scale));
    expect(m.scale).toBe(4);
  });

  it('a wrong bias length, a missing one, an unexpected one, and a lora_A bias PEFT never writes', () => {
    const t = lora();
    const short = validateAdapter(input(peftConfig({ lora_bias: true }), [...t, ...vectors(t, 'lora_B.bias', 0.1, (out) => [out - 1])]), MODEL, LIMITS);
    expect(short.errors.filter((e) => e.code === 'shape_mismatch')[0]).toMatchObject({ expected: [Q_OUT], actual: [Q_OUT - 1] });
    const missing = validateAdapter(input(peftConfig({ lora_bias: true }), t), MODEL, LIMITS);
    expect(missing.errors[0]).toMatchObject({ code: 'missing_tensor', key: 'lora_bias', tensor: `${missing.modules[0]!.module}.lora_B.bias` });
    const unexpected = validateAdapter(input(peftConfig({}), [...t, ...vectors(t, 'lora_B.bias')]), MODEL, LIMITS);
    expect(unexpected.errors[0]).toMatchObject({ code: 'unexpected_tensor', key: 'lora_bias' });
    const aBias = validateAdapter(input(peftConfig({ lora_bias: true }), [...t, ...vectors(t, 'lora_B.bias'), ...vectors(t, 'lora_A.bias').slice(0, 1)]), MODEL, LIMITS);
    expect(aBias.errors).toMatchObject([{ code: 'unexpected_tensor', message: expect.stringMatching(/never creates/) }]);
  });

  it('no_effect: a zero bias with a zero delta changes nothing; a non-zero bias does', () => {
    const t = lora();
    for (const x of t) if (x.name.includes('lora_B')) x.data.fill(0);
    expect(codes(validateAdapter(input(peftConfig({ lora_bias: true }), [...t, ...vectors(t, 'lora_B.bias', 0)]), MODEL, LIMITS))).toEqual(['no_effect']);
    expect(validateAdapter(input(peftConfig({ lora_bias: true }), [...t, ...vectors(t, 'lora_B.bias', 0.1)]), MODEL, LIMITS).errors).toEqual([]);
  });
});

describe('DoRA factor g = m / ‖W + s·B·A‖', () => {
  it('equals m / row norm of the merged weight (float64 reference), and the served weight follows the graph', () => {
    const out = 5;
    const inF = 40;
    const r = 2;
    const W = Float32Array.from({ length: out * inF }, (_, i) => Math.sin(i) * 0.3);
    const A = Float32Array.from({ length: inF * r }, (_, i) => Math.cos(i) * 0.1); // engine layout [in, r]
    const B = Float32Array.from({ length: r * out }, (_, i) => (i % 3) * 0.2); // [r, out], scaled
    const magnitude = Float32Array.from({ length: out }, (_, o) => 1 + o / 10);
    const merged = new Float32Array(out * inF);
    for (let o = 0; o < out; o++) for (let k = 0; k < inF; k++) merged[o * inF + k] = W[o * inF + k]! + A[k * r]! * B[o]! + A[k * r + 1]! * B[out + o]!;
    const want = rowNorms(merged, out, inF).map((n, o) => magnitude[o]! / n);
    const g = doraFactor(W, { name: 'm', inFeatures: inF, outFeatures: out, rank: r, A, B, magnitude });
    for (let o = 0; o < out; o++) expect(g[o]).toBeCloseTo(want[o]!, 6);
    // fp32 graph: the checkpoint's weight; int8: the dequantized codes, not the original
    expect(servedWeight(W, out, inF, { dtype: 'fp32' })).toBe(W);
    const q = servedWeight(W, out, inF, { dtype: 'fp32', weights: 'int8' });
    expect(q).not.toEqual(W);
    expect(Math.max(...q.map((v, i) => Math.abs(v - W[i]!)))).toBeLessThan(0.01);
    // a zero row cannot be normalised: a clear error, not Inf in the graph
    expect(() => doraFactor(new Float32Array(out * inF), { name: 'm', inFeatures: inF, outFeatures: out, rank: r, A, B: new Float32Array(r * out), magnitude })).toThrow(/norm 0/);
  });
});
