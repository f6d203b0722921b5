import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ALL_PROJECTIONS, type Architecture } from '../src/model/architecture.js';
import { buildModel } from '../src/model/build.js';
import type { LoraTarget, Manifest } from '../src/model/manifest.js';
import { createSession, emptyLoraFeeds } from '../src/model/session.js';
import {
  KvState,
  batchInvariantRank,
  broadcastLoraFeeds,
  leftPad,
  loraFeeds,
  maxAbs,
  maxAbsDiff,
  maxDiffAll,
  mergeAdapter,
  randomAdapter,
  real,
  runStep,
  toFloat32,
  type Adapter,
} from './helpers/lora-feeds.js';
import { Rng, randomCheckpoint, randomTokens, tinyArchitecture, type MemoryCheckpoint } from './helpers/random-checkpoint.js';
import { referenceForward } from './reference/forward.js';

const silent = { info: () => {}, warn: () => {} };
let root = '';
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'loraserve-lora-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function open(ck: MemoryCheckpoint, opts: { dtype?: 'fp32' | 'fp16'; lora?: boolean; peer?: boolean } = {}) {
  const built = await buildModel(ck, { outDir: join(root, 'models'), dtype: opts.dtype ?? 'fp32', logits: 'all', lora: opts.lora, peer: opts.peer });
  const { session } = await createSession(built.dir, built.manifest, 'cpu', silent);
  return { session, manifest: built.manifest };
}

/** ranks 0..4 varying by layer and module, so one step mixes ranks, including rank-0 modules */
const mixedRanks = (t: LoraTarget) => (t.layer * 3 + ALL_PROJECTIONS.indexOf(t.module)) % 5;
/** attention only, rank 6; down_proj rank 2; gate/up not targeted */
const attentionRanks = (t: LoraTarget) => (t.module.endsWith('_proj') && ['q_proj', 'k_proj', 'v_proj', 'o_proj'].includes(t.module) ? 6 : t.module === 'down_proj' ? 2 : -1);

/** prefill `prompts` (left-padded) with per-row LoRA feeds, then `decode` steps of one token per row */
async function generate(session: ort.InferenceSession, manifest: Manifest, prompts: number[][], lora: Record<string, ort.Tensor>, decode: number[][] = []) {
  const state = new KvState(manifest, prompts.length);
  const out = (await runStep(session, state, leftPad(prompts), lora)).map((r) => real(r));
  for (const tokens of decode) {
    const step = await runStep(session, state, tokens.map((t) => [t]), lora);
    step.forEach((r, b) => out[b].push(...real(r)));
  }
  return { logits: out, state };
}

const CASES: { label: string; arch: Architecture; seed: number }[] = [
  { label: 'llama GQA, tied', arch: tinyArchitecture(), seed: 41 },
  {
    label: 'qwen2 with q/k/v biases, untied',
    arch: tinyArchitecture({ family: 'qwen2', hiddenSize: 48, intermediateSize: 80, numHeads: 6, numKvHeads: 2, headDim: 8, vocabSize: 100, rmsNormEps: 1e-6, ropeTheta: 1e6, tieWordEmbeddings: false, attentionBias: true }),
    seed: 42,
  },
];

describe.each(CASES)('LoRA graph: $label', ({ arch, seed }) => {
  const ck = randomCheckpoint(arch, seed);
  const rng = new Rng(seed);
  const prompt = randomTokens(rng, 7, arch.vocabSize);
  let session: ort.InferenceSession;
  let manifest: Manifest;
  let X: Adapter;
  let Y: Adapter;
  beforeAll(async () => {
    ({ session, manifest } = await open(ck));
    X = randomAdapter(manifest.loraTargets, seed + 1, mixedRanks, 2);
    Y = randomAdapter(manifest.loraTargets, seed + 2, attentionRanks, 0.5);
  });

  it('per-module ranks (some 0) equal the reference forward of the merged checkpoint W + scale·B·A (≤ 1e-4)', async () => {
    expect(new Set([...X.values()].map((m) => m.rank))).toEqual(new Set([0, 1, 2, 3, 4]));
    const merged = mergeAdapter(ck, manifest.loraTargets, X);
    const ref = referenceForward(merged, prompt);
    const { logits } = await generate(session, manifest, [prompt], loraFeeds(manifest, [X]));
    const diff = maxDiffAll(logits[0], ref);
    const effect = maxDiffAll(ref, referenceForward(ck, prompt));
    console.info(`[lora ${arch.family}] graph+adapter vs merged reference: ${diff.toExponential(2)} (adapter moves logits by ${effect.toFixed(2)})`);
    expect(effect).toBeGreaterThan(0.1);
    expect(diff).toBeLessThanOrEqual(1e-4);
  });

  it('a batch of 3 rows with 3 different adapters (one none) gives each row its solo result, prefill and decode', async () => {
    const rows: (Adapter | null)[] = [X, null, Y];
    const decode = [[3, 3, 3], [9, 9, 9]];
    // same prompt in every row: rows differ only through their adapters, so a leak could not hide
    const prompts = [prompt, prompt, prompt];
    const diffs: Record<string, number[]> = { 'max rank': [], 'rank ≥ 2': [] };
    for (const [policy, rankFor] of [['max rank', (r: number) => r], ['rank ≥ 2', batchInvariantRank]] as const) {
      const together = await generate(session, manifest, prompts, loraFeeds(manifest, rows, rankFor), decode);
      for (let b = 0; b < 3; b++) {
        const solo = await generate(session, manifest, [prompt], loraFeeds(manifest, [rows[b]], rankFor), decode.map((d) => [d[b]]));
        diffs[policy].push(maxDiffAll(together.logits[b], solo.logits[0]));
        const ref = referenceForward(rows[b] ? mergeAdapter(ck, manifest.loraTargets, rows[b]!) : ck, [...prompt, 3, 9]);
        expect(maxDiffAll(together.logits[b], ref)).toBeLessThanOrEqual(1e-4);
      }
      expect(maxDiffAll(together.logits[0], together.logits[1])).toBeGreaterThan(0.1);
      expect(maxDiffAll(together.logits[2], together.logits[1])).toBeGreaterThan(0.1);
    }
    const show = (k: string) => diffs[k].map((d) => d.toExponential(2)).join(', ');
    console.info(`[lora ${arch.family}] 3 rows / 3 adapters vs solo — ranks padded to the step's max: ${show('max rank')}; never rank 1: ${show('rank ≥ 2')}`);
    // a rank-1 module padded to a wider rank is summed on another MLAS path: last-bit differences only
    for (const d of diffs['max rank']) expect(d).toBeLessThanOrEqual(1e-4);
    for (const d of diffs['rank ≥ 2']) expect(d).toBeLessThanOrEqual(1e-5);
  });

  it('rows of different lengths (left padding) with different adapters match their solo runs', async () => {
    const prompts = [prompt, prompt.slice(2), prompt.slice(0, 3)];
    const rows: (Adapter | null)[] = [Y, X, null];
    const together = await generate(session, manifest, prompts, loraFeeds(manifest, rows, batchInvariantRank), [[5, 6, 7]]);
    const diffs: number[] = [];
    for (let b = 0; b < 3; b++) {
      const solo = await generate(session, manifest, [prompts[b]], loraFeeds(manifest, [rows[b]], batchInvariantRank), [[[5, 6, 7][b]]]);
      diffs.push(maxDiffAll(together.logits[b], solo.logits[0]));
    }
    console.info(`[lora ${arch.family}] padded rows vs solo: ${diffs.map((d) => d.toExponential(2)).join(', ')}`);
    for (const d of diffs) expect(d).toBeLessThanOrEqual(1e-5);
  });

  it('broadcast A/B (batch dimension 1) equal per-row feeds of the same adapter', async () => {
    const prompts = [prompt, prompt.slice(1)];
    const perRow = await generate(session, manifest, prompts, loraFeeds(manifest, [X, X], batchInvariantRank), [[1, 2]]);
    const broadcast = await generate(session, manifest, prompts, broadcastLoraFeeds(manifest, X, batchInvariantRank), [[1, 2]]);
    expect(broadcastLoraFeeds(manifest, X)[manifest.loraTargets[0].inputA].dims[0]).toBe(1);
    const prefill = Math.max(...[0, 1].map((b) => maxDiffAll(perRow.logits[b].slice(0, -1), broadcast.logits[b].slice(0, -1))));
    const decode = Math.max(...[0, 1].map((b) => maxDiffAll(perRow.logits[b].slice(-1), broadcast.logits[b].slice(-1))));
    console.info(`[lora ${arch.family}] broadcast vs per-row: prefill ${prefill.toExponential(2)}, decode ${decode.toExponential(2)}`);
    expect(prefill).toBeLessThanOrEqual(1e-5);
    // decode: a batch-1 A turns B row products [1, in]·A into one [B, in]·A product, which MLAS sums in another order
    expect(decode).toBeLessThanOrEqual(1e-4);
    expect(maxDiffAll(broadcast.logits[0], referenceForward(mergeAdapter(ck, manifest.loraTargets, X), [...prompt, 1]))).toBeLessThanOrEqual(1e-4);
  });
});

describe('rank 0', () => {
  const arch = CASES[1].arch;
  const ck = randomCheckpoint(arch, 51);
  const prompts = [randomTokens(new Rng(1), 6, arch.vocabSize), randomTokens(new Rng(2), 4, arch.vocabSize)];

  it('r = 0 (empty A/B) is bit-identical to the graph built with lora: false; r = 1 zeros agree closely', async () => {
    const withLora = await open(ck);
    const plain = await open(ck, { lora: false });
    expect(plain.manifest.loraTargets).toEqual([]);
    expect(plain.session.inputNames.some((n) => n.startsWith('lora.'))).toBe(false);
    const decode = [[4, 5]];
    const a = await generate(withLora.session, withLora.manifest, prompts, emptyLoraFeeds(withLora.manifest, 2), decode);
    const b = await generate(plain.session, plain.manifest, prompts, {}, decode);
    const logitsDiff = Math.max(...[0, 1].map((r) => maxDiffAll(a.logits[r], b.logits[r])));
    const presentDiff = Math.max(...Object.keys(a.state.past).map((k) => maxAbsDiff(toFloat32(a.state.past[k]), toFloat32(b.state.past[k]))));
    expect(logitsDiff).toBe(0);
    expect(presentDiff).toBe(0);
    const zeros = await generate(withLora.session, withLora.manifest, prompts, loraFeeds(withLora.manifest, [null, null], () => 1), decode);
    const r1 = Math.max(...[0, 1].map((r) => maxDiffAll(zeros.logits[r], b.logits[r])));
    console.info(`[rank 0] r=0 vs lora:false: logits ${logitsDiff}, present ${presentDiff}; r=1 zeros vs lora:false: ${r1.toExponential(2)}`);
    expect(r1).toBeLessThanOrEqual(1e-5);
  });

  it('an fp16 LoRA graph with an adapter stays within 2e-2 (relative) of the merged reference', async () => {
    const { session, manifest } = await open(ck, { dtype: 'fp16' });
    const adapter = randomAdapter(manifest.loraTargets, 52, mixedRanks, 2);
    const { logits } = await generate(session, manifest, [prompts[0]], loraFeeds(manifest, [adapter]), [[7]]);
    const ref = referenceForward(mergeAdapter(ck, manifest.loraTargets, adapter), [...prompts[0], 7]);
    const rel = maxDiffAll(logits[0], ref) / Math.max(...ref.map((r) => maxAbs(r)));
    console.info(`[lora fp16] max |Δ| / max |logit| = ${rel.toExponential(2)}`);
    expect(rel).toBeLessThanOrEqual(2e-2);
  });
});
