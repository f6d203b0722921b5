import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Engine } from '../src/engine/engine.js';
import { generateText, type TextDelta, type TextGeneration, type TextRequest } from '../src/engine/generation.js';
import { buildModel } from '../src/model/build.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { loadTokenizer } from '../src/tokenizer/index.js';
import type { Tokenizer } from '../src/tokenizer/types.js';
import { Rng, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';
import { STORIES_BIN, TOK512_BIN, HAVE_STORIES } from './helpers/model-io-files.js';
import { buildRandomModel, startEngine, tempRoot, testKv, type TestModel } from './engine-setup.js';

/**
 * generation.ts: token ids → text deltas, stop strings, EOS, usage, cancellation. On the random
 * model a one-character-per-token ASCII tokenizer makes every expectation computable from the
 * token ids alone; on stories260K (a real trained model and its own tokenizer) the public greedy
 * text is known.
 */
const arch = tinyArchitecture({ tieWordEmbeddings: false, maxPositions: 128, eosTokenIds: [] });

/** id = character code; ids 0-2 are <unk>, <s>, </s> and decode to nothing */
const asciiTokenizer: Tokenizer = {
  encode: (text, opts) => [...((opts?.addBos ?? true) ? [1] : []), ...[...text].map((c) => c.charCodeAt(0) & 0x7f)],
  decode: (ids) =>
    ids
      .filter((i) => i > 2)
      .map((i) => String.fromCharCode(i))
      .join(''),
  bosId: 1,
  eosIds: [2],
  vocabSize: 128,
  chatTemplate: null,
  specialTokens: {},
};

let root: Awaited<ReturnType<typeof tempRoot>>;
let model: TestModel;
let engine: Engine;

beforeAll(async () => {
  root = await tempRoot('engine-text');
  model = await buildRandomModel(root.dir, arch, 31);
  engine = await startEngine(model, { MAX_BATCH: 4, PREFILL_CHUNK: 8 });
});
afterAll(async () => {
  await engine?.close();
  await root?.remove();
});

async function run(gen: TextGeneration) {
  const deltas: TextDelta[] = [];
  for await (const d of gen) deltas.push(d);
  return { deltas, text: deltas.map((d) => d.text).join(''), tokens: deltas.flatMap((d) => d.tokens.map((t) => t.token)), result: await gen.result };
}

const prompt = randomTokens(new Rng(4), 6, 128).map((t) => Math.max(3, t));

describe('generateText on the random model', () => {
  const base: TextRequest = { promptIds: prompt, maxTokens: 40, temperature: 0, eosIds: [] };
  let plain: Awaited<ReturnType<typeof run>>;
  beforeAll(async () => {
    plain = await run(generateText({ engine, tokenizer: asciiTokenizer }, base));
  });

  it('without stops: the text is the decode of every generated token and usage counts them', () => {
    expect(plain.result.finishReason).toBe('length');
    expect(plain.tokens).toHaveLength(40);
    expect(plain.text).toBe(asciiTokenizer.decode(plain.tokens));
    expect(plain.result.text).toBe(plain.text);
    expect(plain.result.usage).toEqual({ promptTokens: prompt.length, completionTokens: 40 });
  });

  it('a stop string spanning several tokens ends the text exactly before it', async () => {
    // at most one character per token: a 3-character stop string spans at least 3 tokens
    const at = plain.text.length - 25;
    const stop = plain.text.slice(at, at + 3);
    const first = plain.text.indexOf(stop);
    const before = engine.stats().cancelled;
    const r = await run(generateText({ engine, tokenizer: asciiTokenizer }, { ...base, stop: ['\u007f\u007f\u007f', stop] }));
    expect(r.result.finishReason).toBe('stop');
    expect(r.result.stopString).toBe(stop);
    expect(r.text).toBe(plain.text.slice(0, first));
    expect(r.result.text).toBe(r.text);
    // the tokens up to the one that completed the stop string (ids 0-2 decode to nothing)
    let k = 1;
    while (!asciiTokenizer.decode(plain.tokens.slice(0, k)).includes(stop)) k++;
    expect(r.result.usage.completionTokens).toBe(k);
    expect(r.tokens).toEqual(plain.tokens.slice(0, k));
    // the engine row was cancelled as soon as the stop string appeared
    await waitFor(() => engine.stats().cancelled === before + 1 && engine.stats().running === 0);
  });

  it('a stop string that never appears changes nothing', async () => {
    const r = await run(generateText({ engine, tokenizer: asciiTokenizer }, { ...base, stop: ['\u0001zz'] }));
    expect(r.text).toBe(plain.text);
    expect(r.result.finishReason).toBe('length');
  });

  it('an EOS token ends with stop; its text is not emitted and it counts as a completion token', async () => {
    const k = plain.tokens.findIndex((t, i) => i >= 3 && !plain.tokens.slice(0, i).includes(t));
    expect(k).toBeGreaterThan(0);
    const r = await run(generateText({ engine, tokenizer: asciiTokenizer }, { ...base, eosIds: [plain.tokens[k]] }));
    expect(r.result.finishReason).toBe('stop');
    expect(r.result.stopString).toBeNull();
    expect(r.tokens).toEqual(plain.tokens.slice(0, k));
    expect(r.text).toBe(asciiTokenizer.decode(plain.tokens.slice(0, k)));
    expect(r.result.usage.completionTokens).toBe(k + 1);
  });

  it('a text prompt is tokenized with BOS; logprobs ride along with their tokens; complete() skips the deltas', async () => {
    const text = String.fromCharCode(...prompt);
    const gen = generateText({ engine, tokenizer: asciiTokenizer }, { prompt: text, maxTokens: 10, temperature: 0, logprobs: 3, eosIds: [] });
    const r = await run(gen);
    expect(r.result.usage.promptTokens).toBe(prompt.length + 1);
    for (const d of r.deltas) for (const t of d.tokens) {
      expect(t.top).toHaveLength(3);
      expect(t.top![0].token).toBe(t.token);
      expect(t.logprob).toBeLessThanOrEqual(0);
    }
    const again = await generateText({ engine, tokenizer: asciiTokenizer }, { prompt: text, maxTokens: 10, temperature: 0, eosIds: [] }).complete();
    expect(again.text).toBe(r.text);
  });

  it('an aborted signal cancels the request', async () => {
    const ac = new AbortController();
    const gen = generateText({ engine, tokenizer: asciiTokenizer }, { ...base, maxTokens: 120 }, ac.signal);
    let n = 0;
    for await (const d of gen) {
      n += d.tokens.length;
      if (n >= 2) ac.abort();
    }
    const res = await gen.result;
    expect(res.finishReason).toBe('cancelled');
    expect(res.usage.completionTokens).toBeLessThan(120 - prompt.length);
  });
});

async function waitFor(cond: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('condition not reached in time');
    await new Promise((r) => setTimeout(r, 5));
  }
}

if (!HAVE_STORIES) console.warn(`[engine-text] SKIPPED stories260K tests: ${STORIES_BIN} or ${TOK512_BIN} is missing (../shared/fixtures)`);

describe.skipIf(!HAVE_STORIES)('generateText on stories260K (real weights, real tokenizer)', () => {
  let storiesEngine: Engine;
  let tokenizer: Tokenizer;
  beforeAll(async () => {
    const ck = await openCheckpoint(STORIES_BIN, TOK512_BIN);
    const built = await buildModel(ck, { outDir: join(root.dir, 'stories'), dtype: 'fp32', logits: 'last', kv: testKv() });
    tokenizer = await loadTokenizer(ck.tokenizer!, ck.architecture);
    storiesEngine = await startEngine({ ck: null as never, dir: built.dir, manifest: built.manifest }, { MAX_BATCH: 4, PREFILL_CHUNK: 3 });
  });
  afterAll(async () => {
    await storiesEngine?.close();
  });

  it('greedy from BOS streams the known story and stops at the stop string', async () => {
    const deps = { engine: storiesEngine, tokenizer };
    const full = await run(generateText(deps, { promptIds: [1], maxTokens: 60, temperature: 0 }));
    expect(full.text).toMatch(/^Once upon a time, there was a little girl named Lily\. She loved to play outside in the park\./);
    expect(full.text).toBe(tokenizer.decode([1, ...full.tokens]));
    const stopped = await run(generateText(deps, { promptIds: [1], maxTokens: 60, temperature: 0, stop: ['. She'] }));
    expect(stopped.text).toBe('Once upon a time, there was a little girl named Lily');
    expect(stopped.result.finishReason).toBe('stop');
  });

  it('a text prompt continues with its leading spaces intact, the same alone and next to other streams', async () => {
    const deps = { engine: storiesEngine, tokenizer };
    const req: TextRequest = { prompt: 'Once upon a time, there was a little', maxTokens: 30, temperature: 0 };
    const alone = await run(generateText(deps, req));
    const busy = await Promise.all([
      run(generateText(deps, req)),
      run(generateText(deps, { prompt: 'Tom had a red ball', maxTokens: 30, temperature: 0.8, seed: 3 })),
      run(generateText(deps, { promptIds: [1], maxTokens: 30, temperature: 0 })),
    ]);
    expect(busy[0].text).toBe(alone.text);
    expect(alone.text.startsWith(' ')).toBe(true);
    const promptIds = tokenizer.encode(req.prompt!);
    expect(tokenizer.decode([...promptIds, ...alone.tokens])).toBe(tokenizer.decode(promptIds) + alone.text);
  });
});
