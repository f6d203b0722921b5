import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { FastifyInstance } from 'fastify';
import { encodeSafetensors, f16ToF32 } from '../src/adapters/safetensors.js';
import { float32ToFloat16Bits } from '../src/model/graph/onnx-builder.js';
import { projectionDims, projectionsOf, type Architecture, type Projection } from '../src/model/architecture.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { hfConfigJson, llamaConfigJson, makePeftTensors, peftConfig, seededRandom, type PeftTensor } from './helpers/adapter-fixtures.js';
import { form } from './helpers/adapter-uploads.js';
import { FAMILY_VOCAB, serveFamily, storedTensors, type FamilyFolder, type ServedFamily } from './helpers/family-serve.js';
import { maxAbsDiff } from './helpers/lora-feeds.js';
import { dequantizedProjections } from './helpers/quantized-graph.js';
import { MemoryCheckpoint, randomCheckpoint, tinyArchitecture, type MemoryTensor } from './helpers/random-checkpoint.js';
import { referenceForward } from './reference/forward.js';
import { peftMerge, rowNorms, type PeftModule } from './reference/peft-merge.js';

/**
 * DoRA (use_dora, lora_magnitude_vector) and LoRA biases (lora_bias, lora_B.bias) uploaded over
 * HTTP as PEFT's save_pretrained writes them, served alone and in one batch with base and plain
 * LoRA rows, against the independent reference forward of the checkpoint merged as PEFT's
 * merge_and_unload does (test/reference/peft-merge.ts): greedy ids equal, logprobs within 1e-4.
 */

type Kind = 'lora' | 'dora' | 'dora_b0' | 'bias';

interface Variant {
  name: string;
  kind: Kind;
  config: Record<string, unknown>;
  tensors: PeftTensor[];
  /** module name → what PEFT holds for it */
  modules: Map<string, PeftModule>;
}

const R = 4;
const ALPHA = 8;

/**
 * An adapter of `kind` on `targets`, with PEFT's tensor names. DoRA magnitudes are the base rows'
 * norms (PEFT's initial value, computed from `weights`) moved by ±30%: a trained magnitude.
 * `dora_b0` has lora_B = 0 (PEFT's initial B) with such magnitudes: its delta is zero, its effect not.
 */
function variant(arch: Architecture, weights: ReadonlyMap<string, MemoryTensor>, kind: Kind, seed: number, targets: readonly Projection[]): Variant {
  const tensors = makePeftTensors(arch, { r: R, targets, seed, scale: 0.15 });
  const rand = seededRandom(seed + 1000);
  const modules = new Map<string, PeftModule>();
  const extra: PeftTensor[] = [];
  for (const t of loraTargetsFor(arch).filter((t) => targets.includes(t.module))) {
    const A = tensors.find((p) => p.name === `base_model.model.${t.name}.lora_A.weight`)!.data;
    const B = tensors.find((p) => p.name === `base_model.model.${t.name}.lora_B.weight`)!.data;
    if (kind === 'dora_b0') B.fill(0);
    const mod: PeftModule = { A, B, rank: R, scaling: ALPHA / R };
    if (kind === 'dora' || kind === 'dora_b0') {
      const w = weights.get(`${t.name}.weight`)!;
      const norms = rowNorms(w.data, t.outFeatures, t.inFeatures);
      mod.magnitude = Float32Array.from(norms, (n) => n * (1 + 0.3 * (rand() * 2 - 1)));
      extra.push({ name: `base_model.model.${t.name}.lora_magnitude_vector`, shape: [t.outFeatures], data: mod.magnitude });
    }
    if (kind === 'bias') {
      mod.biasB = Float32Array.from({ length: t.outFeatures }, () => (rand() * 2 - 1) * 0.2);
      extra.push({ name: `base_model.model.${t.name}.lora_B.bias`, shape: [t.outFeatures], data: mod.biasB });
    }
    modules.set(t.name, mod);
  }
  const config = peftConfig({ r: R, lora_alpha: ALPHA, target_modules: targets, use_dora: kind === 'dora' || kind === 'dora_b0', lora_bias: kind === 'bias' });
  return { name: kind.replace('_', '-'), kind, config, tensors: [...tensors, ...extra], modules };
}

async function upload(app: FastifyInstance, v: Variant): Promise<void> {
  const res = await app.inject({
    method: 'POST',
    url: '/v1/adapters',
    payload: form([
      ['name', v.name],
      ['config', Buffer.from(JSON.stringify(v.config)), 'adapter_config.json'],
      ['weights', encodeSafetensors(v.tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
    ]),
  });
  expect(res.statusCode, res.body).toBe(201);
}

interface Served {
  tokens: number[];
  logprobs: { id: number; logprob: number; top_logprobs: { token: number; logprob: number }[] }[];
}

const PROMPT = 'Once upon a time there was a model that';
const MAX_TOKENS = 20;

async function generate(app: FastifyInstance, adapter: string | null): Promise<Served> {
  const res = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROMPT, ...(adapter && { adapter }), max_tokens: MAX_TOKENS, temperature: 0, logprobs: 20 } });
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as Served;
}

/** greedy ids equal to the reference's argmax; returns the largest |Δ logprob| over the served top 20 */
function againstReference(app: FastifyInstance, out: Served, ck: MemoryCheckpoint, label: string, greedy = true): number {
  const promptIds = app.runtime.tokenizer.encode(PROMPT);
  const logits = referenceForward(ck, [...promptIds, ...out.tokens], { prefill: promptIds.length });
  let worst = 0;
  expect(out.tokens.length, label).toBeGreaterThanOrEqual(3);
  out.tokens.forEach((tok, k) => {
    const row = logits[promptIds.length - 1 + k]!;
    const max = Math.max(...row);
    const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
    if (greedy) expect(row.indexOf(max), `${label}: greedy token ${k}`).toBe(tok);
    const lp = out.logprobs[k]!;
    worst = Math.max(worst, maxAbsDiff([lp.logprob, ...lp.top_logprobs.map((t) => t.logprob)], [row[tok]! - lse, ...lp.top_logprobs.map((t) => row[t.token]! - lse)]));
  });
  return worst;
}

/** the largest |Δ logit| between two checkpoints over the prompt: the adapter does change the model */
function effectOf(app: FastifyInstance, a: MemoryCheckpoint, b: MemoryCheckpoint): number {
  const ids = app.runtime.tokenizer.encode(PROMPT);
  const x = referenceForward(a, ids, { prefill: ids.length });
  const y = referenceForward(b, ids, { prefill: ids.length });
  return Math.max(...x.map((row, i) => maxAbsDiff(row, y[i]!)));
}

/**
 * Alone, then all at once (base + every variant in one batch, observed sharing a decode step):
 * each row equal to its merged reference.
 */
async function checkVariants(served: ServedFamily, base: MemoryCheckpoint, variants: readonly Variant[], label: string): Promise<void> {
  const { app } = served;
  for (const v of variants) await upload(app, v);
  const merged = new Map(variants.map((v) => [v.name, peftMerge(base, v.modules, v.kind)]));
  const alone = new Map<string | null, Served>();
  for (const v of variants) {
    const out = await generate(app, v.name);
    const worst = againstReference(app, out, merged.get(v.name)!, `${label} ${v.name} alone`);
    const effect = effectOf(app, merged.get(v.name)!, base);
    console.info(`[${label}] ${v.name} alone: ${out.tokens.length} tokens, max |Δ logprob| ${worst.toExponential(2)}, adapter moves logits by ${effect.toFixed(3)}`);
    expect(worst).toBeLessThan(1e-4);
    expect(effect).toBeGreaterThan(1e-2);
    alone.set(v.name, out);
  }
  alone.set(null, await generate(app, null));

  // every kind in one batch: each stats snapshot the worker sends (one per step) is watched as it
  // lands, since polling from this thread can miss steps whose messages arrive together
  let widest = 0;
  const engine = app.runtime.engine;
  let snapshot = engine.stats();
  Object.defineProperty(engine, 'snapshot', {
    configurable: true,
    get: () => snapshot,
    set: (v: typeof snapshot) => {
      widest = Math.max(widest, v.batchSize);
      snapshot = v;
    },
  });
  const names = [null, ...variants.map((v) => v.name)];
  const together = await Promise.all(names.map((n) => generate(app, n)));
  names.forEach((n, i) => {
    const out = together[i]!;
    expect(out.tokens, `${label} ${n ?? 'base'} in the batch vs alone`).toEqual(alone.get(n)!.tokens);
    const worst = againstReference(app, out, n === null ? base : merged.get(n)!, `${label} ${n ?? 'base'} in the batch`);
    expect(worst).toBeLessThan(1e-4);
  });
  console.info(`[${label}] tokens ${together.map((t) => t.tokens.length).join('/')}; ${names.length} requests together (base, ${variants.map((v) => v.name).join(', ')}): widest decode step ${widest} rows, each equal to its reference`);
  expect(widest).toBe(names.length);
}

const baseDims: Partial<Architecture> = { vocabSize: FAMILY_VOCAB, maxPositions: 256, bosTokenId: 506, eosTokenIds: [507], tieWordEmbeddings: false };

describe('Llama with a bias on every projection: DoRA, lora_bias and plain LoRA per request', () => {
  const arch = tinyArchitecture({ ...baseDims, attentionBias: true, outputBias: true, mlpBias: true });
  const folder: FamilyFolder = { config: llamaConfigJson(arch), tensors: randomCheckpoint(arch, 61).tensors, dtype: 'BF16' };
  let served: ServedFamily;
  beforeAll(async () => {
    served = await serveFamily('dora-llama', folder, { MAX_BATCH: 8 });
  });
  afterAll(async () => {
    await served?.close();
  });

  it('each alone and all in one batch with base rows: equal to PEFT merge_and_unload', async () => {
    const stored = storedTensors(folder);
    const all = projectionsOf(arch);
    const variants = [variant(arch, stored, 'lora', 3, all), variant(arch, stored, 'dora', 4, all), variant(arch, stored, 'bias', 5, all), variant(arch, stored, 'dora_b0', 6, ['q_proj', 'v_proj', 'down_proj'])];
    await checkVariants(served, new MemoryCheckpoint(arch, stored, 'reference'), variants, 'llama');
    // the description names the variant's tensors
    const d = (await served.app.inject({ url: '/v1/adapters/dora' })).json() as { report: { modules: { tensorMagnitude?: string }[] } };
    expect(d.report.modules[0]!.tensorMagnitude).toMatch(/lora_magnitude_vector$/);
    expect(d).toMatchObject({ useDora: true, loraBias: false });
    expect((await served.app.inject({ url: '/v1/adapters/bias' })).json()).toMatchObject({ useDora: false, loraBias: true });
    expect((await served.app.inject({ url: '/v1/adapters/lora' })).json()).toMatchObject({ useDora: false, loraBias: false });
    // lora_B = 0 under DoRA: no delta, yet accepted and measured by the probe (through the served graph) as changing the output
    const b0 = (await served.app.inject({ url: '/v1/adapters/dora-b0' })).json() as { report: { modules: { deltaNorm: number | null }[]; warnings: { code: string }[]; effect: { maxLogprobDelta: number } } };
    expect(b0.report.modules.every((m) => m.deltaNorm === 0)).toBe(true);
    expect(b0.report.warnings.map((w) => w.code)).not.toContain('no_effect_modules');
    console.info(`[llama] dora-b0 (lora_B = 0, m ≠ ‖W‖): probe maxLogprobDelta ${b0.report.effect.maxLogprobDelta.toFixed(3)}`);
    expect(b0.report.effect.maxLogprobDelta).toBeGreaterThan(0.01);
  });
  it('422s that change nothing: DoRA magnitudes that do not fit or hold NaN, a zero row of W + s·B·A; a no-op lora_bias adapter', async () => {
    const { app } = served;
    const stored = storedTensors(folder);
    const v = variant(arch, stored, 'dora', 12, ['q_proj']);
    const mag = v.tensors.find((t) => t.name.endsWith('layers.1.self_attn.q_proj.lora_magnitude_vector'))!;
    const out = mag.shape[0]!;
    const shapes: [string, PeftTensor[]][] = [
      ['bad-shape', v.tensors.map((t) => (t === mag ? { ...t, shape: [out / 2], data: t.data.subarray(0, out / 2) } : t))],
      ['nan', v.tensors.map((t) => (t === mag ? { ...t, data: t.data.map((x, i) => (i === 3 ? Number.NaN : x)) } : t))],
    ];
    for (const [name, tensors] of shapes) {
      const res = await app.inject({
        method: 'POST',
        url: '/v1/adapters',
        payload: form([
          ['name', name],
          ['config', Buffer.from(JSON.stringify(v.config)), 'adapter_config.json'],
          ['weights', encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
        ]),
      });
      expect(res.statusCode, res.body).toBe(422);
      const body = res.json() as { errors: { code: string; tensor?: string; expected?: unknown; actual?: unknown }[] };
      expect(body.errors, name).toMatchObject([name === 'nan' ? { code: 'non_finite', tensor: mag.name } : { code: 'shape_mismatch', tensor: mag.name, expected: [out], actual: [out / 2] }]);
      expect((await app.inject({ url: `/v1/adapters/${name}` })).statusCode).toBe(404);
    }
    // lora_B = 0 and a zero lora_B.bias change nothing: no_effect, as for plain LoRA; a non-zero bias alone is accepted
    const zero = variant(arch, stored, 'bias', 14, ['v_proj']);
    for (const t of zero.tensors) if (t.name.includes('lora_B')) t.data.fill(0);
    const upload = (name: string, tensors: PeftTensor[]) =>
      app.inject({
        method: 'POST',
        url: '/v1/adapters',
        payload: form([
          ['name', name],
          ['config', Buffer.from(JSON.stringify(zero.config)), 'adapter_config.json'],
          ['weights', encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
        ]),
      });
    const none = await upload('bias-zero', zero.tensors);
    expect(none.statusCode, none.body).toBe(422);
    expect((none.json() as { errors: { code: string }[] }).errors.map((e) => e.code)).toEqual(['no_effect']);
    // a row of W + s·B·A that is exactly zero (s = 1, lora_A's first row = −W's first row): PEFT's
    // m / ‖·‖ would be non-finite there, which only the load (reading W) can see: 422, nothing stored
    const zeroRow = variant(arch, stored, 'dora', 15, ['q_proj']);
    zeroRow.config.lora_alpha = R;
    const q0 = 'base_model.model.model.layers.0.self_attn.q_proj';
    const w0 = stored.get('model.layers.0.self_attn.q_proj.weight')!.data;
    const a0 = zeroRow.tensors.find((t) => t.name === `${q0}.lora_A.weight`)!;
    const b0 = zeroRow.tensors.find((t) => t.name === `${q0}.lora_B.weight`)!;
    for (let k = 0; k < arch.hiddenSize; k++) a0.data[k] = -w0[k]!;
    b0.data.set([1, 0, 0, 0], 0);
    const zr = await app.inject({
      method: 'POST',
      url: '/v1/adapters',
      payload: form([
        ['name', 'zero-row'],
        ['config', Buffer.from(JSON.stringify(zeroRow.config)), 'adapter_config.json'],
        ['weights', encodeSafetensors(zeroRow.tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
      ]),
    });
    expect(zr.statusCode, zr.body).toBe(422);
    expect((zr.json() as { errors: unknown[] }).errors).toMatchObject([{ code: 'non_finite', module: 'model.layers.0.self_attn.q_proj', message: expect.stringMatching(/row 0 .* norm 0/) }]);
    expect((await app.inject({ url: '/v1/adapters/zero-row' })).statusCode).toBe(404);
    const biasOnly = await upload('bias-only', zero.tensors.map((t) => (t.name.endsWith('lora_B.bias') ? { ...t, data: t.data.map((_, i) => (i % 5) * 0.01) } : t)));
    expect(biasOnly.statusCode, biasOnly.body).toBe(201);
  });
});

describe('Phi-3 layout (fused qkv_proj / gate_up_proj): DoRA magnitudes span the fused output', () => {
  const arch = tinyArchitecture({ ...baseDims, family: 'phi3', fusedProjections: true, numHeads: 4, numKvHeads: 2, headDim: 16 });
  const config = {
    architectures: ['Phi3ForCausalLM'],
    model_type: 'phi3',
    hidden_size: arch.hiddenSize,
    intermediate_size: arch.intermediateSize,
    num_hidden_layers: arch.numLayers,
    num_attention_heads: arch.numHeads,
    num_key_value_heads: arch.numKvHeads,
    max_position_embeddings: arch.maxPositions,
    rms_norm_eps: 1e-5,
    rope_theta: 10000.0,
    hidden_act: 'silu',
    tie_word_embeddings: false,
    vocab_size: arch.vocabSize,
    bos_token_id: arch.bosTokenId,
    eos_token_id: arch.eosTokenIds[0],
    torch_dtype: 'bfloat16',
  };
  const folder: FamilyFolder = { config, tensors: randomCheckpoint(arch, 62).tensors, dtype: 'BF16' };
  let served: ServedFamily;
  beforeAll(async () => {
    served = await serveFamily('dora-phi3', folder, { MAX_BATCH: 8 });
  });
  afterAll(async () => {
    await served?.close();
  });

  it('DoRA on qkv_proj, o_proj, gate_up_proj, down_proj alone and batched with plain LoRA and the base', async () => {
    const stored = storedTensors(folder);
    expect(projectionDims(arch, 'qkv_proj').outFeatures).toBe(64 + 2 * 32);
    const all = projectionsOf(arch);
    const variants = [variant(arch, stored, 'dora', 7, all), variant(arch, stored, 'lora', 8, all)];
    await checkVariants(served, new MemoryCheckpoint(arch, stored, 'reference'), variants, 'phi3');
  });
});

describe.each([
  { label: 'Qwen2 (q/k/v biases): lora_bias on q/k/v, DoRA everywhere', arch: tinyArchitecture({ ...baseDims, family: 'qwen2', attentionBias: true, numHeads: 4, numKvHeads: 2 }), biasTargets: ['q_proj', 'k_proj', 'v_proj'] as Projection[] },
  { label: 'Qwen3 (q/k norms, head_dim ≠ hidden / heads): DoRA everywhere', arch: tinyArchitecture({ ...baseDims, family: 'qwen3', numHeads: 4, numKvHeads: 2, headDim: 24, qkNorm: true }), biasTargets: [] as Projection[] },
])('$label', ({ arch, biasTargets }) => {
  const folder: FamilyFolder = { config: { ...hfConfigJson(arch), torch_dtype: 'bfloat16' }, tensors: randomCheckpoint(arch, 65).tensors, dtype: 'BF16' };
  let served: ServedFamily;
  beforeAll(async () => {
    served = await serveFamily(`dora-${arch.family}`, folder, { MAX_BATCH: 8 });
  });
  afterAll(async () => {
    await served?.close();
  });

  it('alone and batched with plain LoRA and the base: equal to PEFT merge_and_unload', async () => {
    expect(served.app.runtime.manifest.architecture).toMatchObject({ family: arch.family, attentionBias: arch.attentionBias });
    const stored = storedTensors(folder);
    const all = projectionsOf(arch);
    const variants = [variant(arch, stored, 'dora', 16, all), variant(arch, stored, 'lora', 19, all), ...(biasTargets.length ? [variant(arch, stored, 'bias', 18, biasTargets)] : [])];
    await checkVariants(served, new MemoryCheckpoint(arch, stored, 'reference'), variants, arch.family);
  });
});

describe.each(['int8', 'int4'] as const)('WEIGHTS=%s: the DoRA norm is taken over the dequantized base, as PEFT does for a quantized layer', (bits) => {
  const arch = tinyArchitecture({ ...baseDims, attentionBias: true, outputBias: true, mlpBias: true });
  const folder: FamilyFolder = { config: llamaConfigJson(arch, { torch_dtype: 'float32' }), tensors: randomCheckpoint(arch, 63).tensors, dtype: 'F32' };
  let served: ServedFamily;
  beforeAll(async () => {
    served = await serveFamily(`dora-${bits}`, folder, { WEIGHTS: bits, WEIGHTS_ACCURACY_LEVEL: '0', MAX_BATCH: 8 });
  });
  afterAll(async () => {
    await served?.close();
  });

  it('DoRA and lora_bias alone and batched: equal to PEFT merge into the dequantized base', async () => {
    // the base as MatMulNBits holds it, decoded from the built graph (test/reference/matmulnbits.ts)
    const deq = await dequantizedProjections(served.app.runtime.modelDir);
    const stored = storedTensors(folder);
    const dequantized = new Map<string, MemoryTensor>(stored);
    for (const [name, w] of deq) dequantized.set(name, { shape: stored.get(name)!.shape, data: w });
    const all = projectionsOf(arch);
    const variants = [variant(arch, dequantized, 'dora', 9, all), variant(arch, dequantized, 'bias', 10, all), variant(arch, dequantized, 'lora', 11, all)];
    await checkVariants(served, new MemoryCheckpoint(arch, dequantized, 'reference'), variants, bits);
  });
});

describe('DTYPE=fp16 (the CUDA default, here on the CPU provider): the DoRA norm over the fp16 base', () => {
  const arch = tinyArchitecture({ ...baseDims, attentionBias: true, outputBias: true, mlpBias: true });
  const folder: FamilyFolder = { config: llamaConfigJson(arch), tensors: randomCheckpoint(arch, 64).tensors, dtype: 'BF16' };
  let served: ServedFamily;
  beforeAll(async () => {
    served = await serveFamily('dora-fp16', folder, { DTYPE: 'fp16' });
  });
  afterAll(async () => {
    await served?.close();
  });

  it('DoRA and lora_bias stay as close to the merged reference as plain LoRA does (fp16 activations)', async () => {
    const { app } = served;
    expect(app.runtime.manifest.dtype).toBe('fp16');
    // PEFT on a float16 model: W is float16, and the norm is taken over it
    const half = (v: Float32Array) => v.map((x) => f16ToF32(float32ToFloat16Bits(x)));
    const stored = storedTensors(folder);
    const base = new Map([...stored].map(([n, t]) => [n, { shape: t.shape, data: /proj\.weight$/.test(n) ? half(t.data) : t.data }]));
    const all = projectionsOf(arch);
    const ck = new MemoryCheckpoint(arch, base, 'reference-fp16');
    const worst: Record<string, number> = {};
    for (const v of [variant(arch, base, 'lora', 13, all), variant(arch, base, 'dora', 14, all), variant(arch, base, 'bias', 15, all)]) {
      await upload(app, v);
      // teacher-forced on the served tokens: fp16 may flip a near-tie, so only the logprobs are compared
      worst[v.kind] = againstReference(app, await generate(app, v.name), peftMerge(ck, v.modules, v.kind), `fp16 ${v.name}`, false);
    }
    console.info(`[fp16] max |Δ logprob| vs the fp32 reference of the fp16 base: ${Object.entries(worst).map(([k, w]) => `${k} ${w.toExponential(2)}`).join(', ')}`);
    expect(worst.dora!).toBeLessThan(Math.max(0.05, 3 * worst.lora!));
    expect(worst.bias!).toBeLessThan(Math.max(0.05, 3 * worst.lora!));
  });
});
