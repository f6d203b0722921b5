import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { QueueFullError, type Engine, type GenerateRequest } from '../src/engine/engine.js';
import { randomAdapter } from './helpers/lora-feeds.js';
import { Rng, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';
import { buildRandomModel, collect, engineWeights, mixedRanks, startEngine, tempRoot, type TestModel } from './engine-setup.js';

/**
 * OpenAI's `n` in the engine: n rows from one prompt whose prefill runs once (counted by the
 * engine's `prefillTokens`), the others taking its KV cache and last logits, and every row
 * giving exactly the tokens it gives when its prompt is run for it alone.
 */
const arch = tinyArchitecture({ tieWordEmbeddings: false, maxPositions: 96, eosTokenIds: [] });
let root: Awaited<ReturnType<typeof tempRoot>>;
let model: TestModel;
let engine: Engine;

beforeAll(async () => {
  root = await tempRoot('engine-n');
  model = await buildRandomModel(root.dir, arch, 91);
  // chunks of 4: the 11-token prompt takes three prefill steps
  engine = await startEngine(model, { MAX_BATCH: 8, MAX_QUEUE: 4, PREFILL_CHUNK: 4 });
  await engine.loadAdapter('X@1', engineWeights(model.manifest.loraTargets, randomAdapter(model.manifest.loraTargets, 3, mixedRanks, 2)));
});

afterAll(async () => {
  await engine?.close();
  await root?.remove();
});

const prompt = randomTokens(new Rng(5), 11, arch.vocabSize);
const req: GenerateRequest = { promptIds: prompt, adapterVersion: 'X@1', maxTokens: 9, temperature: 1, seed: 40 };

/** each row as a request of its own, seed + j: the prompt prefilled for each */
async function alone(r: GenerateRequest, n: number, e: Engine = engine): Promise<number[][]> {
  const out: number[][] = [];
  for (let j = 0; j < n; j++) out.push((await collect(e.generate({ ...r, seed: r.seed! + j }))).tokens);
  return out;
}

describe('engine: n rows from one prompt', () => {
  it('prefills the prompt once for n = 4, and every row equals its run alone', async () => {
    const before = engine.stats().prefillTokens;
    const rows = await Promise.all(engine.generateGroup(req, 4).map((g) => collect(g)));
    const shared = engine.stats().prefillTokens - before;
    expect(shared).toBe(prompt.length);

    const mid = engine.stats().prefillTokens;
    const ref = await alone(req, 4);
    expect(engine.stats().prefillTokens - mid).toBe(4 * prompt.length);
    expect(rows.map((r) => r.tokens)).toEqual(ref);
    expect(rows.every((r) => r.result.promptTokens === prompt.length && r.result.finishReason === 'length')).toBe(true);
    expect(new Set(ref.map((t) => t.join(','))).size).toBeGreaterThan(1);
  });

  it('a group joins a busy batch and still prefills once', async () => {
    const other = engine.generate({ promptIds: randomTokens(new Rng(8), 7, arch.vocabSize), maxTokens: 20, temperature: 0 });
    const before = engine.stats().prefillTokens;
    const rows = await Promise.all(engine.generateGroup({ ...req, adapterVersion: null, seed: 7 }, 3).map((g) => collect(g)));
    await collect(other);
    // the other request's 7 tokens may or may not have been counted before `before`
    expect(engine.stats().prefillTokens - before).toBeLessThanOrEqual(prompt.length + 7);
    expect(engine.stats().prefillTokens - before).toBeGreaterThanOrEqual(prompt.length);
    expect(rows.map((r) => r.tokens)).toEqual(await alone({ ...req, adapterVersion: null, seed: 7 }, 3));
  });

  it('all or nothing: a group that does not fit the queue is refused whole', async () => {
    const outstanding = engine.stats().running + engine.stats().waiting;
    expect(() => engine.generateGroup(req, 8 + 4 + 1)).toThrow(QueueFullError);
    expect(engine.stats().running + engine.stats().waiting).toBe(outstanding);
  });

  it('when the first row is cancelled before its prefill, the others run the prompt themselves', async () => {
    const small = await startEngine(model, { MAX_BATCH: 1, MAX_QUEUE: 8, PREFILL_CHUNK: 4 });
    try {
      // one row at a time: the group waits behind this one, and its first row is cancelled while waiting
      const blocker = small.generate({ promptIds: randomTokens(new Rng(2), 5, arch.vocabSize), maxTokens: 12, temperature: 0 });
      const base = { ...req, adapterVersion: null };
      const group = small.generateGroup(base, 3);
      group[0]!.cancel();
      const before = small.stats().prefillTokens;
      const rows = await Promise.all(group.map((g) => collect(g)));
      await collect(blocker);
      expect(rows[0]!.result.finishReason).toBe('cancelled');
      const ref = await alone(base, 3, small);
      expect(rows[1]!.tokens).toEqual(ref[1]);
      expect(rows[2]!.tokens).toEqual(ref[2]);
      // the blocker's prompt may have been run before `before` was read; the two followers ran theirs
      expect(small.stats().prefillTokens - before).toBeGreaterThanOrEqual(2 * prompt.length);
    } finally {
      await small.close();
    }
  });
});
