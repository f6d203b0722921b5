import { createHash } from 'node:crypto';
import { cp, mkdir, mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AdapterStore, NameTakenError, NotStoredError, adapterNameProblem, pauseHookFromEnv, type AdapterMeta, type PausePoint } from '../src/adapters/store.js';
import { SharedFolderStore } from '../src/adapters/shared-folder.js';
import { AdapterRegistry, type AdapterEngine } from '../src/adapters/registry.js';
import type { AdapterWeights } from '../src/adapters/convert.js';
import { HttpProblem } from '../src/http/problem.js';
import { makeConfig } from '../src/config.js';
import { createLogger } from '../src/logger.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { startRuntime, type Runtime } from '../src/runtime.js';
import { adapterBytes, type AdapterBytes } from './helpers/adapter-uploads.js';
import { versionMeta, writeStagedFiles } from './helpers/stored-versions.js';

/**
 * The on-disk store alone: atomic create/replace/delete and recovery. Each crash point is
 * simulated by copying ADAPTER_DIR while a write is held at that point (what a SIGKILL there
 * would leave), then opening a store on the copy. test/adapters-crash.test.ts does the same with
 * a real server process and SIGKILL.
 */

let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'loraserve-store-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

let n = 0;
const fresh = async (label: string) => {
  const d = path.join(root, `${label}-${n++}`);
  await mkdir(d, { recursive: true });
  return d;
};

const sha = (b: Buffer | string) => createHash('sha256').update(b).digest('hex');

interface Version {
  config: string;
  weights: Buffer;
}
const versionA: Version = { config: '{"r": 4, "v": "A"}', weights: Buffer.from('AAAA-weights-'.repeat(1000)) };
const versionB: Version = { config: '{"r": 8, "v": "B"}', weights: Buffer.from('BBBB-other-weights-'.repeat(3000)) };

async function stage(v: Version): Promise<string> {
  return writeStagedFiles(await fresh('staged'), v.config, v.weights);
}

function metaFor(name: string, version: number, v: Version): AdapterMeta {
  return versionMeta(name, version, v.config, v.weights, { note: `version ${version}` });
}

/** What the store holds under `name`: 'A', 'B', 'absent', or a description of a mix. */
async function holds(dir: string, name: string): Promise<string> {
  const entries = await readdir(dir);
  if (!entries.includes(name)) return 'absent';
  const config = await readFile(path.join(dir, name, 'adapter_config.json'), 'utf8').catch(() => null);
  const weights = await readFile(path.join(dir, name, 'adapter_model.safetensors')).catch(() => null);
  const meta = JSON.parse(await readFile(path.join(dir, name, 'meta.json'), 'utf8').catch(() => 'null')) as AdapterMeta | null;
  for (const [label, v, ver] of [['A', versionA, 1], ['B', versionB, 2]] as const) {
    if (config === v.config && weights?.equals(v.weights) && meta?.version === ver && meta.files['adapter_model.safetensors'].sha256 === sha(v.weights)) return label;
  }
  return `mix: config=${config}, weights=${weights?.byteLength}, meta=${meta?.version}`;
}

const hidden = async (dir: string) => (await readdir(dir)).filter((e) => e.startsWith('.'));

describe('adapter names', () => {
  it('accepts [a-zA-Z0-9._-]{1,64} without a leading dot', () => {
    for (const ok of ['a', 'my-adapter_v1.2', 'A'.repeat(64), 'x..y', '0']) expect(adapterNameProblem(ok), ok).toBeNull();
  });
  it('refuses traversal, absolute, empty, long and odd names, each with a reason', () => {
    for (const bad of ['', '.', '..', '../x', '/etc', 'a/b', 'a\\b', '.hidden', 'A'.repeat(65), 'sp ace', 'ü', 'a\0b', '.tmp-x', '.old-a']) {
      expect(adapterNameProblem(bad), JSON.stringify(bad)).toMatch(/adapter name/);
    }
  });
});

describe('AdapterStore', () => {
  it('creates a version whole: the two files, meta.json with their sha256 and sizes, no temp left', async () => {
    const dir = await fresh('store');
    const { store, recovered } = await AdapterStore.open(dir);
    expect(recovered).toEqual([]);
    await store.create(metaFor('alpha', 1, versionA), await stage(versionA));
    expect(await holds(dir, 'alpha')).toBe('A');
    expect(await readdir(dir)).toEqual(['alpha']);
    const [entry] = await store.list();
    expect(entry!.meta!.files['adapter_model.safetensors']).toEqual({ bytes: versionA.weights.byteLength, sha256: sha(versionA.weights) });
    expect(await store.verify(entry!)).toEqual([]);
    await expect(store.create(metaFor('alpha', 1, versionB), await stage(versionB))).rejects.toThrow(/exists/);
    expect(await holds(dir, 'alpha')).toBe('A');
    expect(await hidden(dir)).toEqual([]);
  });

  it('digest() computes what an independent sha256 of the bytes gives', async () => {
    const { store } = await AdapterStore.open(await fresh('store'));
    const d = await stage(versionB);
    expect(await store.digest(d)).toEqual(metaFor('x', 1, versionB).files);
  });

  it('replaces and deletes atomically, leaving no temp entries', async () => {
    const dir = await fresh('store');
    const { store } = await AdapterStore.open(dir);
    await store.create(metaFor('alpha', 1, versionA), await stage(versionA));
    await store.replace(metaFor('alpha', 2, versionB), await stage(versionB));
    expect(await holds(dir, 'alpha')).toBe('B');
    expect(await readdir(dir)).toEqual(['alpha']);
    await store.delete('alpha');
    expect(await readdir(dir)).toEqual([]);
    // replace of an absent name creates it
    await store.replace(metaFor('beta', 2, versionB), await stage(versionB));
    expect(await holds(dir, 'beta')).toBe('B');
  });

  it('a replace that fails while writing leaves the old version and no temp folder', async () => {
    const dir = await fresh('store');
    const { store } = await AdapterStore.open(dir);
    await store.create(metaFor('alpha', 1, versionA), await stage(versionA));
    const broken = await stage(versionB);
    await rm(path.join(broken, 'adapter_model.safetensors'));
    await expect(store.replace(metaFor('alpha', 2, versionB), broken)).rejects.toThrow();
    expect(await holds(dir, 'alpha')).toBe('A');
    expect(await hidden(dir)).toEqual([]);
  });

  it('verify() names a file whose bytes no longer match meta.json, and a folder without meta.json', async () => {
    const dir = await fresh('store');
    const { store } = await AdapterStore.open(dir);
    await store.create(metaFor('alpha', 1, versionA), await stage(versionA));
    await writeFile(path.join(dir, 'alpha', 'adapter_model.safetensors'), Buffer.from('tampered'));
    const diffs = await store.verify(await store.read('alpha'));
    expect(diffs).toHaveLength(1);
    expect(diffs[0]).toMatch(/adapter_model\.safetensors is 8 bytes/);
    await mkdir(path.join(dir, 'copied-in'));
    const copied = await store.read('copied-in');
    expect(copied.meta).toBeNull();
    expect(copied.metaError).toMatch(/meta\.json is missing/);
  });

  it('recovery: removes temp, upload and deleted folders; completes a finished swap; rolls back a half swap', async () => {
    const dir = await fresh('store');
    const { store } = await AdapterStore.open(dir);
    await store.create(metaFor('done', 1, versionA), await stage(versionA));
    await store.create(metaFor('half', 1, versionA), await stage(versionA));
    // a finished swap: `.old-done` (version A) beside the new `done`
    await cp(path.join(dir, 'done'), path.join(dir, '.old-done'), { recursive: true });
    await rm(path.join(dir, 'done'), { recursive: true });
    await store.create(metaFor('done', 2, versionB), await stage(versionB));
    // a half swap: `half` moved aside, its replacement never renamed in
    await cp(path.join(dir, 'half'), path.join(dir, '.old-half'), { recursive: true });
    await rm(path.join(dir, 'half'), { recursive: true });
    await mkdir(path.join(dir, '.tmp-1234'));
    await writeFile(path.join(dir, '.tmp-1234', 'adapter_config.json'), versionB.config);
    await mkdir(path.join(dir, '.upload-5678'));
    await mkdir(path.join(dir, '.del-9'));
    await writeFile(path.join(dir, '.DS_Store'), 'not ours');
    await writeFile(path.join(dir, 'README.txt'), 'not an adapter');

    const { store: reopened, recovered } = await AdapterStore.open(dir);
    expect(recovered.map((r) => `${r.entry}: ${r.action}`).sort()).toEqual(
      ['.del-9: removed deleted', '.old-done: completed swap', '.old-half: rolled back swap', '.tmp-1234: removed temp', '.upload-5678: removed temp'].sort(),
    );
    expect(await holds(dir, 'done')).toBe('B');
    expect(await holds(dir, 'half')).toBe('A');
    expect((await readdir(dir)).sort()).toEqual(['.DS_Store', 'README.txt', 'done', 'half']);
    expect((await reopened.list()).map((e) => e.name)).toEqual(['done', 'half']);
  });

  describe('a crash at each point of a write leaves the old or the new version whole', () => {
    /**
     * Holds the write at `point`, copies ADAPTER_DIR there (the state a SIGKILL would leave),
     * lets the write finish, then recovers the copy.
     */
    async function crashAt(point: PausePoint, op: 'create' | 'replace'): Promise<{ snapshotHolds: string; leftovers: string[]; liveHolds: string }> {
      const dir = await fresh('live');
      const snapshot = path.join(await fresh('snap'), 'adapters');
      let reached = false;
      const { store } = await AdapterStore.open(dir, {
        pause: async (at) => {
          if (at !== point) return;
          reached = true;
          await cp(dir, snapshot, { recursive: true });
        },
      });
      if (op === 'replace') {
        const { store: plain } = await AdapterStore.open(dir);
        await plain.create(metaFor('alpha', 1, versionA), await stage(versionA));
        await store.replace(metaFor('alpha', 2, versionB), await stage(versionB));
      } else {
        await store.create(metaFor('alpha', 2, versionB), await stage(versionB));
      }
      expect(reached, `the write passed ${point}`).toBe(true);
      await AdapterStore.open(snapshot);
      return { snapshotHolds: await holds(snapshot, 'alpha'), leftovers: await hidden(snapshot), liveHolds: await holds(dir, 'alpha') };
    }

    const expectations: [PausePoint, 'create' | 'replace', string][] = [
      ['mid-write', 'create', 'absent'],
      ['before-swap', 'create', 'absent'],
      ['mid-write', 'replace', 'A'],
      ['before-swap', 'replace', 'A'],
      ['mid-swap', 'replace', 'A'],
      ['after-swap', 'replace', 'B'],
    ];
    for (const [point, op, want] of expectations) {
      it(`${op}, crash at ${point} → ${want}`, async () => {
        const r = await crashAt(point, op);
        expect(r.snapshotHolds).toBe(want);
        expect(r.leftovers).toEqual([]);
        expect(r.liveHolds).toBe('B');
      });
    }
  });

  it('the test-only pause hook reads LORASERVE_TEST_PAUSE=<point>:<ms> and nothing else', async () => {
    expect(pauseHookFromEnv({}).pause).toBeUndefined();
    expect(pauseHookFromEnv({ LORASERVE_TEST_PAUSE: 'nonsense' }).pause).toBeUndefined();
    const hook = pauseHookFromEnv({ LORASERVE_TEST_PAUSE: 'mid-swap:30' });
    const t0 = Date.now();
    await hook.pause!('before-swap', 'x');
    expect(Date.now() - t0).toBeLessThan(25);
    await hook.pause!('mid-swap', 'x');
    expect(Date.now() - t0).toBeGreaterThanOrEqual(28);
  });
});

describe('AdapterRegistry with the real engine', () => {
  let runtime: Runtime;
  let good: AdapterBytes;
  const loads: string[] = [];
  const unloads: string[] = [];
  /** the real engine, with a record of what the registry asked of it */
  let engine: AdapterEngine;

  beforeAll(async () => {
    const model = await ensureEmbeddedModel(path.join(root, 'model'));
    const config = makeConfig({ MODEL_PATH: model, CACHE_DIR: path.join(root, 'cache'), ADAPTER_DIR: path.join(root, 'runtime-adapters'), DEVICE: 'cpu', LOG_LEVEL: 'silent' });
    runtime = await startRuntime(config, createLogger(config));
    good = adapterBytes(runtime.manifest.architecture, { modelId: runtime.manifest.modelId, seed: 5 });
    engine = {
      loadAdapter: (id: string, w: AdapterWeights) => {
        loads.push(id);
        return runtime.engine.loadAdapter(id, w);
      },
      unloadAdapter: (id: string) => {
        unloads.push(id);
        return runtime.engine.unloadAdapter(id);
      },
    };
  });
  afterAll(async () => {
    await runtime?.close();
  });

  async function stageGood(): Promise<string> {
    return stage({ config: good.config.toString(), weights: good.weights });
  }

  async function open(dir: string, failAt?: PausePoint): Promise<AdapterRegistry> {
    return AdapterRegistry.open({
      config: { ...runtime.config, ADAPTER_DIR: dir },
      manifest: runtime.manifest,
      engine,
      log: createLogger({ LOG_LEVEL: 'silent' }),
      hooks: failAt
        ? {
            pause: async (at) => {
              if (at === failAt) throw new Error('injected disk failure (ENOSPC)');
            },
          }
        : {},
    });
  }

  it('a create that fails after loading into the engine leaves nothing: no folder, no entry, nothing in the engine', async () => {
    const dir = await fresh('reg');
    const registry = await open(dir, 'before-swap');
    loads.length = unloads.length = 0;
    await expect(registry.create('doomed', await stageGood())).rejects.toThrow(/injected/);
    expect(loads).toHaveLength(1);
    expect(unloads).toEqual(loads);
    expect(runtime.engine.hasAdapter(loads[0]!)).toBe(false);
    expect(registry.list()).toEqual([]);
    expect(await readdir(dir)).toEqual([]);
    expect(() => registry.resolveForGeneration('doomed')).toThrow(HttpProblem);
  });

  it('a replace that fails keeps the old version served and unloads only the new one', async () => {
    const dir = await fresh('reg');
    const ok = await open(dir);
    await ok.create('kept', await stageGood());
    const oldId = ok.resolveForGeneration('kept');
    const failing = await open(dir, 'mid-swap');
    const reopenedId = failing.resolveForGeneration('kept');
    loads.length = unloads.length = 0;
    await expect(failing.replace('kept', await stageGood())).rejects.toThrow(/injected/);
    expect(unloads).toEqual(loads);
    expect(failing.resolveForGeneration('kept')).toBe(reopenedId);
    expect(runtime.engine.hasAdapter(reopenedId)).toBe(true);
    expect(failing.get('kept').version).toBe(1);
    expect(await readdir(dir)).toEqual(['kept']);
    expect(oldId).not.toBe(reopenedId);
  });

  it('validate() loads and stores nothing; create() loads one version; delete() unloads it', async () => {
    const dir = await fresh('reg');
    const registry = await open(dir);
    loads.length = unloads.length = 0;
    const report = await registry.validate(await stageGood());
    expect(report.ok).toBe(true);
    expect(loads).toEqual([]);
    expect(await readdir(dir)).toEqual([]);
    await registry.create('a', await stageGood());
    const id = registry.resolveForGeneration('a');
    expect(loads).toEqual([id]);
    expect(runtime.engine.hasAdapter(id)).toBe(true);
    await registry.delete('a');
    expect(unloads).toEqual([id]);
    expect(runtime.engine.hasAdapter(id)).toBe(false);
    expect(await readdir(dir)).toEqual([]);
  });

  it('at startup, damaged files and foreign folders are listed incompatible (never served); intact ones are loaded', async () => {
    const dir = await fresh('reg');
    const first = await open(dir);
    await first.create('intact', await stageGood());
    await first.create('tampered', await stageGood());
    const w = path.join(dir, 'tampered', 'adapter_model.safetensors');
    const bytes = await readFile(w);
    bytes[bytes.length - 1] ^= 0x01;
    await writeFile(w, bytes);
    await mkdir(path.join(dir, 'copied-in'));
    await writeFile(path.join(dir, 'copied-in', 'adapter_config.json'), good.config);

    const reopened = await open(dir);
    expect(reopened.list().map((a) => [a.name, a.state])).toEqual([
      ['copied-in', 'incompatible'],
      ['intact', 'ready'],
      ['tampered', 'incompatible'],
    ]);
    expect(reopened.get('tampered').errors.map((e) => e.code)).toEqual(['corrupt_file']);
    expect(reopened.get('tampered').errors[0]!.message).toMatch(/adapter_model\.safetensors/);
    expect(reopened.get('copied-in').errors[0]!.message).toMatch(/meta\.json is missing/);
    let thrown: unknown;
    try {
      reopened.resolveForGeneration('tampered');
    } catch (e) {
      thrown = e;
    }
    expect(thrown).toBeInstanceOf(HttpProblem);
    expect((thrown as HttpProblem).status).toBe(409);
    expect(runtime.engine.hasAdapter(reopened.resolveForGeneration('intact'))).toBe(true);
    // an incompatible adapter can be replaced by a good upload, or deleted
    await reopened.replace('tampered', await stageGood());
    expect(reopened.get('tampered').state).toBe('ready');
    await reopened.delete('copied-in');
    expect((await readdir(dir)).sort()).toEqual(['intact', 'tampered']);
  });

  it('MAX_LOADED_ADAPTERS: the least recently used idle adapter is unloaded, one in use never; a held load over the bound is trimmed when it ends', async () => {
    const dir = await fresh('reg');
    const registry = await AdapterRegistry.open({ config: { ...runtime.config, ADAPTER_DIR: dir, MAX_LOADED_ADAPTERS: 1 }, manifest: runtime.manifest, engine, log: createLogger({ LOG_LEVEL: 'silent' }) });
    await registry.create('a', await stageGood());
    await registry.create('b', await stageGood());
    expect(registry.loadedNames()).toEqual(['b']);
    expect(registry.list().map((x) => [x.name, x.state, x.loaded])).toEqual([
      ['a', 'ready', false],
      ['b', 'ready', true],
    ]);
    // b is held by a running request: loading a must not unload it
    const holdB = await registry.acquire('b');
    const holdA = await registry.acquire('a');
    expect(runtime.engine.hasAdapter(holdB.versionId)).toBe(true);
    expect(runtime.engine.hasAdapter(holdA.versionId)).toBe(true);
    expect(registry.loadedNames()).toEqual(['a', 'b']);
    holdA.release();
    // still over the bound while b is held, a is idle: a goes
    expect(registry.loadedNames()).toEqual(['b']);
    holdB.release();
    expect(registry.stats()).toMatchObject({ stored: 2, loaded: 1, evictions: 2, loads: 1 });
    // at start: both validated (ready), one loaded; the other is loaded by its first request
    const reopened = await AdapterRegistry.open({ config: { ...runtime.config, ADAPTER_DIR: dir, MAX_LOADED_ADAPTERS: 1 }, manifest: runtime.manifest, engine, log: createLogger({ LOG_LEVEL: 'silent' }) });
    expect(reopened.list().map((x) => [x.name, x.state, x.loaded])).toEqual([
      ['a', 'ready', true],
      ['b', 'ready', false],
    ]);
    const lease = await reopened.acquire('b');
    expect(reopened.loadedNames()).toEqual(['b']);
    lease.release();
    await expect(reopened.acquire('nope')).rejects.toMatchObject({ status: 404 });
  });
});

describe('SharedFolderStore (ADAPTER_STORE=shared)', () => {
  const opened: SharedFolderStore[] = [];
  afterAll(async () => {
    for (const s of opened) await s.close();
  });
  async function openShared(dir: string, leaseMs = 60_000, hooks = {}): Promise<SharedFolderStore> {
    const { store } = await SharedFolderStore.open(dir, { leaseMs, hooks });
    opened.push(store);
    return store;
  }

  /** What the shared store names `name`: 'A', 'B', 'absent', or a description of anything else. */
  async function sharedHolds(store: SharedFolderStore, name: string): Promise<string> {
    const entry = await store.find(name);
    if (!entry) return 'absent';
    if ((await store.verify(entry)).length) return `damaged: ${(await store.verify(entry)).join('; ')}`;
    const config = await readFile(path.join(entry.dir, 'adapter_config.json'), 'utf8');
    for (const [label, v, ver] of [['A', versionA, 1], ['B', versionB, 2]] as const) if (config === v.config && entry.meta?.version === ver) return label;
    return `other: ${config}`;
  }
  const versionsOf = async (dir: string) => readdir(path.join(dir, '.versions'));

  it('create, replace, delete: one immutable folder per version, the pointer switched; nothing left over', async () => {
    const dir = await fresh('shared');
    const store = await openShared(dir);
    const a = await store.create(metaFor('alpha', 1, versionA), await stage(versionA));
    expect(await sharedHolds(store, 'alpha')).toBe('A');
    const b = await store.replace(metaFor('alpha', 2, versionB), await stage(versionB));
    expect(b.ref).not.toBe(a.ref);
    expect(await sharedHolds(store, 'alpha')).toBe('B');
    expect(await versionsOf(dir)).toEqual([b.ref]);
    expect(await store.refs()).toEqual(new Map([['alpha', b.ref]]));
    await store.delete('alpha');
    await expect(store.delete('alpha')).rejects.toBeInstanceOf(NotStoredError);
    expect(await store.find('alpha')).toBeNull();
    expect(await versionsOf(dir)).toEqual([]);
    expect(await readdir(path.join(dir, '.work'))).toEqual([]);
    // a local store on the same folder sees no adapter in it
    const { store: local } = await AdapterStore.open(dir);
    expect(await local.list()).toEqual([]);
  });

  it('concurrent creates of one name through two stores on one folder: exactly one wins, the other gets NameTakenError and leaves nothing', async () => {
    const dir = await fresh('shared');
    const [s1, s2] = [await openShared(dir), await openShared(dir)];
    for (let i = 0; i < 5; i++) {
      const name = `n${i}`;
      const results = await Promise.allSettled([s1.create(metaFor(name, 1, versionA), await stage(versionA)), s2.create(metaFor(name, 1, versionB), await stage(versionB))]);
      expect(results.filter((r) => r.status === 'fulfilled')).toHaveLength(1);
      const lost = results.find((r) => r.status === 'rejected') as PromiseRejectedResult;
      expect(lost.reason).toBeInstanceOf(NameTakenError);
      expect((await versionsOf(dir)).filter((v) => v.startsWith(`${name}@`))).toHaveLength(1);
    }
    expect(await readdir(path.join(dir, '.work'))).toEqual([]);
  });

  describe('a crash at each point of a write leaves the old or the new version whole', () => {
    const expectations: [PausePoint, 'create' | 'replace', string][] = [
      ['mid-write', 'create', 'absent'],
      ['before-swap', 'create', 'absent'],
      ['mid-write', 'replace', 'A'],
      ['before-swap', 'replace', 'A'],
      ['mid-swap', 'replace', 'A'],
      ['after-swap', 'replace', 'B'],
    ];
    for (const [point, op, want] of expectations) {
      it(`${op}, crash at ${point} → ${want}; the clean-up removes the rest once the lease ran out`, async () => {
        const dir = await fresh('shared-live');
        const snapshot = path.join(await fresh('shared-snap'), 'adapters');
        let reached = false;
        const store = await openShared(dir, 60_000, {
          pause: async (at: PausePoint) => {
            if (at !== point) return;
            reached = true;
            await cp(dir, snapshot, { recursive: true });
          },
        });
        if (op === 'replace') {
          await (await openShared(dir)).create(metaFor('alpha', 1, versionA), await stage(versionA));
          await store.replace(metaFor('alpha', 2, versionB), await stage(versionB));
        } else {
          await store.create(metaFor('alpha', 2, versionB), await stage(versionB));
        }
        expect(reached).toBe(true);
        // the copy is what a SIGKILL at that point leaves; a replica opening it after the lease cleans up
        await new Promise((r) => setTimeout(r, 30));
        const { store: after, recovered } = await SharedFolderStore.open(snapshot, { leaseMs: 20 });
        opened.push(after);
        expect(await sharedHolds(after, 'alpha')).toBe(want);
        const referenced = [...(await after.refs()).values()];
        expect(await versionsOf(snapshot)).toEqual(referenced);
        expect(await readdir(path.join(snapshot, '.work'))).toEqual([]);
        if (point === 'mid-write' || point === 'before-swap') expect(recovered.length).toBeGreaterThan(0);
        expect(await sharedHolds(store, 'alpha')).toBe('B');
      });
    }
  });

  it("leases: another replica's clean-up leaves a live writer's upload folder alone however old it is, and removes it once the writer stops renewing", async () => {
    const dir = await fresh('shared');
    const writer = await openShared(dir, 150);
    const other = await openShared(dir, 150);
    const upload = await writer.uploadDir();
    await new Promise((r) => setTimeout(r, 600));
    expect(await other.collect()).toEqual([]);
    expect(await readdir(path.join(dir, '.work'))).toEqual([path.basename(upload)]);
    // the writer dies: nothing renews the lease any more
    await writer.close();
    // (the other's own clean-up runs every lease; an explicit pass makes the end certain)
    await new Promise((r) => setTimeout(r, 400));
    await other.collect();
    expect(await readdir(path.join(dir, '.work'))).toEqual([]);
  });
});
