import type { InferenceSession } from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { EngineCore } from '../src/engine/core.js';
import { capiKvBuffers } from '../src/engine/device-kv.js';
import type { KvBuffers, KvTensor } from '../src/engine/kv-store.js';
import type { EngineLimits, EngineStats, FromWorker, Provider, WorkerRequest } from '../src/engine/protocol.js';
import type { BoundOutputs } from '../src/engine/transfer.js';
import { createSession, type EngineSession } from '../src/model/session.js';
import { CapiSession } from '../src/runtime/capi-session.js';
import { tinyArchitecture } from './helpers/random-checkpoint.js';
import { startEmbeddedApp, type EmbeddedApp } from './helpers/embedded-app.js';
import { buildRandomModel, tempRoot, type TestModel } from './engine-setup.js';

/**
 * What crosses the JS↔onnxruntime boundary per decode step does not grow with the context
 * (loraserve_runtime_bytes_transferred_total), under the KV contract LORASERVE_TEST_KV picks. The
 * same request decodes at two context lengths on the real session; the bytes per generated token
 * must be the same. Resident: O(rows), and the contrast — the cache views counted as copied, which
 * is what onnxruntime-node's CUDA path does to every input — must grow with the context, or this
 * test could not tell the two apart. Gqa: the Node API's copy of the bound present buffers is
 * counted (flat, sized by the context length), and a runner that returns them in place
 * ('in-place') moves only the logits; with the cache in the runner's own memory (capiKvBuffers,
 * what the worker uses with RUNTIME=capi) the cache views are not counted even where the provider
 * is cuda, since they never leave the device.
 */

const limits: EngineLimits = { maxBatch: 4, maxQueue: 4, prefillChunk: 1024, requestTimeoutMs: 0, contextLength: 1024 };

let root: Awaited<ReturnType<typeof tempRoot>>;
let model: TestModel;
let session: InferenceSession;
/** the C API runner over the same graph: it really returns bound outputs in place */
let capi: EngineSession;

beforeAll(async () => {
  root = await tempRoot('engine-transfer');
  model = await buildRandomModel(root.dir, tinyArchitecture({ maxPositions: 1024 }), 77);
  ({ session } = await createSession(model.dir, model.manifest, 'cpu', { info: () => {}, warn: () => {} }));
  ({ session: capi } = await createSession(model.dir, model.manifest, 'cpu', { info: () => {}, warn: () => {} }, 'capi'));
}, 120_000);
afterAll(async () => {
  await session?.release();
  await capi?.release();
  await root?.remove();
});

const request = (promptLength: number, maxTokens: number): WorkerRequest => ({
  promptIds: Array.from({ length: promptLength }, (_, i) => 3 + ((i * 7) % 100)),
  adapterVersion: null,
  maxTokens,
  sampling: { temperature: 0, topK: 0, topP: 1, topLogprobs: 0 },
  seed: 1,
  eosIds: [],
  vocabLimit: 128,
});

/** Runs `rows` copies of a request to the end; returns the bytes of the decode steps alone, per token. */
async function decodeBytesPerToken(
  promptLength: number,
  rows: number,
  provider: Provider,
  boundOutputs: BoundOutputs = 'copied',
  on: EngineSession = session,
  kvBuffers?: KvBuffers<KvTensor>,
): Promise<{ toRuntime: number; fromRuntime: number; tokens: number }> {
  let stats: EngineStats | null = null;
  let tokens = 0;
  const started = new Set<number>();
  const sink = (m: FromWorker) => {
    if (m.type === 'step') {
      stats = m.stats;
      tokens += m.tokens.length;
      for (const [id] of m.tokens) started.add(id);
    }
  };
  // the gqa cache allocated whole (its capacity, not the context, sizes what the Node API copies back)
  const core = new EngineCore(on, model.manifest, limits, sink, { provider, boundOutputs, initialKvCapacity: limits.contextLength, ...(kvBuffers && { kvBuffers }) });
  const maxTokens = 12;
  for (let i = 0; i < rows; i++) core.submit(i + 1, request(promptLength, maxTokens));
  // every prefill ends with each row's first token; from then on only decode steps run
  while (started.size < rows) {
    await core.step();
    core.flush();
  }
  const after = stats! as EngineStats;
  const start = { to: after.bytesToRuntime, from: after.bytesFromRuntime, tokens };
  while (core.hasWork()) {
    await core.step();
    core.flush();
  }
  const end = stats! as EngineStats;
  core.close();
  const decoded = tokens - start.tokens;
  expect(decoded).toBeGreaterThanOrEqual(rows * (maxTokens - 4));
  return { toRuntime: (end.bytesToRuntime - start.to) / decoded, fromRuntime: (end.bytesFromRuntime - start.from) / decoded, tokens: decoded };
}

describe('bytes across the runtime boundary', () => {
  it('per generated token, the same at context 16 and 600 (batch 3); counting the cache as copied would grow ~40×', async () => {
    const short = await decodeBytesPerToken(16, 3, 'cpu');
    const long = await decodeBytesPerToken(600, 3, 'cpu');
    console.info(
      `[transfer] per decode token, context 16 vs 600: to_runtime ${short.toRuntime} vs ${long.toRuntime} B, from_runtime ${short.fromRuntime} vs ${long.fromRuntime} B`,
    );
    expect(short.toRuntime).toBeGreaterThan(0);
    expect(short.fromRuntime).toBeGreaterThan(0);
    expect(long.toRuntime).toBe(short.toRuntime);
    expect(long.fromRuntime).toBe(short.fromRuntime);

    const a = model.manifest.architecture;
    /** one layer's K or V for one row, in bytes, over `positions` */
    const kvBytes = (positions: number) => 4 * a.numKvHeads * a.headDim * positions;
    if (model.manifest.kv === 'resident') {
      // from_runtime is the logits and the step's new K/V: vocab floats + 2·layers·kvHeads·headDim per row
      expect(short.fromRuntime).toBe(4 * a.vocabSize + 2 * a.numLayers * kvBytes(1));
      const copiedShort = await decodeBytesPerToken(16, 3, 'cuda');
      const copiedLong = await decodeBytesPerToken(600, 3, 'cuda');
      expect(copiedLong.toRuntime / copiedShort.toRuntime).toBeGreaterThan(10);
    } else {
      // gqa through onnxruntime-node: the present outputs are written in place, then copied back
      // whole by the Node API ([rows, kvHeads, contextLength, headDim] per layer, K and V): flat in
      // the context, counted because it is a real copy
      expect(short.fromRuntime).toBe(4 * a.vocabSize + 2 * a.numLayers * kvBytes(limits.contextLength));
      // the C-API runner hands the bound buffers back without copying: logits only
      const inPlace = await decodeBytesPerToken(600, 3, 'cpu', 'in-place', capi);
      expect(inPlace.fromRuntime).toBe(4 * a.vocabSize);
      expect(inPlace.toRuntime).toBe(short.toRuntime);
      // on cuda the Node API copies the fed cache views to the device: the whole buffer of the step's rows
      const copied = await decodeBytesPerToken(600, 3, 'cuda');
      expect(copied.toRuntime - short.toRuntime).toBe(2 * a.numLayers * kvBytes(limits.contextLength));
      // the cache in the C-API runner's memory (device memory on cuda): never counted, on either
      // provider; per token only ids, positions, lengths, LoRA inputs in and logits out, flat in the context
      if (!(capi instanceof CapiSession)) throw new Error('RUNTIME=capi did not open the C API runner');
      const buffers = capiKvBuffers(capi);
      const device = await decodeBytesPerToken(600, 3, 'cuda', 'in-place', capi, buffers);
      const deviceShort = await decodeBytesPerToken(16, 3, 'cuda', 'in-place', capi, buffers);
      expect(device.toRuntime).toBe(short.toRuntime);
      expect(device.fromRuntime).toBe(4 * a.vocabSize);
      expect(deviceShort.toRuntime).toBe(device.toRuntime);
      expect(deviceShort.fromRuntime).toBe(device.fromRuntime);
    }
  }, 120_000);
});

describe('/metrics', () => {
  let app: EmbeddedApp;
  beforeAll(async () => {
    app = await startEmbeddedApp('transfer-metrics');
  }, 120_000);
  afterAll(async () => {
    await app?.close();
  });

  const counter = async (direction: string): Promise<number> => {
    const text = await (await fetch(`${app.url}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith(`loraserve_runtime_bytes_transferred_total{direction="${direction}"}`));
    expect(line, `no ${direction} series in /metrics`).toBeDefined();
    return Number(line!.split(' ').pop());
  };

  it('loraserve_runtime_bytes_transferred_total{direction} counts both ways and grows with a generation', async () => {
    const before = { to: await counter('to_runtime'), from: await counter('from_runtime') };
    const res = await fetch(`${app.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: 'Once upon a time', max_tokens: 8, temperature: 0 }),
    });
    expect(res.status).toBe(200);
    const to = await counter('to_runtime');
    const from = await counter('from_runtime');
    expect(to).toBeGreaterThan(before.to);
    expect(from).toBeGreaterThan(before.from);
  }, 120_000);
});
