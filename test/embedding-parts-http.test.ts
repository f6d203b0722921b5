import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { encodeSafetensors } from '../src/adapters/safetensors.js';
import type { Architecture } from '../src/model/architecture.js';
import { loraTargetsFor, type LoraTarget } from '../src/model/manifest.js';
import { llamaConfigJson, makePeftTensors, peftConfig, type PeftTensor } from './helpers/adapter-fixtures.js';
import { form, gzip, packTar } from './helpers/adapter-uploads.js';
import { FAMILY_VOCAB, serveFamily, storedTensors, type FamilyFolder, type ServedFamily } from './helpers/family-serve.js';
import { maxAbsDiff, mergeAdapter, type Adapter } from './helpers/lora-feeds.js';
import { MemoryCheckpoint, Rng, randomCheckpoint, tinyArchitecture, type MemoryTensor } from './helpers/random-checkpoint.js';
import { referenceForward, type ReferenceEmbedding } from './reference/forward.js';
import { embeddedModelFiles } from '../src/model/embedded.js';
import { HfTokenizer } from '../src/tokenizer/hf.js';
import { cp, readdir } from 'node:fs/promises';
import path from 'node:path';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';

/**
 * Issue 18 items 3–5 over real HTTP: adapters with LoRA on embed_tokens, trainable tokens, and
 * saved embed_tokens / lm_head copies (PEFT's tensor names, real safetensors), served on a tied
 * Gemma 2 (√hidden embedding scale, final soft-cap: the hooks these parts interact with) and
 * compared with the independent reference forward pass, which applies each part as PEFT's module
 * does — alone, and in one batch with base and plain-LoRA rows.
 */

const arch: Architecture = tinyArchitecture({
  vocabSize: FAMILY_VOCAB,
  maxPositions: 256,
  bosTokenId: 506,
  eosTokenIds: [507],
  family: 'gemma2',
  numLayers: 2,
  numHeads: 4,
  numKvHeads: 2,
  headDim: 24,
  normPlusOne: true,
  embedScale: true,
  sandwichNorms: true,
  activation: 'gelu_tanh',
  tieWordEmbeddings: true,
});

/** config.json as transformers' Gemma2Config writes it (the keys readArchitecture reads) */
const gemma2Config = (a: Architecture) => ({
  architectures: ['Gemma2ForCausalLM'],
  model_type: 'gemma2',
  attention_bias: false,
  attention_dropout: 0.0,
  bos_token_id: a.bosTokenId,
  eos_token_id: a.eosTokenIds[0],
  head_dim: a.headDim,
  hidden_act: 'gelu_pytorch_tanh',
  hidden_activation: 'gelu_pytorch_tanh',
  hidden_size: a.hiddenSize,
  intermediate_size: a.intermediateSize,
  max_position_embeddings: a.maxPositions,
  num_attention_heads: a.numHeads,
  num_hidden_layers: a.numLayers,
  num_key_value_heads: a.numKvHeads,
  pad_token_id: 0,
  rms_norm_eps: 1e-6,
  torch_dtype: 'bfloat16',
  vocab_size: a.vocabSize,
  attn_logit_softcapping: 50.0,
  final_logit_softcapping: 8.0,
  query_pre_attn_scalar: a.headDim,
  rope_theta: 10000.0,
  sliding_window: 64,
  tie_word_embeddings: true,
});

const PROMPT = 'Once upon a time there was a model that';
/** holds a token only the added-tokens adapter's tokenizer knows */
const PROMPT_ADDED = 'Once upon a time <|tool|> there was';
const R = 4;
const ALPHA = 8;
const H = arch.hiddenSize;
const V = arch.vocabSize;

/** A served model and what the reference needs of it. */
interface Ctx {
  served: ServedFamily;
  stored: ReadonlyMap<string, MemoryTensor>;
  targets: LoraTarget[];
  promptIds: number[];
}

/** Serves `folder` for the enclosing describe; tests call the result. */
function serveDuringDescribe(label: string, folder: FamilyFolder): () => Ctx {
  let ctx: Ctx | undefined;
  beforeAll(async () => {
    const served = await serveFamily(label, folder, { MAX_BATCH: 8 });
    ctx = { served, stored: storedTensors(folder), targets: loraTargetsFor(served.app.runtime.manifest.architecture), promptIds: served.app.runtime.tokenizer.encode(PROMPT) };
  }, 120_000);
  afterAll(async () => {
    await ctx?.served.close();
  });
  return () => {
    if (!ctx) throw new Error(`${label} is not being served (its beforeAll failed)`);
    return ctx;
  };
}

const uniform = (rng: Rng, n: number, scale: number) => Float32Array.from({ length: n }, () => (rng.next() * 2 - 1) * scale);

interface Kind {
  name: string;
  config: Record<string, unknown>;
  tensors: PeftTensor[];
  /** the q/v LoRA (PEFT layout) merged into the reference checkpoint */
  lora: PeftTensor[];
  embedding: ReferenceEmbedding;
}

/** q_proj / v_proj LoRA, as every kind below also carries (PEFT saves them alongside) */
const projectionLora = (a: Architecture, seed: number) => makePeftTensors(a, { r: R, targets: ['q_proj', 'v_proj'], seed, scale: 0.15 });
const peftFor = (ctx: Ctx) => (extra: Record<string, unknown>) => peftConfig({ base_model_name_or_path: ctx.served.dir, r: R, lora_alpha: ALPHA, target_modules: ['q_proj', 'v_proj'], ...extra });
const EMB_A = 'base_model.model.model.embed_tokens.lora_embedding_A';
const EMB_B = 'base_model.model.model.embed_tokens.lora_embedding_B';
const EMBED_DELTA = 'base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta';

/** The kinds served on the tied Gemma 2 */
function kinds(ctx: Ctx): Kind[] {
  const { stored, promptIds } = ctx;
  const projectionLoraOf = (seed: number) => projectionLora(arch, seed);
  const rng = new Rng(91);
  const baseEmbed = stored.get('model.embed_tokens.weight')!.data;
  const plain = projectionLoraOf(31);
  // LoRA on the embedding: A [r, vocab], B [hidden, r] (PEFT's lora_embedding_A / _B, no .weight)
  const embA = uniform(rng, R * V, 1);
  const embB = uniform(rng, H * R, 0.05);
  const embLora = projectionLoraOf(32);
  // trainable tokens: the prompt's first ids and a few others; the saved rows are values
  const indices = [...new Set([...promptIds.slice(0, 5), 3, 200, 201, 300])];
  const values = uniform(rng, indices.length * H, 0.4);
  const tokLora = projectionLoraOf(33);
  // modules_to_save copies: the base table moved by noise (a fine-tune's copies start from the base)
  const embedCopy = Float32Array.from(baseEmbed, (v) => v + (rng.next() * 2 - 1) * 0.1);
  const headCopy = Float32Array.from(baseEmbed, (v) => v + (rng.next() * 2 - 1) * 0.1);
  const savedLora = projectionLoraOf(34);
  const config = peftFor(ctx);
  return [
    { name: 'plain', config: config({}), tensors: plain, lora: plain, embedding: {} },
    {
      name: 'emb-lora',
      config: config({ target_modules: ['q_proj', 'v_proj', 'embed_tokens'] }),
      tensors: [...embLora, { name: EMB_A, shape: [R, V], data: embA }, { name: EMB_B, shape: [H, R], data: embB }],
      lora: embLora,
      embedding: { lora: { A: embA, B: embB, rank: R, scale: ALPHA / R } },
    },
    {
      name: 'tokens',
      config: config({ trainable_token_indices: indices }),
      tensors: [...tokLora, { name: EMBED_DELTA, shape: [indices.length, H], data: values }],
      lora: tokLora,
      // tied Gemma 2: PEFT ties lm_head's token adapter to the embedding's
      embedding: { tokens: { indices, values, tiedHead: true } },
    },
    {
      name: 'saved',
      config: config({ modules_to_save: ['embed_tokens', 'lm_head'] }),
      tensors: [...savedLora, { name: 'base_model.model.model.embed_tokens.weight', shape: [V, H], data: embedCopy }, { name: 'base_model.model.lm_head.weight', shape: [V, H], data: headCopy }],
      lora: savedLora,
      embedding: { embedWeight: embedCopy, lmHeadWeight: headCopy },
    },
  ];
}

async function upload(ctx: Ctx, k: Kind): Promise<Record<string, unknown>> {
  const res = await ctx.served.app.inject({
    method: 'POST',
    url: '/v1/adapters',
    payload: form([
      ['name', k.name],
      ['config', Buffer.from(JSON.stringify(k.config)), 'adapter_config.json'],
      ['weights', encodeSafetensors(k.tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
    ]),
  });
  expect(res.statusCode, res.body).toBe(201);
  return res.json() as Record<string, unknown>;
}

interface Served {
  tokens: number[];
  logprobs: { logprob: number; top_logprobs: { token: number; logprob: number }[] }[];
}

async function generate(ctx: Ctx, adapter: string | null): Promise<Served> {
  const res = await ctx.served.app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROMPT, ...(adapter && { adapter }), max_tokens: 8, temperature: 0, logprobs: 20 } });
  expect(res.statusCode, res.body).toBe(200);
  return res.json() as Served;
}

/** The reference for `k` (null: the base) on the served sequence: greedy ids equal, worst |Δ logprob| returned. */
function check(ctx: Ctx, k: Kind | null, out: Served): { worst: number; effect: number } {
  const { served, stored, targets, promptIds } = ctx;
  // the architecture as the server read it from config.json (soft-caps, window, scalar included)
  const base = new MemoryCheckpoint(served.app.runtime.manifest.architecture, stored, 'reference');
  const adapter: Adapter = new Map(
    (k?.lora ?? [])
      .filter((t) => t.name.includes('lora_A'))
      .map((a) => {
        const module = a.name.replace(/^base_model\.model\./, '').replace(/\.lora_A\.weight$/, '');
        const b = k!.lora.find((t) => t.name === a.name.replace('lora_A', 'lora_B'))!;
        return [module, { rank: R, A: a.data, B: b.data, scale: ALPHA / R }];
      }),
  );
  const seq = [...promptIds, ...out.tokens];
  const logits = referenceForward(mergeAdapter(base, targets, adapter), seq, { prefill: promptIds.length, embedding: k?.embedding });
  const onlyLora = referenceForward(mergeAdapter(base, targets, adapter), seq, { prefill: promptIds.length });
  let worst = 0;
  let effect = 0;
  out.tokens.forEach((tok, i) => {
    const row = logits[promptIds.length - 1 + i]!;
    effect = Math.max(effect, maxAbsDiff(row, onlyLora[promptIds.length - 1 + i]!));
    const max = Math.max(...row);
    const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
    expect(row.indexOf(max), `${k?.name ?? 'base'}: greedy token ${i}`).toBe(tok);
    const lp = out.logprobs[i]!;
    worst = Math.max(worst, maxAbsDiff([lp.logprob, ...lp.top_logprobs.map((t) => t.logprob)], [row[tok]! - lse, ...lp.top_logprobs.map((t) => row[t.token]! - lse)]));
  });
  expect(out.tokens.length).toBeGreaterThanOrEqual(3);
  return { worst, effect };
}

describe('tied Gemma 2: embedding LoRA, trainable tokens and saved embed_tokens / lm_head, served as PEFT computes them', () => {
  const folder: FamilyFolder = { config: gemma2Config(arch), tensors: randomCheckpoint(arch, 83).tensors, dtype: 'BF16' };
  const gemma = serveDuringDescribe('embedding-parts', folder);
  let all: Kind[];
  let served: ServedFamily;
  let targets: LoraTarget[];
  beforeAll(async () => {
    ({ served, targets } = gemma());
    all = kinds(gemma());
    for (const k of all) await upload(gemma(), k);
  }, 60_000);

  it.each(['emb-lora', 'tokens', 'saved'])('%s alone: greedy tokens equal the reference, logprobs within 1e-4', async (name) => {
    const k = all.find((x) => x.name === name)!;
    const r = check(gemma(), k, await generate(gemma(), name));
    console.info(`[${name}] alone: max |Δ logprob| ${r.worst.toExponential(2)}; the part moves logits by ${r.effect.toFixed(3)} beyond its q/v LoRA`);
    // each part must change the output, or this test could not fail
    expect(r.effect).toBeGreaterThan(1e-2);
    expect(r.worst).toBeLessThan(1e-4);
  });

  it('one batch of base, plain LoRA and each part: every row equals its reference', async () => {
    const names = [null, 'plain', 'emb-lora', 'tokens', 'saved', null, 'saved', 'tokens'];
    let maxBatch = 0;
    let maxDistinct = 0;
    const poll = setInterval(() => {
      const s = served.app.runtime.engine.stats();
      maxBatch = Math.max(maxBatch, s.batchSize);
      maxDistinct = Math.max(maxDistinct, new Set(s.runningAdapters).size);
    }, 1);
    const outs = await Promise.all(names.map((n) => generate(gemma(), n)));
    clearInterval(poll);
    console.info(`[mixed] largest decode batch ${maxBatch}, distinct adapters running at once ${maxDistinct}`);
    expect(maxBatch).toBeGreaterThanOrEqual(4);
    let worst = 0;
    outs.forEach((out, i) => {
      const k = names[i] === null ? null : all.find((x) => x.name === names[i])!;
      worst = Math.max(worst, check(gemma(), k, out).worst);
    });
    console.info(`[mixed] ${names.length} rows: max |Δ logprob| ${worst.toExponential(2)}`);
    expect(worst).toBeLessThan(1e-4);
  });

  /**
   * An adapter trained after resize_token_embeddings(V + 2): its saved embed_tokens and lm_head have
   * two rows more than the base, and its tokenizer.json adds the two tokens (ids V, V + 1).
   */
  function addedTokens() {
    const k = all.find((x) => x.name === 'saved')!;
    const rng = new Rng(97);
    const baseEmbed = gemma().stored.get('model.embed_tokens.weight')!.data;
    const Vp = V + 2;
    const embed = new Float32Array(Vp * H);
    embed.set(baseEmbed.map((v) => v + (rng.next() * 2 - 1) * 0.1));
    embed.set(uniform(rng, 2 * H, 0.5), V * H);
    const head = new Float32Array(Vp * H);
    head.set(baseEmbed.map((v) => v + (rng.next() * 2 - 1) * 0.1));
    head.set(uniform(rng, 2 * H, 0.5), V * H);
    const tj = JSON.parse(embeddedModelFiles().get('tokenizer.json')!.toString('utf8')) as { added_tokens: Record<string, unknown>[] };
    tj.added_tokens.push(...['<|tool|>', '<|end_tool|>'].map((content, i) => ({ id: V + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: false })));
    const tokenizerJson = Buffer.from(JSON.stringify(tj));
    const arch0 = served.app.runtime.manifest.architecture;
    const own = new HfTokenizer(tokenizerJson.toString('utf8'), embeddedModelFiles().get('tokenizer_config.json')!.toString('utf8'), arch0);
    const promptIds = own.encode(PROMPT_ADDED);
    // the reference: the base with the q/v LoRA merged, the adapter's own tables, vocabulary V + 2
    const loraOf: Adapter = new Map(
      k.lora
        .filter((t) => t.name.includes('lora_A'))
        .map((x) => {
          const module = x.name.replace(/^base_model\.model\./, '').replace(/\.lora_A\.weight$/, '');
          const b = k.lora.find((t) => t.name === x.name.replace('lora_A', 'lora_B'))!;
          return [module, { rank: R, A: x.data, B: b.data, scale: ALPHA / R }];
        }),
    );
    const reference = (seq: number[], prefill: number) => referenceForward(mergeAdapter(new MemoryCheckpoint({ ...arch0, vocabSize: Vp }, gemma().stored, 'reference'), targets, loraOf), seq, { prefill, embedding: { embedWeight: embed, lmHeadWeight: head } });
    // lm_head's row of <|tool|>: 1.3 × the row of the adapter's first greedy token, so that greedy
    // decoding generates the added token (and feeds it back at the next step)
    const first = reference(promptIds, promptIds.length).at(-1)!;
    const g = first.indexOf(Math.max(...first.subarray(0, V)));
    head.set(head.subarray(g * H, (g + 1) * H).map((v) => v * 1.3), V * H);
    const tensors = [...k.lora, { name: 'base_model.model.model.embed_tokens.weight', shape: [Vp, H], data: embed }, { name: 'base_model.model.lm_head.weight', shape: [Vp, H], data: head }];
    const weights = encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data })));
    return { Vp, tokenizerJson, weights, config: Buffer.from(JSON.stringify(k.config)), promptIds, reference };
  }

  it('a larger vocabulary without the adapter\'s tokenizer.json is a 422 naming both sizes, and nothing is stored', async () => {
    const a = addedTokens();
    const res = await served.app.inject({ method: 'POST', url: '/v1/adapters', payload: form([['name', 'added-tokens'], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors']]) });
    expect(res.statusCode).toBe(422);
    const body = res.json() as { errors: { code: string; file: string; message: string; expected: unknown; actual: unknown }[] };
    expect(body.errors).toMatchObject([{ code: 'missing_file', file: 'tokenizer.json', expected: V + 2, actual: V }]);
    expect(body.errors[0]!.message).toContain(`vocabulary is ${V + 2} tokens`);
    expect(body.errors[0]!.message).toContain(`the served model's is ${V}`);
    expect((await served.app.inject({ method: 'GET', url: '/v1/adapters/added-tokens' })).statusCode).toBe(404);
    // a tokenizer that does not add the tokens: its size is named against the copies'
    const plainTok = embeddedModelFiles().get('tokenizer.json')!;
    const res2 = await served.app.inject({ method: 'POST', url: '/v1/adapters', payload: form([['name', 'added-tokens'], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors'], ['tokenizer', plainTok, 'tokenizer.json']]) });
    expect(res2.statusCode).toBe(422);
    expect((res2.json() as { errors: unknown[] }).errors).toMatchObject([{ code: 'shape_mismatch', file: 'tokenizer.json', expected: V + 2, actual: V }]);
    expect((await served.app.inject({ method: 'GET', url: '/v1/adapters/added-tokens' })).statusCode).toBe(404);
  });

  it('a larger vocabulary with its tokenizer.json is served: the added token is encoded and generated, matching the reference, in a batch with base rows', async () => {
    const a = addedTokens();
    const res = await served.app.inject({ method: 'POST', url: '/v1/adapters', payload: form([['name', 'added-tokens'], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors'], ['tokenizer', a.tokenizerJson, 'tokenizer.json']]) });
    expect(res.statusCode, res.body).toBe(201);
    const d = (await served.app.inject({ method: 'GET', url: '/v1/adapters/added-tokens' })).json() as { embedding: { vocabSize: number }; memoryBytes: number };
    expect(d.embedding.vocabSize).toBe(V + 2);

    const prompt = PROMPT_ADDED;
    const { promptIds } = a;
    expect(promptIds).toContain(V);
    const gen = (adapter: string | null) =>
      served.app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt, ...(adapter && { adapter }), max_tokens: 8, temperature: 0, logprobs: 20 } }).then((r) => {
        expect(r.statusCode, r.body).toBe(200);
        return r.json() as Served & { usage: { prompt_tokens: number }; text: string };
      });
    const [tuned, base, tuned2] = await Promise.all([gen('added-tokens'), gen(null), gen('added-tokens')]);
    expect(tuned.usage.prompt_tokens).toBe(promptIds.length);
    expect(tuned2.tokens).toEqual(tuned.tokens);
    expect(base.usage.prompt_tokens).toBe(served.app.runtime.tokenizer.encode(prompt).length);
    // an added token is generated (and fed back in the next step)
    expect(tuned.tokens.some((t) => t >= V)).toBe(true);
    expect(tuned.text).toContain('<|tool|>');

    const seq = [...promptIds, ...tuned.tokens];
    const logits = a.reference(seq, promptIds.length);
    let worst = 0;
    tuned.tokens.forEach((tok, i) => {
      const row = logits[promptIds.length - 1 + i]!;
      expect(row.length).toBe(V + 2);
      const max = Math.max(...row);
      const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
      expect(row.indexOf(max), `greedy token ${i}`).toBe(tok);
      const lp = tuned.logprobs[i]!;
      worst = Math.max(worst, maxAbsDiff([lp.logprob, ...lp.top_logprobs.map((t) => t.logprob)], [row[tok]! - lse, ...lp.top_logprobs.map((t) => row[t.token]! - lse)]));
    });
    console.info(`[added-tokens] prompt ${promptIds.length} ids (added id ${V} at ${promptIds.indexOf(V)}), generated ${JSON.stringify(tuned.tokens)}, max |Δ logprob| ${worst.toExponential(2)}`);
    expect(worst).toBeLessThan(1e-4);
    // the base row of the same batch: its own tokenizer, its reference
    const baseIds = served.app.runtime.tokenizer.encode(prompt);
    const baseLogits = referenceForward(new MemoryCheckpoint(served.app.runtime.manifest.architecture, gemma().stored, 'reference'), [...baseIds, ...base.tokens], { prefill: baseIds.length });
    base.tokens.forEach((tok, i) => {
      const row = baseLogits[baseIds.length - 1 + i]!;
      expect(row.length).toBe(V);
      expect(row.indexOf(Math.max(...row)), `base greedy token ${i}`).toBe(tok);
    });
    expect(base.tokens.every((t) => t < V)).toBe(true);
  });

  it('chat: the chat template of the adapter\'s tokenizer_config.json renders the prompt, its tokenizer decodes the logprob tokens', async () => {
    const a = addedTokens();
    const config = JSON.parse(embeddedModelFiles().get('tokenizer_config.json')!.toString('utf8')) as Record<string, unknown>;
    config.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}";
    const res = await served.app.inject({
      method: 'POST',
      url: '/v1/adapters',
      payload: form([['name', 'added-chat'], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors'], ['tokenizer', a.tokenizerJson, 'tokenizer.json'], ['tokenizer_config', Buffer.from(JSON.stringify(config)), 'tokenizer_config.json']]),
    });
    expect(res.statusCode, res.body).toBe(201);
    const chat = await served.app.inject({ method: 'POST', url: '/v1/chat/completions', payload: { model: 'added-chat', messages: [{ role: 'user', content: PROMPT_ADDED }], max_tokens: 3, temperature: 0, logprobs: true, top_logprobs: 2 } });
    expect(chat.statusCode, chat.body).toBe(200);
    const body = chat.json() as { usage: { prompt_tokens: number }; choices: { message: { content: string }; logprobs: { content: { token: string }[] } }[] };
    // the same ids as the native route's BOS + prompt: the template's bos_token and the added token each one id
    expect(body.usage.prompt_tokens).toBe(a.promptIds.length);
    expect(body.choices[0]!.logprobs.content[0]!.token).toBe('<|tool|>');
    expect(body.choices[0]!.message.content).toContain('<|tool|>');
  });

  it('after a restart the stored version brings its tokenizer back: the same ids in and out', async () => {
    const a = addedTokens();
    const before = (await served.app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROMPT_ADDED, adapter: 'added-tokens', max_tokens: 4, temperature: 0 } })).json() as { tokens: number[]; text: string };
    // a copy of ADAPTER_DIR opened by a second server on the same model (what a restart finds)
    const tmp = path.dirname(served.dir);
    const copy = path.join(tmp, 'adapters-restart');
    await cp(path.join(tmp, 'adapters'), copy, { recursive: true });
    expect((await readdir(path.join(copy, 'added-tokens'))).sort()).toEqual(['adapter_config.json', 'adapter_model.safetensors', 'meta.json', 'tokenizer.json']);
    const again = await buildApp(makeConfig({ MODEL_PATH: served.dir, ADAPTER_DIR: copy, CACHE_DIR: path.join(tmp, 'cache'), DEVICE: 'cpu', LOG_LEVEL: 'silent' }));
    try {
      const r = await again.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROMPT_ADDED, adapter: 'added-tokens', max_tokens: 4, temperature: 0 } });
      expect(r.statusCode, r.body).toBe(200);
      const out = r.json() as { tokens: number[]; text: string; usage: { prompt_tokens: number } };
      expect(out.usage.prompt_tokens).toBe(a.promptIds.length);
      expect(out.tokens).toEqual(before.tokens);
      expect(out.text).toBe(before.text);
    } finally {
      await again.close();
    }
  });

  it('in an archive: tokenizer.json beside adapter_config.json is kept and used; without it the archive is a 422 that stores nothing', async () => {
    const a = addedTokens();
    const entries = [
      { name: 'ckpt/adapter_config.json', data: a.config },
      { name: 'ckpt/adapter_model.safetensors', data: a.weights },
    ];
    const upload = async (name: string, withTokenizer: boolean) =>
      served.app.inject({ method: 'POST', url: '/v1/adapters', payload: form([['name', name], ['archive', gzip(await packTar(withTokenizer ? [...entries, { name: 'ckpt/tokenizer.json', data: a.tokenizerJson }] : entries)), 'adapter.tar.gz']]) });
    const without = await upload('added-tar', false);
    expect(without.statusCode).toBe(422);
    expect((without.json() as { errors: unknown[] }).errors).toMatchObject([{ code: 'missing_file', file: 'tokenizer.json', expected: V + 2, actual: V }]);
    expect((await served.app.inject({ method: 'GET', url: '/v1/adapters/added-tar' })).statusCode).toBe(404);
    const ok = await upload('added-tar', true);
    expect(ok.statusCode, ok.body).toBe(201);
    const r = await served.app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROMPT_ADDED, adapter: 'added-tar', max_tokens: 4, temperature: 0 } });
    expect(r.statusCode, r.body).toBe(200);
    const out = r.json() as { tokens: number[]; usage: { prompt_tokens: number } };
    expect(out.usage.prompt_tokens).toBe(a.promptIds.length);
    expect(out.tokens[0]).toBe(V);
  });

  it('the description and /metrics count the memory the saved copies take', async () => {
    const d = (await served.app.inject({ method: 'GET', url: '/v1/adapters/saved' })).json() as Record<string, unknown>;
    // two [vocab, hidden] float32 copies plus the q/v LoRA matrices
    const lora = targets.filter((t) => t.module === 'q_proj' || t.module === 'v_proj').reduce((n, t) => n + 4 * R * (t.inFeatures + t.outFeatures), 0);
    expect(d.memoryBytes).toBe(2 * 4 * V * H + lora);
    expect(d.embedding).toMatchObject({ embedCopy: 'base_model.model.model.embed_tokens.weight', headCopy: 'base_model.model.lm_head.weight' });
    // the effect probe (issue 17) ran through the served graph with the adapter's own embedding and head
    expect((d.effect as { maxLogprobDelta: number } | null)?.maxLogprobDelta).toBeGreaterThan(1e-2);
    const tok = (await served.app.inject({ method: 'GET', url: '/v1/adapters/tokens' })).json() as { memoryBytes: number; embedding: { tokens: { indices: number[]; tiedHead: boolean } } };
    expect(tok.embedding.tokens.tiedHead).toBe(true);
    expect(tok.memoryBytes).toBe(4 * tok.embedding.tokens.indices.length * H + lora);
    const metrics = (await served.app.inject({ method: 'GET', url: '/metrics' })).body;
    const line = metrics.split('\n').find((l) => l.startsWith('loraserve_adapter_memory_bytes{adapter="saved"}'));
    expect(line, metrics).toBeDefined();
    expect(Number(line!.split(' ').pop())).toBe(d.memoryBytes);
  });
});

describe('untied Llama: trainable tokens leave lm_head alone unless the dict names it; embedding LoRA', () => {
  const llama = tinyArchitecture({ vocabSize: FAMILY_VOCAB, maxPositions: 256, bosTokenId: 506, eosTokenIds: [507], tieWordEmbeddings: false });
  const folder: FamilyFolder = { config: llamaConfigJson(llama), tensors: randomCheckpoint(llama, 87).tensors, dtype: 'BF16' };
  const ctx = serveDuringDescribe('embedding-parts-untied', folder);
  const Hl = llama.hiddenSize;
  let all: Kind[];
  beforeAll(async () => {
    const c = ctx();
    const rng = new Rng(93);
    const config = peftFor(c);
    const embIds = [...new Set([...c.promptIds.slice(0, 4), 10, 400])];
    const headIds = [11, 12, 300, 301, 302];
    const embValues = uniform(rng, embIds.length * Hl, 0.8);
    const headValues = uniform(rng, headIds.length * Hl, 0.8);
    const embA = uniform(rng, R * V, 1);
    const embB = uniform(rng, Hl * R, 0.3);
    const loras = [41, 42, 43].map((seed) => projectionLora(llama, seed));
    all = [
      {
        name: 'tokens-list',
        config: config({ trainable_token_indices: embIds }),
        tensors: [...loras[0]!, { name: EMBED_DELTA, shape: [embIds.length, Hl], data: embValues }],
        lora: loras[0]!,
        // untied: only the embedding's rows change
        embedding: { tokens: { indices: embIds, values: embValues, tiedHead: false } },
      },
      {
        name: 'tokens-dict',
        config: config({ trainable_token_indices: { embed_tokens: embIds, lm_head: headIds } }),
        tensors: [...loras[1]!, { name: EMBED_DELTA, shape: [embIds.length, Hl], data: embValues }, { name: 'base_model.model.lm_head.token_adapter.trainable_tokens_delta', shape: [headIds.length, Hl], data: headValues }],
        lora: loras[1]!,
        embedding: { tokens: { indices: embIds, values: embValues, tiedHead: false }, headTokens: { indices: headIds, values: headValues } },
      },
      {
        name: 'emb-lora',
        config: config({ target_modules: ['q_proj', 'v_proj', 'embed_tokens'] }),
        tensors: [...loras[2]!, { name: EMB_A, shape: [R, V], data: embA }, { name: EMB_B, shape: [Hl, R], data: embB }],
        lora: loras[2]!,
        embedding: { lora: { A: embA, B: embB, rank: R, scale: ALPHA / R } },
      },
    ];
    for (const k of all) await upload(c, k);
  }, 60_000);

  it('one batch of base rows and each kind: every row equals its reference, and each part moves its logits', async () => {
    const names = [null, 'tokens-list', 'tokens-dict', 'emb-lora', null, 'tokens-dict'];
    const outs = await Promise.all(names.map((n) => generate(ctx(), n)));
    let worst = 0;
    outs.forEach((out, i) => {
      const k = names[i] === null ? null : all.find((x) => x.name === names[i])!;
      const r = check(ctx(), k, out);
      if (k) expect(r.effect, k.name).toBeGreaterThan(1e-2);
      worst = Math.max(worst, r.worst);
    });
    console.info(`[untied mixed] ${names.length} rows: max |Δ logprob| ${worst.toExponential(2)}`);
    expect(worst).toBeLessThan(1e-4);
  });
});
