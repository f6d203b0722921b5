import { mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { architectureFromHfConfig } from '../src/model/checkpoint/hf-config.js';
import { startServer, type ServerProcess } from './helpers/serve-process.js';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';

/**
 * Graceful shutdown of the real process (`node bin/loraserve.js serve`, embedded model): SIGTERM
 * in the middle of streams — readiness and new work answer 503 at once, requests queued for a
 * batch slot (not started) get a 503 with Retry-After, the running stream finishes with its final
 * event, the process exits 0. With a short DRAIN_TIMEOUT_MS the remaining streams end with an
 * `error` event (OpenAI: an error chunk, then [DONE]) and the process still exits 0. Request ids: a
 * client's x-request-id comes back and tags the log lines of its request, adapter included.
 */

interface SseEvent {
  event: string;
  data: string;
}

function parseSse(text: string): SseEvent[] {
  return text
    .split('\n\n')
    .filter((b) => b.trim() !== '')
    .map((block) => {
      let event = 'message';
      const data: string[] = [];
      for (const line of block.split('\n')) {
        if (line.startsWith('event:')) event = line.slice(6).trim();
        else if (line.startsWith('data:')) data.push(line.slice(5).trimStart());
      }
      return { event, data: data.join('\n') };
    });
}

/** Starts a streamed generation; resolves once its first bytes arrived, with the rest as a promise. */
async function openStream(url: string, body: Record<string, unknown>, headers: Record<string, string> = {}) {
  const res = await fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body: JSON.stringify({ ...body, stream: true }) });
  expect(res.status).toBe(200);
  const reader = res.body!.getReader();
  const decoder = new TextDecoder();
  let text = '';
  const first = await reader.read();
  if (first.value) text += decoder.decode(first.value, { stream: true });
  const rest = (async () => {
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
      }
    } catch {
      // cut by the server: what arrived is what counts
    }
    return text;
  })();
  return { res, rest };
}

let tmp: string;
let modelDir: string;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-drain-'));
  // written once, shared by the servers below (each builds nothing new after the first)
  modelDir = path.join(tmp, 'model');
  await ensureEmbeddedModel(modelDir);
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

const env = (extra: Record<string, string>) => ({
  MODEL_PATH: '',
  DEFAULT_MODEL_DIR: modelDir,
  ADAPTER_DIR: path.join(tmp, `adapters-${Math.random().toString(36).slice(2)}`),
  DEVICE: 'cpu',
  API_KEYS: '',
  ADMIN_API_KEYS: '',
  ...extra,
});

// greedy decoding of the embedded model runs to the context limit without an EOS (measured:
// 506 tokens, ~1.3 s on this machine); MAX_BATCH 1 queues the second stream behind the first,
// so the drain has to wait for both
const LONG = { prompt: 'Once upon a time', max_tokens: 100_000, temperature: 0 };

describe('one server: request ids, then SIGTERM while streaming', () => {
  let server: ServerProcess;
  beforeAll(async () => {
    server = await startServer(env({ MAX_BATCH: '1', DRAIN_TIMEOUT_MS: '60000' }));
  });
  afterAll(async () => {
    await server?.stop('SIGKILL');
  });

  it('echoes x-request-id and tags the log lines of the request, adapter included', async () => {
    const configFile = path.join(modelDir, 'config.json');
    const arch = architectureFromHfConfig(JSON.parse(await readFile(configFile, 'utf8')), configFile);
    const modelId = ((await (await fetch(`${server.url}/readyz`)).json()) as { model: string }).model;
    const up = await fetch(`${server.url}/v1/adapters`, { method: 'POST', body: filesForm('rid-probe', adapterBytes(arch, { modelId, r: 4 })) });
    expect(up.status).toBe(201);

    const plain = await fetch(`${server.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', 'x-request-id': 'ops-rid-plain-1' },
      body: JSON.stringify({ prompt: 'Once', max_tokens: 3, adapter: 'rid-probe', seed: 1 }),
    });
    expect(plain.status).toBe(200);
    expect(plain.headers.get('x-request-id')).toBe('ops-rid-plain-1');
    const streamed = await openStream(server.url, { prompt: 'Once', max_tokens: 3, adapter: 'rid-probe', seed: 2 }, { 'x-request-id': 'ops-rid-stream-2' });
    expect(streamed.res.headers.get('x-request-id')).toBe('ops-rid-stream-2');
    await streamed.rest;
    // an id that is not a safe token is replaced, not logged verbatim
    const bad = await fetch(`${server.url}/healthz`, { headers: { 'x-request-id': 'evil id with spaces <and> "quotes"' } });
    expect(bad.headers.get('x-request-id')).toMatch(/^[0-9a-f-]{36}$/);

    // pino writes each line at once, but stdout is a pipe that may deliver it after the response
    const parsed = () =>
      server
        .output()
        .split('\n')
        .filter((l) => l.startsWith('{'))
        .map((l) => JSON.parse(l) as Record<string, unknown>);
    let lines = parsed();
    for (let i = 0; i < 100 && ['ops-rid-plain-1', 'ops-rid-stream-2'].some((id) => !lines.some((l) => l.reqId === id && l.adapter === 'rid-probe')); i++) {
      await new Promise((r) => setTimeout(r, 50));
      lines = parsed();
    }
    for (const id of ['ops-rid-plain-1', 'ops-rid-stream-2']) {
      const mine = lines.filter((l) => l.reqId === id);
      expect(mine.length, id).toBeGreaterThanOrEqual(2);
      expect(mine.some((l) => l.adapter === 'rid-probe'), `${id}: a log line naming the adapter`).toBe(true);
    }
    expect(server.output()).not.toContain('evil id');
  });

  it('refuses new work, sends queued requests a 503, finishes the running stream, exits 0', async () => {
    const a = await openStream(server.url, LONG);
    // MAX_BATCH 1: these two wait for a's slot; they have not started, so the drain refuses them
    const post = (body: Record<string, unknown>) => fetch(`${server.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body) });
    const queuedStream = post({ ...LONG, prompt: 'The little dog', stream: true });
    const queuedPlain = post({ ...LONG, prompt: 'A cat' });
    for (let i = 0; i < 200; i++) {
      if (/^vllm:num_requests_waiting 2$/m.test(await (await fetch(`${server.url}/metrics`)).text())) break;
      await new Promise((r) => setTimeout(r, 20));
    }

    server.child.kill('SIGTERM');
    // readiness flips at once; new work is refused; probes and metrics still answer
    let ready: Response | null = null;
    for (let i = 0; i < 50; i++) {
      ready = await fetch(`${server.url}/readyz`);
      if (ready.status === 503) break;
      await new Promise((r) => setTimeout(r, 10));
    }
    expect(ready!.status).toBe(503);
    for (const queued of [await queuedStream, await queuedPlain]) {
      expect(queued.status).toBe(503);
      expect(queued.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      expect(Number(queued.headers.get('retry-after'))).toBeGreaterThan(0);
      expect(((await queued.json()) as { detail: string }).detail).toMatch(/draining/);
    }
    const refused = await fetch(`${server.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'hi', max_tokens: 2 }) });
    expect(refused.status).toBe(503);
    expect(refused.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    expect(Number(refused.headers.get('retry-after'))).toBeGreaterThan(0);
    expect(await refused.json()).toMatchObject({ status: 503, title: 'Service Unavailable' });
    expect((await fetch(`${server.url}/v1/models`)).status).toBe(503);
    expect((await fetch(`${server.url}/healthz`)).status).toBe(200);
    const metrics = await fetch(`${server.url}/metrics`);
    expect(metrics.status).toBe(200);
    const scrape = await metrics.text();
    expect(scrape).toMatch(/^vllm:num_requests_running 1$/m);
    expect(scrape).toMatch(/^vllm:num_requests_waiting 0$/m);

    const events = parseSse(await a.rest);
    const done = events.filter((e) => e.event === 'done');
    expect(done).toHaveLength(1);
    expect(events[events.length - 1]!.event).toBe('done');
    const final = JSON.parse(done[0]!.data) as { finish_reason: string; usage: { completion_tokens: number } };
    expect(final.finish_reason).toBe('length');
    const tokenEvents = events.filter((e) => e.event === 'message' && (JSON.parse(e.data) as { token: number | null }).token !== null);
    expect(tokenEvents).toHaveLength(final.usage.completion_tokens);
    expect(await server.exited).toBe(0);
    const out = server.output();
    expect(out).toContain('"msg":"draining"');
    expect(out).toMatch(/"clean":true[^\n]*"msg":"stopped"/);
  });
});

describe('drain deadline', () => {
  let server: ServerProcess;
  afterAll(async () => {
    await server?.stop('SIGKILL');
  });

  it('ends the streams still running at DRAIN_TIMEOUT_MS with an error event (OpenAI: an error chunk), and exits 0', async () => {
    server = await startServer(env({ MAX_BATCH: '2', DRAIN_TIMEOUT_MS: '200' }));
    const model = ((await (await fetch(`${server.url}/readyz`)).json()) as { model: string }).model;
    const a = await openStream(server.url, LONG);
    const chat = await fetch(`${server.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ model, messages: [{ role: 'user', content: 'Tell me a story' }], max_tokens: 100_000, temperature: 0, stream: true }),
    });
    expect(chat.status).toBe(200);
    const chatText = chat.text().catch(() => '');
    const t0 = Date.now();
    server.child.kill('SIGTERM');
    expect(await server.exited).toBe(0);
    // far sooner than the stream would have taken
    expect(Date.now() - t0).toBeLessThan(5000);
    const events = parseSse(await a.rest);
    expect(events.some((e) => e.event === 'done')).toBe(false);
    const last = events[events.length - 1]!;
    expect(last.event).toBe('error');
    expect(JSON.parse(last.data)).toMatchObject({ status: 503, detail: expect.stringMatching(/drain deadline/) });
    const chunks = parseSse(await chatText).map((e) => e.data);
    expect(chunks[chunks.length - 1]).toBe('[DONE]');
    // OpenAI's error object, as on every OpenAI route (issue 16): what the SDK raises mid-stream
    const error = JSON.parse(chunks[chunks.length - 2]!) as { error?: { message: string; type: string } };
    expect(error.error).toMatchObject({ type: 'server_error', message: expect.stringMatching(/drain deadline/) });
    expect(server.output()).toMatch(/"clean":false[^\n]*"msg":"stopped"/);
  });
});

