import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdir, mkdtemp, readFile, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { CreateBucketCommand, S3Client } from '@aws-sdk/client-s3';
import S3rver from 's3rver';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { NameTakenError, NotStoredError, type AdapterMeta } from '../src/adapters/store.js';
import { S3Store, parseS3Url } from '../src/adapters/s3-store.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { readArchitecture } from '../src/model/checkpoint/index.js';
import { adapterBytes, filesForm, sha256, type AdapterBytes } from './helpers/adapter-uploads.js';
import { versionMeta, writeStagedFiles } from './helpers/stored-versions.js';
import { freePort, startServer as startServerProcess, type ServerProcess } from './helpers/serve-process.js';

/**
 * The S3 backend (ADAPTER_DIR=s3://bucket/prefix) against S3-compatible servers the test starts:
 *   - s3rver (npm, a devDependency): always. It ignores If-None-Match on PUT, so it cannot show
 *     that concurrent creates have one winner; the store's probe must say so, and that test is
 *     skipped loudly for it.
 *   - moto's server (`moto_server`, when it is on PATH; not from the npm or Debian registries, so
 *     not installed by the project): it honours If-None-Match: *, and the conditional create is
 *     tested there. Skipped loudly when absent.
 * Two real server processes share one bucket through s3rver: upload through one, generate through
 * the other; replace and delete propagate.
 */

let tmp: string;
let s3rver: S3rver;
let s3rverEndpoint: string;
const children = new Set<ChildProcess>();
const stores: S3Store[] = [];

const CREDS = { AWS_ACCESS_KEY_ID: 'S3RVER', AWS_SECRET_ACCESS_KEY: 'S3RVER', AWS_REGION: 'us-east-1' };
for (const [k, v] of Object.entries(CREDS)) process.env[k] ??= v;

const sha = (b: Buffer | string) => sha256(typeof b === 'string' ? Buffer.from(b) : b);
async function stage(config: string, weights: Buffer): Promise<string> {
  return writeStagedFiles(await mkdtemp(path.join(tmp, 'staged-')), config, weights);
}
const metaFor = (name: string, version: number, config: string, weights: Buffer): AdapterMeta => versionMeta(name, version, config, weights);

async function openStore(endpoint: string, url: string, leaseMs = 60_000): Promise<S3Store> {
  const { store } = await S3Store.open({ url, endpoint, region: 'us-east-1', cacheDir: await mkdtemp(path.join(tmp, 'cache-')), leaseMs });
  stores.push(store);
  return store;
}

async function createBucket(endpoint: string, bucket: string): Promise<void> {
  const c = new S3Client({ endpoint, forcePathStyle: true, region: 'us-east-1' });
  await c.send(new CreateBucketCommand({ Bucket: bucket }));
  c.destroy();
}

/** moto's server from PATH on a free port, or null (with the reason printed) when there is none. */
async function startMoto(): Promise<{ endpoint: string; child: ChildProcess } | null> {
  if (spawnSync('sh', ['-c', 'command -v moto_server']).status !== 0) {
    console.warn('SKIPPED: moto_server is not on PATH; the conditional create (If-None-Match: *) is not tested against a server that honours it');
    return null;
  }
  const port = await freePort();
  const child = spawn('moto_server', ['-H', '127.0.0.1', '-p', String(port)], { stdio: 'ignore' });
  children.add(child);
  const endpoint = `http://127.0.0.1:${port}`;
  for (let i = 0; i < 100; i++) {
    try {
      await fetch(endpoint);
      return { endpoint, child };
    } catch {
      await new Promise((r) => setTimeout(r, 100));
    }
  }
  console.warn('SKIPPED: moto_server did not start');
  return null;
}

beforeAll(async () => {
  tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-s3-'));
  await mkdir(path.join(tmp, 's3rver'));
  s3rver = new S3rver({ address: '127.0.0.1', port: 0, silent: true, directory: path.join(tmp, 's3rver'), configureBuckets: [{ name: 'adapters', configs: [] }] });
  const { port } = await s3rver.run();
  s3rverEndpoint = `http://127.0.0.1:${port}`;
});

afterAll(async () => {
  for (const s of stores) await s.close();
  for (const c of children) c.kill('SIGKILL');
  await s3rver?.close();
  await rm(tmp, { recursive: true, force: true });
});

describe('parseS3Url', () => {
  it('splits bucket and prefix; refuses what is not s3://bucket[/prefix]', () => {
    expect(parseS3Url('s3://adapters/team/a/')).toEqual({ bucket: 'adapters', prefix: 'team/a' });
    expect(parseS3Url('s3://adapters')).toEqual({ bucket: 'adapters', prefix: '' });
    for (const bad of ['./data/adapters', 's3://', 's3://A_B/x', 'http://x/y']) expect(parseS3Url(bad), bad).toBeNull();
  });
});

describe('S3Store against s3rver (npm)', () => {
  it('create, replace, delete: immutable versions under a switched pointer; the versions are read back whole', async () => {
    const store = await openStore(s3rverEndpoint, 's3://adapters/store-test');
    const [c1, w1, c2, w2] = ['{"v":1}', Buffer.from('one'.repeat(5000)), '{"v":2}', Buffer.from('two'.repeat(7000))] as const;
    const a = await store.create(metaFor('alpha', 1, c1, w1), await stage(c1, w1));
    if (store.conditionalWrites) await expect(store.create(metaFor('alpha', 1, c2, w2), await stage(c2, w2))).rejects.toBeInstanceOf(NameTakenError);
    // a second store (another replica) reads it through the pointer and downloads it
    const other = await openStore(s3rverEndpoint, 's3://adapters/store-test');
    const seen = await other.find('alpha');
    expect(seen?.meta?.files['adapter_model.safetensors'].sha256).toBe(sha(w1));
    expect(await other.verify(seen!)).toEqual([]);
    expect(await readFile(path.join(seen!.dir, 'adapter_model.safetensors'))).toEqual(w1);

    const b = await store.replace(metaFor('alpha', 2, c2, w2), await stage(c2, w2));
    expect(b.ref).not.toBe(a.ref);
    expect((await other.refs()).get('alpha')).toBe(b.ref);
    const next = await other.find('alpha');
    expect(await other.verify(next!)).toEqual([]);
    expect(await readFile(path.join(next!.dir, 'adapter_model.safetensors'))).toEqual(w2);
    await store.delete('alpha');
    expect(await other.find('alpha')).toBeNull();
    await expect(other.delete('alpha')).rejects.toBeInstanceOf(NotStoredError);
    expect(await other.collect()).toEqual([]);
  });

  it('the probe finds that s3rver ignores If-None-Match on PUT (so the README does not claim unique names on it)', async () => {
    const store = await openStore(s3rverEndpoint, 's3://adapters/probe-test');
    // s3rver 3.7.1 reads If-None-Match on GET only; if a newer one honours it on PUT, update the README
    expect(store.conditionalWrites).toBe(false);
  });

  it('a version whose writer died (no pointer, lease run out) is removed by the clean-up; a referenced one stays', async () => {
    const url = 's3://adapters/gc-test';
    const store = await openStore(s3rverEndpoint, url, 200);
    const c = '{"v":1}';
    const w = Buffer.from('x'.repeat(1000));
    await store.create(metaFor('kept', 1, c, w), await stage(c, w));
    // what a crash between the version's objects and the pointer leaves
    const c2 = new S3Client({ endpoint: s3rverEndpoint, forcePathStyle: true, region: 'us-east-1' });
    const { PutObjectCommand } = await import('@aws-sdk/client-s3');
    await c2.send(new PutObjectCommand({ Bucket: 'adapters', Key: 'gc-test/versions/orphan@1-dead/adapter_config.json', Body: c }));
    c2.destroy();
    await new Promise((r) => setTimeout(r, 1200));
    await store.collect();
    const lister = new S3Client({ endpoint: s3rverEndpoint, forcePathStyle: true, region: 'us-east-1' });
    const { ListObjectsV2Command } = await import('@aws-sdk/client-s3');
    const keys = ((await lister.send(new ListObjectsV2Command({ Bucket: 'adapters', Prefix: 'gc-test/' }))).Contents ?? []).map((o) => o.Key!);
    lister.destroy();
    expect(keys.filter((k) => k.includes('orphan@'))).toEqual([]);
    expect(keys.filter((k) => k.includes('/versions/kept@')).length).toBe(3);
    const other = await openStore(s3rverEndpoint, url);
    expect(await other.verify((await other.find('kept'))!)).toEqual([]);
    expect(await other.collect()).toEqual([]);
  });
});

describe('conditional create (If-None-Match: *) against moto_server, when on PATH', () => {
  let moto: { endpoint: string; child: ChildProcess } | null = null;
  beforeAll(async () => {
    moto = await startMoto();
    if (moto) await createBucket(moto.endpoint, 'adapters');
  });

  it('concurrent creates of one name through two stores: exactly one wins, the other gets NameTakenError and leaves no version', async (ctx) => {
    if (!moto) {
      console.warn('SKIPPED: no S3 server that honours If-None-Match: * (moto_server not on PATH)');
      ctx.skip();
      return;
    }
    const [s1, s2] = [await openStore(moto.endpoint, 's3://adapters/race'), await openStore(moto.endpoint, 's3://adapters/race')];
    expect(s1.conditionalWrites).toBe(true);
    for (let i = 0; i < 5; i++) {
      const name = `n${i}`;
      const [c1, w1, c2, w2] = [`{"a":${i}}`, Buffer.from(`a${i}`.repeat(900)), `{"b":${i}}`, Buffer.from(`b${i}`.repeat(900))] as const;
      const results = await Promise.allSettled([s1.create(metaFor(name, 1, c1, w1), await stage(c1, w1)), s2.create(metaFor(name, 1, c2, w2), await stage(c2, w2))]);
      expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
      expect((results.find((r) => r.status === 'rejected') as PromiseRejectedResult).reason).toBeInstanceOf(NameTakenError);
      const entry = await s2.find(name);
      expect(await s2.verify(entry!)).toEqual([]);
    }
    // no version without a pointer is left behind
    expect(await s1.collect()).toEqual([]);
  });
});

describe('two real server processes sharing one bucket (s3rver)', () => {
  let A: ServerProcess;
  let B: ServerProcess;
  let v1: AdapterBytes;
  let v2: AdapterBytes;

  async function startReplica(): Promise<ServerProcess> {
    const s = await startServerProcess({
      MODEL_PATH: path.join(tmp, 'model'),
      ADAPTER_DIR: 's3://adapters/replicas',
      S3_ENDPOINT: s3rverEndpoint,
      ...CREDS,
      ADAPTER_SYNC_MS: '250',
      CACHE_DIR: path.join(tmp, `cache-${children.size}`),
      DEVICE: 'cpu',
      LOG_LEVEL: 'warn',
    });
    children.add(s.child);
    return s;
  }
  const generate = async (s: ServerProcess, adapter: string) => {
    const res = await fetch(`${s.url}/v1/generate`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ prompt: 'Once upon a time', adapter, max_tokens: 5, temperature: 0 }) });
    return { status: res.status, body: (await res.json()) as { tokens?: number[] } };
  };

  beforeAll(async () => {
    const model = await ensureEmbeddedModel(path.join(tmp, 'model'));
    const { architecture, modelId } = await readArchitecture(model);
    v1 = adapterBytes(architecture, { modelId, seed: 21, alpha: 64 });
    v2 = adapterBytes(architecture, { modelId, seed: 22, alpha: 64, r: 4 });
    A = await startReplica();
    B = await startReplica();
  }, 180_000);

  it('upload through A, generate through B; replace through B reaches A; delete through A reaches B', async () => {
    const created = await fetch(`${A.url}/v1/adapters`, { method: 'POST', body: filesForm('s3-adapter', v1) });
    expect(created.status).toBe(201);
    const onA = await generate(A, 's3-adapter');
    const onB = await generate(B, 's3-adapter');
    expect(onB.status).toBe(200);
    expect(onB.body.tokens).toEqual(onA.body.tokens);

    const put = await fetch(`${B.url}/v1/adapters/s3-adapter`, { method: 'PUT', body: filesForm(null, v2) });
    expect(put.status).toBe(200);
    const deadline = Date.now() + 10_000;
    let detail: { version?: number; sha256?: { weights: string } } = {};
    while (Date.now() < deadline) {
      detail = (await (await fetch(`${A.url}/v1/adapters/s3-adapter`)).json()) as typeof detail;
      if (detail.version === 2) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    expect(detail.version).toBe(2);
    expect(detail.sha256!.weights).toBe(sha256(v2.weights));
    expect((await generate(A, 's3-adapter')).body.tokens).toEqual((await generate(B, 's3-adapter')).body.tokens);

    expect((await fetch(`${A.url}/v1/adapters/s3-adapter`, { method: 'DELETE' })).status).toBe(204);
    let status = 0;
    for (let i = 0; i < 100 && status !== 404; i++) {
      status = (await generate(B, 's3-adapter')).status;
      if (status !== 404) await new Promise((r) => setTimeout(r, 100));
    }
    expect(status).toBe(404);
  }, 120_000);
});
