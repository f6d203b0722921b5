import type { FastifyInstance } from 'fastify';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';
import { startEmbeddedApp, type EmbeddedApp } from './helpers/embedded-app.js';

/**
 * The official `openai` npm client, unchanged, against a real listening server: `model` picks
 * an adapter by name, as with vLLM. Results must equal the native API's for the same request.
 */

let server: EmbeddedApp;
let app: FastifyInstance;
let client: OpenAI;
let baseId: string;

beforeAll(async () => {
  server = await startEmbeddedApp('openai');
  app = server.app;
  client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: 'unused', maxRetries: 0 });
  baseId = app.runtime.manifest.modelId;
  const bytes = adapterBytes(app.runtime.manifest.architecture, { modelId: baseId, r: 8, alpha: 32, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], seed: 5 });
  const res = await app.inject({ method: 'POST', url: '/v1/adapters', payload: filesForm('poet', bytes) });
  expect(res.statusCode, res.body).toBe(201);
});

afterAll(async () => {
  await server?.close();
});

const native = async (payload: Record<string, unknown>) =>
  (await app.inject({ method: 'POST', url: '/v1/generate', payload })).json() as {
    text: string;
    tokens: number[];
    logprobs: { id: number; logprob: number; text: string }[];
    usage: { prompt_tokens: number; completion_tokens: number };
  };

describe('openai client', () => {
  it('lists the base model and the adapter', async () => {
    const ids = (await client.models.list()).data.map((m) => m.id);
    expect(ids).toEqual([baseId, 'poet']);
  });

  it('completions with model = adapter name equal /v1/generate, logprobs included', async () => {
    const ref = await native({ prompt: 'Roses are', adapter: 'poet', max_tokens: 10, temperature: 0, logprobs: 2 });
    const c = await client.completions.create({ model: 'poet', prompt: 'Roses are', max_tokens: 10, temperature: 0, logprobs: 2 });
    expect(c.choices[0]!.text).toBe(ref.text);
    expect(c.usage).toMatchObject({ prompt_tokens: ref.usage.prompt_tokens, completion_tokens: ref.usage.completion_tokens });
    const lp = c.choices[0]!.logprobs!;
    expect(lp.token_logprobs).toEqual(ref.logprobs.map((t) => t.logprob));
    expect(lp.tokens).toEqual(ref.logprobs.map((t) => t.text));
    expect(lp.top_logprobs!.every((t) => Object.keys(t).length >= 1)).toBe(true);
    // and the adapter matters
    const base = await client.completions.create({ model: baseId, prompt: 'Roses are', max_tokens: 10, temperature: 0 });
    expect(base.choices[0]!.text).not.toBe(c.choices[0]!.text);
  });

  it('streamed completions concatenate to the unstreamed text', async () => {
    const whole = await client.completions.create({ model: 'poet', prompt: 'Once', max_tokens: 12, temperature: 0 });
    const stream = await client.completions.create({ model: 'poet', prompt: 'Once', max_tokens: 12, temperature: 0, stream: true, stream_options: { include_usage: true } });
    let text = '';
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.text ?? '';
      finish = chunk.choices[0]?.finish_reason ?? finish;
      usage = chunk.usage ?? usage;
    }
    expect(text).toBe(whole.choices[0]!.text);
    expect(finish).toBe(whole.choices[0]!.finish_reason);
    expect(usage?.completion_tokens).toBe(whole.usage?.completion_tokens);
  });

  it('chat completions through the chat template, streamed and not, with the adapter', async () => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: 'system', content: 'You are terse.' },
      { role: 'user', content: 'Say hi' },
    ];
    const whole = await client.chat.completions.create({ model: 'poet', messages, max_tokens: 12, temperature: 0, logprobs: true, top_logprobs: 3 });
    const msg = whole.choices[0]!.message;
    expect(msg.role).toBe('assistant');
    expect(typeof msg.content).toBe('string');
    const lp = whole.choices[0]!.logprobs!.content!;
    expect(lp.length).toBe(whole.usage!.completion_tokens - (whole.choices[0]!.finish_reason === 'stop' ? 1 : 0));
    expect(lp.every((t) => t.top_logprobs.length === 3)).toBe(true);

    const stream = await client.chat.completions.create({ model: 'poet', messages, max_tokens: 12, temperature: 0, stream: true });
    let text = '';
    let role: string | undefined;
    for await (const chunk of stream) {
      role ??= chunk.choices[0]?.delta.role;
      text += chunk.choices[0]?.delta.content ?? '';
    }
    expect(role).toBe('assistant');
    expect(text).toBe(msg.content);

    // the same prompt rendered by the template and sent natively gives the same text
    const base = await client.chat.completions.create({ model: baseId, messages, max_tokens: 12, temperature: 0 });
    expect(base.choices[0]!.message.content).not.toBe(msg.content);
  });

  it('unknown model → 404 through the client', async () => {
    await expect(client.completions.create({ model: 'missing', prompt: 'x', max_tokens: 1 })).rejects.toMatchObject({ status: 404 });
  });
});
