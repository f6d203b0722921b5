import type { InferenceSession, Tensor } from 'onnxruntime-node';
import ort from 'onnxruntime-node';
import { createSession, type Provider } from '../src/model/session.js';
import { pastKeyName, pastValueName, presentKeyName, presentValueName, type Manifest } from '../src/model/manifest.js';
import { EngineCore, type RunSession } from '../src/engine/core.js';
import { openEngineSession, type EngineSessionParts } from '../src/engine/engine-session.js';
import { ConfigSchema } from '../src/config.js';
import { FeedBuilder, kvShapeOf } from '../src/engine/batch.js';
import { ResidentKv } from '../src/engine/kv.js';
import type { Engine } from '../src/engine/engine.js';
import type { EngineLimits, FromWorker, WorkerRequest } from '../src/engine/protocol.js';
import { sample } from '../src/engine/sampler.js';
import { median, now, throughput, type StreamTrace, type Throughput } from './timing.js';

/**
 * Decode without HTTP, three ways:
 *   core    — the worker's decode loop (EngineCore: scheduler, feeds, KV, sampler) driven on this
 *             thread over a session from createSession, with session.run timed from outside;
 *             the engine's own code minus the worker messaging. This is "raw".
 *   engine  — Engine.generate: the same loop in its worker thread, tokens posted back.
 *   minimal — a hand-written loop over the peer export (no LoRA inputs, attention_mask): the
 *             least work onnxruntime can be given per token, to price the LoRA inputs.
 */

export interface GenSpec {
  promptIds: number[];
  maxTokens: number;
  /** only ids below this are sampled (the tokenizer's size, as the HTTP routes do) */
  vocabLimit: number;
  eosIds: number[];
}

export interface CoreProfile {
  decodeSteps: number;
  /** median per decode step at full batch: the whole EngineCore.step, and session.run inside it */
  stepMs: number;
  /** mean of the same steps: above the median when some steps stall (GC, page faults, a busy CPU) */
  meanStepMs: number;
  /** mean time per loop turn outside step(): flush (posting tokens) and the yield to the event loop */
  betweenStepsMs: number;
  runMs: number;
  /** step − run: feed assembly, KV composition, sampling, bookkeeping */
  outsideRunMs: number;
  /** measured apart on the same shapes: FeedBuilder.decode, and sample() for every row */
  feedsMs: number;
  sampleMs: number;
  /**
   * sample() for every row over the model's whole vocabulary (the presets' tokenizer has 512 ids,
   * so `sampleMs` is far below what a real tokenizer's vocabulary costs: 151,936 ids on Qwen2.5)
   */
  sampleFullVocabMs: number;
  prefillRunMs: number;
}

export interface CoreResult {
  throughput: Throughput;
  profile: CoreProfile;
  /** greedy tokens of the first stream */
  tokens: number[];
}

const greedy = { temperature: 0, topK: 0, topP: 1, topLogprobs: 0 };

function limitsFor(manifest: Manifest, batch: number): EngineLimits {
  return { maxBatch: Math.max(8, batch), maxQueue: 64, prefillChunk: 64, requestTimeoutMs: 0, contextLength: Math.min(manifest.architecture.maxPositions, 4096) };
}

function workerRequest(spec: GenSpec): WorkerRequest {
  return { promptIds: [...spec.promptIds], adapterVersion: null, maxTokens: spec.maxTokens, sampling: greedy, seed: 1, eosIds: [...spec.eosIds], vocabLimit: spec.vocabLimit };
}

const quiet = { info: () => {}, warn: () => {} };

/**
 * Opens the session once, as the engine's worker does (openEngineSession: RUNTIME from the
 * environment, default auto, and with the C API runner the gqa cache in its memory); `runCore`
 * may be called on it for several batch sizes.
 */
export async function openCore(modelDir: string, manifest: Manifest, provider: Provider = 'cpu'): Promise<{ session: EngineSessionParts; close: () => Promise<void> }> {
  const parts = await openEngineSession(modelDir, manifest, provider, ConfigSchema.shape.RUNTIME.parse(process.env.RUNTIME ?? 'auto'), quiet);
  return { session: parts, close: () => parts.session.release() };
}

/** `micro`: also time FeedBuilder and the sampler apart (the profile's feedsMs, sampleMs…; NaN without) */
export async function runCore(opened: EngineSessionParts, manifest: Manifest, spec: GenSpec, batch: number, provider: Provider = 'cpu', micro = true): Promise<CoreResult> {
  const { session } = opened;
  // what the last session.run was: a decode step has one token per row
  const last = { kind: 'prefill' as 'prefill' | 'decode', rows: 0, runMs: 0 };
  const timing: RunSession = {
    // fetches pass through: the gqa KV store binds its cache as pre-allocated outputs (engine/step-run.ts)
    run: async (feeds: InferenceSession.FeedsType, fetches?: InferenceSession.FetchesType) => {
      const ids = feeds.input_ids as Tensor;
      last.kind = ids.dims[1] === 1 ? 'decode' : 'prefill';
      last.rows = Number(ids.dims[0]);
      const t0 = now();
      const out = fetches ? await session.run(feeds, fetches) : await session.run(feeds);
      last.runMs = now() - t0;
      return out;
    },
  } as RunSession;
  const traces = new Map<number, StreamTrace>();
  const failures: string[] = [];
  const sink = (m: FromWorker) => {
    if (m.type === 'step') {
      const t = now();
      for (const [id] of m.tokens) traces.get(id)?.tokens.push(t);
      for (const d of m.done) if (d.error) failures.push(d.error);
    } else if (m.type === 'rejected') failures.push(m.message);
  };
  const tokens: number[] = [];
  const firstSink = (m: FromWorker) => {
    if (m.type === 'step') for (const [id, tok] of m.tokens) if (id === 1) tokens.push(tok);
    sink(m);
  };
  const core = new EngineCore(timing, manifest, limitsFor(manifest, batch), firstSink, { provider, boundOutputs: opened.boundOutputs, ...(opened.kvBuffers && { kvBuffers: opened.kvBuffers }) });
  const start = now();
  for (let id = 1; id <= batch; id++) {
    traces.set(id, { start, tokens: [] });
    core.submit(id, workerRequest(spec));
  }
  const steps: { step: number; run: number }[] = [];
  const prefills: number[] = [];
  let between = 0;
  let turns = 0;
  while (core.hasWork()) {
    const t0 = now();
    await core.step();
    const t1 = now();
    const stepMs = t1 - t0;
    core.flush();
    if (last.kind === 'decode' && last.rows === batch) steps.push({ step: stepMs, run: last.runMs });
    else if (last.kind === 'prefill') prefills.push(last.runMs);
    await new Promise<void>((r) => setImmediate(r));
    between += now() - t1;
    turns++;
  }
  // the cache may be the runner's memory, which no garbage collector frees
  core.close();
  if (failures.length) throw new Error(`core loop failed: ${failures[0]}`);
  const stepMs = median(steps.map((s) => s.step));
  const runMedian = median(steps.map((s) => s.run));
  const parts = micro ? microProfile(manifest, batch, spec.promptIds.length + spec.maxTokens / 2, spec.vocabLimit) : { feedsMs: Number.NaN, sampleMs: Number.NaN, sampleFullVocabMs: Number.NaN };
  return {
    throughput: throughput([...traces.values()]),
    profile: { decodeSteps: steps.length, stepMs, meanStepMs: steps.reduce((x, y) => x + y.step, 0) / Math.max(1, steps.length), betweenStepsMs: between / Math.max(1, turns), runMs: runMedian, outsideRunMs: stepMs - runMedian, feedsMs: parts.feedsMs, sampleMs: parts.sampleMs, sampleFullVocabMs: parts.sampleFullVocabMs, prefillRunMs: median(prefills) },
    tokens,
  };
}

/** FeedBuilder.decode and sample() alone, on the shapes of a mid-run decode step. */
function microProfile(manifest: Manifest, batch: number, past: number, vocabLimit: number): { feedsMs: number; sampleMs: number; sampleFullVocabMs: number } {
  const shape = kvShapeOf(manifest);
  const len = Math.max(1, Math.round(past));
  const kv = new ResidentKv(shape, batch, len, len);
  const slots = Array.from({ length: batch }, () => kv.acquire());
  const lens = slots.map(() => len);
  const fb = new FeedBuilder(manifest);
  const rows = Array.from({ length: batch }, () => null);
  const tokens = Array.from({ length: batch }, (_, i) => i + 1);
  const feedTimes: number[] = [];
  for (let i = 0; i < 20; i++) {
    const t0 = now();
    fb.decode(tokens, slots, lens, kv, rows);
    feedTimes.push(now() - t0);
  }
  const vocab = manifest.architecture.vocabSize;
  const logits = new Float32Array(vocab);
  for (let i = 0; i < vocab; i++) logits[i] = Math.sin(i);
  const rng = () => 0.5;
  const sampleTimes = (limit: number) => {
    const times: number[] = [];
    for (let i = 0; i < 10; i++) {
      const t0 = now();
      for (let b = 0; b < batch; b++) sample(logits.subarray(0, Math.min(limit, vocab)), greedy, rng);
      times.push(now() - t0);
    }
    return median(times);
  };
  return { feedsMs: median(feedTimes), sampleMs: sampleTimes(vocabLimit), sampleFullVocabMs: sampleTimes(vocab) };
}

/** Engine.generate: the worker loop, no HTTP, no detokenizer. */
export async function runEngine(engine: Engine, spec: GenSpec, batch: number, adapters: (string | null)[] = []): Promise<Throughput> {
  const start = now();
  const traces = await Promise.all(
    Array.from({ length: batch }, async (_, i): Promise<StreamTrace> => {
      const gen = engine.generate({ promptIds: spec.promptIds, adapterVersion: adapters[i] ?? null, maxTokens: spec.maxTokens, temperature: 0, eosIds: spec.eosIds, vocabLimit: spec.vocabLimit });
      const trace: StreamTrace = { start, tokens: [] };
      for await (const _ of gen) trace.tokens.push(now());
      await gen.result;
      return trace;
    }),
  );
  return throughput(traces);
}

export interface MinimalResult {
  throughput: Throughput;
  runMs: number;
  tokens: number[];
}

/**
 * Decode over the peer export by hand: every row has the same prompt, so prefill is one [batch, s]
 * run, then one run per token. Greedy over `vocabLimit`, no EOS. Only what the graph needs.
 */
export async function runMinimal(modelDir: string, manifest: Manifest, spec: GenSpec, batch: number): Promise<MinimalResult> {
  const { session } = await createSession(modelDir, manifest, 'cpu', quiet);
  try {
    const a = manifest.architecture;
    const H = a.numKvHeads;
    const D = a.headDim;
    const s = spec.promptIds.length;
    const start = now();
    const traces: StreamTrace[] = Array.from({ length: batch }, () => ({ start, tokens: [] }));
    const ids = new BigInt64Array(batch * s);
    const pos = new BigInt64Array(batch * s);
    for (let b = 0; b < batch; b++) for (let i = 0; i < s; i++) [ids[b * s + i], pos[b * s + i]] = [BigInt(spec.promptIds[i]), BigInt(i)];
    let feeds: Record<string, Tensor> = {
      input_ids: new ort.Tensor('int64', ids, [batch, s]),
      position_ids: new ort.Tensor('int64', pos, [batch, s]),
      attention_mask: new ort.Tensor('int64', new BigInt64Array(batch * s).fill(1n), [batch, s]),
    };
    for (let l = 0; l < a.numLayers; l++) {
      feeds[pastKeyName(l)] = new ort.Tensor('float32', new Float32Array(0), [batch, H, 0, D]);
      feeds[pastValueName(l)] = new ort.Tensor('float32', new Float32Array(0), [batch, H, 0, D]);
    }
    const runTimes: number[] = [];
    const tokens: number[] = [];
    let total = s;
    const vocab = a.vocabSize;
    for (let step = 0; step < spec.maxTokens; step++) {
      const t0 = now();
      const out = await session.run(feeds);
      if (step > 0) runTimes.push(now() - t0);
      const logits = out.logits.data as Float32Array;
      const per = logits.length / batch;
      const next = new BigInt64Array(batch);
      const t = now();
      for (let b = 0; b < batch; b++) {
        const row = logits.subarray((b + 1) * per - vocab, (b + 1) * per);
        const tok = sample(row.subarray(0, Math.min(spec.vocabLimit, vocab)), greedy, () => 0.5).token;
        next[b] = BigInt(tok);
        traces[b].tokens.push(t);
        if (b === 0) tokens.push(tok);
      }
      total++;
      const nextFeeds: Record<string, Tensor> = {
        input_ids: new ort.Tensor('int64', next, [batch, 1]),
        position_ids: new ort.Tensor('int64', new BigInt64Array(batch).fill(BigInt(total - 1)), [batch, 1]),
        attention_mask: new ort.Tensor('int64', new BigInt64Array(batch * total).fill(1n), [batch, total]),
      };
      for (let l = 0; l < a.numLayers; l++) {
        nextFeeds[pastKeyName(l)] = out[presentKeyName(l)];
        nextFeeds[pastValueName(l)] = out[presentValueName(l)];
      }
      feeds = nextFeeds;
    }
    return { throughput: throughput(traces), runMs: median(runTimes), tokens };
  } finally {
    await session.release();
  }
}
