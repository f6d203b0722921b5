import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Architecture } from '../src/model/architecture.js';
import { buildModel } from '../src/model/build.js';
import { createSession, emptyLoraFeeds } from '../src/model/session.js';
import { KvState, maxDiffAll, real, runStep } from './helpers/lora-feeds.js';
import { dequantizedCheckpoint, dequantizedProjections, quantizedWidths } from './helpers/quantized-graph.js';
import { Rng, randomCheckpoint, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';
import { referenceForward } from './reference/forward.js';

/**
 * Every family's projections go through the same quantized `projection`: biases (Qwen2), q/k
 * norms (Qwen3), fused qkv_proj / gate_up_proj (Phi-3), Gemma 2's sandwich norms and soft-caps.
 * The graph (accuracy_level 0) must equal the reference forward of the dequantized checkpoint.
 */
const CASES: { label: string; arch: Architecture; projections: number }[] = [
  { label: 'qwen2 (q/k/v biases, K = 80 padded)', arch: tinyArchitecture({ family: 'qwen2', hiddenSize: 48, intermediateSize: 80, numHeads: 6, numKvHeads: 2, headDim: 8, vocabSize: 100, attentionBias: true, tieWordEmbeddings: false, ropeTheta: 1e6 }), projections: 7 },
  { label: 'qwen3 (q/k norms)', arch: tinyArchitecture({ family: 'qwen3', hiddenSize: 32, numHeads: 4, numKvHeads: 2, headDim: 12, qkNorm: true, ropeTheta: 1e6 }), projections: 7 },
  { label: 'phi3 (fused qkv_proj and gate_up_proj)', arch: tinyArchitecture({ family: 'phi3', fusedProjections: true, numHeads: 4, numKvHeads: 2, headDim: 16, tieWordEmbeddings: false }), projections: 4 },
  {
    label: 'gemma2 (sandwich norms, soft-caps, GELU)',
    arch: tinyArchitecture({ family: 'gemma2', numLayers: 3, numHeads: 4, numKvHeads: 2, headDim: 24, normPlusOne: true, embedScale: true, sandwichNorms: true, activation: 'gelu_tanh', attnSoftcap: 5, finalSoftcap: 8, queryPreAttnScalar: 20 }),
    projections: 7,
  },
];

describe('quantized projections in every family (int4, accuracy_level 0) vs the reference of the dequantized checkpoint', () => {
  let root: string;
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'loraserve-quant-fam-'));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  it.each(CASES)('$label', async ({ arch, projections }) => {
    const ck = randomCheckpoint(arch, 83);
    const built = await buildModel(ck, { outDir: root, dtype: 'fp32', logits: 'all', lora: true, weights: 'int4', accuracyLevel: 0 });
    const deq = await dequantizedProjections(built.dir);
    // every projection, plus the LM head, all at 4 bits (the head as a Q4_0 GGUF's output is)
    expect(deq.size).toBe(arch.numLayers * projections + 1);
    const widths = await quantizedWidths(built.dir);
    expect(widths.get('lm_head.weight')).toBe(4);
    expect(new Set(widths.values())).toEqual(new Set([4]));
    const { reference, tensors } = dequantizedCheckpoint(ck, deq);
    const { session } = await createSession(built.dir, built.manifest, 'cpu', pino({ level: 'silent' }));
    const prompt = randomTokens(new Rng(5), 12, arch.vocabSize);
    const logits = real((await runStep(session, new KvState(built.manifest, 1), [prompt], emptyLoraFeeds(built.manifest, 1)))[0]);
    await session.release();
    const ref = referenceForward(reference, prompt, { prefill: prompt.length });
    expect(tensors.get('lm_head.weight')!.data).not.toEqual(ck.tensor(arch.tieWordEmbeddings ? 'model.embed_tokens.weight' : 'lm_head.weight')!.read());
    const plain = referenceForward(ck, prompt, { prefill: prompt.length });
    // the dequantized reference matches; the fp32 one does not (the quantization is visible)
    expect(maxDiffAll(logits, ref)).toBeLessThanOrEqual(1e-4);
    expect(maxDiffAll(logits, plain)).toBeGreaterThan(1e-3);
  });

  it('an fp16 graph with int4 projections runs on CPU (float16 scales) and stays within 2e-2 (relative) of its dequantized reference', async () => {
    const { arch } = CASES[0]!;
    const ck = randomCheckpoint(arch, 84);
    const built = await buildModel(ck, { outDir: root, dtype: 'fp16', logits: 'all', lora: true, weights: 'int4', accuracyLevel: 0 });
    const { reference } = dequantizedCheckpoint(ck, await dequantizedProjections(built.dir));
    const { session } = await createSession(built.dir, built.manifest, 'cpu', pino({ level: 'silent' }));
    const prompt = randomTokens(new Rng(6), 12, arch.vocabSize);
    const logits = real((await runStep(session, new KvState(built.manifest, 1), [prompt], emptyLoraFeeds(built.manifest, 1)))[0]);
    await session.release();
    const ref = referenceForward(reference, prompt, { prefill: prompt.length });
    const scale = Math.max(...ref.map((r) => Math.max(...r.map(Math.abs))));
    const rel = maxDiffAll(logits, ref) / scale;
    console.info(`[fp16 int4] max |Δ| / max |logit| = ${rel.toExponential(2)}`);
    expect(rel).toBeLessThan(2e-2);
  });
});
