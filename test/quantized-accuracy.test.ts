import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type ort from 'onnxruntime-node';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildModel } from '../src/model/build.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import type { Checkpoint } from '../src/model/checkpoint/types.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import type { QuantizedWeights } from '../src/model/graph/llama.js';
import type { Manifest } from '../src/model/manifest.js';
import { createSession } from '../src/model/session.js';
import { KvState, real, runStep } from './helpers/lora-feeds.js';

/**
 * The accuracy cost of WEIGHTS=int8/int4 (served settings: accuracy_level 4) against fp32 on a
 * real trained model (stories260K) and the embedded random model. fp32 decodes greedily; each
 * quantized graph is then fed the same tokens (teacher forcing) and compared per position:
 * |Δ logprob| of fp32's token, max |Δ logprob| over the vocabulary, argmax agreement; plus the
 * quantized graph's own greedy run (how many tokens before it first departs from fp32's).
 * The numbers printed here are the ones in README "Quantized weights".
 */

const STORIES = fileURLToPath(new URL('../../shared/fixtures/stories260K/', import.meta.url));
const haveStories = existsSync(join(STORIES, 'stories260K.bin'));
if (!haveStories) console.warn(`SKIPPING the stories260K accuracy test: fixture folder ${STORIES} is absent (it lives in ../shared/fixtures beside the repo)`);
const silent = pino({ level: 'silent' });
const STEPS = 64;

const logSoftmax = (row: Float32Array): Float64Array => {
  const max = Math.max(...row);
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(row, (v) => v - lse);
};
const argmax = (row: ArrayLike<number>) => {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
};

interface Graph {
  session: ort.InferenceSession;
  manifest: Manifest;
}

async function open(ck: Checkpoint, outDir: string, weights?: QuantizedWeights, accuracyLevel: 0 | 4 = 4): Promise<Graph> {
  const built = await buildModel(ck, { outDir, dtype: 'fp32', logits: 'last', lora: false, ...(weights ? { weights, accuracyLevel } : {}) });
  expect(built.manifest.weights).toBe(weights);
  const { session } = await createSession(built.dir, built.manifest, 'cpu', silent);
  return { session, manifest: built.manifest };
}

/** feeds `prompt` then `forced` one token at a time (or its own greedy pick when forced is absent) */
async function decode(g: Graph, prompt: number[], forced?: number[]): Promise<{ tokens: number[]; rows: Float32Array[] }> {
  const state = new KvState(g.manifest, 1);
  const tokens: number[] = [];
  const rows: Float32Array[] = [];
  let row = real((await runStep(g.session, state, [prompt], {}))[0])[0]!;
  for (let t = 0; t < STEPS; t++) {
    rows.push(row);
    const next = forced ? forced[t]! : argmax(row);
    tokens.push(next);
    if (t < STEPS - 1) row = real((await runStep(g.session, state, [[next]], {}))[0])[0]!;
  }
  return { tokens, rows };
}

interface Accuracy {
  meanTokenDiff: number;
  maxTokenDiff: number;
  maxVocabDiff: number;
  agreement: number;
  freeRunPrefix: number;
}

type Case = `${QuantizedWeights}@${0 | 4}`;

async function measure(label: string, ck: Checkpoint, dir: string, prompt: number[]): Promise<Record<Case, Accuracy>> {
  const fp32 = await open(ck, dir);
  const ref = await decode(fp32, prompt);
  await fp32.session.release();
  const out = {} as Record<Case, Accuracy>;
  // accuracy_level 4 (served default: int8 activations) and 0 (float activations: weights alone)
  for (const [weights, level] of [['int8', 4], ['int4', 4], ['int8', 0], ['int4', 0]] as const) {
    const g = await open(ck, dir, weights, level);
    const forced = await decode(g, prompt, ref.tokens);
    const free = await decode(g, prompt);
    await g.session.release();
    let sum = 0;
    let maxToken = 0;
    let maxVocab = 0;
    let agree = 0;
    ref.rows.forEach((r, t) => {
      const a = logSoftmax(r);
      const b = logSoftmax(forced.rows[t]!);
      const tok = ref.tokens[t]!;
      const d = Math.abs(a[tok]! - b[tok]!);
      sum += d;
      maxToken = Math.max(maxToken, d);
      for (let v = 0; v < a.length; v++) maxVocab = Math.max(maxVocab, Math.abs(a[v]! - b[v]!));
      if (argmax(forced.rows[t]!) === tok) agree++;
    });
    const prefix = free.tokens.findIndex((tok, t) => tok !== ref.tokens[t]);
    out[`${weights}@${level}`] = { meanTokenDiff: sum / STEPS, maxTokenDiff: maxToken, maxVocabDiff: maxVocab, agreement: agree / STEPS, freeRunPrefix: prefix === -1 ? STEPS : prefix };
    const m = out[`${weights}@${level}`];
    console.info(
      `[accuracy] ${label} ${weights} accuracy_level ${level} vs fp32 over ${STEPS} greedy tokens: |Δ logprob| of fp32's token mean ${m.meanTokenDiff.toExponential(2)} max ${m.maxTokenDiff.toExponential(2)}; ` +
        `max over vocab ${m.maxVocabDiff.toExponential(2)}; greedy agreement (teacher-forced) ${(100 * m.agreement).toFixed(1)}%; free-run identical for ${m.freeRunPrefix}/${STEPS} tokens`,
    );
  }
  return out;
}

describe('accuracy of quantized base weights vs fp32', () => {
  let root: string;
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'loraserve-quant-acc-'));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it.skipIf(!haveStories)('stories260K (trained llama2.c weights; hidden 64, down_proj K = 172 is padded to 6 blocks)', async () => {
    const ck = await openCheckpoint(join(STORIES, 'stories260K.bin'), join(STORIES, 'tok512.bin'));
    const acc = await measure('stories260K', ck, join(root, 'stories'), [1]);
    // int8 is close to exact on a trained model; int4 costs more, but both stay quantized (≠ fp32)
    expect(acc['int8@4'].meanTokenDiff).toBeGreaterThan(0);
    expect(acc['int8@4'].meanTokenDiff).toBeLessThan(acc['int4@4'].meanTokenDiff);
    expect(acc['int8@4'].agreement).toBeGreaterThanOrEqual(0.95);
    expect(acc['int4@4'].agreement).toBeGreaterThanOrEqual(0.8);
    // float activations remove the activation-quantization part of the error
    expect(acc['int8@0'].meanTokenDiff).toBeLessThan(acc['int8@4'].meanTokenDiff);
  });

  it('the embedded random model (hidden 64, 4 layers)', async () => {
    const ck = await openCheckpoint(await ensureEmbeddedModel(join(root, 'embedded')));
    const acc = await measure('embedded', ck, join(root, 'embedded-cache'), [ck.architecture.bosTokenId ?? 1, 40, 41, 42]);
    expect(acc['int8@4'].meanTokenDiff).toBeGreaterThan(0);
    expect(acc['int8@4'].meanTokenDiff).toBeLessThan(acc['int4@4'].meanTokenDiff);
    expect(acc['int8@0'].meanTokenDiff).toBeLessThan(acc['int4@0'].meanTokenDiff);
  });
});
