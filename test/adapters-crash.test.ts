import type { ChildProcess } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, stat, writeFile } from 'node:fs/promises';
import { request } from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { encodeSafetensors, readHeader, readTensorBytes, toFloat32, type TensorToWrite } from '../src/adapters/safetensors.js';
import type { PausePoint } from '../src/adapters/store.js';
import type { Architecture } from '../src/model/architecture.js';
import { adapterBytes, filesForm, form, listing, sha256, type AdapterBytes } from './helpers/adapter-uploads.js';
import { killServer, startServer as startServerProcess, type ServerProcess } from './helpers/serve-process.js';
import { waitFor } from './helpers/wait-for.js';

/**
 * Crash safety with the real server process (`node bin/loraserve.js serve`), killed with SIGKILL:
 *   - in the middle of an upload (half of a large multipart body sent),
 *   - in the middle of a replace, at each point of the store's swap (held there by the test-only
 *     LORASERVE_TEST_PAUSE=<point>:<ms> hook, see src/adapters/store.ts),
 * then restarted: the store holds the old or the new version whole, never a mix, and no temp
 * entry. Finally the base model is switched to one whose q_proj has other dimensions: the stored
 * adapter is listed `incompatible` with its report, generation with it is 409, and it is still on
 * disk (serving the first model again makes it ready).
 */

let tmp: string;
let modelA: string;
let modelB: string;
let adapterDir: string;
let cacheDir: string;
let arch: Architecture;
let v1: AdapterBytes;
let v2: AdapterBytes;
const children = new Set<ChildProcess>();

/** the real CLI on a free port (test/helpers/serve-process.ts), tracked so afterAll can kill leftovers */
async function startServer(env: Record<string, string>): Promise<ServerProcess> {
  const server = await startServerProcess({ ADAPTER_DIR: adapterDir, CACHE_DIR: cacheDir, DEVICE: 'cpu', LOG_LEVEL: 'warn', ...env });
  children.add(server.child);
  void server.exited.then(() => children.delete(server.child));
  return server;
}

/** Which version ADAPTER_DIR/keep holds: 'v1', 'v2', or a description of anything else. */
async function storedVersion(): Promise<string> {
  const dir = path.join(adapterDir, 'keep');
  const config = await readFile(path.join(dir, 'adapter_config.json')).catch(() => null);
  const weights = await readFile(path.join(dir, 'adapter_model.safetensors')).catch(() => null);
  const meta = JSON.parse(await readFile(path.join(dir, 'meta.json'), 'utf8').catch(() => 'null')) as { files: Record<string, { sha256: string }> } | null;
  for (const [label, v] of [['v1', v1], ['v2', v2]] as const) {
    if (config?.equals(v.config) && weights?.equals(v.weights) && meta?.files['adapter_model.safetensors']!.sha256 === sha256(v.weights) && meta.files['adapter_config.json']!.sha256 === sha256(v.config)) return label;
  }
  return `a mix or nothing: config ${config ? sha256(config).slice(0, 8) : 'missing'}, weights ${weights ? sha256(weights).slice(0, 8) : 'missing'}, meta ${meta ? meta.files['adapter_model.safetensors']!.sha256.slice(0, 8) : 'missing'}`;
}

const hiddenEntries = async () => (await readdir(adapterDir)).filter((e) => e.startsWith('.'));

async function generate(s: ServerProcess, adapter: string): Promise<{ status: number; body: Record<string, unknown> }> {
  const res = await fetch(`${s.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'Once upon a time', adapter, max_tokens: 4, temperature: 0 }) });
  return { status: res.status, body: (await res.json()) as Record<string, unknown> };
}

/** A copy of model A with 4 attention heads instead of 8: q_proj is [32, 64], o_proj [64, 32]. */
async function writeNarrowModel(from: string, to: string): Promise<void> {
  await mkdir(to, { recursive: true });
  for (const f of ['tokenizer.json', 'tokenizer_config.json']) await copyFile(path.join(from, f), path.join(to, f));
  const config = JSON.parse(await readFile(path.join(from, 'config.json'), 'utf8')) as Record<string, unknown>;
  const heads = (config.num_attention_heads as number) / 2;
  const headDim = config.head_dim as number;
  await writeFile(path.join(to, 'config.json'), JSON.stringify({ ...config, num_attention_heads: heads }, null, 2));
  const file = path.join(from, 'model.safetensors');
  const { header } = await readHeader(file);
  const tensors: TensorToWrite[] = [];
  for (const t of header!.tensors) {
    let data = toFloat32('F32', await readTensorBytes(file, header!, t));
    let shape = t.shape;
    if (t.name.endsWith('q_proj.weight')) {
      shape = [heads * headDim, t.shape[1]!];
      data = data.slice(0, shape[0]! * shape[1]!);
    } else if (t.name.endsWith('o_proj.weight')) {
      const [rows, cols] = t.shape as [number, number];
      shape = [rows, heads * headDim];
      const out = new Float32Array(rows * shape[1]!);
      for (let r = 0; r < rows; r++) out.set(data.subarray(r * cols, r * cols + shape[1]!), r * shape[1]!);
      data = out;
    }
    tensors.push({ name: t.name, dtype: 'F32', shape, data });
  }
  await writeFile(path.join(to, 'model.safetensors'), encodeSafetensors(tensors, header!.metadata));
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-adapters-crash-'));
  modelA = await ensureEmbeddedModel(path.join(tmp, 'model-a'));
  modelB = path.join(tmp, 'model-b');
  await writeNarrowModel(modelA, modelB);
  adapterDir = path.join(tmp, 'adapters');
  cacheDir = path.join(tmp, 'cache');
  const config = JSON.parse(await readFile(path.join(modelA, 'config.json'), 'utf8')) as Record<string, number>;
  arch = {
    family: 'llama',
    hiddenSize: config.hidden_size!,
    intermediateSize: config.intermediate_size!,
    numLayers: config.num_hidden_layers!,
    numHeads: config.num_attention_heads!,
    numKvHeads: config.num_key_value_heads!,
    headDim: config.head_dim!,
    vocabSize: config.vocab_size!,
    maxPositions: config.max_position_embeddings!,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeLayout: 'rotate_half',
    tieWordEmbeddings: false,
    attentionBias: false,
    bosTokenId: null,
    eosTokenIds: [],
  };
  v1 = adapterBytes(arch, { modelId: 'model-a', seed: 1, targets: ['q_proj', 'v_proj'] });
  v2 = adapterBytes(arch, { modelId: 'model-a', seed: 2, targets: ['q_proj', 'v_proj'], r: 4 });
});

afterAll(async () => {
  for (const c of children) c.kill('SIGKILL');
  await rm(tmp, { recursive: true, force: true });
});

describe('SIGKILL during writes, then restart', () => {
  let server: ServerProcess;

  it('killed in the middle of an upload: after restart no temp folder is left and the stored adapter is intact', async () => {
    server = await startServer({ MODEL_PATH: modelA });
    const created = await fetch(`${server.url}/v1/adapters`, { method: 'POST', body: filesForm('keep', v1) });
    expect(created.status).toBe(201);
    const before = await listing(adapterDir);

    // a 6 MB upload of which a little over half is sent, slowly (the zeros after the adapter make it large)
    const big = adapterBytes(arch, { modelId: 'model-a', seed: 3 });
    const fd = form([['name', 'half'], ['config', big.config, 'adapter_config.json'], ['weights', Buffer.concat([big.weights, Buffer.alloc(6 << 20)]), 'adapter_model.safetensors']]);
    const response = new Response(fd);
    const type = response.headers.get('content-type')!;
    const body = new Uint8Array(await response.arrayBuffer());
    const req = request(`${server.url}/v1/adapters`, { method: 'POST', headers: { 'content-type': type, 'content-length': body.length } });
    req.on('error', () => undefined);
    const half = Math.floor(body.length * 0.55);
    for (let off = 0; off < half; off += 256 * 1024) {
      req.write(body.subarray(off, Math.min(off + 256 * 1024, half)));
      await new Promise((r) => setTimeout(r, 20));
    }
    // the server is now streaming the weights part into its upload folder
    await waitFor('a partial upload on disk', async () => {
      for (const e of await hiddenEntries()) {
        const parts = await readdir(path.join(adapterDir, e)).catch(() => []);
        for (const p of parts) if ((await stat(path.join(adapterDir, e, p))).size > 1 << 20) return true;
      }
      return false;
    });
    await killServer(server);
    req.destroy();
    expect((await hiddenEntries()).length, 'the kill left the upload folder behind').toBeGreaterThan(0);

    server = await startServer({ MODEL_PATH: modelA, LORASERVE_TEST_PAUSE: 'mid-write:120000' });
    expect(await hiddenEntries()).toEqual([]);
    expect(await listing(adapterDir)).toEqual(before);
    const list = (await (await fetch(`${server.url}/v1/adapters`)).json()) as { adapters: { name: string; state: string }[] };
    expect(list.adapters.map((a) => [a.name, a.state])).toEqual([['keep', 'ready']]);
  });

  const points: [PausePoint, 'v1' | 'v2'][] = [
    ['mid-write', 'v1'],
    ['before-swap', 'v1'],
    ['mid-swap', 'v1'],
    ['after-swap', 'v2'],
  ];
  points.forEach(([point, survivor], i) => {
    it(`killed during a replace at ${point}: after restart the store holds ${survivor} whole, no temp entry`, async () => {
      // `server` was started with LORASERVE_TEST_PAUSE=<point>:120000 by the previous step
      expect(await storedVersion()).toBe('v1');
      const put = fetch(`${server.url}/v1/adapters/keep`, { method: 'PUT', body: filesForm(null, v2) }).catch(() => null);
      await waitFor(`the server to hold at ${point}`, () => server.output().includes(`holding at ${point}`));
      await killServer(server);
      await put;
      const next = points[i + 1];
      server = await startServer({ MODEL_PATH: modelA, ...(next ? { LORASERVE_TEST_PAUSE: `${next[0]}:120000` } : {}) });
      expect(await hiddenEntries()).toEqual([]);
      expect(await storedVersion()).toBe(survivor);
      const got = (await (await fetch(`${server.url}/v1/adapters/keep`)).json()) as { state: string; sha256: { weights: string } };
      expect(got.state).toBe('ready');
      expect(got.sha256.weights).toBe(sha256((survivor === 'v1' ? v1 : v2).weights));
      expect((await generate(server, 'keep')).status).toBe(200);
    });
  });

  it('a base model with other dimensions: the adapter is listed incompatible with its report, generation → 409, the files stay', async () => {
    await killServer(server);
    const before = await listing(adapterDir);
    server = await startServer({ MODEL_PATH: modelB });
    const list = (await (await fetch(`${server.url}/v1/adapters`)).json()) as { adapters: { name: string; state: string; errors: { code: string }[] }[] };
    expect(list.adapters.map((a) => [a.name, a.state])).toEqual([['keep', 'incompatible']]);
    const detail = (await (await fetch(`${server.url}/v1/adapters/keep`)).json()) as { state: string; report: { ok: boolean; errors: { code: string; tensor?: string }[] }; sha256: { weights: string } };
    expect(detail.state).toBe('incompatible');
    expect(detail.report.ok).toBe(false);
    const mismatched = detail.report.errors.filter((e) => e.code === 'shape_mismatch').map((e) => e.tensor);
    expect(mismatched.length).toBeGreaterThan(0);
    expect(mismatched.every((t) => /q_proj\.lora_B/.test(t ?? ''))).toBe(true);
    expect(detail.sha256.weights).toBe(sha256(v2.weights));
    const gen = await generate(server, 'keep');
    expect(gen.status).toBe(409);
    expect((gen.body.errors as { code: string }[]).some((e) => e.code === 'shape_mismatch')).toBe(true);
    expect(await listing(adapterDir)).toEqual(before);
    await killServer(server);

    server = await startServer({ MODEL_PATH: modelA });
    const back = (await (await fetch(`${server.url}/v1/adapters/keep`)).json()) as { state: string };
    expect(back.state).toBe('ready');
    expect((await generate(server, 'keep')).status).toBe(200);
    await killServer(server);
  });
});
