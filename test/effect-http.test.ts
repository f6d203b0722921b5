import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { PROBE_TEXT, compareDistributions, probeIds } from '../src/engine/probe.js';
import type { Architecture, Projection } from '../src/model/architecture.js';
import { openCheckpoint, type Checkpoint, type CheckpointTensor } from '../src/model/checkpoint/index.js';
import { adapterBytes, filesForm, form, type AdapterBytes, type AdapterSpec } from './helpers/adapter-uploads.js';
import type { PeftTensor } from './helpers/adapter-fixtures.js';
import { startEmbeddedApp, type EmbeddedApp } from './helpers/embedded-app.js';
import { referenceForward } from './reference/forward.js';

/**
 * Issue 17 over real HTTP on the embedded model: the effect an upload reports is measured through
 * the served graph, and it equals the tests' independent reference forward pass run with the
 * adapter merged into the weights (W + s·B·A) against the base. A no-effect adapter is refused,
 * unless opted in, and then measures exactly zero.
 */

let server: EmbeddedApp;
let app: FastifyInstance;
let arch: Architecture;
let modelId: string;
let ck: Checkpoint;
let ids: number[];

beforeAll(async () => {
  server = await startEmbeddedApp('effect-http');
  app = server.app;
  arch = app.runtime.manifest.architecture;
  modelId = app.runtime.manifest.modelId;
  ck = await openCheckpoint(server.model);
  ids = probeIds(app.runtime.tokenizer.encode(PROBE_TEXT), app.runtime.manifest);
});
afterAll(async () => {
  await server?.close();
});

interface Effect {
  probeTokens: number;
  maxLogprobDelta: number;
  klDivergence: number;
}

async function upload(fd: FormData, url = '/v1/adapters') {
  const res = await app.inject({ method: 'POST', url, payload: fd });
  return { status: res.statusCode, body: res.json() as Record<string, unknown> };
}

const TARGETS: Projection[] = ['q_proj', 'v_proj', 'down_proj'];
let captured: PeftTensor[] = [];
/** the adapter's bytes; its tensors (PEFT layout) are kept in `captured` for the merged reference */
const make = (spec: Omit<AdapterSpec, 'modelId'>): AdapterBytes =>
  adapterBytes(arch, {
    modelId,
    targets: TARGETS,
    ...spec,
    tensors: (t) => {
      const out = spec.tensors ? spec.tensors(t) : t;
      captured = out;
      return out;
    },
  });
const zeroB = (t: PeftTensor[]) => t.map((x) => (x.name.includes('lora_B') ? { ...x, data: new Float32Array(x.data.length) } : x));

/** The checkpoint with W + scale·B·A for every module of the adapter (PEFT layout: B [out, r], A [r, in]). */
function merged(base: Checkpoint, tensors: PeftTensor[], scale: number): Checkpoint {
  const replaced = new Map<string, Float32Array>();
  for (const a of tensors.filter((t) => t.name.includes('lora_A'))) {
    const module = a.name.replace(/^base_model\.model\./, '').replace(/\.lora_A\.weight$/, '');
    const b = tensors.find((t) => t.name === a.name.replace('lora_A', 'lora_B'))!;
    const [r, inF] = a.shape as [number, number];
    const outF = b.shape[0]!;
    const w = Float32Array.from(base.tensor(`${module}.weight`)!.read());
    for (let o = 0; o < outF; o++) {
      for (let i = 0; i < inF; i++) {
        let d = 0;
        for (let k = 0; k < r; k++) d += b.data[o * r + k]! * a.data[k * inF + i]!;
        w[o * inF + i] += scale * d;
      }
    }
    replaced.set(`${module}.weight`, w);
  }
  return {
    architecture: base.architecture,
    modelId: `${base.modelId}+merged`,
    sourceFiles: [],
    tokenizer: base.tokenizer,
    names: () => base.names(),
    tensor(name: string): CheckpointTensor | undefined {
      const t = base.tensor(name);
      const v = replaced.get(name);
      return t && v ? { shape: t.shape, dtype: 'F32', read: () => v } : t;
    },
  };
}

function referenceEffect(adapterCk: Checkpoint): Effect {
  const withAdapter = referenceForward(adapterCk, ids);
  const without = referenceForward(ck, ids);
  let kl = 0;
  let maxDelta = 0;
  withAdapter.forEach((logits, p) => {
    const c = compareDistributions(logits, without[p]!);
    kl += c.kl;
    maxDelta = Math.max(maxDelta, c.maxDelta);
  });
  return { probeTokens: ids.length, maxLogprobDelta: maxDelta, klDivergence: kl / ids.length };
}

describe('the measured effect of an accepted adapter', () => {
  let body: Record<string, unknown>;
  let tensors: PeftTensor[];
  beforeAll(async () => {
    const a = make({ r: 4, alpha: 8, seed: 5 });
    tensors = captured;
    const res = await upload(filesForm('effective', a));
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    body = res.body;
  });

  it('the probe is a few dozen tokens of the documented prompt', () => {
    expect(ids.length).toBeGreaterThanOrEqual(24);
    expect(ids.length).toBeLessThanOrEqual(32);
  });

  it('upload response: effect > 0, equal (1e-4) to the reference forward with the adapter merged vs without', () => {
    const effect = body.effect as Effect;
    expect(effect.probeTokens).toBe(ids.length);
    expect(effect.maxLogprobDelta).toBeGreaterThan(0);
    expect(effect.klDivergence).toBeGreaterThan(0);
    const ref = referenceEffect(merged(ck, tensors, 8 / 4));
    expect(effect.maxLogprobDelta).toBeCloseTo(ref.maxLogprobDelta, 4);
    expect(Math.abs(effect.klDivergence - ref.klDivergence)).toBeLessThan(1e-4);
    expect(Math.abs(effect.maxLogprobDelta - ref.maxLogprobDelta)).toBeLessThan(1e-4);
  });

  it('every module shows deltaNorm and relativeNorm', () => {
    const modules = body.modules as { module: string; deltaNorm: number; relativeNorm: number }[];
    expect(modules).toHaveLength(arch.numLayers * TARGETS.length);
    for (const m of modules) {
      expect(m.deltaNorm).toBeGreaterThan(0);
      expect(m.relativeNorm).toBeGreaterThan(0);
      const w = ck.tensor(`${m.module}.weight`)!.read();
      const norm = Math.sqrt(w.reduce((s, x) => s + x * x, 0));
      expect(Math.abs(m.relativeNorm * norm - m.deltaNorm) / m.deltaNorm).toBeLessThan(1e-6);
    }
  });

  it('GET /v1/adapters/{name} shows the same effect and norms', async () => {
    const res = await app.inject({ method: 'GET', url: '/v1/adapters/effective' });
    const got = res.json() as Record<string, unknown>;
    expect(got.effect).toEqual(body.effect);
    expect(got.modules).toEqual(body.modules);
    expect((got.report as { effect: unknown }).effect).toEqual(body.effect);
  });

  it('POST /v1/adapters/validate reports the same effect and stores nothing', async () => {
    const a = make({ r: 4, alpha: 8, seed: 5 });
    const res = await upload(filesForm(null, a), '/v1/adapters/validate');
    expect(res.status, JSON.stringify(res.body)).toBe(200);
    expect(res.body.effect).toEqual(body.effect);
    const list = (await app.inject({ method: 'GET', url: '/v1/adapters' })).json() as { adapters: { name: string }[] };
    expect(list.adapters.map((x) => x.name)).toEqual(['effective']);
    expect(app.runtime.engine.stats().adaptersResident).toBe(1);
  });
});

describe('an adapter that changes nothing', () => {
  it('is refused with 422 no_effect, the cause and its count; the rejection is counted by code', async () => {
    const a = make({ r: 4, seed: 6, tensors: zeroB });
    const res = await upload(filesForm('untrained', a));
    expect(res.status).toBe(422);
    const errors = res.body.errors as { code: string; message: string }[];
    expect(errors.map((e) => e.code)).toEqual(['no_effect']);
    const n = arch.numLayers * TARGETS.length;
    expect(errors[0]!.message).toContain(`all ${n} modules have lora_B = 0`);
    expect((await app.inject({ method: 'GET', url: '/v1/adapters/untrained' })).statusCode).toBe(404);
    const metrics = (await app.inject({ method: 'GET', url: '/metrics' })).body;
    expect(metrics).toMatch(/loraserve_adapter_rejections_total\{code="no_effect"\} 1\b/);
  });

  it('the dry run refuses it too, and takes the opt-in', async () => {
    const a = make({ r: 4, seed: 6, tensors: zeroB });
    expect((await upload(filesForm(null, a), '/v1/adapters/validate')).status).toBe(422);
    const ok = await upload(form([['allow_no_effect', 'true'], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors']]), '/v1/adapters/validate');
    expect(ok.status).toBe(200);
    expect(ok.body.effect).toMatchObject({ maxLogprobDelta: 0, klDivergence: 0 });
  });

  it('with allow_no_effect=true it is accepted, warned about, and its probe numbers are exactly 0', async () => {
    const a = make({ r: 4, alpha: 0, seed: 7 });
    const res = await upload(form([['name', 'noop'], ['allow_no_effect', 'true'], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors']]));
    expect(res.status, JSON.stringify(res.body)).toBe(201);
    expect((res.body.warnings as { code: string }[]).map((w) => w.code)).toEqual(['no_effect']);
    expect(res.body.effect).toMatchObject({ probeTokens: ids.length, maxLogprobDelta: 0, klDivergence: 0 });
  });

  it('a bad allow_no_effect value is a 400 that stores nothing', async () => {
    const a = make({ r: 4, seed: 6 });
    const res = await upload(form([['name', 'maybe'], ['allow_no_effect', 'yes please'], ['config', a.config, 'adapter_config.json'], ['weights', a.weights, 'adapter_model.safetensors']]));
    expect(res.status).toBe(400);
    expect((await app.inject({ method: 'GET', url: '/v1/adapters/maybe' })).statusCode).toBe(404);
  });
});

describe('after a restart on the same model', () => {
  it('the opted-in no-op adapter stays ready; effects are those measured at upload', async () => {
    const before = (await app.inject({ method: 'GET', url: '/v1/adapters/effective' })).json() as Record<string, unknown>;
    const again = await buildApp(makeConfig({ MODEL_PATH: server.model, ADAPTER_DIR: server.adapterDir, CACHE_DIR: server.cacheDir, DEVICE: 'cpu', LOG_LEVEL: 'silent' }));
    try {
      const noop = (await again.inject({ method: 'GET', url: '/v1/adapters/noop' })).json() as Record<string, unknown>;
      expect(noop.state).toBe('ready');
      expect(noop.effect).toMatchObject({ maxLogprobDelta: 0, klDivergence: 0 });
      const effective = (await again.inject({ method: 'GET', url: '/v1/adapters/effective' })).json() as Record<string, unknown>;
      expect(effective.effect).toEqual(before.effect);
    } finally {
      await again.close();
    }
  });
});
