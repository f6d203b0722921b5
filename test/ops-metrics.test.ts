import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import Fastify, { type FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import metricsPlugin, { BASE_LABEL, Metrics, adapterNameOfVersion, type EngineStatsLike, type MetricsSource } from '../src/http/metrics.js';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';

/**
 * Prometheus metrics: the exposition computed from a known engine state (vLLM gateway names
 * included), the generation timers, HTTP request accounting (streams and broken-off requests
 * included), and the real app: counters agree with what the responses report, and the gauges
 * show a running stream and its adapter while it runs.
 */

interface Sample {
  name: string;
  labels: Record<string, string>;
  value: number;
}

/** Prometheus text format → samples (no escapes beyond \" and \\ in label values are used here). */
function parseExposition(text: string): Sample[] {
  const out: Sample[] = [];
  for (const line of text.split('\n')) {
    if (!line || line.startsWith('#')) continue;
    const m = /^([A-Za-z_:][A-Za-z0-9_:]*)(?:\{(.*)\})? (\S+)$/.exec(line);
    if (!m) throw new Error(`unparsable exposition line: ${line}`);
    const labels: Record<string, string> = {};
    for (const l of (m[2] ?? '').matchAll(/([A-Za-z_][A-Za-z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!.replace(/\\(.)/g, '$1');
    out.push({ name: m[1]!, labels, value: Number(m[3]) });
  }
  return out;
}

function value(samples: Sample[], name: string, labels: Record<string, string> = {}): number | undefined {
  const s = samples.find((x) => x.name === name && Object.entries(labels).every(([k, v]) => x.labels[k] === v));
  return s?.value;
}

function controlled(stats: EngineStatsLike, adapters: { name: string; state: string }[], maxLora = 8): { source: MetricsSource; set(s: Partial<EngineStatsLike>): void } {
  let current = stats;
  return {
    source: { stats: () => current, adapters: () => adapters, adapterName: adapterNameOfVersion, maxLora },
    set(s) {
      current = { ...current, ...s };
    },
  };
}

describe('adapterNameOfVersion', () => {
  it('strips the registry version suffix and leaves anything else alone', () => {
    expect(adapterNameOfVersion('my.adapter-1@3#17')).toBe('my.adapter-1');
    expect(adapterNameOfVersion('a@1#1')).toBe('a');
    expect(adapterNameOfVersion('plain')).toBe('plain');
    expect(adapterNameOfVersion('x@y')).toBe('x@y');
  });
});

describe('Metrics from a known engine state', () => {
  const base: EngineStatsLike = {
    running: 3,
    waiting: 2,
    runningAdapters: ['alpha@1#1', 'alpha@1#1', 'beta@2#5'],
    waitingAdapters: ['gamma@1#7', 'alpha@1#1'],
    batchSize: 3,
    kvTokens: 150,
    kvCapacity: 600,
    tokensGenerated: 40,
    cancelled: 1,
    adaptersResident: 3,
  };
  const adapters = [
    { name: 'alpha', state: 'ready' },
    { name: 'beta', state: 'ready' },
    { name: 'gamma', state: 'ready' },
    { name: 'old', state: 'incompatible' },
  ];

  it('exports the vLLM gateway gauges', async () => {
    const c = controlled(base, adapters, 6);
    const m = new Metrics(() => c.source);
    const before = Date.now() / 1000;
    const s = parseExposition(await m.scrape());
    const after = Date.now() / 1000;
    expect(value(s, 'vllm:num_requests_running')).toBe(3);
    expect(value(s, 'vllm:num_requests_waiting')).toBe(2);
    expect(value(s, 'vllm:gpu_cache_usage_perc')).toBeCloseTo(150 / 600, 12);
    expect(value(s, 'vllm:kv_cache_usage_perc')).toBeCloseTo(150 / 600, 12);
    const info = s.filter((x) => x.name === 'vllm:lora_requests_info');
    expect(info).toHaveLength(1);
    // names, not versions; each once
    expect(info[0]!.labels).toEqual({ running_lora_adapters: 'alpha,beta', waiting_lora_adapters: 'gamma,alpha', max_lora: '6' });
    expect(info[0]!.value).toBeGreaterThanOrEqual(Math.floor(before));
    expect(info[0]!.value).toBeLessThanOrEqual(after + 1);
  });

  it('exports queue, batch, KV and adapter gauges', async () => {
    const c = controlled(base, adapters);
    const s = parseExposition(await new Metrics(() => c.source).scrape());
    expect(value(s, 'loraserve_queue_depth')).toBe(2);
    expect(value(s, 'loraserve_batch_size')).toBe(3);
    expect(value(s, 'loraserve_kv_cache_tokens')).toBe(150);
    expect(value(s, 'loraserve_kv_cache_capacity_tokens')).toBe(600);
    expect(value(s, 'loraserve_adapters_resident')).toBe(3);
    expect(value(s, 'loraserve_adapters_loaded')).toBe(3);
    expect(value(s, 'loraserve_adapters', { state: 'ready' })).toBe(3);
    expect(value(s, 'loraserve_adapters', { state: 'incompatible' })).toBe(1);
  });

  it('mirrors the engine totals as counters that only grow by what the engine added', async () => {
    const c = controlled(base, adapters);
    const m = new Metrics(() => c.source);
    let s = parseExposition(await m.scrape());
    expect(value(s, 'vllm:generation_tokens_total')).toBe(40);
    expect(value(s, 'loraserve_requests_cancelled_total')).toBe(1);
    c.set({ tokensGenerated: 65, cancelled: 3 });
    s = parseExposition(await m.scrape());
    expect(value(s, 'vllm:generation_tokens_total')).toBe(65);
    expect(value(s, 'loraserve_requests_cancelled_total')).toBe(3);
    // the same state scraped again adds nothing
    s = parseExposition(await m.scrape());
    expect(value(s, 'vllm:generation_tokens_total')).toBe(65);
  });

  it('empty batch and no adapters: zeros, an empty lora info, no KV division by zero', async () => {
    const c = controlled({ ...base, running: 0, waiting: 0, runningAdapters: [], waitingAdapters: [], kvTokens: 0, kvCapacity: 0 }, []);
    const s = parseExposition(await new Metrics(() => c.source).scrape());
    expect(value(s, 'vllm:gpu_cache_usage_perc')).toBe(0);
    expect(s.find((x) => x.name === 'vllm:lora_requests_info')!.labels).toMatchObject({ running_lora_adapters: '', waiting_lora_adapters: '' });
    expect(value(s, 'loraserve_adapters_loaded')).toBe(0);
  });

  it('without a source the gauges read 0 and no lora info is exported', async () => {
    const s = parseExposition(await new Metrics(() => null).scrape());
    expect(value(s, 'vllm:num_requests_running')).toBe(0);
    expect(s.some((x) => x.name === 'vllm:lora_requests_info')).toBe(false);
  });

  it("keeps an adapter's series while it is registered or still running, drops them after", async () => {
    const adapters = [{ name: 'kept', state: 'ready' }, { name: 'leaving', state: 'ready' }];
    const c = controlled({ running: 0, waiting: 0, runningAdapters: [], waitingAdapters: [], batchSize: 0, kvTokens: 0, kvCapacity: 1, tokensGenerated: 0, cancelled: 0 }, adapters);
    const m = new Metrics(() => c.source);
    for (const name of ['kept', 'leaving']) {
      const t = m.startGeneration(name);
      t.tokens(2);
      t.finish('stop');
    }
    m.requestFinished('leaving', 'length');
    const has = (s: Sample[], adapter: string) => s.some((x) => x.labels.adapter === adapter);
    expect(has(parseExposition(await m.scrape()), 'leaving')).toBe(true);
    adapters.pop(); // deleted, but a request on its old version still runs
    c.set({ running: 1, runningAdapters: ['leaving@1#4'] });
    expect(has(parseExposition(await m.scrape()), 'leaving')).toBe(true);
    c.set({ running: 0, runningAdapters: [] });
    const s = parseExposition(await m.scrape());
    expect(has(s, 'leaving')).toBe(false);
    expect(value(s, 'loraserve_generation_requests_total', { adapter: 'kept', finish_reason: 'stop' })).toBe(1);
  });
});

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describe('generation timing', () => {
  it('startGeneration: first token, time per output token, tokens and requests by adapter', async () => {
    const m = new Metrics(() => null);
    const t = m.startGeneration('alpha');
    await sleep(40);
    t.tokens();
    await sleep(30);
    t.tokens();
    await sleep(30);
    t.tokens(2);
    t.finish('stop');
    t.finish('length'); // ignored
    t.tokens(); // ignored
    const s = parseExposition(await m.scrape());
    const a = { adapter: 'alpha' };
    expect(value(s, 'loraserve_time_to_first_token_seconds_count', a)).toBe(1);
    expect(value(s, 'loraserve_time_to_first_token_seconds_sum', a)).toBeGreaterThanOrEqual(0.035);
    // 4 tokens, first to last ≈ 60 ms over 3 intervals
    expect(value(s, 'loraserve_time_per_output_token_seconds_count', a)).toBe(1);
    const tpot = value(s, 'loraserve_time_per_output_token_seconds_sum', a)!;
    expect(tpot).toBeGreaterThanOrEqual(0.055 / 3);
    expect(tpot).toBeLessThan(0.5);
    expect(value(s, 'loraserve_generation_tokens_total', a)).toBe(4);
    expect(value(s, 'loraserve_generation_requests_total', { adapter: 'alpha', finish_reason: 'stop' })).toBe(1);
    expect(value(s, 'loraserve_generation_requests_total', { adapter: 'alpha', finish_reason: 'length' })).toBeUndefined();
    expect(value(s, 'loraserve_generation_duration_seconds_count', a)).toBe(1);
  });

  it('the route observer: base-model label, TPOT from the first-token time', async () => {
    const m = new Metrics(() => null);
    const o = m.observer();
    o.firstToken?.(null, 0.2);
    const finished = o.finished as (adapter: string | null, tokens: number, seconds: number, result: { finishReason: string }, firstTokenSeconds?: number) => void;
    finished(null, 5, 1.0, { finishReason: 'length' }, 0.2);
    const s = parseExposition(await m.scrape());
    const b = { adapter: BASE_LABEL };
    expect(value(s, 'loraserve_time_to_first_token_seconds_sum', b)).toBeCloseTo(0.2, 12);
    expect(value(s, 'loraserve_time_per_output_token_seconds_sum', b)).toBeCloseTo((1.0 - 0.2) / 4, 12);
    expect(value(s, 'loraserve_generation_tokens_total', b)).toBe(5);
    expect(value(s, 'loraserve_generation_requests_total', { ...b, finish_reason: 'length' })).toBe(1);
  });
});

describe('HTTP accounting', () => {
  let app: FastifyInstance;
  let url: string;
  beforeAll(async () => {
    app = Fastify();
    await app.register(metricsPlugin, { source: () => null });
    app.get('/ok/:id', async () => ({ ok: true }));
    app.get('/fail', async (_req, reply) => reply.code(418).send({ no: true }));
    app.get('/stream', async (_req, reply) => {
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'text/event-stream' });
      for (let i = 0; i < 3; i++) {
        reply.raw.write(`data: ${i}\n\n`);
        await sleep(20);
      }
      reply.raw.end();
    });
    app.get('/hang', async (_req, reply) => {
      reply.hijack();
      reply.raw.writeHead(200, { 'content-type': 'text/event-stream' });
      reply.raw.write('data: first\n\n');
      // never ends: the client leaves
    });
    url = await app.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => {
    app.server.closeAllConnections();
    await app.close();
  });

  const scrape = async () => parseExposition(await (await fetch(`${url}/metrics`)).text());

  it('counts by method, route pattern and status; unmatched paths share one label', async () => {
    for (const id of ['1', '2', '3']) expect((await fetch(`${url}/ok/${id}`)).status).toBe(200);
    expect((await fetch(`${url}/fail`)).status).toBe(418);
    expect((await fetch(`${url}/nope/1`)).status).toBe(404);
    expect((await fetch(`${url}/nope/2`)).status).toBe(404);
    const s = await scrape();
    expect(value(s, 'loraserve_http_requests_total', { method: 'GET', route: '/ok/:id', status: '200' })).toBe(3);
    expect(value(s, 'loraserve_http_requests_total', { method: 'GET', route: '/fail', status: '418' })).toBe(1);
    expect(value(s, 'loraserve_http_requests_total', { method: 'GET', route: 'unmatched', status: '404' })).toBe(2);
    expect(value(s, 'loraserve_http_request_duration_seconds_count', { route: '/ok/:id' })).toBe(3);
    expect((await fetch(`${url}/metrics`)).headers.get('content-type')).toMatch(/^text\/plain; version=0\.0\.4/);
  });

  it('times a hijacked stream until its last byte, and counts a client that left as 499', async () => {
    const res = await fetch(`${url}/stream`);
    expect(await res.text()).toBe('data: 0\n\ndata: 1\n\ndata: 2\n\n');
    const ac = new AbortController();
    const hang = await fetch(`${url}/hang`, { signal: ac.signal });
    const reader = hang.body!.getReader();
    await reader.read();
    ac.abort();
    await reader.cancel().catch(() => undefined);
    let s = await scrape();
    for (let i = 0; i < 50 && value(s, 'loraserve_http_requests_total', { route: '/hang' }) === undefined; i++) {
      await sleep(20);
      s = await scrape();
    }
    expect(value(s, 'loraserve_http_requests_total', { route: '/stream', status: '200' })).toBe(1);
    expect(value(s, 'loraserve_http_request_duration_seconds_sum', { route: '/stream' })).toBeGreaterThanOrEqual(0.05);
    expect(value(s, 'loraserve_http_requests_total', { route: '/hang', status: '499' })).toBe(1);
  });
});

describe('the real app', () => {
  let tmp: string;
  let app: FastifyInstance;
  let url: string;

  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-metrics-'));
    const model = await ensureEmbeddedModel(path.join(tmp, 'model'));
    app = await buildApp(makeConfig({ MODEL_PATH: model, ADAPTER_DIR: path.join(tmp, 'adapters'), DEVICE: 'cpu', LOG_LEVEL: 'silent', MAX_BATCH: 4, MAX_ADAPTERS: 3 }));
    url = await app.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => {
    await app?.close();
    await rm(tmp, { recursive: true, force: true });
  });

  const scrape = async () => {
    const res = await app.inject({ method: 'GET', url: '/metrics' });
    expect(res.statusCode).toBe(200);
    return parseExposition(res.body);
  };

  it('counts what the responses report', async () => {
    const before = await scrape();
    const baseTokens = value(before, 'loraserve_generation_tokens_total', { adapter: BASE_LABEL }) ?? 0;
    const engineTokens = value(before, 'vllm:generation_tokens_total') ?? 0;
    let completion = 0;
    for (const seed of [1, 2]) {
      const res = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 'Once upon a time', max_tokens: 6, seed } });
      expect(res.statusCode).toBe(200);
      completion += (res.json() as { usage: { completion_tokens: number } }).usage.completion_tokens;
    }
    expect((await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 1 } })).statusCode).toBe(400);
    const s = await scrape();
    expect(value(s, 'loraserve_http_requests_total', { method: 'POST', route: '/v1/generate', status: '200' })).toBe(2);
    expect(value(s, 'loraserve_http_requests_total', { method: 'POST', route: '/v1/generate', status: '400' })).toBe(1);
    expect(value(s, 'loraserve_generation_tokens_total', { adapter: BASE_LABEL })! - baseTokens).toBe(completion);
    expect(value(s, 'vllm:generation_tokens_total')! - engineTokens).toBe(completion);
    expect(value(s, 'loraserve_time_to_first_token_seconds_count', { adapter: BASE_LABEL })).toBe(2);
    expect(value(s, 'vllm:num_requests_running')).toBe(0);
    // max_lora = min(MAX_BATCH, MAX_ADAPTERS)
    expect(s.find((x) => x.name === 'vllm:lora_requests_info')!.labels.max_lora).toBe('3');
  });

  it('shows a running stream and its adapter, then its cancellation', async () => {
    const manifest = app.runtime.manifest;
    const a = adapterBytes(manifest.architecture, { modelId: manifest.modelId, r: 4, targets: ['q_proj', 'v_proj'], seed: 3 });
    const up = await fetch(`${url}/v1/adapters`, { method: 'POST', body: filesForm('metrics-probe', a) });
    expect(up.status).toBe(201);
    let s = await scrape();
    expect(value(s, 'loraserve_adapters_loaded')).toBe(1);
    const cancelledBefore = value(s, 'loraserve_requests_cancelled_total') ?? 0;

    const ac = new AbortController();
    const res = await fetch(`${url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      // as long as the context allows: it must still run while we look
      body: JSON.stringify({ prompt: 'Once upon a time', adapter: 'metrics-probe', max_tokens: 100_000, seed: 5, stream: true }),
      signal: ac.signal,
    });
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    await reader.read(); // the first token has been generated
    s = await scrape();
    expect(value(s, 'vllm:num_requests_running')).toBe(1);
    expect(s.find((x) => x.name === 'vllm:lora_requests_info')!.labels.running_lora_adapters).toBe('metrics-probe');
    expect(value(s, 'vllm:gpu_cache_usage_perc')).toBeGreaterThan(0);
    ac.abort();
    await reader.cancel().catch(() => undefined);
    for (let i = 0; i < 100 && (value(s, 'vllm:num_requests_running') ?? 0) > 0; i++) {
      await sleep(20);
      s = await scrape();
    }
    expect(value(s, 'vllm:num_requests_running')).toBe(0);
    expect(value(s, 'loraserve_requests_cancelled_total')! - cancelledBefore).toBe(1);
    expect(value(s, 'loraserve_http_requests_total', { method: 'POST', route: '/v1/generate', status: '499' })).toBe(1);
  });

  it("removes a deleted adapter's series (20 deleted adapters leave none)", async () => {
    const manifest = app.runtime.manifest;
    const a = adapterBytes(manifest.architecture, { modelId: manifest.modelId, r: 2, targets: ['q_proj'], seed: 9 });
    const names = Array.from({ length: 20 }, (_, i) => `churn-${i}`);
    for (const name of names) {
      expect((await fetch(`${url}/v1/adapters`, { method: 'POST', body: filesForm(name, a) })).status).toBe(201);
      const gen = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 'Once', max_tokens: 2, adapter: name, seed: 1 } });
      expect(gen.statusCode).toBe(200);
      if (name === names[0]) {
        const s = await scrape();
        expect(value(s, 'loraserve_generation_requests_total', { adapter: name })).toBe(1);
        expect(value(s, 'loraserve_time_to_first_token_seconds_count', { adapter: name })).toBe(1);
      }
      expect((await app.inject({ method: 'DELETE', url: `/v1/adapters/${name}` })).statusCode).toBe(204);
    }
    const s = await scrape();
    const left = s.filter((x) => x.labels.adapter?.startsWith('churn-'));
    expect(left.map((x) => `${x.name}{${x.labels.adapter}}`)).toEqual([]);
    // the base model's series stay
    expect(value(s, 'loraserve_generation_tokens_total', { adapter: BASE_LABEL })).toBeGreaterThan(0);
  }, 120_000);
});
