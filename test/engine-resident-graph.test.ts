import type { InferenceSession, Tensor } from 'onnxruntime-node';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { FeedBuilder, kvShapeOf } from '../src/engine/batch.js';
import { ResidentKv } from '../src/engine/kv.js';
import { buildModel } from '../src/model/build.js';
import { kvCacheKeyName, kvCacheValueName, type Manifest } from '../src/model/manifest.js';
import { createSession, emptyLoraFeeds } from '../src/model/session.js';
import { KvState, maxAbsDiff, runStep } from './helpers/lora-feeds.js';
import { Rng, randomCheckpoint, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';
import { tempRoot } from './engine-setup.js';

/**
 * The resident KV contract (graph/kv.ts) against the concat contract it replaces in the engine:
 * rows of different lengths sharing one cache — prefilled in chunks into their own slots, then
 * decoded together — give each row the logits of its own batch-1 run on the concat graph. And a
 * slot's stale positions (beyond its kv_lens, inside the fed prefix) change nothing, even when
 * they hold large values.
 */

const quiet = { info: () => {}, warn: () => {} };
const arch = tinyArchitecture({ numLayers: 2, maxPositions: 64 });
const ck = randomCheckpoint(arch, 23);
let root: Awaited<ReturnType<typeof tempRoot>>;
let resident: { session: InferenceSession; manifest: Manifest };
let concat: { session: InferenceSession; manifest: Manifest };

beforeAll(async () => {
  root = await tempRoot('resident-graph');
  const r = await buildModel(ck, { outDir: join(root.dir, 'm'), dtype: 'fp32', logits: 'last', kv: 'resident' });
  const c = await buildModel(ck, { outDir: join(root.dir, 'm'), dtype: 'fp32', logits: 'last' });
  expect(r.manifest.kv).toBe('resident');
  expect(c.manifest.kv).toBe('concat');
  resident = { session: (await createSession(r.dir, r.manifest, 'cpu', quiet)).session, manifest: r.manifest };
  concat = { session: (await createSession(c.dir, c.manifest, 'cpu', quiet)).session, manifest: c.manifest };
}, 120_000);
afterAll(async () => {
  await resident?.session.release();
  await concat?.session.release();
  await root?.remove();
});

const lastLogits = (out: Record<string, Tensor>, row: number): Float32Array => {
  const V = arch.vocabSize;
  return (out.logits.data as Float32Array).slice(row * V, (row + 1) * V);
};

describe('resident KV graph', () => {
  it('rows of different lengths in their own slots, chunked prefill then batched decode, equal their batch-1 concat runs; stale positions are masked', async () => {
    const rng = new Rng(5);
    const prompts = [randomTokens(rng, 9, arch.vocabSize), randomTokens(rng, 3, arch.vocabSize), randomTokens(rng, 14, arch.vocabSize)];
    const decodeTokens = prompts.map(() => randomTokens(rng, 4, arch.vocabSize));
    const slots = [2, 0, 1];

    // reference: each row alone on the concat graph
    const lora = emptyLoraFeeds(concat.manifest, 1);
    const expected: Float32Array[][] = [];
    for (let i = 0; i < prompts.length; i++) {
      const state = new KvState(concat.manifest, 1);
      const row: Float32Array[] = [(await runStep(concat.session, state, [prompts[i]], lora))[0][prompts[i].length - 1]!];
      for (const t of decodeTokens[i]) row.push((await runStep(concat.session, state, [[t]], lora))[0][0]!);
      expected.push(row);
    }

    const kv = new ResidentKv(kvShapeOf(resident.manifest), 3, 64, 8);
    const feeds = new FeedBuilder(resident.manifest, 3);
    const got: Float32Array[][] = prompts.map(() => []);
    for (let i = 0; i < prompts.length; i++) {
      for (let start = 0; start < prompts[i].length; start += 4) {
        const end = Math.min(prompts[i].length, start + 4);
        kv.reserve(end);
        const out = await resident.session.run(feeds.prefill(prompts[i].slice(start, end), slots[i], start, kv, null));
        kv.write(out, [slots[i]], [start], end - start);
        if (end === prompts[i].length) got[i].push(lastLogits(out, 0));
      }
    }
    const lens = prompts.map((p) => p.length);
    let staleChecked = false;
    for (let k = 0; k < 4; k++) {
      kv.reserve(Math.max(...lens) + 1);
      const tokens = decodeTokens.map((d) => d[k]);
      const out = await resident.session.run(feeds.decode(tokens, slots, lens, kv, [null, null, null]));
      if (!staleChecked) {
        // the short row's slot beyond its length: large values there must not leak into its logits
        const f = feeds.decode(tokens, slots, lens, kv, [null, null, null]);
        for (let l = 0; l < arch.numLayers; l++) {
          for (const name of [kvCacheKeyName(l), kvCacheValueName(l)]) {
            const d = f[name].data as Float32Array;
            const w = arch.numKvHeads * arch.headDim;
            for (let p = lens[1]; p < Math.max(...lens); p++) d.fill(500, (p * 3 + slots[1]) * w, (p * 3 + slots[1] + 1) * w);
          }
        }
        const dirty = await resident.session.run(f);
        expect(maxAbsDiff(lastLogits(dirty, 1), lastLogits(out, 1))).toBe(0);
        staleChecked = true;
      }
      kv.write(out, slots, lens, 1);
      for (let b = 0; b < 3; b++) {
        got[b].push(lastLogits(out, b));
        lens[b]++;
      }
    }
    let worst = 0;
    got.forEach((row, i) => row.forEach((l, k) => (worst = Math.max(worst, maxAbsDiff(l, expected[i][k])))));
    console.info(`[resident graph] vs concat graph alone: ${worst.toExponential(2)} over ${got.flat().length} logit rows`);
    expect(worst).toBeLessThanOrEqual(1e-4);
  }, 120_000);

  it('declares kv_cache / kv_rows / kv_lens inputs and kv_new outputs, and no attention_bias or present', () => {
    const s = resident.session;
    expect(s.inputNames).toEqual(expect.arrayContaining(['input_ids', 'position_ids', 'kv_rows', 'kv_lens', kvCacheKeyName(0), kvCacheValueName(1)]));
    expect(s.inputNames).not.toContain('attention_bias');
    // hidden_states: the lm_head input, fetched only for rows whose adapter has its own head (engine/head.ts)
    expect(s.outputNames).toEqual(['logits', 'hidden_states', 'kv_new.0.key', 'kv_new.0.value', 'kv_new.1.key', 'kv_new.1.value']);
    expect(s.inputNames).toEqual(expect.arrayContaining(['embed_keep', 'embed_rows']));
  });
});
