import type { ChildProcess } from 'node:child_process';
import { readFile, readdir, rm, mkdtemp } from 'node:fs/promises';
import { request } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { readArchitecture } from '../src/model/checkpoint/index.js';
import type { Architecture } from '../src/model/architecture.js';
import { adapterBytes, filesForm, form, sha256, type AdapterBytes } from './helpers/adapter-uploads.js';
import { killServer, startServer as startServerProcess, type ServerProcess } from './helpers/serve-process.js';
import { waitFor } from './helpers/wait-for.js';

/**
 * Replicas behind a load balancer: three real server processes (`node bin/loraserve.js serve`)
 * share one ADAPTER_DIR with ADAPTER_STORE=shared. An adapter uploaded through one is served by
 * the others (loaded on demand, validated against their own model); replace and delete propagate
 * through the background sync; concurrent creates of one name give exactly one 201; a replica
 * killed with SIGKILL in the middle of an upload leaves the others serving and the store whole,
 * and its leftovers are removed once its lease runs out, while a live replica's slow upload,
 * older than the lease, is left alone. Outputs are compared by the logprobs of greedy decoding:
 * the same model and adapter on the same machine give the same numbers.
 */

const SYNC_MS = 250;
const LEASE_MS = 2000;

let tmp: string;
let model: string;
let adapterDir: string;
let cacheDir: string;
let arch: Architecture;
let modelId: string;
const children = new Set<ChildProcess>();
const servers: ServerProcess[] = [];

async function startReplica(env: Record<string, string> = {}): Promise<ServerProcess> {
  const s = await startServerProcess({
    MODEL_PATH: model,
    ADAPTER_DIR: adapterDir,
    ADAPTER_STORE: 'shared',
    ADAPTER_SYNC_MS: String(SYNC_MS),
    ADAPTER_LEASE_MS: String(LEASE_MS),
    MAX_ADAPTERS: '0',
    CACHE_DIR: cacheDir,
    DEVICE: 'cpu',
    LOG_LEVEL: 'warn',
    ...env,
  });
  children.add(s.child);
  void s.exited.then(() => children.delete(s.child));
  return s;
}

interface Generated {
  status: number;
  body: { tokens?: number[]; logprobs?: { logprob: number }[]; errors?: unknown[]; detail?: string };
}

async function generate(s: ServerProcess, adapter: string | null, maxTokens = 6): Promise<Generated> {
  const res = await fetch(`${s.url}/v1/generate`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ prompt: 'Once upon a time', ...(adapter ? { adapter } : {}), max_tokens: maxTokens, temperature: 0, logprobs: 0 }),
  });
  return { status: res.status, body: (await res.json()) as Generated['body'] };
}

interface Output {
  tokens: number[];
  logprobs: number[];
}

/** What greedy decoding gives: token ids and their logprobs. */
async function output(s: ServerProcess, adapter: string | null): Promise<Output> {
  const g = await generate(s, adapter);
  expect(g.status, JSON.stringify(g.body)).toBe(200);
  return { tokens: g.body.tokens!, logprobs: g.body.logprobs!.map((l) => l.logprob) };
}

/**
 * One model and adapter version give the same tokens and (up to float rounding: requests batched
 * together run other matrix shapes) the same logprobs; another adapter moves them far more.
 */
const same = (a: Output, b: Output) => JSON.stringify(a.tokens) === JSON.stringify(b.tokens) && a.logprobs.every((l, i) => Math.abs(l - b.logprobs[i]!) < 1e-4);
const expectSame = (a: Output, b: Output) => expect(same(a, b), `${JSON.stringify(a)} vs ${JSON.stringify(b)}`).toBe(true);

async function upload(s: ServerProcess, name: string, a: AdapterBytes, method: 'POST' | 'PUT' = 'POST'): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(method === 'POST' ? `${s.url}/v1/adapters` : `${s.url}/v1/adapters/${name}`, { method, body: filesForm(method === 'POST' ? name : null, a) });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

async function detail(s: ServerProcess, name: string): Promise<{ status: number; body: { state?: string; loaded?: boolean; version?: number; sha256?: { weights: string } } }> {
  const res = await fetch(`${s.url}/v1/adapters/${name}`);
  return { status: res.status, body: (await res.json()) as never };
}

async function metric(s: ServerProcess, name: string): Promise<number> {
  const text = await (await fetch(`${s.url}/metrics`)).text();
  const line = text.split('\n').find((l) => l.startsWith(`${name} `));
  return line ? Number(line.split(' ')[1]) : NaN;
}

/** Every pointer names a complete version whose files match its meta.json; returns what is wrong. */
async function storeProblems(): Promise<string[]> {
  const problems: string[] = [];
  for (const name of await readdir(path.join(adapterDir, '.names'))) {
    const pointer = JSON.parse(await readFile(path.join(adapterDir, '.names', name), 'utf8')) as { ref: string };
    const dir = path.join(adapterDir, '.versions', pointer.ref);
    try {
      const meta = JSON.parse(await readFile(path.join(dir, 'meta.json'), 'utf8')) as { name: string; files: Record<string, { sha256: string }> };
      if (meta.name !== name) problems.push(`${name}: meta names ${meta.name}`);
      for (const [f, d] of Object.entries(meta.files)) {
        const got = sha256(await readFile(path.join(dir, f)));
        if (got !== d.sha256) problems.push(`${name}/${f}: sha256 ${got} ≠ ${d.sha256}`);
      }
    } catch (e) {
      problems.push(`${name}: ${(e as Error).message}`);
    }
  }
  return problems;
}

const versionDirs = async () => (await readdir(path.join(adapterDir, '.versions'))).sort();
const workEntries = async () => (await readdir(path.join(adapterDir, '.work'))).sort();

/** A multipart upload sent through a raw request, so that the test decides when each byte goes. */
function rawUpload(s: ServerProcess, name: string, a: AdapterBytes): Promise<{ body: Uint8Array; type: string; req: ReturnType<typeof request>; answer: Promise<number> }> {
  const fd = form([['name', name], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors']]);
  const response = new Response(fd);
  const type = response.headers.get('content-type')!;
  return response.arrayBuffer().then((buf) => {
    const body = new Uint8Array(buf);
    const req = request(`${s.url}/v1/adapters`, { method: 'POST', headers: { 'content-type': type, 'content-length': body.length } });
    const answer = new Promise<number>((resolve) => {
      req.on('response', (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      });
      req.on('error', () => resolve(-1));
    });
    return { body, type, req, answer };
  });
}

let A: ServerProcess;
let B: ServerProcess;
let C: ServerProcess;
let v1: AdapterBytes;
let v2: AdapterBytes;

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-replicas-'));
  model = await ensureEmbeddedModel(path.join(tmp, 'model'));
  adapterDir = path.join(tmp, 'adapters');
  cacheDir = path.join(tmp, 'cache');
  ({ architecture: arch, modelId } = await readArchitecture(model));
  v1 = adapterBytes(arch, { modelId, seed: 11, targets: ['q_proj', 'v_proj', 'o_proj'], alpha: 64 });
  v2 = adapterBytes(arch, { modelId, seed: 12, targets: ['q_proj', 'v_proj', 'o_proj'], alpha: 64, r: 4 });
  // the first start builds the graph into the cache; the others then take it from there
  A = await startReplica();
  [B, C] = await Promise.all([startReplica(), startReplica({ MAX_LOADED_ADAPTERS: '1' })]);
  servers.push(A, B, C);
}, 240_000);

afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  await rm(tmp, { recursive: true, force: true });
});

describe('three replicas sharing one ADAPTER_DIR (ADAPTER_STORE=shared)', () => {
  let v1Output: Output;

  it('an adapter uploaded through A is served by B and C, loaded on demand; the output is the same on every replica', async () => {
    const base = await output(A, null);
    expect((await upload(A, 'shared', v1)).status).toBe(201);
    v1Output = await output(A, 'shared');
    expect(same(v1Output, base), 'the adapter changes the output').toBe(false);

    // B has not loaded it: GET looks it up in the store, then the first request validates and loads it
    const before = await detail(B, 'shared');
    expect(before.status).toBe(200);
    expect(before.body.loaded).toBe(false);
    expectSame(await output(B, 'shared'), v1Output);
    expectSame(await output(C, 'shared'), v1Output);
    const after = await detail(B, 'shared');
    expect([after.body.state, after.body.loaded]).toEqual(['ready', true]);
    expect(await metric(B, 'loraserve_adapter_loads_total')).toBe(1);
    expect(await metric(B, 'loraserve_adapters_loaded')).toBe(1);
  }, 120_000);

  it('concurrent requests for an adapter a replica does not hold wait for one load', async () => {
    expect((await upload(B, 'burst', v2)).status).toBe(201);
    const loads = await metric(A, 'loraserve_adapter_loads_total');
    const outs = await Promise.all(Array.from({ length: 5 }, () => output(A, 'burst')));
    const onB = await output(B, 'burst');
    for (const o of outs) expectSame(o, onB);
    expect(await metric(A, 'loraserve_adapter_loads_total')).toBe(loads + 1);
    expect(await metric(A, 'loraserve_adapter_load_seconds_count')).toBe(loads + 1);
  }, 120_000);

  it('MAX_LOADED_ADAPTERS=1 on C: the least recently used idle adapter is unloaded and reloaded on demand, with the same output', async () => {
    const loads = await metric(C, 'loraserve_adapter_loads_total');
    const evictions = await metric(C, 'loraserve_adapter_evictions_total');
    const burst = await output(C, 'burst');
    expectSame(await output(C, 'shared'), v1Output);
    expectSame(await output(C, 'burst'), burst);
    expect(await metric(C, 'loraserve_adapter_loads_total')).toBe(loads + 3);
    expect(await metric(C, 'loraserve_adapter_evictions_total')).toBe(evictions + 3);
    expect(await metric(C, 'loraserve_adapters_loaded')).toBe(1);
    expect(await metric(C, 'loraserve_adapters_stored')).toBe(2);
    const list = (await (await fetch(`${C.url}/v1/adapters`)).json()) as { adapters: { name: string; loaded: boolean }[] };
    expect(list.adapters.map((a) => [a.name, a.loaded])).toEqual([
      ['burst', true],
      ['shared', false],
    ]);
  }, 120_000);

  it('a replace through B is served in its new version by A and C within ADAPTER_SYNC_MS', async () => {
    const put = await upload(B, 'shared', v2, 'PUT');
    expect(put.status).toBe(200);
    expect(put.body.version).toBe(2);
    const v2Output = await output(B, 'shared');
    expect(same(v2Output, v1Output)).toBe(false);
    for (const s of [A, C]) {
      await waitFor('the replace to reach the replica', async () => (await detail(s, 'shared')).body.version === 2, 10_000);
      expectSame(await output(s, 'shared'), v2Output);
      expect((await detail(s, 'shared')).body.sha256!.weights).toBe(sha256(v2.weights));
    }
    // the old version's files are gone from the store; one version per name is left
    expect((await versionDirs()).filter((d) => d.startsWith('shared@'))).toHaveLength(1);
  }, 120_000);

  it('a request running on A when a replace through B reaches it finishes on the version it started with', async () => {
    const maxTokens = 400;
    const reference = await generate(A, 'shared', maxTokens);
    expect(reference.status).toBe(200);
    const v2Output = await output(B, 'shared');
    const res = await fetch(`${A.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', adapter: 'shared', max_tokens: maxTokens, temperature: 0, stream: true }),
    });
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    const decoder = new TextDecoder();
    let text = '';
    let ended = false;
    const pump = (async () => {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        text += decoder.decode(value, { stream: true });
        if (text.includes('event: done')) ended = true;
      }
    })();
    await waitFor('the first token', () => text.includes('"token"'));
    expect((await upload(B, 'shared', v1, 'PUT')).status).toBe(200);
    await waitFor('the replace to reach A', async () => (await detail(A, 'shared')).body.version === 3, 10_000);
    expect(ended, 'the stream ended before the replace reached A: make it longer').toBe(false);
    await pump;
    const tokens = [...text.matchAll(/"token":(\d+)/g)].map((m) => Number(m[1]));
    expect(tokens).toEqual(reference.body.tokens);
    // new requests get the new version
    expect(same(await output(A, 'shared'), v2Output)).toBe(false);
    expectSame(await output(A, 'shared'), v1Output);
  }, 120_000);

  it('a delete through C answers 404 on A and B within ADAPTER_SYNC_MS', async () => {
    const res = await fetch(`${C.url}/v1/adapters/burst`, { method: 'DELETE' });
    expect(res.status).toBe(204);
    for (const s of [A, B]) {
      await waitFor('the delete to reach the replica', async () => (await generate(s, 'burst')).status === 404, 10_000);
      expect((await detail(s, 'burst')).status).toBe(404);
    }
    expect((await fetch(`${A.url}/v1/adapters/burst`, { method: 'DELETE' })).status).toBe(404);
    expect((await versionDirs()).filter((d) => d.startsWith('burst@'))).toEqual([]);
  }, 60_000);

  it('concurrent creates of one name through the three replicas: exactly one 201, the others 409; one version stored', async () => {
    for (let round = 0; round < 3; round++) {
      const name = `race-${round}`;
      const results = await Promise.all([A, B, C, A, B, C].map((s, i) => upload(s, name, adapterBytes(arch, { modelId, seed: 100 + i }))));
      const statuses = results.map((r) => r.status).sort();
      expect(statuses).toEqual([201, 409, 409, 409, 409, 409]);
      expect((await versionDirs()).filter((d) => d.startsWith(`${name}@`))).toHaveLength(1);
      // every replica serves the winner, with one output
      const winner = results.find((r) => r.status === 201)!.body as { sha256: { weights: string } };
      for (const s of [A, B, C]) {
        await waitFor('the winner to be listed', async () => (await detail(s, name)).body.sha256?.weights === winner.sha256.weights, 10_000);
      }
      const outs = await Promise.all([A, B, C].map((s) => output(s, name)));
      for (const o of outs) expectSame(o, outs[0]!);
    }
    expect(await storeProblems()).toEqual([]);
  }, 180_000);

  it('GET /v1/adapters pages through the store by name', async () => {
    const seen: string[] = [];
    let after: string | null = null;
    for (let i = 0; i < 10; i++) {
      const q: string = after === null ? '?limit=2' : `?limit=2&after=${encodeURIComponent(after)}`;
      const page = (await (await fetch(`${B.url}/v1/adapters${q}`)).json()) as { adapters: { name: string }[]; next: string | null };
      expect(page.adapters.length).toBeLessThanOrEqual(2);
      seen.push(...page.adapters.map((a) => a.name));
      after = page.next;
      if (after === null) break;
    }
    expect(seen).toEqual(['race-0', 'race-1', 'race-2', 'shared']);
    expect((await fetch(`${B.url}/v1/adapters?limit=0`)).status).toBe(400);
  }, 30_000);

  it("a live replica's slow upload, older than the lease, is left alone by the others' clean-up and completes", async () => {
    const slow = adapterBytes(arch, { modelId, seed: 40 });
    const u = await rawUpload(B, 'slow', slow);
    const steps = 10;
    const chunk = Math.ceil(u.body.length / steps);
    // 2.5 leases long
    for (let i = 0; i < steps; i++) {
      u.req.write(u.body.subarray(i * chunk, Math.min((i + 1) * chunk, u.body.length)));
      await new Promise((r) => setTimeout(r, (LEASE_MS * 2.5) / steps));
    }
    u.req.end();
    expect(await u.answer).toBe(201);
    expect((await generate(C, 'slow')).status).toBe(200);
  }, 60_000);

  it('SIGKILL of one replica mid-upload: the others keep serving, the store stays whole, the leftovers go once the lease runs out', async () => {
    const big = adapterBytes(arch, { modelId, seed: 41, targets: ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'], r: 16 });
    const u = await rawUpload(A, 'half', big);
    u.req.write(u.body.subarray(0, Math.floor(u.body.length * 0.6)));
    await waitFor('an upload folder on disk', async () => (await workEntries()).some((e) => e.startsWith('upload-')), 10_000);
    const before = await workEntries();
    await killServer(A);
    u.req.destroy();
    // the others serve, while A's leftovers are still there
    expectSame(await output(B, 'shared'), await output(C, 'shared'));
    expect((await upload(C, 'after-crash', v1)).status).toBe(201);
    expectSame(await output(B, 'after-crash'), v1Output);
    expect(before.length).toBeGreaterThan(0);
    await waitFor("the dead replica's upload folder to be removed", async () => (await workEntries()).length === 0, 20_000);
    expect(await storeProblems()).toEqual([]);
    expect((await detail(B, 'half')).status).toBe(404);
    // every version folder is referenced by a pointer
    const refs = await Promise.all((await readdir(path.join(adapterDir, '.names'))).map(async (n) => (JSON.parse(await readFile(path.join(adapterDir, '.names', n), 'utf8')) as { ref: string }).ref));
    expect(await versionDirs()).toEqual(refs.sort());
    // a restarted replica serves everything in the store
    A = await startReplica();
    expectSame(await output(A, 'after-crash'), v1Output);
  }, 120_000);
});
