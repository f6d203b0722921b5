import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type ort from 'onnxruntime-node';
import pino from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Architecture } from '../src/model/architecture.js';
import { buildModel, loadManifest } from '../src/model/build.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { loadTokenizer } from '../src/tokenizer/index.js';
import { ropeTables } from '../src/model/graph/llama.js';
import { float32ToFloat16Bits } from '../src/model/graph/onnx-builder.js';
import { ManifestSchema, loraTargetsFor, type Manifest } from '../src/model/manifest.js';
import { createSession, cudaUnavailableReason, emptyLoraFeeds, zeroPast } from '../src/model/session.js';
import { f16ToF32 } from '../src/adapters/safetensors.js';
import { KvState, leftPad, maxAbs, maxDiffAll, real, runStep } from './helpers/lora-feeds.js';
import { MemoryCheckpoint, Rng, randomCheckpoint, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';
import { referenceForward } from './reference/forward.js';

const silent = { info: () => {}, warn: () => {} };
let root = '';
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'loraserve-graph-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function open(ck: MemoryCheckpoint, opts: { dtype?: 'fp32' | 'fp16'; logits?: 'all' | 'last'; lora?: boolean; peer?: boolean } = {}) {
  const built = await buildModel(ck, { outDir: join(root, 'models'), dtype: opts.dtype ?? 'fp32', logits: opts.logits ?? 'all', lora: opts.lora, peer: opts.peer });
  const { session } = await createSession(built.dir, built.manifest, 'cpu', silent);
  return { session, manifest: built.manifest, dir: built.dir };
}

/** runs prompts (left-padded into one batch) and returns each row's logits per real token */
async function prefill(session: ort.InferenceSession, manifest: Manifest, prompts: number[][]) {
  const state = new KvState(manifest, prompts.length);
  const chunk = leftPad(prompts);
  const lora = manifest.lora ? emptyLoraFeeds(manifest, prompts.length) : {};
  const out = await runStep(session, state, chunk, lora);
  return { state, lora, logits: out.map((row) => real(row)) };
}

const CASES: { label: string; arch: Architecture; seed: number }[] = [
  { label: 'llama: GQA 4/2, tied embeddings, rotate_half', arch: tinyArchitecture(), seed: 11 },
  {
    label: 'qwen2: q/k/v biases, untied lm_head, rope_theta 1e6',
    arch: tinyArchitecture({ family: 'qwen2', hiddenSize: 48, intermediateSize: 80, numHeads: 6, numKvHeads: 2, headDim: 8, vocabSize: 100, rmsNormEps: 1e-6, ropeTheta: 1e6, tieWordEmbeddings: false, attentionBias: true }),
    seed: 12,
  },
  {
    label: 'qwen3: q/k norms, head_dim 12 with 4 heads over hidden 32',
    arch: tinyArchitecture({ family: 'qwen3', hiddenSize: 32, numHeads: 4, numKvHeads: 2, headDim: 12, qkNorm: true, ropeTheta: 1e6 }),
    seed: 14,
  },
  {
    label: 'llama2.c-style: interleaved RoPE, 3 layers, MHA',
    arch: tinyArchitecture({ hiddenSize: 32, intermediateSize: 72, numLayers: 3, numHeads: 4, numKvHeads: 4, headDim: 8, vocabSize: 64, ropeLayout: 'interleaved', tieWordEmbeddings: false }),
    seed: 13,
  },
];

describe.each(CASES)('$label', ({ arch, seed }) => {
  const ck = randomCheckpoint(arch, seed);
  const rng = new Rng(seed * 7);
  const prompt = randomTokens(rng, 7, arch.vocabSize);
  const short = randomTokens(rng, 4, arch.vocabSize);
  let session: ort.InferenceSession;
  let manifest: Manifest;
  let ref: Float32Array[];
  beforeAll(async () => {
    ({ session, manifest } = await open(ck));
    ref = referenceForward(ck, prompt);
  });

  it('prompt logits equal the reference forward (≤ 1e-4)', async () => {
    const { logits } = await prefill(session, manifest, [prompt]);
    const diff = maxDiffAll(logits[0], ref);
    console.info(`[${arch.family}/${arch.ropeLayout}] prompt vs reference: max |Δ| = ${diff.toExponential(2)} (logit scale ${maxAbs(ref[6]).toFixed(2)})`);
    expect(logits[0]).toHaveLength(7);
    expect(diff).toBeLessThanOrEqual(1e-4);
  });

  it('position_ids drive RoPE: spread-out positions match the reference at those positions, not at 0..6', async () => {
    const spread = prompt.map((_, i) => 3 * i + (i % 2));
    const state = new KvState(manifest, 1);
    const got = real((await runStep(session, state, [prompt], emptyLoraFeeds(manifest, 1), [spread]))[0]);
    const refSpread = referenceForward(ck, prompt, { positions: spread });
    const diff = maxDiffAll(got, refSpread);
    console.info(`[${arch.family}/${arch.ropeLayout}] positions ${spread.join(',')} vs reference: ${diff.toExponential(2)}`);
    expect(diff).toBeLessThanOrEqual(1e-4);
    expect(maxDiffAll(got.slice(1), ref.slice(1))).toBeGreaterThan(1e-2);
  });

  it('decode with the KV cache (prefill 4, then 3 single steps) equals full recompute', async () => {
    const state = new KvState(manifest, 1);
    const lora = emptyLoraFeeds(manifest, 1);
    const got = real((await runStep(session, state, [prompt.slice(0, 4)], lora))[0]);
    for (let t = 4; t < 7; t++) got.push(...real((await runStep(session, state, [[prompt[t]]], lora))[0]));
    expect(state.length).toBe(7);
    expect(state.past['past_key_values.0.key'].dims).toEqual([1, arch.numKvHeads, 7, arch.headDim]);
    const full = (await prefill(session, manifest, [prompt])).logits[0];
    const diffFull = maxDiffAll(got, full);
    const diffRef = maxDiffAll(got, ref);
    console.info(`[${arch.family}/${arch.ropeLayout}] KV decode vs full recompute: ${diffFull.toExponential(2)}, vs reference: ${diffRef.toExponential(2)}`);
    expect(diffFull).toBeLessThanOrEqual(1e-4);
    expect(diffRef).toBeLessThanOrEqual(1e-4);
  });

  it('a left-padded batch of two rows of different lengths equals each row alone, prefill and decode', async () => {
    const batch = await prefill(session, manifest, [prompt, short]);
    const aloneLong = (await prefill(session, manifest, [prompt])).logits[0];
    const aloneShort = await prefill(session, manifest, [short]);
    const next = [prompt[3], short[1]];
    // two decode steps on the padded batch and on the short row alone
    const batchSteps: Float32Array[][] = [];
    const soloSteps: Float32Array[] = [];
    for (let s = 0; s < 2; s++) {
      batchSteps.push((await runStep(session, batch.state, [[next[0] + s], [next[1] + s]], batch.lora)).map((r) => real(r)[0]));
      soloSteps.push(real((await runStep(session, aloneShort.state, [[next[1] + s]], aloneShort.lora))[0])[0]);
    }
    const refShort = referenceForward(ck, [...short, next[1], next[1] + 1]);
    const d = [
      maxDiffAll(batch.logits[0], aloneLong),
      maxDiffAll(batch.logits[1], aloneShort.logits[0]),
      maxDiffAll(batchSteps.map((r) => r[1]), soloSteps),
      maxDiffAll([...batch.logits[1], ...batchSteps.map((r) => r[1])], refShort),
    ];
    console.info(`[${arch.family}/${arch.ropeLayout}] padded batch: long row ${d[0].toExponential(2)}, short row ${d[1].toExponential(2)}, short row decode ${d[2].toExponential(2)}, short row vs reference ${d[3].toExponential(2)}`);
    for (const x of d) expect(x).toBeLessThanOrEqual(1e-4);
  });
});

describe('RoPE layouts', () => {
  it('the two layouts are different functions of the same weights (the layout tests can fail)', async () => {
    const { arch, seed } = CASES.find((c) => c.arch.ropeLayout === 'interleaved')!;
    const ck = randomCheckpoint(arch, seed);
    const other = new MemoryCheckpoint({ ...arch, ropeLayout: 'rotate_half' }, ck.tensors);
    const tokens = randomTokens(new Rng(5), 6, arch.vocabSize);
    const { session, manifest } = await open(ck);
    const { logits } = await prefill(session, manifest, [tokens]);
    expect(maxDiffAll(logits[0], referenceForward(ck, tokens))).toBeLessThanOrEqual(1e-4);
    expect(maxDiffAll(logits[0].slice(1), referenceForward(other, tokens).slice(1))).toBeGreaterThan(1e-2);
  });

  it('rotation tables: rot(x) = x·cos + (x·R)·sin is a rotation of each pair', () => {
    for (const ropeLayout of ['rotate_half', 'interleaved'] as const) {
      const a = tinyArchitecture({ ropeLayout, headDim: 8, maxPositions: 4 });
      const { cos, sin, rotation } = ropeTables(a);
      const x = new Rng(3).array(8, 1);
      const pos = 3;
      const y = new Float64Array(8);
      for (let j = 0; j < 8; j++) {
        let xr = 0;
        for (let k = 0; k < 8; k++) xr += x[k] * rotation[k * 8 + j];
        y[j] = x[j] * cos[pos * 8 + j] + xr * sin[pos * 8 + j];
      }
      // a rotation keeps the norm of every pair
      const pairs = ropeLayout === 'rotate_half' ? [0, 1, 2, 3].map((i) => [i, i + 4]) : [0, 1, 2, 3].map((i) => [2 * i, 2 * i + 1]);
      for (const [i, j] of pairs) expect(Math.hypot(y[i], y[j])).toBeCloseTo(Math.hypot(x[i], x[j]), 5);
    }
  });
});

describe('scaled RoPE (linear, llama3, yarn) at positions beyond original_max_position_embeddings', () => {
  const SCALED: { label: string; rope: NonNullable<Architecture['rope']> }[] = [
    { label: 'linear ×4', rope: { type: 'linear', factor: 4 } },
    // original 64: with head_dim 16 and theta 5e5 the pairs fall in all three bands (kept, blended, divided)
    { label: 'llama3 (factor 8, low 1, high 4)', rope: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 64 } },
    // original 256 of 512: the correction ramp spans pairs 0..3, so some pairs are partly interpolated
    { label: 'yarn ×2 with its attention factor', rope: { type: 'yarn', factor: 2, originalMaxPositions: 256, betaFast: 32, betaSlow: 1, attentionFactor: 0.1 * Math.log(2) + 1, truncate: true } },
    { label: 'yarn ×2, truncate false', rope: { type: 'yarn', factor: 2, originalMaxPositions: 256, betaFast: 32, betaSlow: 1, attentionFactor: 1.1, truncate: false } },
  ];
  it.each(SCALED)('$label: logits equal the reference and differ from plain RoPE', async ({ rope }) => {
    const arch = tinyArchitecture({ maxPositions: 512, ropeTheta: 500000, rope });
    const ck = randomCheckpoint(arch, 19);
    const tokens = randomTokens(new Rng(23), 8, arch.vocabSize);
    const positions = tokens.map((_, i) => (i < 2 ? i : 300 + 30 * i));
    const { session, manifest } = await open(ck);
    const got = real((await runStep(session, new KvState(manifest, 1), [tokens], emptyLoraFeeds(manifest, 1), [positions]))[0]);
    const ref = referenceForward(ck, tokens, { positions });
    const plain = referenceForward(new MemoryCheckpoint({ ...arch, rope: undefined }, ck.tensors), tokens, { positions });
    const diff = maxDiffAll(got, ref);
    const fromPlain = maxDiffAll(ref.slice(2), plain.slice(2));
    console.info(`[rope ${rope.type}] positions up to ${positions.at(-1)}: vs reference ${diff.toExponential(2)}, reference vs plain RoPE ${fromPlain.toFixed(3)}`);
    expect(diff).toBeLessThanOrEqual(1e-4);
    expect(fromPlain).toBeGreaterThan(1e-2);
    await session.release();
  });
});

describe('sliding window: a query sees only the last W keys', () => {
  it.each([
    { label: 'every layer (Mistral), W = 3', window: 3, layers: [0, 1] },
    { label: 'layer 1 only (Qwen2 past max_window_layers), W = 4', window: 4, layers: [1] },
  ])('$label: prompt, KV decode and a left-padded batch equal the reference; without the window they would not', async ({ window, layers }) => {
    const arch = tinyArchitecture({ family: 'mistral', slidingWindow: window, slidingWindowLayers: layers });
    const ck = randomCheckpoint(arch, 29);
    const rng = new Rng(31);
    const prompt = randomTokens(rng, 9, arch.vocabSize);
    const short = randomTokens(rng, 5, arch.vocabSize);
    const { session, manifest } = await open(ck);
    const ref = referenceForward(ck, [...prompt, 5, 6]);
    const state = new KvState(manifest, 1);
    const lora = emptyLoraFeeds(manifest, 1);
    const got = real((await runStep(session, state, [prompt], lora))[0]);
    for (const t of [5, 6]) got.push(...real((await runStep(session, state, [[t]], lora))[0]));
    const batch = await prefill(session, manifest, [prompt, short]);
    const d = [maxDiffAll(got, ref), maxDiffAll(batch.logits[1], referenceForward(ck, short)), maxDiffAll(batch.logits[0], ref.slice(0, 9))];
    const unwindowed = maxDiffAll(ref, referenceForward(new MemoryCheckpoint({ ...arch, slidingWindow: undefined, slidingWindowLayers: undefined }, ck.tensors), [...prompt, 5, 6]));
    console.info(`[window ${window} on layers ${layers.join(',')}] prompt+decode ${d[0].toExponential(2)}, padded short row ${d[1].toExponential(2)}, long row ${d[2].toExponential(2)}; the window moves logits by ${unwindowed.toFixed(2)}`);
    for (const x of d) expect(x).toBeLessThanOrEqual(1e-4);
    expect(unwindowed).toBeGreaterThan(1e-2);
    await session.release();
  });
});

describe('every checkpoint tensor is consumed', () => {
  it('the builder refuses a checkpoint holding a tensor no part of the graph reads, naming it', async () => {
    const ck = randomCheckpoint(tinyArchitecture({ numLayers: 1 }), 17);
    const extra = ck.with(new Map([['model.layers.0.self_attn.o_proj.bias', { shape: [64], data: new Float32Array(64) }]]), 'with-stray-bias');
    await expect(open(extra)).rejects.toThrow(/not used by the llama graph: model\.layers\.0\.self_attn\.o_proj\.bias/);
  });
});

describe('logits: last', () => {
  it('a logits:last graph returns [batch, 1, vocab] equal to the last position of logits:all', async () => {
    const ck = randomCheckpoint(CASES[1].arch, 12);
    const tokens = [[5, 9, 2, 77, 31], [8, 3]];
    const all = await open(ck, { logits: 'all' });
    const last = await open(ck, { logits: 'last' });
    const a = await prefill(all.session, all.manifest, tokens);
    const state = new KvState(last.manifest, 2);
    const out = await runStep(last.session, state, leftPad(tokens), emptyLoraFeeds(last.manifest, 2));
    expect(last.manifest.logits).toBe('last');
    const d = maxDiffAll(out.map((r) => real(r)[0]), a.logits.map((r) => r[r.length - 1]));
    console.info(`[logits last] vs last of all: ${d.toExponential(2)}`);
    expect(d).toBeLessThanOrEqual(1e-5);
    // the next decode step through the 'last' graph's cache also agrees with the reference
    const step = await runStep(last.session, state, [[4], [6]], emptyLoraFeeds(last.manifest, 2));
    const ref = referenceForward(ck, [8, 3, 6]);
    expect(maxDiffAll([real(step[1])[0]], [ref[2]])).toBeLessThanOrEqual(1e-4);
  });
});

describe('fp16', () => {
  it('float16 <-> float32 conversion rounds to nearest even and keeps specials', () => {
    for (const v of [0, -0, 1, -2.5, 65504, 1e-7, 6.1e-5, 3.14159, -1e4, 1 / 3]) {
      const back = f16ToF32(float32ToFloat16Bits(v));
      expect(Math.abs(back - v)).toBeLessThanOrEqual(Math.max(Math.abs(v) * 2 ** -11, 2 ** -25));
    }
    expect(float32ToFloat16Bits(1e6)).toBe(0x7c00);
    expect(float32ToFloat16Bits(-Infinity)).toBe(0xfc00);
    expect(Number.isNaN(f16ToF32(float32ToFloat16Bits(NaN)))).toBe(true);
    expect(float32ToFloat16Bits(1 + 2 ** -11)).toBe(0x3c00); // tie → even
    expect(float32ToFloat16Bits(1 + 3 * 2 ** -11)).toBe(0x3c02);
  });

  it.each([CASES[0], CASES[1]])('an fp16 graph of $label runs on CPU and stays within 2e-2 (relative) of the reference', async ({ arch, seed }) => {
    const ck = randomCheckpoint(arch, seed);
    const tokens = randomTokens(new Rng(seed * 7), 7, arch.vocabSize);
    const { session, manifest } = await open(ck, { dtype: 'fp16' });
    expect(manifest.maskValue).toBeGreaterThanOrEqual(-65504);
    const state = new KvState(manifest, 1);
    const lora = emptyLoraFeeds(manifest, 1);
    expect(lora[manifest.loraTargets[0].inputA].type).toBe('float16');
    const got = real((await runStep(session, state, [tokens.slice(0, 5)], lora))[0]);
    for (let t = 5; t < 7; t++) got.push(...real((await runStep(session, state, [[tokens[t]]], lora))[0]));
    expect(state.past['past_key_values.0.key'].type).toBe('float16');
    const ref = referenceForward(ck, tokens);
    const rel = maxDiffAll(got, ref) / Math.max(...ref.map((r) => maxAbs(r)));
    console.info(`[fp16 ${arch.family}] max |Δ| / max |logit| = ${rel.toExponential(2)}`);
    expect(rel).toBeLessThanOrEqual(2e-2);
  });
});

const STORIES = fileURLToPath(new URL('../../shared/fixtures/stories260K/', import.meta.url));
const haveStories = existsSync(join(STORIES, 'stories260K.bin'));
if (!haveStories) console.warn(`SKIPPING the stories260K test: fixture folder ${STORIES} is absent (it lives in ../shared/fixtures beside the repo)`);

describe.skipIf(!haveStories)('stories260K: real trained llama2.c weights (interleaved RoPE, GQA 8/4)', () => {
  it('greedy decoding from BOS through the KV cache matches the reference and tells the known story', async () => {
    const ck = await openCheckpoint(join(STORIES, 'stories260K.bin'), join(STORIES, 'tok512.bin'));
    expect(ck.architecture.ropeLayout).toBe('interleaved');
    const built = await buildModel(ck, { outDir: join(root, 'stories'), dtype: 'fp32', logits: 'last' });
    const { session } = await createSession(built.dir, built.manifest, 'cpu', silent);
    const state = new KvState(built.manifest, 1);
    const lora = emptyLoraFeeds(built.manifest, 1);
    const tokens = [1];
    const logits: Float32Array[] = [];
    for (let t = 0; t < 40; t++) {
      const out = real((await runStep(session, state, [[tokens[t]]], lora))[0])[0];
      logits.push(out);
      tokens.push(out.indexOf(Math.max(...out)));
    }
    const ref = referenceForward(ck, tokens.slice(0, -1));
    const diff = maxDiffAll(logits, ref);
    console.info(`[stories260K] 40 greedy steps vs reference: max |Δ| = ${diff.toExponential(2)}`);
    expect(diff).toBeLessThanOrEqual(1e-4);
    expect(ref.map((r) => r.indexOf(Math.max(...r)))).toEqual(tokens.slice(1));
    const text = (await loadTokenizer(ck.tokenizer!, ck.architecture)).decode(tokens);
    expect(text.trim()).toMatch(/^Once upon a time, there was a little girl named Lily\. She loved to play outside in the park\./);
  });
});

describe('peer export (Optimum-style names, attention_mask instead of attention_bias)', () => {
  it('has the Optimum I/O names and matches the bias graph and the reference on a padded batch with decode', async () => {
    const arch = CASES[0].arch;
    const ck = randomCheckpoint(arch, 11);
    const peer = await open(ck, { lora: false, peer: true });
    const plain = await open(ck, { lora: false });
    expect([...peer.session.inputNames].sort()).toEqual(
      ['input_ids', 'attention_mask', 'position_ids', ...[0, 1].flatMap((i) => [`past_key_values.${i}.key`, `past_key_values.${i}.value`])].sort(),
    );
    expect([...peer.session.outputNames]).toEqual([...plain.session.outputNames]);
    expect(peer.manifest.lora).toBe(false);
    const prompts = [randomTokens(new Rng(8), 6, arch.vocabSize), randomTokens(new Rng(9), 3, arch.vocabSize)];
    const runAll = async (s: { session: ort.InferenceSession; manifest: Manifest }) => {
      const state = new KvState(s.manifest, 2);
      const out = (await runStep(s.session, state, leftPad(prompts), {})).map((r) => real(r));
      for (const t of [7, 8]) (await runStep(s.session, state, [[t], [t + 1]], {})).forEach((r, b) => out[b].push(...real(r)));
      return out;
    };
    const [a, b] = [await runAll(peer), await runAll(plain)];
    const vsBias = Math.max(maxDiffAll(a[0], b[0]), maxDiffAll(a[1], b[1]));
    const vsRef = maxDiffAll(a[1], referenceForward(ck, [...prompts[1], 8, 9]));
    console.info(`[peer] vs attention_bias graph: ${vsBias.toExponential(2)}, short row vs reference: ${vsRef.toExponential(2)}`);
    expect(vsBias).toBeLessThanOrEqual(1e-5);
    expect(vsRef).toBeLessThanOrEqual(1e-4);
  });

  it('refuses peer with LoRA inputs', async () => {
    await expect(buildModel(randomCheckpoint(tinyArchitecture(), 1), { outDir: join(root, 'models'), dtype: 'fp32', logits: 'all', peer: true })).rejects.toThrow(/lora: false/);
  });
});

describe('build cache', () => {
  const arch = tinyArchitecture({ numLayers: 3 });
  it('a second build is cached; a changed option or source makes a new folder; progress is reported', async () => {
    const outDir = join(root, 'cache');
    const ck = randomCheckpoint(arch, 21);
    const lines: string[] = [];
    const first = await buildModel(ck, { outDir, dtype: 'fp32', logits: 'last', onProgress: (l) => lines.push(l) });
    expect(first.cached).toBe(false);
    expect(lines).toContain('building layer 3/3…');
    expect(ManifestSchema.parse(await loadManifest(first.dir))).toEqual(first.manifest);
    // the table plus ‖W‖_F of each projection (relativeNorm's divisor; test/effect.test.ts checks the values)
    expect(first.manifest.loraTargets).toEqual(loraTargetsFor(arch).map((t) => ({ ...t, weightNorm: expect.any(Number) })));
    expect((await readdir(first.dir)).sort()).toEqual(['manifest.json', 'model.onnx', 'model.onnx.data']);

    const again = await buildModel(ck, { outDir, dtype: 'fp32', logits: 'last', onProgress: (l) => lines.push(`again ${l}`) });
    expect(again).toMatchObject({ dir: first.dir, cached: true });
    expect(lines.some((l) => l.startsWith('again'))).toBe(false);

    const otherOption = await buildModel(ck, { outDir, dtype: 'fp32', logits: 'all' });
    expect(otherOption.cached).toBe(false);
    expect(otherOption.dir).not.toBe(first.dir);

    const w = ck.tensors.get('model.norm.weight')!;
    const changedData = w.data.slice();
    changedData[0] += 1e-3;
    const changed = ck.with(new Map([['model.norm.weight', { shape: w.shape, data: changedData }]]));
    const otherSource = await buildModel(changed, { outDir, dtype: 'fp32', logits: 'last' });
    expect(otherSource.cached).toBe(false);
    expect(otherSource.dir).not.toBe(first.dir);

    // no temporary folders are left behind
    expect((await readdir(outDir)).filter((n) => n.startsWith('.'))).toEqual([]);
  });

  it('hashes source files when the checkpoint has them, and rebuilds a folder whose manifest is broken', async () => {
    const outDir = join(root, 'cache-files');
    const file = join(root, 'weights.bin');
    await writeFile(file, 'version one');
    const base = randomCheckpoint(arch, 22);
    const withFile = () => new MemoryCheckpoint(base.architecture, base.tensors, base.modelId, [file]);
    const a = await buildModel(withFile(), { outDir, dtype: 'fp32', logits: 'last' });
    expect((await buildModel(withFile(), { outDir, dtype: 'fp32', logits: 'last' })).cached).toBe(true);
    await writeFile(file, 'version two');
    const b = await buildModel(withFile(), { outDir, dtype: 'fp32', logits: 'last' });
    expect(b.cached).toBe(false);
    expect(b.dir).not.toBe(a.dir);

    await writeFile(join(b.dir, 'manifest.json'), '{"truncated": ');
    const c = await buildModel(withFile(), { outDir, dtype: 'fp32', logits: 'last' });
    expect(c).toMatchObject({ dir: b.dir, cached: false });
    expect((await loadManifest(c.dir)).sourceHash).toBe(b.manifest.sourceHash);
  });

  it('a checkpoint with a wrongly shaped tensor fails the build with the tensor named, leaving no folder', async () => {
    const outDir = join(root, 'cache-bad');
    const ck = randomCheckpoint(arch, 23);
    const bad = ck.with(new Map([['model.layers.1.mlp.up_proj.weight', { shape: [arch.intermediateSize, arch.hiddenSize - 1], data: new Float32Array(arch.intermediateSize * (arch.hiddenSize - 1)) }]]));
    await expect(buildModel(bad, { outDir, dtype: 'fp32', logits: 'last' })).rejects.toThrow(/model\.layers\.1\.mlp\.up_proj\.weight has shape \[96, 63\]/);
    expect(await readdir(outDir)).toEqual([]);
  });
});

describe('session', () => {
  it('auto falls back to CPU with the CUDA error as the reason (or uses CUDA where it loads); cpu is cpu', async () => {
    const built = await buildModel(randomCheckpoint(tinyArchitecture(), 31), { outDir: join(root, 'models'), dtype: 'fp32', logits: 'last' });
    const warnings: string[] = [];
    const log = { info: () => {}, warn: (m: string) => warnings.push(m) };
    const cudaError = await createSession(built.dir, built.manifest, 'cuda', silent).then(
      (s) => (s.provider === 'cuda' ? null : 'wrong provider'),
      (e: unknown) => (e instanceof Error ? e.message : String(e)),
    );
    const auto = await createSession(built.dir, built.manifest, 'auto', log);
    if (cudaError === null) {
      expect(auto.provider).toBe('cuda');
    } else {
      expect(cudaError).not.toBe('wrong provider');
      expect(auto.provider).toBe('cpu');
      // without the provider libraries CUDA is not even asked for (onnxruntime would print its own red error first)
      const missing = cudaUnavailableReason();
      expect(auto.reason).toContain(missing ?? cudaError);
      expect(warnings.join('\n')).toContain(missing ?? cudaError);
    }
    // the service's own logger fits the log parameter
    const cpu = await createSession(built.dir, built.manifest, 'cpu', pino({ level: 'silent' }));
    expect(cpu).toMatchObject({ provider: 'cpu', reason: 'DEVICE=cpu' });
    expect([...cpu.session.outputNames]).toEqual(['logits', ...Array.from({ length: 2 }, (_, i) => [`present.${i}.key`, `present.${i}.value`]).flat()]);
  });

  it('emptyLoraFeeds and zeroPast give the shapes the graph declares', () => {
    const m = ManifestSchema.parse({
      manifestVersion: 1, builderVersion: 'x', sourceHash: 'x', modelId: 'x', architecture: tinyArchitecture(), dtype: 'fp32', logits: 'last',
      lora: true, maskValue: -1e9, files: { graph: 'model.onnx', weights: 'model.onnx.data' }, loraTargets: loraTargetsFor(tinyArchitecture()),
    });
    const lora = emptyLoraFeeds(m, 3);
    // A, B, and the neutral DoRA factor / lora_B bias of every target
    expect(Object.keys(lora)).toHaveLength(2 * 7 * 4);
    expect(lora['lora.1.down_proj.A'].dims).toEqual([3, 96, 0]);
    expect(lora['lora.1.down_proj.B'].dims).toEqual([3, 0, 64]);
    expect(lora['lora.1.down_proj.magnitude'].dims).toEqual([1, 1, 1]);
    expect([...(lora['lora.1.down_proj.magnitude'].data as Float32Array)].every((v) => v === 1)).toBe(true);
    expect([...(lora['lora.1.down_proj.bias'].data as Float32Array)].every((v) => v === 0)).toBe(true);
    const past = zeroPast(m, 3);
    expect(past['past_key_values.1.value'].dims).toEqual([3, 2, 0, 16]);
  });
});
