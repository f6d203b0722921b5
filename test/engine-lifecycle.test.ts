import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ContextLengthError, EngineClosedError, InvalidRequestError, QueueFullError, UnknownAdapterError, type Engine, type GenerateRequest } from '../src/engine/engine.js';
import { FeedBuilder } from '../src/engine/batch.js';
import { kvStoreFor } from '../src/engine/kv-store.js';
import { runStep } from '../src/engine/step-run.js';
import { createSession } from '../src/model/session.js';
import { randomAdapter } from './helpers/lora-feeds.js';
import { tinyArchitecture } from './helpers/random-checkpoint.js';
import { buildRandomModel, collect, engineWeights, mixedRanks, startEngine, tempRoot, type TestModel } from './engine-setup.js';

/**
 * Requests over their lifetime: cancellation, queue limits, adapter unload while in use, timeouts,
 * close, request checks, and the main thread's responsiveness. A model big enough that a long
 * prompt's prefill takes a visible time on one run (~0.2 s here) and a long generation lasts
 * seconds, so "during" is never a race.
 */
const arch = tinyArchitecture({
  hiddenSize: 256,
  intermediateSize: 768,
  numLayers: 4,
  numHeads: 8,
  numKvHeads: 4,
  headDim: 32,
  vocabSize: 1024,
  maxPositions: 1024,
  tieWordEmbeddings: false,
  eosTokenIds: [],
});
let root: Awaited<ReturnType<typeof tempRoot>>;
let model: TestModel;
let engine: Engine;

beforeAll(async () => {
  root = await tempRoot('engine-lifecycle');
  model = await buildRandomModel(root.dir, arch, 8);
  engine = await startEngine(model, { MAX_BATCH: 2, MAX_QUEUE: 2, PREFILL_CHUNK: 1024 });
});
afterAll(async () => {
  await engine?.close();
  await root?.remove();
});

const long = (seed: number, extra: Partial<GenerateRequest> = {}): GenerateRequest => ({
  promptIds: [3 + seed, 40 + seed, 7],
  maxTokens: 900,
  temperature: 0,
  ...extra,
});

async function waitFor(cond: () => boolean, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 2));
  }
}

describe('engine lifecycle', () => {
  it('an abort cancels a running row at the next step; the row leaves and `cancelled` counts it; its neighbour is unaffected', async () => {
    const neighbourReq: GenerateRequest = { promptIds: [9, 10, 11, 12], maxTokens: 40, temperature: 0 };
    const neighbourAlone = await collect(engine.generate(neighbourReq));
    const before = engine.stats().cancelled;
    const ac = new AbortController();
    const neighbour = collect(engine.generate(neighbourReq));
    let runningWhileStreaming = 0;
    const victim = await collect(engine.generate(long(1), ac.signal), (_, i) => {
      runningWhileStreaming = Math.max(runningWhileStreaming, engine.stats().running);
      if (i === 2) ac.abort();
    });
    expect(runningWhileStreaming).toBe(2);
    expect(victim.result.finishReason).toBe('cancelled');
    expect(victim.result.completionTokens).toBeLessThan(900);
    // the done message carries the stats: the row is gone and counted
    expect(engine.stats().cancelled).toBe(before + 1);
    expect(engine.stats().runningAdapters).toEqual([]);
    expect((await neighbour).tokens).toEqual(neighbourAlone.tokens);
    await waitFor(() => engine.stats().running === 0);
  });

  it('a waiting request can be cancelled before it runs; a full engine throws QueueFullError at once', async () => {
    const acs = [0, 1, 2, 3].map(() => new AbortController());
    const gens = [0, 1, 2, 3].map((i) => engine.generate(long(i), acs[i].signal));
    // 2 running + 2 waiting: the next one is refused synchronously, before any header is sent
    expect(() => engine.generate(long(9))).toThrow(QueueFullError);
    await waitFor(() => engine.stats().running === 2 && engine.stats().waiting === 2);
    acs[3].abort();
    const waitingOne = await gens[3].result;
    expect(waitingOne).toMatchObject({ finishReason: 'cancelled', completionTokens: 0 });
    expect(engine.stats().waiting).toBe(1);
    // room again for one
    const late = engine.generate(long(5), acs[3].signal);
    for (const ac of acs) ac.abort();
    const results = await Promise.all([...gens.slice(0, 3), late].map((g) => g.result));
    for (const r of results) expect(r.finishReason).toBe('cancelled');
    await waitFor(() => engine.stats().running + engine.stats().waiting === 0);
    const after = await collect(engine.generate({ promptIds: [5], maxTokens: 3, temperature: 0 }));
    expect(after.result.finishReason).toBe('length');
  });

  it('an adapter unloaded mid-generation keeps serving the requests holding it (running and queued); new ones fail; it is freed after the last', async () => {
    const peft = randomAdapter(model.manifest.loraTargets, 4, mixedRanks, 2);
    const weights = engineWeights(model.manifest.loraTargets, peft);
    const firstA = weights.modules.values().next().value!.A;
    await engine.loadAdapter('A@1', weights);
    // transferred to the worker: the main thread keeps no copy
    expect(firstA.byteLength).toBe(0);
    const base = engine.stats().adaptersResident;
    const req: GenerateRequest = { promptIds: [17, 4, 99, 250], adapterVersion: 'A@1', maxTokens: 60, temperature: 0 };
    const running = engine.generate(req);
    const blocker = engine.generate(long(3, { maxTokens: 80 }));
    const queued = engine.generate({ ...req, promptIds: [18, 5] });
    await waitFor(() => engine.stats().waiting === 1);
    expect(engine.stats().waitingAdapters).toEqual(['A@1']);
    const tokens: number[] = [];
    let unloaded: Promise<void> | null = null;
    for await (const e of running) {
      tokens.push(e.token);
      if (tokens.length === 3) {
        unloaded = engine.unloadAdapter('A@1');
        expect(() => engine.generate(req)).toThrow(UnknownAdapterError);
      }
    }
    await unloaded;
    expect((await running.result).finishReason).toBe('length');
    expect(tokens).toHaveLength(60);
    const queuedDone = await collect(queued);
    await collect(blocker);
    await waitFor(() => engine.stats().adaptersResident === base - 1);
    // the same weights under a new version, alone, give the same tokens
    await engine.loadAdapter('A@2', engineWeights(model.manifest.loraTargets, peft));
    expect((await collect(engine.generate({ ...req, adapterVersion: 'A@2' }))).tokens).toEqual(tokens);
    expect((await collect(engine.generate({ ...req, promptIds: [18, 5], adapterVersion: 'A@2' }))).tokens).toEqual(queuedDone.tokens);
    expect((await collect(engine.generate({ ...req, adapterVersion: null }))).tokens).not.toEqual(tokens);
    await engine.unloadAdapter('A@2');
    await expect(engine.unloadAdapter('A@2')).rejects.toThrow(UnknownAdapterError);
  });

  it('refuses bad adapters and bad requests with typed errors', async () => {
    const t = model.manifest.loraTargets[0];
    const bad = { modules: new Map([[t.name, { rank: 2, A: new Float32Array(t.inFeatures * 2), B: new Float32Array(3) }]]), bytes: 0 };
    await expect(engine.loadAdapter('bad@1', bad)).rejects.toThrow(/needs A \[256, 2\] and B \[2, 256\]/);
    expect(() => engine.generate({ promptIds: [1], adapterVersion: 'bad@1' })).toThrow(UnknownAdapterError);
    const unknownModule = { modules: new Map([['model.layers.9.self_attn.q_proj', { rank: 1, A: new Float32Array(256), B: new Float32Array(256) }]]), bytes: 0 };
    await expect(engine.loadAdapter('bad@2', unknownModule)).rejects.toThrow(/no LoRA target model\.layers\.9/);
    expect(() => engine.generate({ promptIds: [] })).toThrow(InvalidRequestError);
    expect(() => engine.generate({ promptIds: [1024] })).toThrow(InvalidRequestError);
    expect(() => engine.generate({ promptIds: [1], topP: 0 })).toThrow(InvalidRequestError);
    expect(() => engine.generate({ promptIds: [1], logprobs: 21 })).toThrow(InvalidRequestError);
    expect(() => engine.generate({ promptIds: new Array(1024).fill(5) })).toThrow(ContextLengthError);
    // prompt + 1 = context: exactly one token fits
    const edge = await collect(engine.generate({ promptIds: new Array(1023).fill(5), maxTokens: 10, temperature: 0 }));
    expect(edge.result).toMatchObject({ finishReason: 'length', promptTokens: 1023, completionTokens: 1 });
  });

  it('the main thread stays responsive: a 5 ms timer keeps its beat through a long prefill and decoding', async () => {
    // one prefill run of 1000 tokens (PREFILL_CHUNK 1024), then decoding
    const prompt = Array.from({ length: 1000 }, (_, i) => 3 + ((i * 37) % 1000));
    const beat = startBeat();
    const t0 = performance.now();
    let ttft = 0;
    const r = await collect(engine.generate({ promptIds: prompt, maxTokens: 20, temperature: 0 }), (_, i) => {
      if (i === 0) ttft = performance.now() - t0;
    });
    const total = performance.now() - t0;
    const { worst, ticks } = beat.stop();
    expect(r.result.completionTokens).toBe(20);

    // control: the same prefill run on this thread shows what the timer sees when run() blocks it
    const { session } = await createSession(model.dir, model.manifest, 'cpu', { info: () => {}, warn: () => {} });
    const kv = kvStoreFor(model.manifest, 1, 1024);
    await kv.reserve(prompt.length);
    const feeds = new FeedBuilder(model.manifest).prefill(prompt, kv.acquire(), 0, kv, null);
    const control = startBeat();
    await runStep(session, model.manifest, kv, feeds, false);
    await new Promise((resolve) => setTimeout(resolve, 20));
    const blocked = control.stop();
    await session.release();

    const bound = Math.max(50, ttft / 2);
    console.info(
      `[engine] 1000-token prompt in one prefill run: first token after ${ttft.toFixed(0)} ms, 20 tokens in ${total.toFixed(0)} ms; ` +
        `5 ms timer: ${ticks} ticks, worst lateness ${worst.toFixed(1)} ms (bound ${bound.toFixed(0)} ms); ` +
        `the same run on the main thread delays it ${blocked.worst.toFixed(0)} ms`,
    );
    expect(worst).toBeLessThan(bound);
    expect(ticks).toBeGreaterThan(total / 5 / 3);
    // the detector works: a blocking run on this thread breaks the bound
    expect(blocked.worst).toBeGreaterThan(bound);
  });
});

/** a 5 ms interval timer recording how late its ticks come */
function startBeat(): { stop: () => { worst: number; ticks: number } } {
  let worst = 0;
  let ticks = 0;
  let last = performance.now();
  const timer = setInterval(() => {
    const now = performance.now();
    worst = Math.max(worst, now - last - 5);
    last = now;
    ticks++;
  }, 5);
  return {
    stop: () => {
      clearInterval(timer);
      return { worst, ticks };
    },
  };
}

describe('engine timeout and close', () => {
  let short: Engine;
  beforeAll(async () => {
    short = await startEngine(model, { MAX_BATCH: 2, MAX_QUEUE: 2, REQUEST_TIMEOUT_MS: 300 });
  });
  afterAll(async () => {
    await short?.close();
  });

  it('a request past REQUEST_TIMEOUT_MS ends cancelled with timedOut', async () => {
    const r = await collect(short.generate(long(1)));
    expect(r.result).toMatchObject({ finishReason: 'cancelled', timedOut: true });
    expect(r.tokens.length).toBeGreaterThan(0);
    expect(r.tokens.length).toBeLessThan(900);
  });

  it('close cancels what runs and refuses what comes after', async () => {
    const gen = short.generate(long(2, { maxTokens: 200 }));
    const it = gen[Symbol.asyncIterator]();
    await it.next();
    await short.close();
    expect((await gen.result).finishReason).toBe('cancelled');
    expect(() => short.generate(long(3))).toThrow(EngineClosedError);
  });
});
