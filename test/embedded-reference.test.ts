import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildModel } from '../src/model/build.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { createSession, emptyLoraFeeds } from '../src/model/session.js';
import { loadTokenizer } from '../src/tokenizer/index.js';
import { referenceForward } from './reference/forward.js';
import { KvState, maxDiffAll, real, runStep } from './helpers/lora-feeds.js';

/**
 * The embedded default model, exactly as `npm start` serves it (a Hugging Face folder on disk:
 * config.json, model.safetensors, tokenizer.json), through the builder and onnxruntime, against
 * the independent plain-TypeScript forward pass.
 */
const silent = { info: () => {}, warn: () => {} };
let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'loraserve-embedded-ref-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('the embedded default model', () => {
  it('ONNX logits over a prompt equal the reference forward, and KV-cache decode equals full recompute (≤ 1e-4)', async () => {
    const dir = await ensureEmbeddedModel(join(root, 'model'));
    const ck = await openCheckpoint(dir);
    const tokenizer = await loadTokenizer(ck.tokenizer!, ck.architecture);
    const prompt = tokenizer.encode('Once upon a time there was a model');
    expect(prompt.length).toBeGreaterThan(5);

    const built = await buildModel(ck, { outDir: join(root, 'cache'), dtype: 'fp32', logits: 'all' });
    const { session } = await createSession(built.dir, built.manifest, 'cpu', silent);
    const lora = emptyLoraFeeds(built.manifest, 1);
    const ref = referenceForward(ck, prompt);

    const full = real((await runStep(session, new KvState(built.manifest, 1), [prompt], lora))[0]!);
    const fullDiff = maxDiffAll(full, ref);

    const state = new KvState(built.manifest, 1);
    const split = 3;
    const stepped = real((await runStep(session, state, [prompt.slice(0, split)], lora))[0]!);
    for (const tok of prompt.slice(split)) stepped.push(...real((await runStep(session, state, [[tok]], lora))[0]!));
    const decodeDiff = maxDiffAll(stepped, full);

    console.info(`embedded model: ${prompt.length} tokens, prompt vs reference ${fullDiff.toExponential(2)}, KV decode vs full recompute ${decodeDiff.toExponential(2)}`);
    expect(full).toHaveLength(prompt.length);
    expect(fullDiff).toBeLessThanOrEqual(1e-4);
    expect(decodeDiff).toBeLessThanOrEqual(1e-4);
    await session.release();
  });
});
