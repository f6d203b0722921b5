import { copyFile, mkdir, mkdtemp, readFile, readdir, readlink, rm } from 'node:fs/promises';
import { connect, type Socket } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { architectureFromHfConfig } from '../src/model/checkpoint/hf-config.js';
import type { Architecture } from '../src/model/architecture.js';
import { startServer, type ServerProcess } from './helpers/serve-process.js';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';
import { HAVE_STORIES, STORIES_BIN, TOK512_BIN, warnIfMissing } from './helpers/model-io-files.js';

/**
 * Hostile clients against the real process (`node bin/loraserve.js serve`): what one client sends
 * must neither stall the others (/healthz keeps answering), nor hold resources forever, nor put a
 * key in the log. Bounds on time are generous ("answered at all"), never tight.
 */

let tmp: string;
let modelDir: string;
let arch: Architecture;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-hostile-server-'));
  modelDir = path.join(tmp, 'model');
  await ensureEmbeddedModel(modelDir);
  const configFile = path.join(modelDir, 'config.json');
  arch = architectureFromHfConfig(JSON.parse(await readFile(configFile, 'utf8')), configFile);
});
afterAll(async () => {
  await rm(tmp, { recursive: true, force: true });
});

/** /healthz answered at all (status 200) within a generous bound. */
async function healthAnswers(url: string, boundMs = 10_000, latencies?: number[]): Promise<boolean> {
  try {
    const t0 = performance.now();
    const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(boundMs) });
    latencies?.push(performance.now() - t0);
    return res.status === 200;
  } catch {
    return false;
  }
}

/** Probes /healthz while `work` is in flight; every probe must answer. */
async function healthDuring<T>(url: string, work: Promise<T>, label: string): Promise<{ result: T; probes: boolean[] }> {
  let done = false;
  const t0 = performance.now();
  const settled = work.finally(() => (done = true));
  const probes: boolean[] = [];
  const latencies: number[] = [];
  // at least three probes, the first while the work has only just started
  for (let i = 0; i < 3 || !done; i++) {
    probes.push(await healthAnswers(url, 10_000, latencies));
    if (i > 50) break;
    await new Promise((r) => setTimeout(r, 100));
  }
  const result = await settled;
  // for the record, not asserted: how long the request took and how /healthz fared meanwhile
  console.info(`${label}: answered in ${(performance.now() - t0).toFixed(0)} ms; /healthz max ${Math.max(...latencies).toFixed(1)} ms over ${latencies.length} probes`);
  return { result, probes };
}

const KEY_INFER = 'sk-infer-SECRET-1f0a9c';
const KEY_ADMIN = 'sk-admin-SECRET-77b2e4';
const COOKIE = 'session=COOKIE-SECRET-5d1e';
const XKEY = 'XAPIKEY-SECRET-a8c3';

function env(extra: Record<string, string>): Record<string, string> {
  return {
    MODEL_PATH: '',
    DEFAULT_MODEL_DIR: modelDir,
    CACHE_DIR: path.join(tmp, 'cache'),
    ADAPTER_DIR: path.join(tmp, `adapters-${Math.random().toString(36).slice(2)}`),
    DEVICE: 'cpu',
    API_KEYS: '',
    ADMIN_API_KEYS: '',
    ...extra,
  };
}

describe('embedded model at LOG_LEVEL=trace, with keys', () => {
  let server: ServerProcess;
  let adapterDir: string;
  beforeAll(async () => {
    const e = env({ LOG_LEVEL: 'trace', API_KEYS: KEY_INFER, ADMIN_API_KEYS: KEY_ADMIN, UPLOAD_IDLE_TIMEOUT_MS: '1000', MAX_CONCURRENT_UPLOADS: '2' });
    adapterDir = e.ADAPTER_DIR!;
    server = await startServer(e);
  }, 120_000);
  afterAll(async () => {
    await server?.stop('SIGKILL');
  });

  const admin = { authorization: `Bearer ${KEY_ADMIN}`, cookie: COOKIE, 'x-api-key': XKEY };
  const infer = { authorization: `Bearer ${KEY_INFER}`, cookie: COOKIE, 'x-api-key': XKEY, 'content-type': 'application/json' };

  it('keeps every key out of a trace-level log of authorised uploads and generations', async () => {
    const modelId = ((await (await fetch(`${server.url}/readyz`)).json()) as { model: string }).model;
    const a = adapterBytes(arch, { modelId, r: 4 });
    const up = await fetch(`${server.url}/v1/adapters`, { method: 'POST', headers: admin, body: filesForm('logprobe', a) });
    expect(up.status).toBe(201);
    const dry = await fetch(`${server.url}/v1/adapters/validate`, { method: 'POST', headers: admin, body: filesForm(null, a) });
    expect(dry.status).toBe(200);
    const put = await fetch(`${server.url}/v1/adapters/logprobe`, { method: 'PUT', headers: admin, body: filesForm(null, a) });
    expect(put.status).toBe(200);
    const gen = await fetch(`${server.url}/v1/generate`, { method: 'POST', headers: infer, body: JSON.stringify({ prompt: 'Once', max_tokens: 3, adapter: 'logprobe' }) });
    expect(gen.status).toBe(200);
    const streamed = await fetch(`${server.url}/v1/generate`, { method: 'POST', headers: infer, body: JSON.stringify({ prompt: 'Once', max_tokens: 3, stream: true }) });
    await streamed.text();
    const chat = await fetch(`${server.url}/v1/chat/completions`, { method: 'POST', headers: infer, body: JSON.stringify({ model: 'logprobe', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 }) });
    expect(chat.status).toBe(200);
    // a wrong key and an admin key on an inference route are refused; they are credentials too
    const wrong = await fetch(`${server.url}/v1/adapters`, { headers: { authorization: `Bearer ${KEY_INFER}` } });
    expect(wrong.status).toBe(403);

    const out = server.output();
    // the paths that used to leak really were logged (with the value redacted)
    expect(out).toContain('Providing options to busboy');
    expect(out).toMatch(/"busboyOptions":\{"headers":\{[^\n]*"authorization":"\[redacted\]"/);
    for (const secret of [KEY_INFER, KEY_ADMIN, 'COOKIE-SECRET', XKEY]) expect(out, secret).not.toContain(secret);
  });

  it('cuts stalled uploads after UPLOAD_IDLE_TIMEOUT_MS: socket closed, staged folder removed, no descriptor left', async () => {
    const a = adapterBytes(arch, { modelId: 'x', r: 4 });
    const res = new Response(filesForm('stalled', a));
    const body = Buffer.from(await res.arrayBuffer());
    const contentType = res.headers.get('content-type')!;
    const stalled = await Promise.all([0, 1].map(() => stallUpload(server.url, contentType, body, admin)));

    // both slots are taken: the next upload is refused at once, with a Retry-After
    const busy = await fetch(`${server.url}/v1/adapters/validate`, { method: 'POST', headers: admin, body: filesForm(null, a) });
    expect(busy.status).toBe(429);
    expect(Number(busy.headers.get('retry-after'))).toBeGreaterThanOrEqual(1);
    expect(busy.headers.get('content-type')).toMatch(/^application\/problem\+json/);
    // refused while the client is still sending a larger body: it reads the 429, not a reset
    const large = new FormData();
    large.append('weights', new Blob([new Uint8Array(512 * 1024)]), 'adapter_model.safetensors');
    expect((await fetch(`${server.url}/v1/adapters/validate`, { method: 'POST', headers: admin, body: large })).status).toBe(429);
    expect(await healthAnswers(server.url)).toBe(true);

    // the server closes both connections by itself (far sooner than this bound)
    const closed = await Promise.race([Promise.all(stalled.map((s) => s.closed)).then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 30_000))]);
    expect(closed).toBe(true);
    for (const s of stalled) s.socket.destroy();
    expect(await healthAnswers(server.url)).toBe(true);
    // the staged folders are gone, and the process holds no descriptor inside ADAPTER_DIR
    let staged: string[] = [];
    for (let i = 0; i < 50; i++) {
      staged = (await readdir(adapterDir)).filter((f) => f.startsWith('.upload-'));
      if (staged.length === 0) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(staged).toEqual([]);
    expect(await openFilesUnder(server.child.pid!, adapterDir)).toEqual([]);
    expect(server.output()).toContain('upload stalled: aborting it');
    // the slots are free again
    const ok = await fetch(`${server.url}/v1/adapters/validate`, { method: 'POST', headers: admin, body: filesForm(null, a) });
    expect(ok.status).toBe(200);
  }, 60_000);

  it('answers /healthz while a 1 MB prompt is tokenized (tokenizer.json path)', async () => {
    const prompt = 'Once upon a time there was a robot. '.repeat(Math.ceil((1 << 20) / 36));
    const big = fetch(`${server.url}/v1/generate`, { method: 'POST', headers: infer, body: JSON.stringify({ prompt, max_tokens: 1 }) });
    const { result, probes } = await healthDuring(server.url, big, '1 MB prompt, tokenizer.json');
    expect(probes.every(Boolean)).toBe(true);
    expect(result.status).toBe(400);
    expect(((await result.json()) as { detail: string }).detail).toMatch(/context holds/);
  }, 60_000);
});

describe.skipIf(!HAVE_STORIES)('stories260K (llama2.c tokenizer): long prompts', () => {
  warnIfMissing(HAVE_STORIES, 'the llama2.c long-prompt server tests');
  let server: ServerProcess;
  beforeAll(async () => {
    const dir = path.join(tmp, 'stories');
    await mkdir(dir, { recursive: true });
    await copyFile(STORIES_BIN, path.join(dir, 'stories260K.bin'));
    await copyFile(TOK512_BIN, path.join(dir, 'tokenizer.bin'));
    server = await startServer(env({ MODEL_PATH: path.join(dir, 'stories260K.bin'), LOG_LEVEL: 'warn' }));
  }, 120_000);
  afterAll(async () => {
    await server?.stop('SIGKILL');
  });

  for (const [label, bytes] of [
    ['64 KB', 64 * 1024],
    ['1 MB', 1 << 20],
  ] as const) {
    it(`refuses a ${label} prompt that cannot fit, and /healthz answers meanwhile`, async () => {
      const prompt = 'Lily and Tom played in the park. '.repeat(Math.ceil(bytes / 33));
      // the native route and the OpenAI one share the prompt path; take one each
      const model = ((await (await fetch(`${server.url}/readyz`)).json()) as { model: string }).model;
      const route = bytes > 64 * 1024 ? { path: '/v1/completions', body: { model, prompt, max_tokens: 1 } } : { path: '/v1/generate', body: { prompt, max_tokens: 1 } };
      const big = fetch(`${server.url}${route.path}`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(route.body) });
      const { result, probes } = await healthDuring(server.url, big, `${label} prompt, llama2.c`);
      expect(probes.every(Boolean)).toBe(true);
      expect(result.status).toBe(400);
      expect(await result.text()).toMatch(/at least \d+ tokens/);
    }, 90_000);
  }

  it('still serves a prompt that fits, after the long ones', async () => {
    const res = await fetch(`${server.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'Lily and Tom played in the park. '.repeat(8), max_tokens: 2 }) });
    expect(res.status).toBe(200);
    expect(((await res.json()) as { usage: { prompt_tokens: number } }).usage.prompt_tokens).toBeGreaterThan(10);
  }, 60_000);
});

describe('Retry-After on a full queue', () => {
  it('is estimated from the queue ahead (MAX_QUEUE 3, MAX_BATCH 1: at least 4 s), not always 1', async () => {
    const app = await buildApp(makeConfig({ MODEL_PATH: modelDir, CACHE_DIR: path.join(tmp, 'cache'), ADAPTER_DIR: path.join(tmp, 'adapters-retry'), DEVICE: 'cpu', LOG_LEVEL: 'silent', MAX_BATCH: 1, MAX_QUEUE: 3 }));
    const ac = new AbortController();
    try {
      const url = await app.listen({ port: 0, host: '127.0.0.1' });
      const long = (seed: number) => fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'Once upon a time', max_tokens: 100_000, temperature: 0, seed }), signal: ac.signal }).catch(() => null);
      const pending = [1, 2, 3, 4].map(long);
      for (let i = 0; i < 200 && app.runtime.engine.stats().waiting < 3; i++) await new Promise((r) => setTimeout(r, 20));
      expect(app.runtime.engine.stats().waiting).toBe(3);
      const refused = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 'b', max_tokens: 2 } });
      expect(refused.statusCode).toBe(429);
      const retry = Number(refused.headers['retry-after']);
      // 3 waiting + this one, one at a time, each at least the 1 s prior (or what was measured)
      expect(retry).toBeGreaterThanOrEqual(4);
      expect(retry).toBeLessThanOrEqual(120);
      expect((refused.json() as { retry_after: number }).retry_after).toBe(retry);
      expect(await healthAnswers(url)).toBe(true);
      ac.abort();
      await Promise.all(pending);
    } finally {
      ac.abort();
      await app.close();
    }
  }, 120_000);
});

/** Sends the headers and the first third of a multipart body, then nothing more. */
async function stallUpload(url: string, contentType: string, body: Buffer, headers: Record<string, string>): Promise<{ socket: Socket; closed: Promise<void> }> {
  const { hostname, port } = new URL(url);
  const socket = connect(Number(port), hostname);
  await new Promise<void>((resolve, reject) => socket.once('connect', resolve).once('error', reject));
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()));
  socket.on('error', () => undefined);
  socket.on('data', () => undefined);
  const head = [`POST /v1/adapters HTTP/1.1`, `host: ${hostname}:${port}`, `content-type: ${contentType}`, `content-length: ${body.byteLength}`, ...Object.entries(headers).map(([k, v]) => `${k}: ${v}`), '', ''].join('\r\n');
  socket.write(head);
  socket.write(body.subarray(0, Math.floor(body.byteLength / 3)));
  // let the server take the request in and stage its first part
  await new Promise((r) => setTimeout(r, 300));
  return { socket, closed };
}

/** Files under `dir` that process `pid` holds open (Linux /proc). */
async function openFilesUnder(pid: number, dir: string): Promise<string[]> {
  const fds = await readdir(`/proc/${pid}/fd`).catch(() => [] as string[]);
  const out: string[] = [];
  for (const fd of fds) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => '');
    if (target.startsWith(dir)) out.push(target);
  }
  return out;
}
