import { describe, expect, it } from 'vitest';
import { toEngineWeights } from '../src/adapters/convert.js';
import type { ValidationReport } from '../src/adapters/report.js';
import { encodeSafetensors, parseHeader } from '../src/adapters/safetensors.js';
import { validateAdapter, type AdapterInput, type ModelFacts, type ValidationLimits } from '../src/adapters/validate.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { makePeftTensors, peftConfig, seededRandom, smallArch, type PeftTensor } from './helpers/adapter-fixtures.js';

/**
 * Validation of the parts of a PEFT adapter outside the projections (adapters/embedding-parts.ts):
 * embedding LoRA, trainable tokens, saved embed_tokens / lm_head, and the memory budget. Real
 * safetensors headers, PEFT's key names; each bad input is one precise problem.
 */

const ARCH = smallArch(); // vocab 64, hidden 24, untied
const TIED = smallArch({ tieWordEmbeddings: true });
const facts = (architecture = ARCH): ModelFacts => ({ architecture, loraTargets: loraTargetsFor(architecture), modelId: 'small-llama' });
const LIMITS: ValidationLimits = { maxLoraRank: 64, strictBaseModel: false };
const V = ARCH.vocabSize;
const H = ARCH.hiddenSize;

function input(config: Record<string, unknown>, tensors: PeftTensor[]): AdapterInput {
  const bytes = encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data })));
  const n = Number(bytes.readBigUInt64LE(0));
  const parsed = parseHeader('adapter_model.safetensors', bytes.subarray(8, 8 + n), bytes.byteLength);
  return { configText: JSON.stringify(config), weightsFile: 'adapter_model.safetensors', header: parsed.header, headerProblems: parsed.problems, values: new Map(tensors.map((t) => [t.name, t.data])) };
}

const rand = seededRandom(7);
const tensor = (name: string, shape: number[]): PeftTensor => ({ name, shape, data: Float32Array.from({ length: shape.reduce((a, b) => a * b, 1) }, () => rand() * 2 - 1) });
const qv = makePeftTensors(ARCH, { r: 8, targets: ['q_proj', 'v_proj'], seed: 3 });
const EMB_A = 'base_model.model.model.embed_tokens.lora_embedding_A';
const EMB_B = 'base_model.model.model.embed_tokens.lora_embedding_B';
const DELTA = 'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta';
const EMBED = 'base_model.model.model.embed_tokens.weight';
const HEAD = 'base_model.model.lm_head.weight';
const codes = (r: ValidationReport) => r.errors.map((p) => p.code);

describe('LoRA on embed_tokens', () => {
  it('passes with its rank from rank_pattern; the engine gets Aᵀ per token and scale·Bᵀ', () => {
    const a = tensor(EMB_A, [4, V]);
    const b = tensor(EMB_B, [H, 4]);
    const config = peftConfig({ target_modules: ['q_proj', 'v_proj', 'embed_tokens'], rank_pattern: { embed_tokens: 4 }, lora_alpha: 16 });
    const r = validateAdapter(input(config, [...qv, a, b]), facts(), LIMITS);
    expect(r.errors).toEqual([]);
    // the rank_pattern key matches an adapted module: no rank_pattern_unmatched warning
    expect(r.warnings).toEqual([]);
    expect(r.embedding?.lora).toEqual({ tensorA: EMB_A, tensorB: EMB_B, rank: 4, alpha: 16, scale: 4 });
    const w = toEngineWeights(r, new Map([...qv, a, b].map((t) => [t.name, t.data])), facts());
    // Δ(token) = scale · B · A[:, token], as lora/layer.py Embedding computes it
    const token = 37;
    for (const i of [0, 11, H - 1]) {
      let want = 0;
      for (let k = 0; k < 4; k++) want += b.data[i * 4 + k]! * a.data[k * V + token]!;
      let got = 0;
      for (let k = 0; k < 4; k++) got += w.embedding!.lora!.A[token * 4 + k]! * w.embedding!.lora!.B[k * H + i]!;
      expect(got).toBeCloseTo(4 * want, 5);
    }
  });

  it('ensure_weight_tying on a tied model (lm_head would get the transposed LoRA) is refused precisely', () => {
    const config = peftConfig({ target_modules: ['q_proj', 'v_proj', 'embed_tokens'], r: 8, ensure_weight_tying: true });
    const tensors = [...qv, tensor(EMB_A, [8, V]), tensor(EMB_B, [H, 8])];
    expect(validateAdapter(input(config, tensors), facts(), LIMITS).ok).toBe(true);
    const tied = validateAdapter(input(config, tensors), facts(TIED), LIMITS);
    expect(tied.errors).toMatchObject([{ code: 'unsupported_feature', key: 'ensure_weight_tying', module: 'lm_head' }]);
  });

  it('a wrong vocabulary, a missing B and a rank over MAX_LORA_RANK are each named', () => {
    const config = peftConfig({ target_modules: ['q_proj', 'v_proj', 'embed_tokens'], r: 8 });
    const wrongVocab = validateAdapter(input(config, [...qv, tensor(EMB_A, [8, 32]), tensor(EMB_B, [H, 8])]), facts(), LIMITS);
    expect(codes(wrongVocab)).toEqual(['shape_mismatch']);
    expect(wrongVocab.errors[0]).toMatchObject({ tensor: EMB_A, expected: [8, V], actual: [8, 32] });
    expect(wrongVocab.errors[0]!.message).toContain(`vocab_size ${V}`);
    const missing = validateAdapter(input(config, [...qv, tensor(EMB_A, [8, V])]), facts(), LIMITS);
    expect(missing.errors.map((e) => [e.code, e.tensor])).toEqual([['missing_tensor', 'model.embed_tokens.lora_embedding_B']]);
    const big = validateAdapter(input(config, [...qv, tensor(EMB_A, [8, V]), tensor(EMB_B, [H, 8])]), facts(), { ...LIMITS, maxLoraRank: 4 });
    expect(big.errors.filter((e) => e.module === 'model.embed_tokens').map((e) => e.code)).toEqual(['rank_too_large']);
  });
});

describe('trainable tokens', () => {
  it('list form on an untied and on a tied model; dict form naming embed_tokens', () => {
    const indices = [0, 5, 63];
    const t = tensor(DELTA, [3, H]);
    const untied = validateAdapter(input(peftConfig({ trainable_token_indices: indices }), [...qv, t]), facts(), LIMITS);
    expect(untied.errors).toEqual([]);
    expect(untied.embedding?.tokens).toEqual({ tensor: DELTA, indices, tiedHead: false });
    const tied = validateAdapter(input(peftConfig({ trainable_token_indices: indices }), [...qv, t]), facts(TIED), LIMITS);
    expect(tied.embedding?.tokens?.tiedHead).toBe(true);
    const dict = validateAdapter(input(peftConfig({ trainable_token_indices: { embed_tokens: indices } }), [...qv, t]), facts(), LIMITS);
    expect(dict.embedding?.tokens?.indices).toEqual(indices);
  });

  it('ids outside the vocabulary, a count that differs from the tensor, repeated ids, and each missing half', () => {
    const outside = validateAdapter(input(peftConfig({ trainable_token_indices: [1, 64, 99] }), [...qv, tensor(DELTA, [3, H])]), facts(), LIMITS);
    expect(codes(outside)).toEqual(['shape_mismatch']);
    expect(outside.errors[0]).toMatchObject({ key: 'trainable_token_indices', actual: [64, 99] });
    expect(outside.errors[0]!.message).toContain(`vocabulary of ${V} tokens`);
    const count = validateAdapter(input(peftConfig({ trainable_token_indices: [1, 2] }), [...qv, tensor(DELTA, [3, H])]), facts(), LIMITS);
    expect(count.errors).toMatchObject([{ code: 'shape_mismatch', tensor: DELTA, expected: [2, H], actual: [3, H] }]);
    expect(codes(validateAdapter(input(peftConfig({ trainable_token_indices: [1, 1] }), [...qv, tensor(DELTA, [2, H])]), facts(), LIMITS))).toEqual(['invalid_config']);
    expect(codes(validateAdapter(input(peftConfig({ trainable_token_indices: [1, 2] }), qv), facts(), LIMITS))).toEqual(['missing_tensor']);
    expect(codes(validateAdapter(input(peftConfig(), [...qv, tensor(DELTA, [2, H])]), facts(), LIMITS))).toEqual(['unexpected_tensor']);
  });

  it('a dict key that is neither embed_tokens nor lm_head stays refused', () => {
    const r = validateAdapter(input(peftConfig({ trainable_token_indices: { 'vision.embed': [1] } }), qv), facts(), LIMITS);
    expect(r.errors).toMatchObject([{ code: 'unsupported_feature', key: 'trainable_token_indices', actual: 'vision.embed' }]);
  });
});

describe('modules_to_save of embed_tokens / lm_head', () => {
  it('full copies pass and count in memoryBytes; a missing copy is named', () => {
    const config = peftConfig({ modules_to_save: ['embed_tokens', 'lm_head'] });
    const r = validateAdapter(input(config, [...qv, tensor(EMBED, [V, H]), tensor(HEAD, [V, H])]), facts(), LIMITS);
    expect(r.errors).toEqual([]);
    expect(r.embedding).toMatchObject({ embedCopy: EMBED, headCopy: HEAD, lora: null, tokens: null });
    const lora = r.modules.reduce((n, m) => n + 4 * m.rank * (ARCH.hiddenSize + (m.projection === 'q_proj' ? ARCH.numHeads : ARCH.numKvHeads) * ARCH.headDim), 0);
    expect(r.memoryBytes).toBe(2 * 4 * V * H + lora);
    const missing = validateAdapter(input(config, [...qv, tensor(EMBED, [V, H])]), facts(), LIMITS);
    expect(missing.errors).toMatchObject([{ code: 'missing_tensor', module: 'lm_head' }]);
  });

  it('a larger vocabulary (added tokens): each missing piece is a 422 naming both sizes; with the matching tokenizer it passes', () => {
    const both = peftConfig({ modules_to_save: ['embed_tokens', 'lm_head'] });
    const tensors = [...qv, tensor(EMBED, [V + 6, H]), tensor(HEAD, [V + 6, H])];
    const tok = (vocabSize: number | null, missingIds: number[] = []) => ({ vocabSize, missingIds, problems: [] });
    const noTok = validateAdapter(input(both, tensors), facts(), LIMITS);
    expect(noTok.errors).toMatchObject([{ code: 'missing_file', file: 'tokenizer.json', tensor: EMBED, expected: V + 6, actual: V }]);
    expect(noTok.errors[0]!.message).toContain(`vocabulary is ${V + 6} tokens`);
    expect(noTok.errors[0]!.message).toContain(`the served model's is ${V}`);
    const wrongTok = validateAdapter({ ...input(both, tensors), tokenizer: tok(V + 5) }, facts(), LIMITS);
    expect(wrongTok.errors).toMatchObject([{ code: 'shape_mismatch', file: 'tokenizer.json', expected: V + 6, actual: V + 5 }]);
    const holes = validateAdapter({ ...input(both, tensors), tokenizer: tok(V + 6, [V + 2]) }, facts(), LIMITS);
    expect(holes.errors).toMatchObject([{ code: 'invalid_config', file: 'tokenizer.json', actual: [V + 2] }]);
    // only the embedding covers the added tokens: they could never be generated
    const embedOnly = validateAdapter({ ...input(peftConfig({ modules_to_save: ['embed_tokens'] }), [...qv, tensor(EMBED, [V + 6, H])]), tokenizer: tok(V + 6) }, facts(), LIMITS);
    expect(embedOnly.errors).toMatchObject([{ code: 'shape_mismatch', module: 'lm_head', expected: [V + 6, H], actual: [V, H] }]);
    const unequal = validateAdapter({ ...input(both, [...qv, tensor(EMBED, [V + 6, H]), tensor(HEAD, [V + 4, H])]), tokenizer: tok(V + 6) }, facts(), LIMITS);
    expect(codes(unequal)).toContain('shape_mismatch');
    const ok = validateAdapter({ ...input(both, tensors), tokenizer: tok(V + 6) }, facts(), LIMITS);
    expect(ok.errors).toEqual([]);
    expect(ok.embedding).toMatchObject({ embedCopy: EMBED, headCopy: HEAD, vocabSize: V + 6 });
    const lora = ok.modules.reduce((n, m) => n + 4 * m.rank * (ARCH.hiddenSize + (m.projection === 'q_proj' ? ARCH.numHeads : ARCH.numKvHeads) * ARCH.headDim), 0);
    expect(ok.memoryBytes).toBe(2 * 4 * (V + 6) * H + lora);
  });

  it('a saved embedding together with trainable tokens of it is refused, as PEFT refuses it', () => {
    const r = validateAdapter(input(peftConfig({ modules_to_save: ['embed_tokens'], trainable_token_indices: [1] }), [...qv, tensor(EMBED, [V, H]), tensor(DELTA, [1, H])]), facts(), LIMITS);
    expect(codes(r)).toContain('unsupported_feature');
  });

  it('ADAPTER_MEMORY_BUDGET_MB: an adapter over the budget is refused saying how much it needs', () => {
    const files = input(peftConfig({ modules_to_save: ['lm_head'] }), [...qv, tensor(HEAD, [V, H])]);
    const fits = validateAdapter(files, facts(), { ...LIMITS, maxAdapterBytes: 1 << 20 });
    expect(fits.ok).toBe(true);
    const over = validateAdapter(files, facts(), { ...LIMITS, maxAdapterBytes: 4 * V * H });
    expect(over.errors).toMatchObject([{ code: 'over_memory_budget', actual: fits.memoryBytes }]);
    expect(over.errors[0]!.message).toContain('ADAPTER_MEMORY_BUDGET_MB');
  });
});
