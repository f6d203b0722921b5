import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';
import { startEmbeddedApp, type EmbeddedApp } from './helpers/embedded-app.js';

/**
 * The native generation API over real HTTP against the embedded model, with adapters uploaded
 * through the API: streaming equals non-streaming (adapter included), stop strings, errors as
 * problem+json, no cross-talk between concurrent requests, cancellation on disconnect.
 */

let server: EmbeddedApp;
let tmp: string;
let app: FastifyInstance;
let url: string;

interface GenBody {
  text: string;
  tokens: number[];
  finish_reason: string;
  usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number };
}

beforeAll(async () => {
  server = await startEmbeddedApp('generate', { MAX_BATCH: 8 });
  ({ app, url, tmp } = server);
  const arch = app.runtime.manifest.architecture;
  const modelId = app.runtime.manifest.modelId;
  // three adapters of different ranks and targets; large enough values to move greedy choices
  const specs = [
    { name: 'alpha', r: 4, targets: ['q_proj', 'v_proj'] as const, seed: 11 },
    { name: 'beta', r: 8, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const, seed: 12 },
    { name: 'gamma', r: 2, targets: ['down_proj', 'up_proj'] as const, seed: 13 },
  ];
  for (const s of specs) {
    const bytes = adapterBytes(arch, { modelId, r: s.r, alpha: 4 * s.r, targets: [...s.targets], seed: s.seed });
    const res = await app.inject({ method: 'POST', url: '/v1/adapters', payload: filesForm(s.name, bytes) });
    expect(res.statusCode, res.body).toBe(201);
  }
});

afterAll(async () => {
  await server?.close();
});

const gen = async (payload: Record<string, unknown>) => {
  const res = await app.inject({ method: 'POST', url: '/v1/generate', payload });
  return { status: res.statusCode, type: String(res.headers['content-type']), body: res.json() as GenBody & { detail?: string } };
};

interface SseEvent {
  event: string;
  data: string;
}

async function readSse(res: Response, onEvent?: (e: SseEvent, all: SseEvent[]) => boolean | void): Promise<SseEvent[]> {
  const events: SseEvent[] = [];
  const reader = res.body!.getReader();
  const dec = new TextDecoder();
  let buf = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += dec.decode(value, { stream: true });
    let i: number;
    while ((i = buf.indexOf('\n\n')) >= 0) {
      const block = buf.slice(0, i);
      buf = buf.slice(i + 2);
      const ev: SseEvent = { event: 'message', data: '' };
      for (const line of block.split('\n')) {
        if (line.startsWith('event: ')) ev.event = line.slice(7);
        else if (line.startsWith('data: ')) ev.data += line.slice(6);
      }
      events.push(ev);
      if (onEvent?.(ev, events)) {
        await reader.cancel();
        return events;
      }
    }
  }
  return events;
}

const streamGen = async (payload: Record<string, unknown>, signal?: AbortSignal) =>
  fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ ...payload, stream: true }), signal });

describe('POST /v1/generate', () => {
  it('adapters change greedy output, and each adapter gives its own', async () => {
    const outs = await Promise.all([null, 'alpha', 'beta', 'gamma'].map((adapter) => gen({ prompt: 'The cat sat', adapter, max_tokens: 10, temperature: 0 })));
    for (const o of outs) expect(o.status).toBe(200);
    const texts = new Set(outs.map((o) => JSON.stringify(o.body.tokens)));
    expect(texts.size).toBe(4);
  });

  it('a streamed request with an adapter yields exactly the tokens of the same request unstreamed', async () => {
    for (const adapter of ['beta', null]) {
      const plain = await gen({ prompt: 'Once there was', adapter, max_tokens: 16, temperature: 0 });
      const res = await streamGen({ prompt: 'Once there was', adapter, max_tokens: 16, temperature: 0 });
      expect(res.status).toBe(200);
      expect(res.headers.get('content-type')).toContain('text/event-stream');
      const events = await readSse(res);
      const tokenEvents = events.filter((e) => e.event === 'message').map((e) => JSON.parse(e.data) as { token: number; text: string });
      const done = events.find((e) => e.event === 'done');
      expect(done).toBeDefined();
      expect(tokenEvents.map((e) => e.token)).toEqual(plain.body.tokens);
      expect(tokenEvents.map((e) => e.text).join('')).toBe(plain.body.text);
      expect((JSON.parse(done!.data) as GenBody).text).toBe(plain.body.text);
    }
  });

  it('a stop string ends the text exactly before it, with finish_reason stop', async () => {
    const full = await gen({ prompt: 'A story:', adapter: 'alpha', max_tokens: 24, temperature: 0 });
    expect(full.body.text.length).toBeGreaterThan(6);
    // a stop string from the middle of the greedy text, possibly spanning tokens
    const stop = full.body.text.slice(3, 6);
    const cut = full.body.text.indexOf(stop);
    const stopped = await gen({ prompt: 'A story:', adapter: 'alpha', max_tokens: 24, temperature: 0, stop: [stop] });
    expect(stopped.body.text).toBe(full.body.text.slice(0, cut));
    expect(stopped.body.finish_reason).toBe('stop');
    // streamed, the same
    const events = await readSse(await streamGen({ prompt: 'A story:', adapter: 'alpha', max_tokens: 24, temperature: 0, stop: [stop] }));
    const done = JSON.parse(events.find((e) => e.event === 'done')!.data) as GenBody;
    expect(done.text).toBe(full.body.text.slice(0, cut));
    expect(events.filter((e) => e.event === 'message').map((e) => (JSON.parse(e.data) as { text: string }).text).join('')).toBe(done.text);
  });

  it('seeded sampling is reproducible, alone and next to other requests', async () => {
    const req = { prompt: 'Hello', adapter: 'gamma', max_tokens: 12, temperature: 1, top_p: 0.9, top_k: 50, seed: 1234 };
    const alone = await gen(req);
    const busy = await Promise.all([gen(req), gen({ ...req, seed: 99 }), gen({ ...req, adapter: 'beta' }), gen({ prompt: 'x y z', max_tokens: 20, temperature: 0 })]);
    expect(busy[0]!.body.tokens).toEqual(alone.body.tokens);
    expect(busy[1]!.body.tokens).not.toEqual(alone.body.tokens);
  });

  it('12 concurrent greedy requests over 3 adapters and the base each return exactly their solo tokens', async () => {
    const reqs = Array.from({ length: 12 }, (_, i) => ({ prompt: ['Once upon', 'The dog', 'In a land far', 'Why'][i % 4]!, adapter: [null, 'alpha', 'beta', 'gamma'][i % 4] ?? null, max_tokens: 8 + (i % 5) * 3, temperature: 0 }));
    const alone: number[][] = [];
    for (const r of reqs) alone.push((await gen(r)).body.tokens);
    const together = await Promise.all(reqs.map((r, i) => new Promise((res) => setTimeout(res, i * 7)).then(() => gen(r))));
    together.forEach((t, i) => expect(t.body.tokens, `request ${i}`).toEqual(alone[i]));
  });

  it('errors are problem+json: unknown adapter 404, prompt over the context 400, bad body 400', async () => {
    const unknown = await gen({ prompt: 'x', adapter: 'nope', max_tokens: 2 });
    expect(unknown.status).toBe(404);
    expect(unknown.type).toContain('application/problem+json');
    const long = await gen({ prompt: 'word '.repeat(2000), max_tokens: 2 });
    expect(long.status).toBe(400);
    expect(long.type).toContain('application/problem+json');
    expect(long.body.detail).toMatch(/context/);
    const bad = await gen({ prompt: 3, max_tokens: -1 });
    expect(bad.status).toBe(400);
    expect(bad.type).toContain('application/problem+json');
  });

  it('a client that disconnects mid-stream frees its row', async () => {
    const before = app.runtime.engine.stats().cancelled;
    const ac = new AbortController();
    const res = await streamGen({ prompt: 'Tell me', max_tokens: 400, temperature: 0 }, ac.signal);
    await readSse(res, (_e, all) => all.length >= 3);
    ac.abort();
    const deadline = Date.now() + 20_000;
    while (Date.now() < deadline && !(app.runtime.engine.stats().cancelled > before && app.runtime.engine.stats().running === 0)) {
      await new Promise((r) => setTimeout(r, 50));
    }
    expect(app.runtime.engine.stats().cancelled).toBeGreaterThan(before);
    expect(app.runtime.engine.stats().running).toBe(0);
  });

  it('GET /healthz stays responsive while a long generation runs', async () => {
    const long = gen({ prompt: 'Go on', max_tokens: 300, temperature: 0 });
    await new Promise((r) => setTimeout(r, 100));
    const times: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t0 = performance.now();
      const res = await fetch(`${url}/healthz`);
      expect(res.status).toBe(200);
      times.push(performance.now() - t0);
    }
    const done = await long;
    expect(done.body.usage.completion_tokens).toBeGreaterThan(0);
    console.info(`/healthz during generation: max ${Math.max(...times).toFixed(1)} ms, median ${times.sort((a, b) => a - b)[5]!.toFixed(1)} ms`);
    // generous: the worker keeps inference off the event loop; a blocked loop would take a whole generation
    expect(Math.max(...times)).toBeLessThan(1000);
  });
});

describe('queue limits', () => {
  it('a full queue answers 429 with Retry-After', async () => {
    const small = await buildApp(makeConfig({ MODEL_PATH: app.runtime.config.MODEL_PATH, ADAPTER_DIR: path.join(tmp, 'adapters-small'), CACHE_DIR: path.join(tmp, 'cache'), DEVICE: 'cpu', LOG_LEVEL: 'silent', MAX_BATCH: 1, MAX_QUEUE: 0 }));
    try {
      const first = small.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 'a', max_tokens: 200, temperature: 0 } });
      await new Promise((r) => setTimeout(r, 50));
      const second = await small.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 'b', max_tokens: 2 } });
      expect(second.statusCode).toBe(429);
      expect(second.headers['retry-after']).toMatch(/^\d+$/);
      expect(String(second.headers['content-type'])).toContain('application/problem+json');
      expect((await first).statusCode).toBe(200);
    } finally {
      await small.close();
    }
  });
});
