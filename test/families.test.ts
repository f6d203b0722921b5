import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Architecture } from '../src/model/architecture.js';
import { encodeSafetensors } from '../src/adapters/safetensors.js';
import { llamaConfigJson, makePeftTensors, peftConfig } from './helpers/adapter-fixtures.js';
import { form } from './helpers/adapter-uploads.js';
import { FAMILY_VOCAB, checkAdapterAgainstReference, serveFamily, storedTensors, type FamilyFolder, type ServedFamily } from './helpers/family-serve.js';
import { maxAbsDiff } from './helpers/lora-feeds.js';
import { MemoryCheckpoint, randomCheckpoint, tinyArchitecture } from './helpers/random-checkpoint.js';
import { referenceForward } from './reference/forward.js';

/**
 * Every supported family, served through HTTP from a checkpoint in its real layout, against the
 * independent reference forward pass (test/reference/forward.ts) with an adapter merged as
 * W + scale·B·A: greedy ids equal and logprobs within 1e-4.
 */

/** Serves `folder` for the enclosing describe (from its beforeAll to its afterAll); tests call the result. */
function serveDuringDescribe(label: string, folder: FamilyFolder): () => ServedFamily {
  let served: ServedFamily | undefined;
  beforeAll(async () => {
    served = await serveFamily(label, folder);
  });
  afterAll(async () => {
    await served?.close();
  });
  return () => {
    if (!served) throw new Error(`${label} is not being served (its beforeAll failed)`);
    return served;
  };
}

const baseDims: Partial<Architecture> = { vocabSize: FAMILY_VOCAB, maxPositions: 256, bosTokenId: 506, eosTokenIds: [507] };

describe('Llama with attention_bias and mlp_bias (every bias transformers applies: q/k/v/o and gate/up/down)', () => {
  const arch = tinyArchitecture({ ...baseDims, attentionBias: true, outputBias: true, mlpBias: true, tieWordEmbeddings: false, ropeTheta: 500000 });
  const folder: FamilyFolder = { config: llamaConfigJson(arch), tensors: randomCheckpoint(arch, 41).tensors, dtype: 'BF16' };
  const served = serveDuringDescribe('llama-biases', folder);

  it('applies o_proj.bias and the MLP biases: served tokens and logprobs equal the merged reference', async () => {
    expect(served().app.runtime.manifest.architecture).toMatchObject({ attentionBias: true, outputBias: true, mlpBias: true });
    const r = await checkAdapterAgainstReference(served(), storedTensors(folder));
    console.info(`[llama biases] ${r.tokens.length} tokens after a ${r.promptLength}-token prompt: max |Δ logprob| ${r.worst.toExponential(2)}, adapter moves logits by ${r.effect.toFixed(2)}`);
    expect(r.effect).toBeGreaterThan(1e-2);
    expect(r.worst).toBeLessThan(1e-4);
  });
});

const LONG_PROMPT = 'Once upon a time there was a little model. It liked to read long stories about dogs, cats and the sea, and every night it told them again to anyone who would listen.';

describe.each([
  {
    label: 'Llama 3.2 layout: rope_scaling llama3 (tied embeddings)',
    extra: { rope_scaling: { factor: 8.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 16, rope_type: 'llama3' } },
    type: 'llama3',
  },
  {
    label: 'rope_parameters layout (transformers >= 4.57): yarn with its attention factor',
    extra: { rope_theta: undefined, rope_scaling: undefined, rope_parameters: { rope_type: 'yarn', rope_theta: 500000.0, factor: 16.0, original_max_position_embeddings: 16 } },
    type: 'yarn',
  },
])('$label, served past original_max_position_embeddings', ({ extra, type }) => {
  const arch = tinyArchitecture({ ...baseDims, tieWordEmbeddings: true, ropeTheta: 500000 });
  const folder: FamilyFolder = { config: JSON.parse(JSON.stringify(llamaConfigJson(arch, extra))) as Record<string, unknown>, tensors: randomCheckpoint(arch, 43).tensors, dtype: 'BF16' };
  const served = serveDuringDescribe(`llama-${type}`, folder);

  it('greedy tokens and logprobs equal the merged reference at every position', async () => {
    const a = served().app.runtime.manifest.architecture;
    expect(a.rope?.type).toBe(type);
    const r = await checkAdapterAgainstReference(served(), storedTensors(folder), { prompt: LONG_PROMPT });
    console.info(`[llama ${type}] ${r.tokens.length} tokens after a ${r.promptLength}-token prompt (original context 16): max |Δ logprob| ${r.worst.toExponential(2)}`);
    expect(r.promptLength).toBeGreaterThan(2 * 16);
    expect(r.worst).toBeLessThan(1e-4);
  });
});

describe('Qwen3: q_norm / k_norm per head before RoPE, explicit head_dim (heads × head_dim ≠ hidden), no biases', () => {
  const arch = tinyArchitecture({ ...baseDims, family: 'qwen3', numHeads: 4, numKvHeads: 2, headDim: 24, qkNorm: true, tieWordEmbeddings: true, ropeTheta: 1_000_000, rmsNormEps: 1e-6 });
  // config.json as Qwen3-0.6B's (transformers' Qwen3Config), at test size
  const config = {
    architectures: ['Qwen3ForCausalLM'],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: arch.bosTokenId,
    eos_token_id: arch.eosTokenIds[0],
    head_dim: arch.headDim,
    hidden_act: 'silu',
    hidden_size: arch.hiddenSize,
    initializer_range: 0.02,
    intermediate_size: arch.intermediateSize,
    max_position_embeddings: arch.maxPositions,
    max_window_layers: arch.numLayers,
    model_type: 'qwen3',
    num_attention_heads: arch.numHeads,
    num_hidden_layers: arch.numLayers,
    num_key_value_heads: arch.numKvHeads,
    rms_norm_eps: arch.rmsNormEps,
    rope_scaling: null,
    rope_theta: arch.ropeTheta,
    sliding_window: null,
    tie_word_embeddings: true,
    torch_dtype: 'bfloat16',
    use_cache: true,
    use_sliding_window: false,
    vocab_size: arch.vocabSize,
  };
  const folder: FamilyFolder = { config, tensors: randomCheckpoint(arch, 47).tensors, dtype: 'BF16' };
  const served = serveDuringDescribe('qwen3', folder);

  it('greedy tokens and logprobs equal the merged reference', async () => {
    expect(served().app.runtime.manifest.architecture).toMatchObject({ family: 'qwen3', headDim: 24, qkNorm: true, attentionBias: false });
    const r = await checkAdapterAgainstReference(served(), storedTensors(folder), { prompt: LONG_PROMPT });
    console.info(`[qwen3] ${r.tokens.length} tokens after a ${r.promptLength}-token prompt: max |Δ logprob| ${r.worst.toExponential(2)}, adapter moves logits by ${r.effect.toFixed(2)}`);
    expect(r.effect).toBeGreaterThan(1e-2);
    expect(r.worst).toBeLessThan(1e-4);
  });

  it('the checker knows its projection shapes: q_proj out = heads × head_dim (96), o_proj in = 96', () => {
    const targets = served().app.runtime.manifest.loraTargets.filter((t) => t.layer === 0);
    expect(targets.find((t) => t.module === 'q_proj')).toMatchObject({ inFeatures: 64, outFeatures: 96 });
    expect(targets.find((t) => t.module === 'k_proj')).toMatchObject({ inFeatures: 64, outFeatures: 48 });
    expect(targets.find((t) => t.module === 'o_proj')).toMatchObject({ inFeatures: 96, outFeatures: 64 });
  });
});

describe('Phi-3.5 layout: fused qkv_proj and gate_up_proj, LongRoPE short/long factors, adapters on the fused modules', () => {
  const arch = tinyArchitecture({ ...baseDims, family: 'phi3', fusedProjections: true, numHeads: 4, numKvHeads: 2, headDim: 16, tieWordEmbeddings: false, ropeTheta: 10000 });
  const half = arch.headDim / 2;
  const shortFactor = Array.from({ length: half }, (_, i) => 1 + 0.05 * i);
  const longFactor = Array.from({ length: half }, (_, i) => 1 + 1.5 * i);
  // config.json as Phi-3.5-mini-instruct's, at test size (original context 16 of 256)
  const config = {
    architectures: ['Phi3ForCausalLM'],
    attention_bias: false,
    attention_dropout: 0.0,
    bos_token_id: arch.bosTokenId,
    embd_pdrop: 0.0,
    eos_token_id: arch.eosTokenIds[0],
    hidden_act: 'silu',
    hidden_size: arch.hiddenSize,
    initializer_range: 0.02,
    intermediate_size: arch.intermediateSize,
    max_position_embeddings: arch.maxPositions,
    model_type: 'phi3',
    num_attention_heads: arch.numHeads,
    num_hidden_layers: arch.numLayers,
    num_key_value_heads: arch.numKvHeads,
    original_max_position_embeddings: 16,
    pad_token_id: arch.eosTokenIds[0],
    resid_pdrop: 0.0,
    rms_norm_eps: 1e-5,
    rope_scaling: { long_factor: longFactor, short_factor: shortFactor, type: 'longrope' },
    rope_theta: 10000.0,
    sliding_window: 262144,
    tie_word_embeddings: false,
    torch_dtype: 'bfloat16',
    use_cache: true,
    vocab_size: arch.vocabSize,
  };
  const folder: FamilyFolder = { config, tensors: randomCheckpoint(arch, 53).tensors, dtype: 'BF16' };
  const served = serveDuringDescribe('phi3', folder);

  it('reads the fused layout and offers the fused modules as LoRA targets', () => {
    const m = served().app.runtime.manifest;
    expect(m.architecture).toMatchObject({ family: 'phi3', fusedProjections: true, rope: { type: 'longrope', originalMaxPositions: 16, attentionFactor: Math.sqrt(1 + Math.log(256 / 16) / Math.log(16)) } });
    expect(m.loraTargets.filter((t) => t.layer === 0).map((t) => [t.module, t.inFeatures, t.outFeatures])).toEqual([
      ['qkv_proj', 64, 64 + 2 * 32],
      ['o_proj', 64, 64],
      ['gate_up_proj', 64, 2 * 96],
      ['down_proj', 96, 64],
    ]);
  });

  it('a short prompt whose generation crosses the original context (short factors, then long): equal to the merged reference', async () => {
    const r = await checkAdapterAgainstReference(served(), storedTensors(folder));
    console.info(`[phi3 longrope] ${r.tokens.length} tokens after a ${r.promptLength}-token prompt (original context 16): max |Δ logprob| ${r.worst.toExponential(2)}, adapter moves logits by ${r.effect.toFixed(2)}`);
    expect(r.promptLength).toBeLessThan(16);
    expect(r.promptLength + r.tokens.length).toBeGreaterThan(16);
    expect(r.effect).toBeGreaterThan(1e-2);
    expect(r.worst).toBeLessThan(1e-4);
  });

  it('a prompt longer than the original context (long factors throughout): equal to the merged reference', async () => {
    const r = await checkAdapterAgainstReference(served(), storedTensors(folder), { prompt: LONG_PROMPT });
    console.info(`[phi3 longrope] ${r.tokens.length} tokens after a ${r.promptLength}-token prompt: max |Δ logprob| ${r.worst.toExponential(2)}`);
    expect(r.worst).toBeLessThan(1e-4);
  });

  it('an adapter whose qkv_proj lora_B has the q slice of another model is a 422 naming the slice', async () => {
    const a = served().app.runtime.manifest.architecture;
    const peft = makePeftTensors(a, {
      r: 4,
      targets: ['qkv_proj', 'gate_up_proj'],
      seed: 3,
      // a model with 6 query heads of 16 (96 rows of q) but the same 2 KV heads
      shapeOverride: ({ projection, part, shape }) => (projection === 'qkv_proj' && part === 'B' ? [96 + 64, 4] : projection === 'gate_up_proj' && part === 'B' ? [2 * 80, 4] : shape),
    });
    const res = await served().app.inject({
      method: 'POST',
      url: '/v1/adapters/validate',
      payload: form([
        ['config', Buffer.from(JSON.stringify(peftConfig({ r: 4, target_modules: ['qkv_proj', 'gate_up_proj'] }))), 'adapter_config.json'],
        ['weights', encodeSafetensors(peft.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
      ]),
    });
    expect(res.statusCode, res.body).toBe(422);
    const errors = (res.json() as { errors: { code: string; tensor?: string; message: string }[] }).errors;
    const qkv = errors.find((e) => e.code === 'shape_mismatch' && e.tensor?.includes('layers.0.self_attn.qkv_proj.lora_B'));
    expect(qkv?.message).toContain('the q slice has 96 rows (6 heads) where this model has 64; k and v agree (32 each)');
    const gateUp = errors.find((e) => e.code === 'shape_mismatch' && e.tensor?.includes('layers.0.mlp.gate_up_proj.lora_B'));
    expect(gateUp?.message).toContain("halves are 80 rows each where this model's intermediate_size is 96");
  });
});

describe('Mistral with its sliding window: the full context, a prompt longer than the window', () => {
  const W = 16;
  const arch = tinyArchitecture({ ...baseDims, family: 'mistral', slidingWindow: W, slidingWindowLayers: [0, 1], tieWordEmbeddings: false, ropeTheta: 10000 });
  // config.json as Mistral-7B-v0.1's (sliding_window 4096 of 32768), at test size
  const config = {
    architectures: ['MistralForCausalLM'],
    bos_token_id: arch.bosTokenId,
    eos_token_id: arch.eosTokenIds[0],
    hidden_act: 'silu',
    hidden_size: arch.hiddenSize,
    initializer_range: 0.02,
    intermediate_size: arch.intermediateSize,
    max_position_embeddings: arch.maxPositions,
    model_type: 'mistral',
    num_attention_heads: arch.numHeads,
    num_hidden_layers: arch.numLayers,
    num_key_value_heads: arch.numKvHeads,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    sliding_window: W,
    tie_word_embeddings: false,
    torch_dtype: 'bfloat16',
    use_cache: true,
    vocab_size: arch.vocabSize,
  };
  const folder: FamilyFolder = { config, tensors: randomCheckpoint(arch, 59).tensors, dtype: 'BF16' };
  const served = serveDuringDescribe('mistral', folder);

  it('keeps max_position_embeddings as the context and matches the merged reference past the window', async () => {
    expect(served().app.runtime.manifest.architecture).toMatchObject({ family: 'mistral', maxPositions: 256, slidingWindow: W, slidingWindowLayers: [0, 1] });
    const r = await checkAdapterAgainstReference(served(), storedTensors(folder), { prompt: LONG_PROMPT });
    console.info(`[mistral window ${W}] ${r.tokens.length} tokens after a ${r.promptLength}-token prompt: max |Δ logprob| ${r.worst.toExponential(2)}`);
    expect(r.promptLength).toBeGreaterThan(2 * W);
    expect(r.worst).toBeLessThan(1e-4);
  });
});

const gemmaCommon = (a: Architecture) => ({
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: a.bosTokenId,
  cache_implementation: 'hybrid',
  eos_token_id: [a.eosTokenIds[0], 505],
  head_dim: a.headDim,
  hidden_activation: 'gelu_pytorch_tanh',
  hidden_size: a.hiddenSize,
  initializer_range: 0.02,
  intermediate_size: a.intermediateSize,
  max_position_embeddings: a.maxPositions,
  num_attention_heads: a.numHeads,
  num_hidden_layers: a.numLayers,
  num_key_value_heads: a.numKvHeads,
  pad_token_id: 0,
  rms_norm_eps: 1e-6,
  torch_dtype: 'bfloat16',
  use_cache: true,
  vocab_size: a.vocabSize,
});

describe.each([
  {
    label: 'Gemma 2 (gemma-2-2b layout): (1+w) norms, √hidden embeddings, GELU-tanh, sandwich norms, soft-capping, query_pre_attn_scalar, even layers sliding',
    arch: tinyArchitecture({ ...baseDims, family: 'gemma2', numLayers: 3, numHeads: 4, numKvHeads: 2, headDim: 24, normPlusOne: true, embedScale: true, sandwichNorms: true, activation: 'gelu_tanh', tieWordEmbeddings: true }),
    config: (a: Architecture) => ({
      ...gemmaCommon(a),
      architectures: ['Gemma2ForCausalLM'],
      model_type: 'gemma2',
      hidden_act: 'gelu_pytorch_tanh',
      attn_logit_softcapping: 5.0,
      final_logit_softcapping: 8.0,
      query_pre_attn_scalar: 20,
      rope_theta: 10000.0,
      sliding_window: 16,
    }),
    expected: { family: 'gemma2', attnSoftcap: 5, finalSoftcap: 8, queryPreAttnScalar: 20, slidingWindow: 16, slidingWindowLayers: [0, 2], tieWordEmbeddings: true },
  },
  {
    label: 'Gemma 3 text (gemma-3-4b layout): q/k (1+w) norms, local layers at rope_local_base_freq, the global layer with rope_theta and linear scaling',
    arch: tinyArchitecture({ ...baseDims, family: 'gemma3_text', numLayers: 3, numHeads: 4, numKvHeads: 1, headDim: 16, normPlusOne: true, embedScale: true, sandwichNorms: true, activation: 'gelu_tanh', qkNorm: true, tieWordEmbeddings: true }),
    config: (a: Architecture) => ({
      ...gemmaCommon(a),
      architectures: ['Gemma3ForCausalLM'],
      model_type: 'gemma3_text',
      attn_logit_softcapping: null,
      final_logit_softcapping: null,
      query_pre_attn_scalar: 16,
      rope_local_base_freq: 10000.0,
      rope_scaling: { factor: 8.0, rope_type: 'linear' },
      rope_theta: 1000000.0,
      sliding_window: 16,
      sliding_window_pattern: 3,
    }),
    expected: { family: 'gemma3_text', qkNorm: true, localRopeTheta: 10000, ropeTheta: 1e6, rope: { type: 'linear', factor: 8 }, slidingWindow: 16, slidingWindowLayers: [0, 1] },
  },
])('$label', ({ arch, config, expected }) => {
  const folder: FamilyFolder = { config: config(arch), tensors: randomCheckpoint(arch, 61).tensors, dtype: 'BF16' };
  const served = serveDuringDescribe(arch.family, folder);

  it('served greedy tokens and logprobs equal the merged reference past the window', async () => {
    expect(served().app.runtime.manifest.architecture).toMatchObject({ ...expected, normPlusOne: true, embedScale: true, sandwichNorms: true, activation: 'gelu_tanh' });
    const r = await checkAdapterAgainstReference(served(), storedTensors(folder), { prompt: LONG_PROMPT });
    console.info(`[${arch.family}] ${r.tokens.length} tokens after a ${r.promptLength}-token prompt: max |Δ logprob| ${r.worst.toExponential(2)}, adapter moves logits by ${r.effect.toFixed(2)}`);
    expect(r.promptLength).toBeGreaterThan(16);
    expect(r.effect).toBeGreaterThan(1e-2);
    expect(r.worst).toBeLessThan(1e-4);
  });
});

describe('each Gemma hook changes the model (so the served tests above can fail)', () => {
  it('removing any one of them from the reference moves the logits', () => {
    const arch = tinyArchitecture({
      ...baseDims,
      family: 'gemma3_text',
      numLayers: 3,
      headDim: 16,
      normPlusOne: true,
      embedScale: true,
      sandwichNorms: true,
      activation: 'gelu_tanh',
      qkNorm: true,
      attnSoftcap: 3,
      finalSoftcap: 4,
      queryPreAttnScalar: 9,
      localRopeTheta: 10000,
      ropeTheta: 1e6,
      slidingWindow: 4,
      slidingWindowLayers: [0, 1],
    });
    const ck = randomCheckpoint(arch, 67);
    const tokens = Array.from({ length: 12 }, (_, i) => (i * 37 + 5) % arch.vocabSize);
    const full = referenceForward(ck, tokens);
    const without: Partial<Architecture>[] = [
      { normPlusOne: undefined },
      { embedScale: undefined },
      { sandwichNorms: undefined },
      { activation: undefined },
      { attnSoftcap: undefined },
      { finalSoftcap: undefined },
      { queryPreAttnScalar: undefined },
      { localRopeTheta: undefined },
      { slidingWindow: undefined },
    ];
    for (const change of without) {
      const other = referenceForward(new MemoryCheckpoint({ ...arch, ...change }, ck.tensors), tokens);
      const d = Math.max(...full.map((row, i) => maxAbsDiff(row, other[i]!)));
      expect(d, `without ${Object.keys(change)[0]}`).toBeGreaterThan(1e-3);
    }
  });
});
