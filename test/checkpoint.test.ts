import { copyFile, readFile, rm, truncate, writeFile, open } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeSafetensors } from '../src/adapters/safetensors.js';
import { presetConfig } from '../bench/presets.js';
import { architectureFromHfConfig } from '../src/model/checkpoint/hf-config.js';
import { openCheckpoint, readArchitecture } from '../src/model/checkpoint/index.js';
import { ModelInputError } from '../src/model/checkpoint/types.js';
import { HAVE_STORIES, STORIES_BIN, TINY, encodeTensor, exactValues, tempDir, tinyHfConfig, tinyHfTensors, warnIfMissing, writeTinyHfFolder } from './helpers/model-io-files.js';

let root: string;
beforeAll(async () => {
  root = await tempDir('checkpoint');
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** Awaits `p`, expects a ModelInputError, and returns its message. */
async function inputError(p: Promise<unknown>): Promise<string> {
  const e = await p.then(
    () => null,
    (err: unknown) => err,
  );
  expect(e).toBeInstanceOf(ModelInputError);
  return (e as ModelInputError).message;
}

function syncInputError(f: () => unknown): string {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(ModelInputError);
    return (e as ModelInputError).message;
  }
  throw new Error('expected a ModelInputError');
}

describe('architectureFromHfConfig', () => {
  it('applies the Hugging Face defaults', () => {
    const cfg = tinyHfConfig();
    delete cfg.num_key_value_heads;
    delete cfg.rope_theta;
    delete cfg.tie_word_embeddings;
    cfg.eos_token_id = [2, 7, 2];
    const a = architectureFromHfConfig(cfg, 'config.json');
    expect(a).toMatchObject({ family: 'llama', numHeads: 4, numKvHeads: 4, headDim: TINY.hidden / 4, ropeTheta: 10000, tieWordEmbeddings: false, attentionBias: false, ropeLayout: 'rotate_half', eosTokenIds: [2, 7], bosTokenId: 1 });
  });

  it('knows qwen2 has q/k/v biases, reads llama attention_bias and an explicit head_dim', () => {
    expect(architectureFromHfConfig(tinyHfConfig({ family: 'qwen2' }), 'c').attentionBias).toBe(true);
    expect(architectureFromHfConfig({ ...tinyHfConfig(), attention_bias: true, head_dim: 8 }, 'c')).toMatchObject({ attentionBias: true, headDim: 8 });
  });

  it('accepts architectures without model_type; windows: mistral every layer, qwen2 from max_window_layers or layer_types, at full context', () => {
    const cfg = tinyHfConfig({ family: 'mistral' });
    delete cfg.model_type;
    expect(architectureFromHfConfig({ ...cfg, sliding_window: 32 }, 'c')).toMatchObject({ family: 'mistral', maxPositions: TINY.maxPos, slidingWindow: 32, slidingWindowLayers: [0, 1] });
    // a window as long as the context never masks anything
    expect(architectureFromHfConfig({ ...cfg, sliding_window: TINY.maxPos }, 'c').slidingWindow).toBeUndefined();
    expect(architectureFromHfConfig({ ...cfg, sliding_window: null }, 'c').slidingWindow).toBeUndefined();
    const qwen = { ...tinyHfConfig({ family: 'qwen2' }), sliding_window: 8, max_window_layers: 1 };
    expect(architectureFromHfConfig(qwen, 'c').slidingWindow).toBeUndefined();
    expect(architectureFromHfConfig({ ...qwen, use_sliding_window: true }, 'c')).toMatchObject({ slidingWindow: 8, slidingWindowLayers: [1] });
    expect(architectureFromHfConfig({ ...qwen, use_sliding_window: true, layer_types: ['sliding_attention', 'full_attention'] }, 'c')).toMatchObject({ slidingWindowLayers: [0] });
  });

  it("maps Llama's attention_bias to q/k/v and o_proj biases and mlp_bias to the MLP's; qwen2 has q/k/v only", () => {
    expect(architectureFromHfConfig({ ...tinyHfConfig(), attention_bias: true, mlp_bias: true }, 'c')).toMatchObject({ attentionBias: true, outputBias: true, mlpBias: true });
    expect(architectureFromHfConfig({ ...tinyHfConfig(), mlp_bias: true }, 'c')).toMatchObject({ attentionBias: false, outputBias: false, mlpBias: true });
    expect(architectureFromHfConfig(tinyHfConfig({ family: 'qwen2' }), 'c')).toMatchObject({ attentionBias: true, outputBias: false, mlpBias: false });
  });

  it('reads qwen3: explicit head_dim, q/k norms, attention_bias for q/k/v/o', () => {
    const cfg = { ...tinyHfConfig(), model_type: 'qwen3', architectures: ['Qwen3ForCausalLM'], head_dim: 8, attention_bias: false, use_sliding_window: false, sliding_window: null };
    expect(architectureFromHfConfig(cfg, 'c')).toMatchObject({ family: 'qwen3', headDim: 8, qkNorm: true, attentionBias: false, outputBias: false, mlpBias: false });
    expect(architectureFromHfConfig({ ...cfg, attention_bias: true }, 'c')).toMatchObject({ attentionBias: true, outputBias: true });
  });

  it('reads phi3: fused projections, LongRoPE with the top-level original_max_position_embeddings; refuses partial rotary and short factor lists', () => {
    const half = TINY.hidden / TINY.heads / 2;
    const cfg = { ...tinyHfConfig(), model_type: 'phi3', architectures: ['Phi3ForCausalLM'], max_position_embeddings: 1024, original_max_position_embeddings: 64, sliding_window: 2047, rope_scaling: { type: 'longrope', short_factor: new Array(half).fill(1), long_factor: new Array(half).fill(4) } };
    const a = architectureFromHfConfig(cfg, 'c');
    expect(a).toMatchObject({ family: 'phi3', fusedProjections: true, attentionBias: false, maxPositions: 1024, rope: { type: 'longrope', originalMaxPositions: 64, longFactor: [4, 4] } });
    expect(a.rope?.type === 'longrope' && a.rope.attentionFactor).toBeCloseTo(Math.sqrt(1 + Math.log(16) / Math.log(64)), 12);
    expect(syncInputError(() => architectureFromHfConfig({ ...cfg, partial_rotary_factor: 0.75 }, 'c'))).toContain('partial_rotary_factor 0.75 is not supported');
    expect(syncInputError(() => architectureFromHfConfig({ ...cfg, rope_scaling: { ...cfg.rope_scaling, long_factor: [1] } }, 'c'))).toContain(`"rope_scaling.long_factor" must list ${half} positive numbers`);
  });

  it('reads gemma2 / gemma3_text: tied by default, soft-caps, layer patterns, local RoPE base; refuses another activation', () => {
    const base = { ...tinyHfConfig(), hidden_activation: 'gelu_pytorch_tanh', hidden_act: undefined, head_dim: 8, query_pre_attn_scalar: 8, sliding_window: 16, tie_word_embeddings: undefined };
    const g2 = architectureFromHfConfig({ ...base, model_type: 'gemma2', architectures: ['Gemma2ForCausalLM'], num_hidden_layers: 4, attn_logit_softcapping: 50, final_logit_softcapping: 30 }, 'c');
    expect(g2).toMatchObject({ family: 'gemma2', tieWordEmbeddings: true, normPlusOne: true, embedScale: true, sandwichNorms: true, activation: 'gelu_tanh', attnSoftcap: 50, finalSoftcap: 30, queryPreAttnScalar: 8, slidingWindowLayers: [0, 2] });
    const g3 = architectureFromHfConfig({ ...base, model_type: 'gemma3_text', architectures: ['Gemma3ForCausalLM'], num_hidden_layers: 7, rope_theta: 1e6, rope_local_base_freq: 10000, sliding_window_pattern: 6, attn_logit_softcapping: null }, 'c');
    expect(g3).toMatchObject({ family: 'gemma3_text', qkNorm: true, localRopeTheta: 10000, ropeTheta: 1e6, slidingWindowLayers: [0, 1, 2, 3, 4, 6] });
    expect(g3.attnSoftcap).toBeUndefined();
    // transformers >= 4.57 writes Gemma 3's RoPE per layer type
    const perType: Record<string, unknown> = { ...base, model_type: 'gemma3_text', num_hidden_layers: 7, rope_parameters: { full_attention: { rope_type: 'linear', factor: 8, rope_theta: 1e6 }, sliding_attention: { rope_type: 'default', rope_theta: 10000 } } };
    expect(architectureFromHfConfig(perType, 'c')).toMatchObject({ ropeTheta: 1e6, rope: { type: 'linear', factor: 8 }, localRopeTheta: 10000 });
    expect(syncInputError(() => architectureFromHfConfig({ ...base, model_type: 'gemma2', hidden_activation: 'gelu' }, 'c'))).toContain('hidden_activation "gelu" is not supported for gemma2 (only gelu_pytorch_tanh)');
  });

  it('names the file and the missing key', () => {
    const cfg = tinyHfConfig();
    delete cfg.hidden_size;
    const msg = syncInputError(() => architectureFromHfConfig(cfg, '/m/config.json'));
    expect(msg).toContain('/m/config.json');
    expect(msg).toContain('hidden_size');
    expect(msg).toMatch(/missing/);
  });

  it('refuses unsupported architectures, naming them and the supported list', () => {
    const msg = syncInputError(() => architectureFromHfConfig({ ...tinyHfConfig(), model_type: 'gpt2', architectures: ['GPT2LMHeadModel'] }, 'config.json'));
    expect(msg).toContain('gpt2');
    expect(msg).toContain('llama');
    expect(msg).toContain('Qwen2ForCausalLM');
  });

  it("reads Llama 3.2's rope_scaling, the rope_parameters layout (transformers >= 4.57), linear and yarn with transformers' defaults", () => {
    const llama32 = { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' };
    const expected = { type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 };
    expect(architectureFromHfConfig({ ...tinyHfConfig(), rope_theta: 500000, rope_scaling: llama32 }, 'c')).toMatchObject({ ropeTheta: 500000, rope: expected });
    const params: Record<string, unknown> = { ...tinyHfConfig(), rope_parameters: { ...llama32, rope_theta: 250000 } };
    delete params.rope_theta;
    delete params.rope_scaling;
    expect(architectureFromHfConfig(params, 'c')).toMatchObject({ ropeTheta: 250000, rope: expected });
    expect(architectureFromHfConfig({ ...tinyHfConfig(), rope_scaling: { type: 'linear', factor: 2 } }, 'c').rope).toEqual({ type: 'linear', factor: 2 });
    const yarn = architectureFromHfConfig({ ...tinyHfConfig(), max_position_embeddings: 131072, rope_scaling: { rope_type: 'yarn', factor: 4, original_max_position_embeddings: 32768 } }, 'c').rope;
    expect(yarn).toEqual({ type: 'yarn', factor: 4, originalMaxPositions: 32768, betaFast: 32, betaSlow: 1, attentionFactor: 0.1 * Math.log(4) + 1, truncate: true });
    const given = architectureFromHfConfig({ ...tinyHfConfig(), rope_scaling: { rope_type: 'yarn', factor: 4, attention_factor: 1.5, beta_fast: 16, truncate: false } }, 'c').rope;
    expect(given).toMatchObject({ attentionFactor: 1.5, betaFast: 16, originalMaxPositions: TINY.maxPos, truncate: false });
    expect(architectureFromHfConfig({ ...tinyHfConfig(), rope_scaling: { rope_type: 'default' } }, 'c').rope).toBeUndefined();
  });

  it("the llama-3.2-1b bench preset writes Llama 3.2 1B's config: real dims and its llama3 rope_scaling", () => {
    const a = architectureFromHfConfig(presetConfig('llama-3.2-1b'), 'config.json');
    expect(a).toMatchObject({ family: 'llama', hiddenSize: 2048, intermediateSize: 8192, numLayers: 16, numHeads: 32, numKvHeads: 8, headDim: 64, vocabSize: 128256, maxPositions: 131072, ropeTheta: 500000, tieWordEmbeddings: true });
    expect(a.rope).toEqual({ type: 'llama3', factor: 32, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8192 });
  });

  it('refuses dynamic NTK, unknown rope types and incomplete llama3 settings, naming the key', () => {
    const dynamic = syncInputError(() => architectureFromHfConfig({ ...tinyHfConfig(), rope_scaling: { type: 'dynamic', factor: 2 } }, 'config.json'));
    expect(dynamic).toMatch(/rope_scaling.*"dynamic".*not supported.*length of each sequence/);
    const unknown = syncInputError(() => architectureFromHfConfig({ ...tinyHfConfig(), rope_parameters: { rope_type: 'su', rope_theta: 1e4 } }, 'config.json'));
    expect(unknown).toMatch(/rope_parameters.*"su" is not supported.*default, linear, llama3, yarn/);
    const partial = syncInputError(() => architectureFromHfConfig({ ...tinyHfConfig(), rope_scaling: { rope_type: 'llama3', factor: 8 } }, 'config.json'));
    expect(partial).toContain('missing required key "rope_scaling.low_freq_factor"');
  });
});

describe.skipIf(!HAVE_STORIES)('llama2.c checkpoint (stories260K)', () => {
  warnIfMissing(HAVE_STORIES, 'the stories260K checkpoint tests');

  it('opens with the architecture of its header', async () => {
    const ck = await openCheckpoint(STORIES_BIN);
    expect(ck.architecture).toEqual({
      family: 'llama',
      hiddenSize: 64,
      intermediateSize: 172,
      numLayers: 5,
      numHeads: 8,
      numKvHeads: 4,
      headDim: 8,
      vocabSize: 512,
      maxPositions: 512,
      rmsNormEps: 1e-5,
      ropeTheta: 10000,
      ropeLayout: 'interleaved',
      tieWordEmbeddings: true,
      attentionBias: false,
      bosTokenId: 1,
      eosTokenIds: [2],
    });
    expect(ck.modelId).toBe('stories260K');
    expect(ck.tokenizer).toEqual({ kind: 'llama2c', path: join(STORIES_BIN, '..', 'tokenizer.bin') });
    expect(ck.names()).toHaveLength(1 + 5 * 9 + 1);
    expect(ck.tensor('lm_head.weight')).toBeUndefined();
    const withTok = await openCheckpoint(STORIES_BIN, '/somewhere/tok512.bin');
    expect(withTok.tokenizer).toEqual({ kind: 'llama2c', path: '/somewhere/tok512.bin' });
    expect(await readArchitecture(STORIES_BIN)).toEqual({ architecture: ck.architecture, modelId: 'stories260K' });
  });

  it('reads tensors equal to the raw float32 bytes at their offsets', async () => {
    const raw = await readFile(STORIES_BIN);
    const f32At = (byteOffset: number, n: number) => {
      const out = new Float32Array(n);
      for (let i = 0; i < n; i++) out[i] = raw.readFloatLE(byteOffset + i * 4);
      return out;
    };
    const [dim, hid, L, , , V, seq] = [64, 172, 5, 8, 4, 512, 512];
    const kv = 32;
    // offsets (in floats, after the 28-byte header) from the fixture README's array order
    const embed = 0;
    const rmsAtt = embed + V * dim;
    const wq = rmsAtt + L * dim;
    const wk = wq + L * dim * dim;
    const wv = wk + L * kv * dim;
    const wo = wv + L * kv * dim;
    const rmsFfn = wo + L * dim * dim;
    const w1 = rmsFfn + L * dim;
    const w2 = w1 + L * hid * dim;
    const w3 = w2 + L * dim * hid;
    const byte = (floats: number) => 28 + floats * 4;
    const ck = await openCheckpoint(STORIES_BIN);
    const cases: [string, number, number][] = [
      ['model.embed_tokens.weight', byte(embed), V * dim],
      ['model.layers.0.input_layernorm.weight', byte(rmsAtt), dim],
      ['model.layers.2.self_attn.k_proj.weight', byte(wk + 2 * kv * dim), kv * dim],
      ['model.layers.4.self_attn.v_proj.weight', byte(wv + 4 * kv * dim), kv * dim],
      ['model.layers.1.self_attn.o_proj.weight', byte(wo + 1 * dim * dim), dim * dim],
      ['model.layers.3.post_attention_layernorm.weight', byte(rmsFfn + 3 * dim), dim],
      ['model.layers.4.mlp.gate_proj.weight', byte(w1 + 4 * hid * dim), hid * dim],
      ['model.layers.3.mlp.down_proj.weight', byte(w2 + 3 * dim * hid), dim * hid],
      ['model.layers.0.mlp.up_proj.weight', byte(w3), hid * dim],
      // counted from the end of the file: rms_final sits just before the two RoPE tables
      ['model.norm.weight', raw.byteLength - 2 * seq * 4 * 4 - dim * 4, dim],
    ];
    for (const [name, off, n] of cases) {
      const t = ck.tensor(name)!;
      expect(t, name).toBeDefined();
      const got = t.read();
      expect(got.length, name).toBe(n);
      expect(got, name).toEqual(f32At(off, n));
    }
    expect(ck.tensor('model.layers.2.self_attn.k_proj.weight')!.shape).toEqual([32, 64]);
    expect(ck.tensor('model.layers.3.mlp.down_proj.weight')!.shape).toEqual([64, 172]);
    // a trained RMSNorm weight is not all ones: the values are real
    expect(new Set(ck.tensor('model.norm.weight')!.read()).size).toBeGreaterThan(10);
  });

  it('refuses a truncated .bin with expected vs actual bytes', async () => {
    const bad = join(root, 'short.bin');
    await copyFile(STORIES_BIN, bad);
    await truncate(bad, 1_056_540 - 100);
    const msg = await inputError(openCheckpoint(bad));
    expect(msg).toContain(bad);
    expect(msg).toContain('truncated');
    expect(msg).toContain('1056540');
    expect(msg).toContain('1056440');
    await inputError(readArchitecture(bad));
  });

  it('names pickle archives and newer llama2.c exports instead of misreading them', async () => {
    const zip = join(root, 'pytorch_model.bin');
    await writeFile(zip, Buffer.concat([Buffer.from('PK\x03\x04', 'latin1'), Buffer.alloc(100)]));
    expect(await inputError(openCheckpoint(zip))).toMatch(/pickle/);
    const v1 = Buffer.alloc(256);
    v1.writeUInt32LE(0x616b3432, 0);
    v1.writeInt32LE(1, 4);
    const v1Path = join(root, 'v1.bin');
    await writeFile(v1Path, v1);
    expect(await inputError(openCheckpoint(v1Path))).toContain('version-1');
  });

  it('reads a separate classifier when vocab_size is negative', async () => {
    const raw = await readFile(STORIES_BIN);
    const untied = Buffer.concat([raw, Buffer.alloc(512 * 64 * 4)]);
    untied.writeInt32LE(-512, 20);
    const wcls = new Float32Array(512 * 64).map((_, i) => i / 1000);
    Buffer.from(wcls.buffer).copy(untied, raw.byteLength);
    const path = join(root, 'untied.bin');
    await writeFile(path, untied);
    const ck = await openCheckpoint(path);
    expect(ck.architecture.tieWordEmbeddings).toBe(false);
    expect(ck.architecture.vocabSize).toBe(512);
    expect(ck.tensor('lm_head.weight')!.read()).toEqual(wcls);
  });
});

describe('Hugging Face folder', () => {
  it('reads back an untied F32 model.safetensors', async () => {
    const dir = join(root, 'hf-f32');
    const want = await writeTinyHfFolder(dir);
    const ck = await openCheckpoint(dir);
    expect(ck.architecture).toMatchObject({ family: 'llama', hiddenSize: 16, numKvHeads: 2, headDim: 4, ropeTheta: 500000, rmsNormEps: 1e-6, tieWordEmbeddings: false });
    expect(ck.modelId).toBe('hf-f32');
    expect(ck.sourceFiles).toEqual([join(dir, 'config.json'), join(dir, 'model.safetensors')]);
    expect(ck.tokenizer).toBeNull();
    expect(ck.names().sort()).toEqual([...want.keys()].sort());
    for (const [name, t] of want) {
      const got = ck.tensor(name)!;
      expect(got.dtype).toBe('F32');
      expect(got.shape).toEqual(t.shape);
      expect(got.read()).toEqual(t.values);
    }
  });

  it('reads a sharded, tied qwen2 model with F16 and BF16 tensors as the same floats', async () => {
    const dir = join(root, 'hf-sharded');
    const dtypeOf = (name: string) => (name.includes('mlp') ? 'BF16' : name.includes('self_attn') ? 'F16' : 'F32') as 'F32' | 'F16' | 'BF16';
    const want = await writeTinyHfFolder(dir, { family: 'qwen2', tied: true, shards: 3, dtypeOf });
    await writeFile(join(dir, 'tokenizer.json'), '{"model":{}}');
    await writeFile(join(dir, 'tokenizer_config.json'), '{"bos_token":null}');
    const ck = await openCheckpoint(dir);
    expect(ck.architecture).toMatchObject({ family: 'qwen2', attentionBias: true, tieWordEmbeddings: true });
    expect(ck.tensor('lm_head.weight')).toBeUndefined();
    expect(ck.sourceFiles).toContain(join(dir, 'model.safetensors.index.json'));
    expect(ck.sourceFiles).toContain(join(dir, 'model-00003-of-00003.safetensors'));
    expect(ck.sourceFiles).toContain(join(dir, 'tokenizer.json'));
    expect(ck.tokenizer).toEqual({ kind: 'hf', tokenizerJson: '{"model":{}}', tokenizerConfigJson: '{"bos_token":null}' });
    const seen = new Set<string>();
    for (const [name, t] of want) {
      const got = ck.tensor(name)!;
      seen.add(got.dtype);
      expect(got.dtype).toBe(dtypeOf(name));
      expect(got.read(), name).toEqual(t.values);
    }
    expect(seen).toEqual(new Set(['F32', 'F16', 'BF16']));
  });

  it('reads tensor bytes from disk when asked, not at open', async () => {
    const dir = join(root, 'hf-lazy');
    const want = await writeTinyHfFolder(dir);
    const ck = await openCheckpoint(dir);
    // overwrite the data section with zeros after opening: a lazy reader sees them
    const path = join(dir, 'model.safetensors');
    const bytes = await readFile(path);
    const headerEnd = 8 + Number(bytes.readBigUInt64LE(0));
    const fh = await open(path, 'r+');
    await fh.write(Buffer.alloc(bytes.byteLength - headerEnd), 0, bytes.byteLength - headerEnd, headerEnd);
    await fh.close();
    const name = 'model.layers.1.mlp.up_proj.weight';
    expect(ck.tensor(name)!.read()).toEqual(new Float32Array(want.get(name)!.values.length));
  });

  it('reads the architecture from a folder or a config.json with no weights', async () => {
    const dir = join(root, 'config-only');
    await writeTinyHfFolder(dir);
    await rm(join(dir, 'model.safetensors'));
    await writeFile(join(dir, 'generation_config.json'), JSON.stringify({ eos_token_id: [2, 9] }));
    const fromDir = await readArchitecture(dir);
    expect(fromDir.modelId).toBe('config-only');
    expect(fromDir.architecture.eosTokenIds).toEqual([2, 9]);
    const fromFile = await readArchitecture(join(dir, 'config.json'));
    expect(fromFile.architecture).toMatchObject({ hiddenSize: 16, numLayers: 2, eosTokenIds: [2] });
    expect(fromFile.modelId).toBe('config-only');
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toMatch(/no model\.safetensors/);
  });
});

describe('bad Hugging Face inputs name the file and the problem', () => {
  async function folder(name: string, spec: Parameters<typeof writeTinyHfFolder>[1] = {}): Promise<string> {
    const dir = join(root, name);
    await writeTinyHfFolder(dir, spec);
    return dir;
  }

  it('missing config key', async () => {
    const dir = await folder('bad-key');
    const cfg = tinyHfConfig();
    delete cfg.num_hidden_layers;
    await writeFile(join(dir, 'config.json'), JSON.stringify(cfg));
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain(join(dir, 'config.json'));
    expect(msg).toContain('num_hidden_layers');
  });

  it('unsupported architecture', async () => {
    const dir = await folder('bad-arch');
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...tinyHfConfig(), model_type: 'gpt2', architectures: ['GPT2LMHeadModel'] }));
    const msg = await inputError(readArchitecture(dir));
    expect(msg).toContain(join(dir, 'config.json'));
    expect(msg).toContain('gpt2');
    expect(msg).toMatch(/not supported/);
  });

  it('truncated model.safetensors', async () => {
    const dir = await folder('bad-trunc');
    const path = join(dir, 'model.safetensors');
    const size = (await readFile(path)).byteLength;
    await truncate(path, size - 10);
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain('model.safetensors');
    expect(msg).toContain('truncated');
  });

  it('a header cut short', async () => {
    const dir = await folder('bad-header');
    await truncate(join(dir, 'model.safetensors'), 20);
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain('model.safetensors');
    expect(msg).toContain('truncated');
  });

  it('unsupported dtype (I32 weights)', async () => {
    const dir = await folder('bad-dtype');
    const want = tinyHfTensors();
    const tensors = [...want].map(([name, t]) =>
      name === 'model.layers.0.mlp.up_proj.weight' ? { name, dtype: 'I32' as const, shape: t.shape, data: new Uint8Array(t.values.length * 4) } : encodeTensor(name, t.shape, t.values, 'F32'),
    );
    await writeFile(join(dir, 'model.safetensors'), encodeSafetensors(tensors));
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain('model.layers.0.mlp.up_proj.weight');
    expect(msg).toContain('dtype I32 not supported');
    expect(msg).toContain('model.safetensors');
  });

  it('wrong tensor shape', async () => {
    const dir = await folder('bad-shape');
    const want = tinyHfTensors();
    const tensors = [...want].map(([name, t]) => (name === 'model.layers.1.self_attn.k_proj.weight' ? encodeTensor(name, [16, 8], t.values, 'F32') : encodeTensor(name, t.shape, t.values, 'F32')));
    await writeFile(join(dir, 'model.safetensors'), encodeSafetensors(tensors));
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain('model.layers.1.self_attn.k_proj.weight');
    expect(msg).toContain('expected [8, 16]');
    expect(msg).toContain('actual [16, 8]');
  });

  it('missing lm_head in an untied model, missing bias in qwen2', async () => {
    const dir = await folder('bad-missing');
    const cfg = { ...tinyHfConfig({ family: 'qwen2' }), tie_word_embeddings: false };
    await writeFile(join(dir, 'config.json'), JSON.stringify(cfg));
    const tensors = [...tinyHfTensors()].filter(([name]) => name !== 'lm_head.weight').map(([name, t]) => encodeTensor(name, t.shape, t.values, 'F32'));
    await writeFile(join(dir, 'model.safetensors'), encodeSafetensors(tensors));
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain('lm_head.weight is missing');
    expect(msg).toContain('model.layers.0.self_attn.q_proj.bias is missing');
  });

  it('a tensor the graph would not consume (o_proj.bias with attention_bias false, a stray tensor) is refused, each named', async () => {
    const dir = await folder('bad-unused');
    const want = tinyHfTensors();
    const extra = [encodeTensor('model.layers.0.self_attn.o_proj.bias', [TINY.hidden], exactValues(TINY.hidden, 5), 'F32'), encodeTensor('model.layers.1.mlp.gate_proj.bias', [TINY.intermediate], exactValues(TINY.intermediate, 6), 'F32')];
    await writeFile(join(dir, 'model.safetensors'), encodeSafetensors([...[...want].map(([name, t]) => encodeTensor(name, t.shape, t.values, 'F32')), ...extra]));
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain('model.layers.0.self_attn.o_proj.bias');
    expect(msg).toContain('model.layers.1.mlp.gate_proj.bias');
    expect(msg).toMatch(/not used by the llama graph/);
    // with the switches that make transformers use them, the same names are required instead
    await writeFile(join(dir, 'config.json'), JSON.stringify({ ...tinyHfConfig(), mlp_bias: true, attention_bias: true }));
    const missing = await inputError(openCheckpoint(dir));
    expect(missing).toContain('model.layers.0.self_attn.q_proj.bias is missing');
    expect(missing).toContain('model.layers.0.mlp.down_proj.bias is missing');
  });

  it('a saved lm_head beside tied embeddings is accepted only when it equals them; plain inv_freq buffers are accepted', async () => {
    const dir = await folder('tied-dup', { tied: true });
    const want = tinyHfTensors({ tied: true });
    const embed = want.get('model.embed_tokens.weight')!;
    const half = TINY.hidden / TINY.heads / 2;
    const invFreq = Float32Array.from({ length: half }, (_, i) => 1 / Math.pow(500000, (2 * i) / (TINY.hidden / TINY.heads)));
    const write = (head: Float32Array) =>
      writeFile(
        join(dir, 'model.safetensors'),
        encodeSafetensors([
          ...[...want].map(([name, t]) => encodeTensor(name, t.shape, t.values, 'F32')),
          encodeTensor('lm_head.weight', embed.shape, head, 'F32'),
          encodeTensor('model.layers.0.self_attn.rotary_emb.inv_freq', [half], invFreq, 'F32'),
        ]),
      );
    await write(embed.values);
    const ck = await openCheckpoint(dir);
    expect(ck.names()).not.toContain('lm_head.weight');
    expect(ck.names()).not.toContain('model.layers.0.self_attn.rotary_emb.inv_freq');
    await write(embed.values.map((v) => v + 1 / 64));
    expect(await inputError(openCheckpoint(dir))).toContain('tensor lm_head.weight [32, 16] is not used');
  });

  it('a sharded index naming a missing or escaping shard', async () => {
    const dir = await folder('bad-shards', { shards: 2 });
    await rm(join(dir, 'model-00002-of-00002.safetensors'));
    const msg = await inputError(openCheckpoint(dir));
    expect(msg).toContain('model-00002-of-00002.safetensors');
    expect(msg).toContain('not found');
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ weight_map: { 'model.norm.weight': '../x.safetensors' } }));
    expect(await inputError(openCheckpoint(dir))).toContain('plain file names');
  });

  it('a path that is neither a folder nor a .bin', async () => {
    const path = join(root, 'model.gguf');
    await writeFile(path, 'x');
    expect(await inputError(openCheckpoint(path))).toContain(path);
    expect(await inputError(openCheckpoint(join(root, 'nope')))).toContain('not found');
  });
});
