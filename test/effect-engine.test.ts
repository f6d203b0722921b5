import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Engine, TokenEvent } from '../src/engine/engine.js';
import { compareDistributions } from '../src/engine/probe.js';
import { collect, engineWeights, mixedRanks, startEngine, tempRoot, buildRandomModel, type TestModel } from './engine-setup.js';
import { mergeAdapter, randomAdapter, type Adapter } from './helpers/lora-feeds.js';
import { randomTokens, Rng, tinyArchitecture } from './helpers/random-checkpoint.js';
import { referenceForward } from './reference/forward.js';

/**
 * The probe in the inference worker (engine/probe.ts) on a random Qwen2-style model (GQA, q/k/v
 * biases, interleaved ranks incl. rank 1 and untargeted modules): its numbers equal the reference
 * forward pass with the adapter merged vs without, and it takes turns with a running stream.
 */

const arch = tinyArchitecture({ family: 'qwen2', attentionBias: true, numLayers: 3, tieWordEmbeddings: false, ropeLayout: 'rotate_half' });
let root: Awaited<ReturnType<typeof tempRoot>>;
let model: TestModel;
let engine: Engine;
let adapter: Adapter;
const ids = randomTokens(new Rng(3), 20, arch.vocabSize);

beforeAll(async () => {
  root = await tempRoot('effect-engine');
  model = await buildRandomModel(root.dir, arch, 77);
  engine = await startEngine(model, { MAX_BATCH: 4 });
  adapter = randomAdapter(model.manifest.loraTargets, 5, mixedRanks);
  await engine.loadAdapter('a@1', engineWeights(model.manifest.loraTargets, adapter));
});
afterAll(async () => {
  await engine?.close();
  await root?.remove();
});

describe('the probe through the served graph', () => {
  it('equals (1e-4) the reference forward with the adapter merged vs without; > 0', async () => {
    const probe = await engine.probeAdapter('a@1', ids);
    const merged = referenceForward(mergeAdapter(model.ck, model.manifest.loraTargets, adapter), ids);
    const base = referenceForward(model.ck, ids);
    let kl = 0;
    let maxDelta = 0;
    merged.forEach((l, p) => {
      const c = compareDistributions(l, base[p]!);
      kl += c.kl;
      maxDelta = Math.max(maxDelta, c.maxDelta);
    });
    expect(probe.probeTokens).toBe(ids.length);
    expect(probe.klDivergence).toBeGreaterThan(0);
    expect(probe.maxLogprobDelta).toBeGreaterThan(0);
    expect(Math.abs(probe.klDivergence - kl / ids.length)).toBeLessThan(1e-4);
    expect(Math.abs(probe.maxLogprobDelta - maxDelta)).toBeLessThan(1e-4);
  });

  it('an adapter whose every module is zero measures exactly 0', async () => {
    const zero: Adapter = new Map([...adapter].map(([k, m]) => [k, { ...m, B: new Float32Array(m.B.length) }]));
    await engine.loadAdapter('zero@1', engineWeights(model.manifest.loraTargets, zero));
    expect(await engine.probeAdapter('zero@1', ids)).toEqual({ probeTokens: ids.length, maxLogprobDelta: 0, klDivergence: 0 });
  });

  it('an unknown version is refused', async () => {
    await expect(engine.probeAdapter('nope@1', ids)).rejects.toThrow(/nope@1/);
  });

  it('takes turns with a running stream: tokens arrive while it runs, and its numbers do not change', async () => {
    const alone = await engine.probeAdapter('a@1', ids);
    const events: ('token' | 'probe-start' | 'probe-end')[] = [];
    const gen = engine.generate({ promptIds: ids.slice(0, 4), adapterVersion: null, maxTokens: 50, temperature: 0 });
    let started = false;
    const stream = collect(gen, (_e: TokenEvent, i) => {
      events.push('token');
      if (i === 1 && !started) {
        started = true;
        events.push('probe-start');
        void engine.probeAdapter('a@1', ids).then((r) => {
          events.push('probe-end');
          expect(r).toEqual(alone);
        });
      }
    });
    await stream;
    // the probe needs ids.length runs; had it held the worker for all of them, no token would fall between
    const start = events.indexOf('probe-start');
    const end = events.indexOf('probe-end');
    expect(start).toBeGreaterThan(0);
    expect(end).toBeGreaterThan(start);
    expect(events.slice(start, end).filter((e) => e === 'token').length).toBeGreaterThanOrEqual(ids.length - 2);
  });
});
