import { execFile } from 'node:child_process';
import { mkdir, readFile, readdir, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { promisify } from 'node:util';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import type { Architecture } from '../src/model/architecture.js';
import { adapterBytes, adapterEntries, filesForm, form, gzip, listing, packTar, packZip, sha256, type AdapterBytes } from './helpers/adapter-uploads.js';
import { startEmbeddedApp, type EmbeddedApp } from './helpers/embedded-app.js';

/**
 * The adapter API over real HTTP against the embedded default model: upload as PEFT files, .tar,
 * .tar.gz and .zip; list, get, replace, delete, validate; the seed's shape mismatch; MAX_ADAPTERS.
 * inject() for plain requests, a listening server + fetch for archives and streams.
 */

let server: EmbeddedApp;
let tmp: string;
let adapterDir: string;
let app: FastifyInstance;
let url: string;
let arch: Architecture;
let modelId: string;

beforeAll(async () => {
  server = await startEmbeddedApp('adapters-http');
  ({ app, url, tmp, adapterDir } = server);
  arch = app.runtime.manifest.architecture;
  modelId = app.runtime.manifest.modelId;
});

afterAll(async () => {
  await server?.close();
});

const make = (spec: Omit<Parameters<typeof adapterBytes>[1], 'modelId'> = {}) => adapterBytes(arch, { modelId, ...spec });

async function upload(fd: FormData, method: 'POST' | 'PUT' = 'POST', pathname = '/v1/adapters') {
  const res = await app.inject({ method, url: pathname, payload: fd });
  return { status: res.statusCode, type: String(res.headers['content-type']), headers: res.headers, body: res.json() as Record<string, unknown> };
}

async function send(fd: FormData, method: 'POST' | 'PUT' = 'POST', pathname = '/v1/adapters') {
  const res = await fetch(url + pathname, { method, body: fd });
  return { status: res.status, type: String(res.headers.get('content-type')), body: (await res.json()) as Record<string, unknown> };
}

const list = async () => (await app.inject({ method: 'GET', url: '/v1/adapters' })).json() as { adapters: { name: string; state: string; version: number }[] };

/** What the API must report for an adapter: computed from the bytes and the config, not by the server. */
function expectSummary(body: Record<string, unknown>, a: AdapterBytes, name: string): void {
  const cfg = JSON.parse(a.config.toString()) as { r: number; lora_alpha: number; target_modules: string[] };
  expect(body).toMatchObject({
    name,
    state: 'ready',
    sha256: { config: sha256(a.config), weights: sha256(a.weights) },
    bytes: { config: a.config.byteLength, weights: a.weights.byteLength, total: a.config.byteLength + a.weights.byteLength },
    r: cfg.r,
    loraAlpha: cfg.lora_alpha,
    errors: [],
  });
  const layers = Array.from({ length: arch.numLayers }, (_, i) => i);
  expect(body.targets).toEqual(cfg.target_modules.map((projection) => ({ projection, layers, ranks: [cfg.r], scales: [cfg.lora_alpha / cfg.r] })));
  expect((body.modules as unknown[]).length).toBe(arch.numLayers * cfg.target_modules.length);
}

async function storedBytes(name: string): Promise<AdapterBytes> {
  return {
    config: await readFile(path.join(adapterDir, name, 'adapter_config.json')),
    weights: await readFile(path.join(adapterDir, name, 'adapter_model.safetensors')),
  };
}

describe('upload as PEFT files', () => {
  it('POST → 201 with the summary; listed; GET shows ranks, scales, targets and the report; the files are stored byte for byte', async () => {
    const a = make({ seed: 11 });
    const res = await upload(filesForm('plain', a));
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    expect(res.headers.location).toBe('/v1/adapters/plain');
    expectSummary(res.body, a, 'plain');
    expect((await list()).adapters.map((x) => x.name)).toContain('plain');
    const got = await app.inject({ method: 'GET', url: '/v1/adapters/plain' });
    expect(got.statusCode).toBe(200);
    const detail = got.json() as Record<string, unknown> & { report: { ok: boolean; modules: unknown[] } };
    expectSummary(detail, a, 'plain');
    expect(detail.report.ok).toBe(true);
    expect(detail.report.modules).toHaveLength(arch.numLayers * 2);
    const stored = await storedBytes('plain');
    expect(stored.config.equals(a.config) && stored.weights.equals(a.weights)).toBe(true);
    const meta = JSON.parse(await readFile(path.join(adapterDir, 'plain', 'meta.json'), 'utf8')) as { files: Record<string, { sha256: string }> };
    expect(meta.files['adapter_model.safetensors']!.sha256).toBe(sha256(a.weights));
  });

  it('per-module ranks and scales follow rank_pattern and use_rslora (alpha/√r)', async () => {
    const a = make({ seed: 12, r: 8, alpha: 16, targets: ['q_proj', 'v_proj'], config: { rank_pattern: { q_proj: 4 }, use_rslora: true } });
    const res = await upload(filesForm('patterned', a));
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    const modules = res.body.modules as { module: string; rank: number; scale: number; rankKey: string }[];
    for (const m of modules) {
      const isQ = m.module.endsWith('q_proj');
      expect(m.rank).toBe(isQ ? 4 : 8);
      expect(m.rankKey).toBe(isQ ? 'q_proj' : 'r');
      expect(m.scale).toBeCloseTo(16 / Math.sqrt(isQ ? 4 : 8), 12);
    }
  });

  it('field names alone (config/weights) or file names alone identify the two files', async () => {
    const a = make({ seed: 13 });
    const byField = await upload(form([['name', 'by-field'], ['config', a.config, 'cfg.json'], ['weights', a.weights, 'w.st']]));
    expect(byField.status, JSON.stringify(byField.body)).toBe(201);
    const byFilename = await upload(form([['name', 'by-filename'], ['file1', a.config, 'adapter_config.json'], ['file2', a.weights, 'adapter_model.safetensors']]));
    expect(byFilename.status, JSON.stringify(byFilename.body)).toBe(201);
  });

  it('POST of a taken name → 409 and the stored adapter is untouched', async () => {
    const a = make({ seed: 14 });
    expect((await upload(filesForm('taken', a))).status).toBe(201);
    const before = await listing(adapterDir);
    const res = await upload(filesForm('taken', make({ seed: 15 })));
    expect(res.status).toBe(409);
    expect(res.type).toMatch(/^application\/problem\+json/);
    expect(res.body.title).toBe('Adapter Exists');
    // `name` after the files: refused after the upload instead of before it, same answer
    const b = make({ seed: 15 });
    const nameLast = await upload(form([['config', b.config, 'adapter_config.json'], ['weights', b.weights, 'adapter_model.safetensors'], ['name', 'taken']]));
    expect(nameLast.status).toBe(409);
    expect(await listing(adapterDir)).toEqual(before);
  });

  it('two concurrent POSTs of one name: one 201, one 409', async () => {
    const [x, y] = await Promise.all([send(filesForm('race', make({ seed: 16 }))), send(filesForm('race', make({ seed: 17 })))]);
    expect([x.status, y.status].sort()).toEqual([201, 409]);
  });

  it('a POST without `name` → 400 naming it', async () => {
    const res = await upload(filesForm(null, make()));
    expect(res.status).toBe(400);
    expect(res.body.detail).toMatch(/`name`/);
  });
});

describe('upload as an archive of the folder (real server, streamed)', () => {
  const cases: [string, (a: AdapterBytes) => Promise<[Uint8Array, string]>][] = [
    ['tar, files at the top', async (a) => [await packTar(adapterEntries(a)), 'adapter.tar']],
    ['tar.gz, folder nested one level', async (a) => [gzip(await packTar([{ name: 'my-adapter', type: 'directory' }, ...adapterEntries(a, 'my-adapter')])), 'adapter.tar.gz']],
    ['tgz with ./ prefixes', async (a) => [gzip(await packTar(adapterEntries(a, '.'))), 'adapter.tgz']],
    ['zip, folder nested one level', async (a) => [packZip(adapterEntries(a, 'checkpoint-100')), 'adapter.zip']],
    ['zip, files at the top, extra files ignored', async (a) => [packZip([...adapterEntries(a), { name: 'README.md', data: Buffer.from('# my adapter') }]), 'adapter.zip']],
  ];
  cases.forEach(([label, build], i) => {
    it(`${label} → 201 with the same digests as the files`, async () => {
      const a = make({ seed: 100 + i });
      const [bytes, filename] = await build(a);
      const res = await send(form([['name', `arch-${i}`], ['archive', bytes, filename]]));
      expect(res.status, JSON.stringify(res.body)).toBe(201);
      expectSummary(res.body, a, `arch-${i}`);
      const stored = await storedBytes(`arch-${i}`);
      expect(stored.config.equals(a.config) && stored.weights.equals(a.weights)).toBe(true);
    });
  });

  const tarBin = process.platform !== 'win32';
  it.skipIf(!tarBin)('a .tar.gz made by the system `tar -czf x.tgz -C dir .` → 201', async () => {
    const a = make({ seed: 120 });
    const dir = path.join(tmp, 'tar-src');
    await mkdir(dir, { recursive: true });
    await writeFile(path.join(dir, 'adapter_config.json'), a.config);
    await writeFile(path.join(dir, 'adapter_model.safetensors'), a.weights);
    await writeFile(path.join(dir, 'README.md'), 'trained with PEFT');
    const out = path.join(tmp, 'sys.tgz');
    try {
      await promisify(execFile)('tar', ['-czf', out, '-C', dir, '.']);
    } catch (e) {
      console.warn(`system tar unavailable (${(e as Error).message}); SKIPPING the system-tar case`);
      return;
    }
    const res = await send(form([['name', 'sys-tar'], ['archive', await readFile(out), 'adapter.tgz']]));
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    expectSummary(res.body, a, 'sys-tar');
  });

  it('an archive with two adapter folders → 400 naming both', async () => {
    const a = make();
    const res = await send(form([['name', 'two'], ['archive', packZip([...adapterEntries(a, 'x'), ...adapterEntries(a, 'y')]), 'two.zip']]));
    expect(res.status).toBe(400);
    expect(res.body.detail).toMatch(/x\/.*y\//);
  });

  it('an archive without adapter_config.json → 422 missing_file', async () => {
    const a = make();
    const res = await send(form([['name', 'nocfg'], ['archive', await packTar([{ name: 'adapter_model.safetensors', data: a.weights }]), 'a.tar']]));
    expect(res.status).toBe(422);
    expect((res.body.errors as { code: string; file: string }[])[0]).toMatchObject({ code: 'missing_file', file: 'adapter_config.json' });
  });
});

describe('the seed case: lora_B of q_proj trained on a narrower model', () => {
  it('→ 422 with shape_mismatch for every such tensor; nothing stored; the list unchanged', async () => {
    const narrow = arch.numHeads * arch.headDim - 16;
    const a = make({
      seed: 21,
      tensors: (ts) => ts.map((t) => (/q_proj\.lora_B/.test(t.name) ? { ...t, shape: [narrow, t.shape[1]!], data: t.data.slice(0, narrow * t.shape[1]!) } : t)),
    });
    const beforeDisk = await listing(adapterDir);
    const beforeList = await list();
    const res = await upload(filesForm('seed-case', a));
    expect(res.status).toBe(422);
    expect(res.type).toMatch(/^application\/problem\+json/);
    const errors = res.body.errors as { code: string; tensor?: string; expected?: unknown; actual?: unknown }[];
    const mismatched = errors.filter((e) => e.code === 'shape_mismatch').map((e) => e.tensor);
    const want = Array.from({ length: arch.numLayers }, (_, i) => `base_model.model.model.layers.${i}.self_attn.q_proj.lora_B.weight`);
    expect(mismatched.sort()).toEqual(want.sort());
    const first = errors.find((e) => e.code === 'shape_mismatch')!;
    expect(first.expected).toEqual([arch.numHeads * arch.headDim, 8]);
    expect(first.actual).toEqual([narrow, 8]);
    expect(res.body.warnings).toBeInstanceOf(Array);
    expect((res.body.report as { ok: boolean }).ok).toBe(false);
    expect(await listing(adapterDir)).toEqual(beforeDisk);
    expect(await list()).toEqual(beforeList);
    expect((await app.inject({ method: 'GET', url: '/v1/adapters/seed-case' })).statusCode).toBe(404);
  });
});

describe('validate: a dry run that stores nothing', () => {
  it('200 with the report when it fits, 422 with it when not; ADAPTER_DIR and the list unchanged', async () => {
    const beforeDisk = await listing(adapterDir);
    const beforeList = await list();
    const ok = await upload(filesForm('dry', make({ seed: 31 })), 'POST', '/v1/adapters/validate');
    expect(ok.status, JSON.stringify(ok.body)).toBe(200);
    expect(ok.body).toMatchObject({ ok: true, errors: [] });
    expect((ok.body.modules as unknown[]).length).toBe(arch.numLayers * 2);
    const bad = await upload(filesForm(null, make({ seed: 32, r: 8, config: { r: 4 } })), 'POST', '/v1/adapters/validate');
    expect(bad.status).toBe(422);
    expect((bad.body.errors as { code: string }[]).some((e) => e.code === 'rank_mismatch')).toBe(true);
    expect(await listing(adapterDir)).toEqual(beforeDisk);
    expect(await list()).toEqual(beforeList);
  });
});

describe('replace, generate, delete', () => {
  async function generate(adapter: string | null, maxTokens: number): Promise<{ status: number; tokens: number[]; body: Record<string, unknown> }> {
    const res = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: 'Once upon a time', adapter, max_tokens: maxTokens, temperature: 0 } });
    const body = res.json() as Record<string, unknown>;
    return { status: res.statusCode, tokens: (body.tokens as number[]) ?? [], body };
  }

  it('PUT replaces atomically (200, version 2); a stream that started on version 1 finishes on version 1', async () => {
    const v1 = make({ seed: 41, targets: ['q_proj', 'v_proj', 'o_proj', 'down_proj'], alpha: 64 });
    const v2 = make({ seed: 42, targets: ['q_proj', 'v_proj', 'o_proj', 'down_proj'], alpha: 64 });
    expect((await upload(filesForm('swap', v1))).status).toBe(201);
    const maxTokens = 300;
    const base = await generate(null, maxTokens);
    const onV1 = await generate('swap', maxTokens);
    expect(onV1.status, JSON.stringify(onV1.body)).toBe(200);
    expect(onV1.tokens).toHaveLength(maxTokens);
    expect(onV1.tokens, 'the adapter changes the output').not.toEqual(base.tokens);

    // start a stream on version 1, replace while it runs
    const res = await fetch(`${url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'Once upon a time', adapter: 'swap', max_tokens: maxTokens, temperature: 0, stream: true }) });
    expect(res.status).toBe(200);
    const reader = res.body!.getReader();
    const first = await reader.read();
    expect(first.done).toBe(false);
    const put = await send(filesForm(null, v2), 'PUT', '/v1/adapters/swap');
    expect(put.status, JSON.stringify(put.body)).toBe(200);
    expect(put.body).toMatchObject({ name: 'swap', version: 2, sha256: { weights: sha256(v2.weights) } });
    let text = Buffer.from(first.value!).toString();
    for (let r = await reader.read(); !r.done; r = await reader.read()) text += Buffer.from(r.value).toString();
    const events = text.split('\n\n').filter(Boolean);
    const tokens = events.filter((e) => !e.startsWith('event:')).map((e) => (JSON.parse(e.slice('data: '.length)) as { token: number | null }).token).filter((t): t is number => t !== null);
    expect(events.at(-1)).toMatch(/^event: done/);
    expect(tokens, 'the running stream kept version 1').toEqual(onV1.tokens);

    const onV2 = await generate('swap', maxTokens);
    expect(onV2.status).toBe(200);
    expect(onV2.tokens, 'new requests get version 2').not.toEqual(onV1.tokens);
    const stored = await storedBytes('swap');
    expect(stored.weights.equals(v2.weights)).toBe(true);
    expect((await readdir(adapterDir)).filter((e) => e.startsWith('.'))).toEqual([]);
  });

  it('PUT of a new name creates it (201); a `name` field that differs from the URL → 400', async () => {
    const created = await upload(filesForm(null, make({ seed: 43 })), 'PUT', '/v1/adapters/put-new');
    expect(created.status, JSON.stringify(created.body)).toBe(201);
    expect(created.body).toMatchObject({ name: 'put-new', version: 1 });
    const mismatch = await upload(filesForm('other', make({ seed: 44 })), 'PUT', '/v1/adapters/put-new');
    expect(mismatch.status).toBe(400);
  });

  it('DELETE → 204; then GET 404, generation 404, the folder gone; a second DELETE 404', async () => {
    expect((await upload(filesForm('doomed', make({ seed: 51 })))).status).toBe(201);
    expect((await generate('doomed', 2)).status).toBe(200);
    const del = await app.inject({ method: 'DELETE', url: '/v1/adapters/doomed' });
    expect(del.statusCode).toBe(204);
    expect((await app.inject({ method: 'GET', url: '/v1/adapters/doomed' })).statusCode).toBe(404);
    const gen = await generate('doomed', 2);
    expect(gen.status).toBe(404);
    expect(await readdir(adapterDir)).not.toContain('doomed');
    const again = await app.inject({ method: 'DELETE', url: '/v1/adapters/doomed' });
    expect(again.statusCode).toBe(404);
    expect(String(again.headers['content-type'])).toMatch(/^application\/problem\+json/);
  });
});

describe('MAX_ADAPTERS', () => {
  it('one more than the limit → 409 "Adapter Limit Reached"; a replace still works; after a delete there is room', async () => {
    const dir = path.join(tmp, 'limited');
    const limited = await buildApp(makeConfig({ MODEL_PATH: path.join(tmp, 'model'), ADAPTER_DIR: dir, CACHE_DIR: path.join(tmp, 'cache'), DEVICE: 'cpu', LOG_LEVEL: 'silent', MAX_ADAPTERS: 2 }));
    try {
      const post = async (name: string, seed: number, method: 'POST' | 'PUT' = 'POST') => {
        const res = await limited.inject({ method, url: method === 'POST' ? '/v1/adapters' : `/v1/adapters/${name}`, payload: filesForm(method === 'POST' ? name : null, make({ seed })) });
        return { status: res.statusCode, body: res.json() as Record<string, unknown> };
      };
      expect((await post('one', 1)).status).toBe(201);
      expect((await post('two', 2)).status).toBe(201);
      const third = await post('three', 3);
      expect(third.status).toBe(409);
      expect(third.body).toMatchObject({ title: 'Adapter Limit Reached', limit: 2, count: 2 });
      expect((await post('three', 3, 'PUT')).status).toBe(409);
      expect((await post('two', 4, 'PUT')).status).toBe(200);
      expect((await limited.inject({ method: 'DELETE', url: '/v1/adapters/one' })).statusCode).toBe(204);
      expect((await post('three', 3)).status).toBe(201);
      expect((await readdir(dir)).sort()).toEqual(['three', 'two']);
    } finally {
      await limited.close();
    }
  });
});
