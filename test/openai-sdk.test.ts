import { readFile, writeFile } from 'node:fs/promises';
import path from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { loadOpenApi } from '../src/http/openapi.js';
import { Contract } from './helpers/contract.js';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';
import { startEmbeddedApp, type EmbeddedApp } from './helpers/embedded-app.js';

/**
 * Issue 16 as an OpenAI SDK user meets it: the official `openai` client (6.x), unchanged, against
 * a real listening server. Errors arrive as the SDK's exceptions with OpenAI's message, status,
 * code and param; `n`, prompt lists, token prompts and echo give the choices OpenAI would;
 * `models.retrieve` works and says what an adapter must look like; a model without a chat
 * template says how to supply one (CHAT_TEMPLATE), and with one the chat route works.
 * Every JSON body the server sends here is also checked against openapi.yaml.
 */

const contract = new Contract(loadOpenApi().doc);
let server: EmbeddedApp;
let client: OpenAI;
let baseId: string;
const contractProblems: string[] = [];

/** a fetch that checks every response against openapi.yaml before the SDK reads it */
const checkedFetch: typeof fetch = async (input, init) => {
  const res = await fetch(input, init);
  const url = new URL(typeof input === 'string' || input instanceof URL ? input : input.url);
  const route = url.pathname.startsWith('/v1/models/') ? '/v1/models/{id}' : url.pathname;
  const body = await res.clone().text();
  contractProblems.push(...contract.check({ method: init?.method ?? 'GET', route, status: res.status, contentType: res.headers.get('content-type') ?? undefined, body }));
  return res;
};

const clientFor = (url: string, apiKey = 'unused') => new OpenAI({ baseURL: `${url}/v1`, apiKey, maxRetries: 0, fetch: checkedFetch });

/** the SDK's exception for a call that must fail */
async function failure(p: Promise<unknown>): Promise<InstanceType<typeof OpenAI.APIError>> {
  try {
    await p;
  } catch (e) {
    if (e instanceof OpenAI.APIError) return e;
    throw e;
  }
  throw new Error('the call succeeded');
}

beforeAll(async () => {
  server = await startEmbeddedApp('openai-sdk');
  client = clientFor(server.url);
  baseId = server.app.runtime.manifest.modelId;
  const bytes = adapterBytes(server.app.runtime.manifest.architecture, { modelId: baseId, r: 4, alpha: 8, targets: ['q_proj', 'v_proj'], seed: 9 });
  const res = await server.app.inject({ method: 'POST', url: '/v1/adapters', payload: filesForm('poet', bytes) });
  expect(res.statusCode, res.body).toBe(201);
});

afterAll(async () => {
  await server?.close();
});

describe('errors reach the SDK with OpenAI’s shape', () => {
  it('unknown model: NotFoundError with the server’s message, code model_not_found, param model', async () => {
    const e = await failure(client.completions.create({ model: 'missing', prompt: 'x', max_tokens: 1 }));
    expect(e).toBeInstanceOf(OpenAI.NotFoundError);
    expect(e.status).toBe(404);
    expect(e.message).toBe('404 no adapter named "missing"; GET /v1/adapters lists them');
    expect(e.code).toBe('model_not_found');
    expect(e.param).toBe('model');
    expect(e.type).toBe('invalid_request_error');
  });

  it('a bad field: BadRequestError naming the field', async () => {
    const e = await failure(client.chat.completions.create({ model: baseId, messages: [{ role: 'user', content: 'hi' }], temperature: 7 }));
    expect(e.status).toBe(400);
    expect(e.param).toBe('temperature');
    expect(e.message).toMatch(/^400 invalid request: temperature: /);
    expect(e.message).not.toMatch(/no body/);
  });

  it('a prompt longer than the context: code context_length_exceeded', async () => {
    const ctx = server.app.runtime.engine.contextLength;
    const e = await failure(client.completions.create({ model: baseId, prompt: Array.from({ length: ctx + 5 }, () => 7), max_tokens: 1 }));
    expect(e.status).toBe(400);
    expect(e.code).toBe('context_length_exceeded');
    expect(e.param).toBe('prompt');
    expect(e.message).toContain(`this model's context holds ${ctx} tokens`);
  });

  it('401 and 403: AuthenticationError and PermissionDeniedError with their messages', async () => {
    const keyed = await buildApp(makeConfig({ MODEL_PATH: server.model, ADAPTER_DIR: server.adapterDir, CACHE_DIR: server.cacheDir, DEVICE: 'cpu', LOG_LEVEL: 'silent', API_KEYS: 'inf', ADMIN_API_KEYS: 'adm' }), { runtime: server.app.runtime });
    const url = await keyed.listen({ port: 0, host: '127.0.0.1' });
    try {
      const e401 = await failure(clientFor(url, 'wrong').models.list());
      expect(e401).toBeInstanceOf(OpenAI.AuthenticationError);
      expect(e401.message).toBe('401 unknown API key');
      expect(e401.code).toBe('invalid_api_key');
      const e403 = await failure(clientFor(url, 'adm').completions.create({ model: baseId, prompt: 'x' }));
      expect(e403).toBeInstanceOf(OpenAI.PermissionDeniedError);
      expect(e403.message).toMatch(/^403 this key is an admin key/);
      expect((await clientFor(url, 'inf').models.list()).data.length).toBe(2);
    } finally {
      await keyed.close();
    }
  });

  it('problem+json members stay beside OpenAI’s error object', async () => {
    const res = await server.app.inject({ method: 'POST', url: '/v1/completions', payload: { model: 'missing', prompt: 'x' } });
    expect(res.headers['content-type']).toMatch(/^application\/problem\+json/);
    const body = res.json();
    expect(body).toMatchObject({ status: 404, title: 'Not Found', detail: body.error.message, error: { type: 'invalid_request_error', param: 'model', code: 'model_not_found' } });
    // the native API keeps plain problem+json
    const native = (await server.app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 'x', adapter: 'missing' } })).json();
    expect(native.status).toBe(404);
    expect(native.error).toBeUndefined();
  });
});

describe('fields the server would ignore are refused by name', () => {
  const chat = { model: '', messages: [{ role: 'user' as const, content: 'hi' }], max_tokens: 2 };
  it.each([
    ['tools', { tools: [{ type: 'function' as const, function: { name: 'f', parameters: {} } }] }],
    ['tool_choice', { tool_choice: 'auto' as const }],
    ['response_format', { response_format: { type: 'json_object' as const } }],
    ['functions', { functions: [{ name: 'f' }] }],
    ['logit_bias', { logit_bias: { '5': 10 } }],
    ['presence_penalty', { presence_penalty: 0.5 }],
  ])('chat: %s', async (field, extra) => {
    const e = await failure(client.chat.completions.create({ ...chat, model: baseId, ...extra } as OpenAI.ChatCompletionCreateParamsNonStreaming));
    expect(e.status).toBe(400);
    expect(e.param).toBe(field);
    expect(e.code).toBe('unsupported_parameter');
    expect(e.message).toMatch(new RegExp(`^400 ${field}.* not supported`));
  });

  it.each([
    ['suffix', { suffix: ' and so on' }],
    ['best_of', { best_of: 3 }],
    ['frequency_penalty', { frequency_penalty: 1 }],
  ])('completions: %s', async (field, extra) => {
    const e = await failure(client.completions.create({ model: baseId, prompt: 'Once', max_tokens: 2, ...extra }));
    expect(e.status).toBe(400);
    expect(e.param).toBe(field);
    expect(e.code).toBe('unsupported_parameter');
  });

  it('neutral values that ask for nothing are accepted', async () => {
    const c = await client.chat.completions.create({ ...chat, model: baseId, tools: [], response_format: { type: 'text' }, presence_penalty: 0, logit_bias: {} });
    expect(c.choices).toHaveLength(1);
    const d = await client.completions.create({ model: baseId, prompt: 'Once', max_tokens: 2, best_of: 1, frequency_penalty: 0 });
    expect(d.choices).toHaveLength(1);
  });
});

describe('prompt lists, token prompts, echo', () => {
  const greedy = { model: 'poet', max_tokens: 6, temperature: 0 } as const;
  const one = async (prompt: string | number[]) => (await client.completions.create({ ...greedy, prompt })).choices[0]!.text;

  it('a list of strings: one choice per prompt, in order, each as if asked alone', async () => {
    const prompts = ['Once upon a time', 'The dog', 'Lily saw'];
    const c = await client.completions.create({ ...greedy, prompt: prompts });
    expect(c.choices.map((x) => x.index)).toEqual([0, 1, 2]);
    expect(c.choices.map((x) => x.text)).toEqual([await one(prompts[0]!), await one(prompts[1]!), await one(prompts[2]!)]);
    expect(new Set(c.choices.map((x) => x.text)).size).toBeGreaterThan(1);
    const tok = server.app.runtime.tokenizer;
    expect(c.usage!.prompt_tokens).toBe(prompts.reduce((n, p) => n + tok.encode(p).length, 0));
  });

  it('token ids, and a list of token-id lists, equal the text they encode', async () => {
    const tok = server.app.runtime.tokenizer;
    const a = tok.encode('Once upon a time');
    const b = tok.encode('The dog');
    expect(await one(a)).toBe(await one('Once upon a time'));
    const c = await client.completions.create({ ...greedy, prompt: [a, b] });
    expect(c.choices.map((x) => x.text)).toEqual([await one('Once upon a time'), await one('The dog')]);
    expect(c.usage!.prompt_tokens).toBe(a.length + b.length);
  });

  it('token ids outside the vocabulary: 400 naming prompt', async () => {
    const e = await failure(client.completions.create({ ...greedy, prompt: [1, 2, 10_000_000] }));
    expect(e.status).toBe(400);
    expect(e.param).toBe('prompt');
  });

  it('echo puts the prompt before the completion, streamed and not', async () => {
    const plain = await one('The dog');
    const c = await client.completions.create({ ...greedy, prompt: 'The dog', echo: true });
    expect(c.choices[0]!.text).toBe(`The dog${plain}`);
    const stream = await client.completions.create({ ...greedy, prompt: ['The dog', 'Lily saw'], echo: true, stream: true });
    const texts = ['', ''];
    for await (const chunk of stream) for (const ch of chunk.choices) texts[ch.index] += ch.text;
    expect(texts).toEqual([`The dog${plain}`, `Lily saw${await one('Lily saw')}`]);
  });
});

describe('n choices of one prompt', () => {
  it('completions: n choices; with a seed, choice 0 is the n = 1 answer and choice j uses seed + j', async () => {
    const req = { model: 'poet', prompt: 'Once upon a time', max_tokens: 8, temperature: 1, seed: 11 } as const;
    const engine = server.app.runtime.engine;
    const before = engine.stats().prefillTokens;
    const c = await client.completions.create({ ...req, n: 3 });
    // the prompt ran through the model once for the three choices
    expect(engine.stats().prefillTokens - before).toBe(c.usage!.prompt_tokens);
    expect(c.usage!.prompt_tokens).toBe(server.app.runtime.tokenizer.encode('Once upon a time').length);
    expect(c.choices.map((x) => x.index)).toEqual([0, 1, 2]);
    for (let j = 0; j < 3; j++) {
      const alone = await client.completions.create({ ...req, seed: 11 + j });
      expect(c.choices[j]!.text).toBe(alone.choices[0]!.text);
    }
    expect(new Set(c.choices.map((x) => x.text)).size).toBeGreaterThan(1);
    // the prompt is counted once, the completions of all choices
    const alone = await client.completions.create(req);
    expect(c.usage!.prompt_tokens).toBe(alone.usage!.prompt_tokens);
  });

  it('two prompts × n = 2: choice index = prompt × n + j', async () => {
    const c = await client.completions.create({ model: baseId, prompt: ['The dog', 'Lily saw'], n: 2, max_tokens: 5, temperature: 0 });
    expect(c.choices).toHaveLength(4);
    const [a, b] = [(await client.completions.create({ model: baseId, prompt: 'The dog', max_tokens: 5, temperature: 0 })).choices[0]!.text, (await client.completions.create({ model: baseId, prompt: 'Lily saw', max_tokens: 5, temperature: 0 })).choices[0]!.text];
    expect(c.choices.map((x) => x.text)).toEqual([a, a, b, b]);
  });

  it('chat: n choices, streamed chunks carry their index and concatenate to the unstreamed texts', async () => {
    const req = { model: 'poet', messages: [{ role: 'user' as const, content: 'Tell me a story' }], max_tokens: 8, temperature: 0.9, seed: 4, n: 3 };
    const before = server.app.runtime.engine.stats().prefillTokens;
    const whole = await client.chat.completions.create(req);
    expect(whole.choices.map((x) => x.index)).toEqual([0, 1, 2]);
    expect(server.app.runtime.engine.stats().prefillTokens - before).toBe(whole.usage!.prompt_tokens);
    const stream = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
    const texts = ['', '', ''];
    const finished: (string | null)[] = [null, null, null];
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      for (const ch of chunk.choices) {
        texts[ch.index] += ch.delta.content ?? '';
        finished[ch.index] = ch.finish_reason ?? finished[ch.index]!;
      }
      usage = chunk.usage ?? usage;
    }
    expect(texts).toEqual(whole.choices.map((x) => x.message.content));
    expect(finished).toEqual(whole.choices.map((x) => x.finish_reason));
    expect(usage).toEqual(whole.usage);
  });

  it('n out of range: 400 naming n', async () => {
    const e = await failure(client.completions.create({ model: baseId, prompt: 'x', n: 1000 }));
    expect(e.status).toBe(400);
    expect(e.param).toBe('n');
  });
});

describe('models.retrieve', () => {
  it('the base model: stable created, and the shapes an adapter must have', async () => {
    const m = (await client.models.retrieve(baseId)) as OpenAI.Model & Record<string, unknown>;
    expect(m).toMatchObject({ id: baseId, object: 'model', owned_by: 'loraserve', parent: null });
    expect(m.created).toBe(server.app.runtime.loadedAt);
    const again = await client.models.retrieve(baseId);
    expect(again.created).toBe(m.created);
    const a = server.app.runtime.manifest.architecture;
    expect(m.architecture).toMatchObject({ family: a.family, num_layers: a.numLayers, hidden_size: a.hiddenSize });
    const targets = (m.lora as { targets: { module: string; in_features: number; out_features: number; layers: number[] }[] }).targets;
    const q = targets.find((t) => t.module === 'q_proj')!;
    expect(q).toEqual({ module: 'q_proj', in_features: a.hiddenSize, out_features: a.numHeads * a.headDim, layers: [...Array(a.numLayers).keys()] });
    const k = targets.find((t) => t.module === 'k_proj')!;
    expect(k.out_features).toBe(a.numKvHeads * a.headDim);
    const down = targets.find((t) => t.module === 'down_proj')!;
    expect([down.in_features, down.out_features]).toEqual([a.intermediateSize, a.hiddenSize]);
    expect(targets.map((t) => t.module).sort()).toEqual(['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj']);
  });

  it('an adapter: parent = the base model, created = its upload time, the same in list and retrieve', async () => {
    const m = await client.models.retrieve('poet');
    expect(m).toMatchObject({ id: 'poet', parent: baseId });
    const detail = server.app.runtime.registry.get('poet');
    expect(m.created).toBe(Math.floor(Date.parse(detail.created!) / 1000));
    const listed = (await client.models.list()).data.find((x) => x.id === 'poet')!;
    expect(listed.created).toBe(m.created);
  });

  it('an unknown id: NotFoundError model_not_found', async () => {
    const e = await failure(client.models.retrieve('nope'));
    expect(e).toBeInstanceOf(OpenAI.NotFoundError);
    expect(e.code).toBe('model_not_found');
  });
});

describe('chat without a chat template, then with CHAT_TEMPLATE', () => {
  it('says how to supply one; a file or an inline template then serves chat', async () => {
    // the embedded model without its chat_template
    const cfgPath = path.join(server.model, 'tokenizer_config.json');
    const cfg = JSON.parse(await readFile(cfgPath, 'utf8')) as Record<string, unknown>;
    delete cfg.chat_template;
    await writeFile(cfgPath, JSON.stringify(cfg));
    const common = { MODEL_PATH: server.model, ADAPTER_DIR: path.join(server.tmp, 'adapters-2'), CACHE_DIR: server.cacheDir, DEVICE: 'cpu' as const, LOG_LEVEL: 'silent' as const };
    const messages = [{ role: 'user' as const, content: 'Tell me a story' }];

    const bare = await buildApp(makeConfig(common));
    const bareUrl = await bare.listen({ port: 0, host: '127.0.0.1' });
    try {
      const e = await failure(clientFor(bareUrl).chat.completions.create({ model: baseId, messages }));
      expect(e.status).toBe(400);
      expect(e.code).toBe('no_chat_template');
      expect(e.param).toBe('messages');
      expect(e.message).toMatch(/has no chat template.*CHAT_TEMPLATE/);
    } finally {
      await bare.close();
    }

    const template = '{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}';
    const file = path.join(server.tmp, 'template.jinja');
    await writeFile(file, template);
    for (const setting of [file, template]) {
      const app = await buildApp(makeConfig({ ...common, CHAT_TEMPLATE: setting }));
      const url = await app.listen({ port: 0, host: '127.0.0.1' });
      try {
        const c = clientFor(url);
        const chat = await c.chat.completions.create({ model: baseId, messages, max_tokens: 6, temperature: 0 });
        // the template's text, tokenized without BOS (a chat template places BOS itself; this one does not)
        const ids = app.runtime.tokenizer.encode('user: Tell me a story\nassistant:', { addBos: false });
        const plain = await c.completions.create({ model: baseId, prompt: ids, max_tokens: 6, temperature: 0 });
        expect(chat.choices[0]!.message.content).toBe(plain.choices[0]!.text);
        expect(chat.usage!.prompt_tokens).toBe(ids.length);
      } finally {
        await app.close();
      }
    }
    await expect(buildApp(makeConfig({ ...common, CHAT_TEMPLATE: path.join(server.tmp, 'no-such.jinja') }))).rejects.toThrow(/CHAT_TEMPLATE=.*no such file/);
    await expect(buildApp(makeConfig({ ...common, CHAT_TEMPLATE: '{% for m in messages %}' }))).rejects.toThrow(/does not parse/);
  });
});

describe('the contract', () => {
  it('every response above validated against openapi.yaml', () => {
    expect(contractProblems).toEqual([]);
  });
});
