import * as ort from 'onnxruntime-node';
import type { InferenceSession, Tensor } from 'onnxruntime-node';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Architecture } from '../src/model/architecture.js';
import { FeedBuilder, kvShapeOf, type LoraModule, type ResidentAdapter } from '../src/engine/batch.js';
import { GqaKv, hostKvBuffers } from '../src/engine/kv-store.js';
import { runStep as runEngineStep } from '../src/engine/step-run.js';
import { buildModel } from '../src/model/build.js';
import { gqaSupport } from '../src/model/graph/gqa.js';
import { GraphBuilder, float, int } from '../src/model/graph/onnx-builder.js';
import { kvCacheKeyName, kvPresentKeyName, KV_SEQLENS, KV_TOTAL, type LoraTarget, type Manifest } from '../src/model/manifest.js';
import { createSession } from '../src/model/session.js';
import { KvState, broadcastLoraFeeds, maxAbsDiff, randomAdapter, runStep, type Adapter } from './helpers/lora-feeds.js';
import { Rng, randomCheckpoint, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';
import { attentionOnly, engineWeights, mixedRanks, tempRoot } from './engine-setup.js';

/**
 * The gqa KV contract (graph/gqa.ts: GroupQueryAttention over the engine's slot-major cache, bound
 * as past and present, SkipSimplifiedLayerNormalization for residual + RMSNorm) against the
 * plain-ops concat graph, for every family and RoPE variant the builder supports, in fp32:
 * sequences prefilled in chunks of 4 into their own slots while others decode, decoded together
 * with different adapters per row, one ending mid-way (its slot filled by moving another row,
 * GqaKv.order) and a new one prefilled into the hole; each row's logits equal its batch-1 run on
 * the concat graph within 1e-4.
 */

const quiet = { info: () => {}, warn: () => {} };
let root: Awaited<ReturnType<typeof tempRoot>>;
beforeAll(async () => {
  root = await tempRoot('gqa-graph');
});
afterAll(async () => {
  await root?.remove();
});

const dims: Partial<Architecture> = { maxPositions: 64 };
const CASES: { label: string; arch: Architecture; rotary: 'inside' | 'outside' }[] = [
  { label: 'llama: GQA 4/2, rotate_half', arch: tinyArchitecture(dims), rotary: 'inside' },
  { label: 'llama: interleaved RoPE (llama2.c layout), MHA', arch: tinyArchitecture({ ...dims, numKvHeads: 4, ropeLayout: 'interleaved', tieWordEmbeddings: false }), rotary: 'inside' },
  { label: 'llama3 rope scaling past the original context', arch: tinyArchitecture({ ...dims, ropeTheta: 500000, rope: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 8 } }), rotary: 'inside' },
  { label: 'yarn with its attention factor', arch: tinyArchitecture({ ...dims, ropeTheta: 500000, rope: { type: 'yarn', factor: 4, originalMaxPositions: 16, betaFast: 32, betaSlow: 1, attentionFactor: 0.1 * Math.log(4) + 1, truncate: true } }), rotary: 'inside' },
  { label: 'qwen2: q/k/v biases', arch: tinyArchitecture({ ...dims, family: 'qwen2', attentionBias: true, ropeTheta: 1e6, tieWordEmbeddings: false }), rotary: 'inside' },
  { label: 'qwen3: q/k norms, head_dim 16', arch: tinyArchitecture({ ...dims, family: 'qwen3', qkNorm: true, ropeTheta: 1e6 }), rotary: 'inside' },
  { label: 'qwen3: q/k norms, head_dim 24 (RoPE outside the op)', arch: tinyArchitecture({ ...dims, family: 'qwen3', numHeads: 4, numKvHeads: 2, headDim: 24, qkNorm: true, ropeTheta: 1e6 }), rotary: 'outside' },
  {
    label: 'phi3: fused projections, LongRoPE switching tables past 16 (RoPE outside the op)',
    arch: tinyArchitecture({ ...dims, family: 'phi3', fusedProjections: true, tieWordEmbeddings: false, rope: { type: 'longrope', shortFactor: [1, 1.2, 1.5, 2, 2, 3, 4, 4], longFactor: [2, 3, 4, 6, 8, 8, 12, 16], originalMaxPositions: 16, attentionFactor: 1.19 } }),
    rotary: 'outside',
  },
  { label: 'mistral: sliding window 4 on every layer', arch: tinyArchitecture({ ...dims, family: 'mistral', slidingWindow: 4, slidingWindowLayers: [0, 1] }), rotary: 'inside' },
  {
    label: 'gemma2: soft-capping, query_pre_attn_scalar, window 5 on layers 0 and 2, sandwich norms',
    arch: tinyArchitecture({ ...dims, family: 'gemma2', numLayers: 3, normPlusOne: true, embedScale: true, sandwichNorms: true, activation: 'gelu_tanh', attnSoftcap: 5, finalSoftcap: 8, queryPreAttnScalar: 20, slidingWindow: 5, slidingWindowLayers: [0, 2] }),
    rotary: 'inside',
  },
  {
    label: 'gemma3: local RoPE theta on windowed layers, global theta elsewhere, q/k norms, MQA',
    arch: tinyArchitecture({ ...dims, family: 'gemma3_text', numLayers: 3, numKvHeads: 1, normPlusOne: true, embedScale: true, sandwichNorms: true, activation: 'gelu_tanh', qkNorm: true, ropeTheta: 1e6, localRopeTheta: 10000, slidingWindow: 4, slidingWindowLayers: [0, 1], queryPreAttnScalar: 16 }),
    rotary: 'inside',
  },
];

function residentAdapter(targets: readonly LoraTarget[], a: Adapter, versionId: string): ResidentAdapter {
  const w = engineWeights(targets, a);
  return { versionId, modules: targets.map((t): LoraModule | null => w.modules.get(t.name) ?? null) };
}

interface Seq {
  prompt: number[];
  decode: number[];
  adapter: Adapter | null;
}

/** the concat graph alone, batch 1: the prompt's last logits, then one row per decode token */
async function reference(session: InferenceSession, manifest: Manifest, s: Seq): Promise<Float32Array[]> {
  const state = new KvState(manifest, 1);
  const lora = broadcastLoraFeeds(manifest, s.adapter);
  const out: Float32Array[] = [(await runStep(session, state, [s.prompt], lora))[0][s.prompt.length - 1]!];
  for (const t of s.decode) out.push((await runStep(session, state, [[t]], lora))[0][0]!);
  return out;
}

const lastLogits = (out: Record<string, Tensor>, row: number, V: number): Float32Array => (out.logits.data as Float32Array).slice(row * V, (row + 1) * V);

describe.each(CASES)('gqa graph: $label', ({ arch, rotary }) => {
  it('equals the plain-ops graph row by row: chunked prefill beside decoding rows, mixed adapters, a row leaving and one joining in its hole', async () => {
    expect(gqaSupport(arch)).toEqual({ ok: true, rotary });
    const ck = randomCheckpoint(arch, 61);
    const g = await buildModel(ck, { outDir: join(root.dir, 'm'), dtype: 'fp32', logits: 'last', kv: 'gqa' });
    const c = await buildModel(ck, { outDir: join(root.dir, 'm'), dtype: 'fp32', logits: 'last' });
    expect(g.manifest.kv).toBe('gqa');
    const gqa = (await createSession(g.dir, g.manifest, 'cpu', quiet)).session;
    const concat = (await createSession(c.dir, c.manifest, 'cpu', quiet)).session;
    try {
      const targets = g.manifest.loraTargets;
      // Phi-3's fused modules (qkv_proj, gate_up_proj) are not in the helpers' tables
      const a1 = randomAdapter(targets, 1, arch.fusedProjections ? (t) => 1 + ((t.layer + t.module.length) % 4) : mixedRanks);
      const a2 = randomAdapter(targets, 2, arch.fusedProjections ? (t) => (t.module === 'qkv_proj' || t.module === 'o_proj' ? 6 : -1) : attentionOnly);
      const resident = new Map<Adapter, ResidentAdapter>([
        [a1, residentAdapter(targets, a1, 'a1')],
        [a2, residentAdapter(targets, a2, 'a2')],
      ]);
      const rng = new Rng(7);
      const V = arch.vocabSize;
      // A, B, C start together; B ends after 2 decode steps; D is prefilled into B's hole while A and C decode
      const seqs: Seq[] = [
        { prompt: randomTokens(rng, 9, V), decode: randomTokens(rng, 5, V), adapter: a1 },
        { prompt: randomTokens(rng, 3, V), decode: randomTokens(rng, 2, V), adapter: null },
        { prompt: randomTokens(rng, 14, V), decode: randomTokens(rng, 4, V), adapter: a2 },
        { prompt: randomTokens(rng, 6, V), decode: randomTokens(rng, 1, V), adapter: a1 },
      ];
      const expected = await Promise.all(seqs.map((s) => reference(concat, c.manifest, s)));

      // 8 positions at first: the buffers double (8 → 16 → 32) while rows hold cached tokens
      const kv = new GqaKv(kvShapeOf(g.manifest), 3, arch.maxPositions, hostKvBuffers, 8);
      const feeds = new FeedBuilder(g.manifest, 3);
      const got: Float32Array[][] = seqs.map(() => []);
      const handle: number[] = [];
      const len: number[] = seqs.map(() => 0);
      const fed: number[] = seqs.map(() => 0);
      const adapterOf = (i: number) => (seqs[i]!.adapter ? resident.get(seqs[i]!.adapter!)! : null);
      const prefillChunk = async (i: number) => {
        const s = seqs[i]!;
        const end = Math.min(s.prompt.length, len[i]! + 4);
        await kv.reserve(end);
        const f = feeds.prefill(s.prompt.slice(len[i], end), handle[i]!, len[i]!, kv, adapterOf(i));
        const out = await runEngineStep(gqa, g.manifest, kv, f, false);
        kv.write(out, [handle[i]!], [len[i]!], end - len[i]!);
        len[i] = end;
        if (end === s.prompt.length) got[i]!.push(lastLogits(out, 0, V));
      };
      const decodeStep = async (rows: number[]) => {
        const order = (await kv.order(rows.map((i) => handle[i]!))).map((k) => rows[k]!);
        const tokens = order.map((i) => seqs[i]!.decode[fed[i]!]!);
        await kv.reserve(Math.max(...order.map((i) => len[i]! + 1)));
        const f = feeds.decode(tokens, order.map((i) => handle[i]!), order.map((i) => len[i]!), kv, order.map(adapterOf));
        const out = await runEngineStep(gqa, g.manifest, kv, f, false);
        kv.write(out, order.map((i) => handle[i]!), order.map((i) => len[i]!), 1);
        order.forEach((i, b) => {
          got[i]!.push(lastLogits(out, b, V));
          len[i]!++;
          fed[i]!++;
        });
      };

      for (const i of [0, 1, 2]) handle[i] = kv.acquire();
      // C's long prompt is chunked while A and B already decode
      for (const i of [0, 1]) while (len[i]! < seqs[i]!.prompt.length) await prefillChunk(i);
      await prefillChunk(2);
      await decodeStep([0, 1]);
      while (len[2]! < seqs[2]!.prompt.length) await prefillChunk(2);
      await decodeStep([0, 1, 2]);
      kv.release(handle[1]!); // B is done (2 tokens)
      handle[3] = kv.acquire(); // D takes B's slot, between A and C
      await prefillChunk(3);
      const movesBefore = kv.moves;
      await decodeStep([0, 2]); // C must move below 2: D steps aside through the scratch slot
      expect(kv.moves).toBeGreaterThan(movesBefore);
      await prefillChunk(3);
      const movesAfter = kv.moves;
      await decodeStep([0, 2, 3]);
      await decodeStep([0, 2]);
      kv.release(handle[3]!);
      expect(kv.moves - movesAfter).toBeLessThanOrEqual(1);
      expect(kv.capacity).toBe(32);

      let worst = 0;
      seqs.forEach((s, i) => {
        expect(got[i]!.length).toBe(1 + s.decode.length);
        got[i]!.forEach((l, k) => (worst = Math.max(worst, maxAbsDiff(l, expected[i]![k]!))));
      });
      console.info(`[gqa graph ${arch.family}${arch.rope ? ` ${arch.rope.type}` : ''}, rotary ${rotary}] vs the plain-ops graph alone: max |Δ logit| ${worst.toExponential(2)} over ${got.flat().length} rows, ${kv.moves} slot moves`);
      expect(worst).toBeLessThanOrEqual(1e-4);
    } finally {
      await gqa.release();
      await concat.release();
    }
  }, 180_000);
});

describe('gqa contract', () => {
  it('declares the cache as past inputs and present outputs, int32 lengths, no mask, rows, or attention_bias', async () => {
    const ck = randomCheckpoint(tinyArchitecture(dims), 3);
    const g = await buildModel(ck, { outDir: join(root.dir, 'm'), dtype: 'fp32', logits: 'last', kv: 'gqa' });
    const { session } = await createSession(g.dir, g.manifest, 'cpu', quiet);
    try {
      expect(session.inputNames).toEqual(expect.arrayContaining(['input_ids', 'position_ids', KV_SEQLENS, KV_TOTAL, kvCacheKeyName(0), 'embed_keep', 'embed_rows']));
      expect(session.inputNames).not.toContain('attention_bias');
      expect(session.inputNames).not.toContain('kv_rows');
      expect(session.outputNames).toEqual(['logits', 'hidden_states', kvPresentKeyName(0), 'kv_present.0.value', kvPresentKeyName(1), 'kv_present.1.value']);
    } finally {
      await session.release();
    }
  });

  it('a head_dim that is not a multiple of 8 falls back to the resident contract, saying why', async () => {
    const arch = tinyArchitecture({ ...dims, family: 'qwen3', hiddenSize: 32, numHeads: 4, numKvHeads: 2, headDim: 12, qkNorm: true });
    expect(gqaSupport(arch)).toEqual({ ok: false, reason: expect.stringMatching(/head_dim 12 is not a multiple of 8/) });
    const lines: string[] = [];
    const g = await buildModel(randomCheckpoint(arch, 5), { outDir: join(root.dir, 'm'), dtype: 'fp32', logits: 'last', kv: 'gqa', onProgress: (l) => lines.push(l) });
    expect(g.manifest.kv).toBe('resident');
    expect(lines.filter((l) => /KV=gqa is not possible/.test(l))).toEqual([expect.stringMatching(/head_dim 12.*resident/)]);
  });

  it('fp32 for cuda is built resident, saying why (CUDA’s GroupQueryAttention has fp16/bf16 kernels only)', async () => {
    const arch = tinyArchitecture(dims);
    expect(gqaSupport(arch).ok).toBe(true);
    const lines: string[] = [];
    const g = await buildModel(randomCheckpoint(arch, 6), { outDir: join(root.dir, 'm'), dtype: 'fp32', logits: 'last', kv: 'gqa', provider: 'cuda', onProgress: (l) => lines.push(l) });
    expect(g.manifest.kv).toBe('resident');
    expect(lines.filter((l) => /KV=gqa with DTYPE=fp32 on cuda/.test(l))).toEqual([expect.stringMatching(/fp16\/bf16 only.*resident KV cache.*DTYPE=fp16/)]);
  });
});

/**
 * One GroupQueryAttention node run with the cache bound as past and present: what the CPU kernel of
 * the installed onnxruntime accepts. gqaSupport and GqaKv.step encode these; if a new onnxruntime
 * lifts one, this fails and says which.
 */
async function gqaNodeRun(o: { hd: number; rotary: boolean; B: number; S: number; past: number }): Promise<string> {
  const H = 2;
  const cap = 16;
  const g = new GraphBuilder(null);
  const ins = [g.input('q', 'float32', ['B', 'S', H * o.hd]), g.input('k', 'float32', ['B', 'S', o.hd]), g.input('v', 'float32', ['B', 'S', o.hd])];
  ins.push(g.input('pk', 'float32', ['B', 1, 'C', o.hd]), g.input('pv', 'float32', ['B', 1, 'C', o.hd]), g.input('sl', 'int32', ['B']), g.input('tot', 'int32', []));
  if (o.rotary) for (const v of [1, 0]) ins.push(g.constFloat(new Float32Array(32 * (o.hd / 2)).fill(v), [32, o.hd / 2], 'float32'));
  g.node('GroupQueryAttention', ins, { attrs: { num_heads: int(H), kv_num_heads: int(1), scale: float(1), ...(o.rotary && { do_rotary: int(1) }) }, domain: 'com.microsoft', outputs: ['out', 'presk', 'presv'] });
  g.output('out', 'float32', ['B', 'S', H * o.hd]);
  g.output('presk', 'float32', ['B', 1, 'C', o.hd]);
  g.output('presv', 'float32', ['B', 1, 'C', o.hd]);
  const session = await ort.InferenceSession.create(g.encode('gqa-constraints', { '': 17, 'com.microsoft': 1 }, 'test'));
  const t = (dims: number[]) => new ort.Tensor('float32', new Float32Array(dims.reduce((a, b) => a * b, 1)).fill(0.1), dims);
  const pk = t([o.B, 1, cap, o.hd]);
  const pv = t([o.B, 1, cap, o.hd]);
  try {
    const feeds = { q: t([o.B, o.S, H * o.hd]), k: t([o.B, o.S, o.hd]), v: t([o.B, o.S, o.hd]), pk, pv, sl: new ort.Tensor('int32', new Int32Array(o.B).fill(o.past + o.S - 1), [o.B]), tot: new ort.Tensor('int32', Int32Array.of(o.past + o.S), []) };
    await session.run(feeds, { out: null, presk: pk, presv: pv });
    return 'ok';
  } catch (e) {
    return (e as Error).message;
  } finally {
    await session.release();
  }
}

describe('onnxruntime GroupQueryAttention (CPU) constraints behind gqaSupport and GqaKv.step', () => {
  it('head_dim % 8; % 16 with the rotary caches; S > 1 over a past only at batch 1', async () => {
    expect(await gqaNodeRun({ hd: 12, rotary: false, B: 1, S: 1, past: 2 })).toMatch(/head_size must be a multiple of 8/);
    expect(await gqaNodeRun({ hd: 8, rotary: false, B: 1, S: 1, past: 2 })).toBe('ok');
    expect(await gqaNodeRun({ hd: 8, rotary: true, B: 1, S: 1, past: 2 })).toMatch(/multiple of 16/);
    expect(await gqaNodeRun({ hd: 24, rotary: true, B: 1, S: 1, past: 2 })).toMatch(/multiple of 16/);
    expect(await gqaNodeRun({ hd: 32, rotary: true, B: 1, S: 1, past: 2 })).toBe('ok');
    expect(await gqaNodeRun({ hd: 16, rotary: true, B: 1, S: 3, past: 2 })).toBe('ok');
    expect(await gqaNodeRun({ hd: 16, rotary: true, B: 2, S: 3, past: 2 })).toMatch(/batch_size must be 1 when sequence_length > 1 and past context is given/);
    expect(await gqaNodeRun({ hd: 16, rotary: true, B: 2, S: 3, past: 0 })).toBe('ok');
    expect([8, 24, 12].map((headDim) => gqaSupport(tinyArchitecture({ headDim })))).toEqual([
      { ok: true, rotary: 'outside' },
      { ok: true, rotary: 'outside' },
      { ok: false, reason: expect.stringMatching(/multiple of 8/) },
    ]);
  });
});
