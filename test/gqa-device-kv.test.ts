import ort from 'onnxruntime-node';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { f16ToF32 } from '../src/adapters/safetensors.js';
import { capiKvBuffers } from '../src/engine/device-kv.js';
import type { ModelArray } from '../src/engine/dtype.js';
import { GqaKv, type StepFeeds } from '../src/engine/kv-store.js';
import type { KvShape } from '../src/engine/kv.js';
import { GraphBuilder, float, float32ToFloat16Bits, int, toFloat16Bits } from '../src/model/graph/onnx-builder.js';
import { kvCacheKeyName, kvCacheValueName, kvPresentKeyName, kvPresentValueName, KV_SEQLENS, KV_TOTAL } from '../src/model/manifest.js';
import { CapiSession, DeviceTensor } from '../src/runtime/capi-session.js';
import { testDevice } from './engine-setup.js';

/**
 * GqaKv over capiKvBuffers on the CPU provider: the cache is memory onnxruntime allocated
 * (DeviceTensors), the very code path CUDA runs with device memory. LORASERVE_TEST_DEVICE=cuda runs
 * it on CUDA (scripts/gpu-check.sh), at fp16: CUDA's GroupQueryAttention has no fp32 kernel. A one-layer graph of a single
 * com.microsoft.GroupQueryAttention writes each step's keys and values into the bound buffers; the
 * test keeps its own copy of every key and value it fed and checks (1) what the buffers hold,
 * read back through session.download, and (2) the op's output against attention computed here
 * from that copy (softmax(q·k·scale)·v per head, kv head = head / (H / KVH)) — so a move, growth
 * or restore that lost or misplaced a position shows up in what the op attends to.
 */

const H = 4;
const KVH = 2;
const D = 8;
const SCALE = 1 / Math.sqrt(D);
const DEVICE = testDevice();
const FP16 = DEVICE === 'cuda';
const T = FP16 ? 'float16' : 'float32';
const shape: KvShape = { layers: 1, kvHeads: KVH, headDim: D, dtype: FP16 ? 'fp16' : 'fp32' };
/** digits toBeCloseTo checks of the op's output against the reference (fp16 rounds the output) */
const DIGITS = FP16 ? 2 : 5;

const hostTensor = (values: Float32Array, dims: number[]) => (FP16 ? new ort.Tensor('float16', toFloat16Bits(values), dims) : new ort.Tensor('float32', values, dims));
const toFloat32 = (a: ModelArray | ort.Tensor['data']): Float32Array => (a instanceof Uint16Array ? Float32Array.from(a, f16ToF32) : (a as Float32Array));

function gqaGraph(): Uint8Array {
  const g = new GraphBuilder(null);
  g.input('q', T, ['batch', 'seq', H * D]);
  g.input('k', T, ['batch', 'seq', KVH * D]);
  g.input('v', T, ['batch', 'seq', KVH * D]);
  g.input(kvCacheKeyName(0), T, ['batch', KVH, 'max_ctx', D]);
  g.input(kvCacheValueName(0), T, ['batch', KVH, 'max_ctx', D]);
  g.input(KV_SEQLENS, 'int32', ['batch']);
  g.input(KV_TOTAL, 'int32', []);
  g.node('GroupQueryAttention', ['q', 'k', 'v', kvCacheKeyName(0), kvCacheValueName(0), KV_SEQLENS, KV_TOTAL], {
    attrs: { num_heads: int(H), kv_num_heads: int(KVH), scale: float(SCALE) },
    domain: 'com.microsoft',
    outputs: ['out', kvPresentKeyName(0), kvPresentValueName(0)],
  });
  g.output('out', T, ['batch', 'seq', H * D]);
  g.output(kvPresentKeyName(0), T, ['batch', KVH, 'max_ctx', D]);
  g.output(kvPresentValueName(0), T, ['batch', KVH, 'max_ctx', D]);
  return g.encode('gqa-device-kv-test', { '': 17, 'com.microsoft': 1 }, 'test');
}

let seed = 7;
const rand = () => {
  seed = (seed * 1103515245 + 12345) % 2 ** 31;
  return seed / 2 ** 31 - 0.5;
};
/** values the model dtype holds exactly, so the reference sees what the op sees */
const randoms = (n: number) => Float32Array.from({ length: n }, () => (FP16 ? f16ToF32(float32ToFloat16Bits(rand())) : rand()));

/** every key and value fed for one row, [position][kvHead * D + j] */
interface RowRef {
  keys: Float32Array[];
  values: Float32Array[];
}

/** attention of one query position over the row's positions [0, upto), per head: the op's semantics without rotary */
function referenceAttention(q: Float32Array, row: RowRef, upto: number): Float32Array {
  const out = new Float32Array(H * D);
  for (let h = 0; h < H; h++) {
    const kvh = Math.floor(h / (H / KVH));
    const scores = Array.from({ length: upto }, (_, p) => {
      let s = 0;
      for (let j = 0; j < D; j++) s += q[h * D + j]! * row.keys[p]![kvh * D + j]!;
      return s * SCALE;
    });
    const max = Math.max(...scores);
    const w = scores.map((s) => Math.exp(s - max));
    const sum = w.reduce((a, b) => a + b, 0);
    for (let p = 0; p < upto; p++) for (let j = 0; j < D; j++) out[h * D + j]! += (w[p]! / sum) * row.values[p]![kvh * D + j]!;
  }
  return out;
}

let session: CapiSession;

beforeAll(async () => {
  session = await CapiSession.create(gqaGraph(), DEVICE === 'cpu' ? { provider: 'cpu', intraOpThreads: 1 } : { provider: 'cuda' });
});
afterAll(async () => {
  await session?.release();
});

describe(`GqaKv over capiKvBuffers (the C-API runner’s memory, ${DEVICE} provider)`, () => {
  /** one run of S new tokens for each of `handles` (in slot order), fed and remembered in `refs`; returns the op's output per row [S][H * D] */
  async function step(kv: GqaKv<DeviceTensor>, handles: number[], lens: number[], S: number, refs: Map<number, RowRef>): Promise<Float32Array[][]> {
    const n = handles.length;
    const q = randoms(n * S * H * D);
    const k = randoms(n * S * KVH * D);
    const v = randoms(n * S * KVH * D);
    const feeds: StepFeeds<DeviceTensor> = {
      ...kv.step(handles, lens, S),
      q: hostTensor(q, [n, S, H * D]),
      k: hostTensor(k, [n, S, KVH * D]),
      v: hostTensor(v, [n, S, KVH * D]),
    };
    expect(feeds[kvCacheKeyName(0)]).toBeInstanceOf(DeviceTensor);
    const out = await session.run(feeds, { out: null, ...kv.bound(feeds) });
    // a bound DeviceTensor stays on the device: only the attention output comes back
    expect(Object.keys(out)).toEqual(['out']);
    kv.write(out, handles, lens, S);
    const o = toFloat32(out['out']!.data);
    return handles.map((h, b) => {
      const ref = refs.get(h) ?? { keys: [], values: [] };
      refs.set(h, ref);
      for (let s = 0; s < S; s++) {
        const at = (b * S + s) * KVH * D;
        ref.keys[lens[b]! + s] = k.slice(at, at + KVH * D);
        ref.values[lens[b]! + s] = v.slice(at, at + KVH * D);
      }
      return Array.from({ length: S }, (_, s) => {
        const got = o.slice((b * S + s) * H * D, (b * S + s + 1) * H * D);
        // causal: position lens[b] + s sees [0, lens[b] + s]
        const want = referenceAttention(q.subarray((b * S + s) * H * D), ref, lens[b]! + s + 1);
        for (let i = 0; i < H * D; i++) expect(got[i]).toBeCloseTo(want[i]!, DIGITS);
        return got;
      });
    });
  }

  /** the buffers hold exactly the keys and values fed for positions [0, len) of the row */
  async function expectCache(kv: GqaKv<DeviceTensor>, handle: number, len: number, ref: RowRef): Promise<void> {
    const [keys, values] = [toFloat32(await kv.read(0, 'key', handle, len)), toFloat32(await kv.read(0, 'value', handle, len))];
    expect(keys.length).toBe(KVH * len * D);
    for (let h = 0; h < KVH; h++) {
      for (let p = 0; p < len; p++) {
        for (let j = 0; j < D; j++) {
          expect(keys[(h * len + p) * D + j]).toBe(ref.keys[p]![h * D + j]);
          expect(values[(h * len + p) * D + j]).toBe(ref.values[p]![h * D + j]);
        }
      }
    }
  }

  it('real GroupQueryAttention runs write each step in place; moves, growth and snapshot/restore keep every position', async () => {
    const kv = new GqaKv(shape, 3, 64, capiKvBuffers(session), 8);
    const refs = new Map<number, RowRef>();
    const [a, b, c] = [kv.acquire(), kv.acquire(), kv.acquire()];
    // prompts (batch 1, several tokens), then decode steps over all three rows
    await step(kv, [a], [0], 3, refs);
    await step(kv, [b], [0], 5, refs);
    await step(kv, [c], [0], 2, refs);
    const lens = new Map([[a, 3], [b, 5], [c, 2]]);
    const decode = async (rows: number[]) => {
      const order = (await kv.order(rows)).map((i) => rows[i]!);
      await kv.reserve(Math.max(...order.map((h) => lens.get(h)! + 1)));
      await step(kv, order, order.map((h) => lens.get(h)!), 1, refs);
      for (const h of order) lens.set(h, lens.get(h)! + 1);
    };
    await decode([a, b, c]);
    for (const h of [a, b, c]) await expectCache(kv, h, lens.get(h)!, refs.get(h)!);

    // a ends: c moves into its hole (one copy through the runner), b and c decode on
    kv.release(a);
    await decode([b, c]);
    expect(kv.moves).toBe(1);
    await expectCache(kv, c, lens.get(c)!, refs.get(c)!);

    // past the 8 allocated positions: the cache doubles (8 → 16), copying every held row
    expect(kv.capacity).toBe(8);
    for (let i = 0; i < 4; i++) await decode([b, c]);
    expect(kv.capacity).toBe(16);
    await expectCache(kv, b, lens.get(b)!, refs.get(b)!);
    await expectCache(kv, c, lens.get(c)!, refs.get(c)!);

    // b's positions restored into a new row d, which then attends to them (checked in `step`)
    const snap = await kv.snapshot(b, lens.get(b)!);
    const d = kv.acquire();
    await kv.restore(snap, d);
    refs.set(d, { keys: refs.get(b)!.keys.slice(), values: refs.get(b)!.values.slice() });
    lens.set(d, lens.get(b)!);
    await expectCache(kv, d, lens.get(d)!, refs.get(d)!);
    kv.release(b);
    kv.release(c);
    await decode([d]);
    await expectCache(kv, d, lens.get(d)!, refs.get(d)!);
    kv.drop(snap);
    expect(() => kv.drop(snap)).toThrow(/another store \(or one already dropped\)/);
    kv.dispose();
  });

  it('frees the buffers it replaces when it grows, and all of them on dispose', async () => {
    const live = () => (session as unknown as { deviceTensors: Set<DeviceTensor> }).deviceTensors.size;
    const before = live();
    const kv = new GqaKv(shape, 2, 64, capiKvBuffers(session), 4);
    // K and V, one layer
    expect(live() - before).toBe(2);
    await kv.reserve(20);
    expect(kv.capacity).toBe(32);
    expect(live() - before).toBe(2);
    const snap = await kv.snapshot(kv.acquire(), 0);
    expect(live() - before).toBe(4);
    kv.drop(snap);
    kv.dispose();
    expect(live()).toBe(before);
  });

  it('feeds the same views step after step: device tensors do not pile up while the cache keeps its size', async () => {
    const live = () => (session as unknown as { deviceTensors: Set<DeviceTensor> }).deviceTensors.size;
    const before = live();
    // capacity 64 from the start: no growth in this test, so the buffers stay the same
    const kv = new GqaKv(shape, 3, 128, capiKvBuffers(session), 64);
    const handles = [kv.acquire(), kv.acquire(), kv.acquire()];
    const refs = new Map<number, RowRef>();
    await step(kv, [handles[0]!], [0], 2, refs);
    const first = kv.step(handles.slice(0, 2), [2, 0], 1)[kvCacheKeyName(0)];
    for (let t = 0; t < 20; t++) await step(kv, handles, [2 + t, t, t], 1, refs);
    const settled = live();
    for (let t = 20; t < 50; t++) await step(kv, handles, [2 + t, t, t], 1, refs);
    expect(live()).toBe(settled);
    // K and V buffers, and a view of each per slot range fed: [0, 1), [0, 2), [0, 3)
    expect(settled - before).toBe(2 + 2 * 3);
    expect(kv.step(handles.slice(0, 2), [50, 48], 1)[kvCacheKeyName(0)]).toBe(first);
    kv.dispose();
    expect(live()).toBe(before);
  });

  it('refuses a copy that does not fit (a clear error, not a write past the buffer)', async () => {
    const buffers = capiKvBuffers(session);
    const small = buffers.allocate(shape.dtype, [2, KVH, 4, D]);
    const large = buffers.allocate(shape.dtype, [2, KVH, 8, D]);
    try {
      await expect(Promise.resolve(buffers.copy([{ src: large, srcSlot: 0, dst: small, dstSlot: 1 }], 6))).rejects.toThrow(/6 positions do not fit buffers of 8 and 4/);
      await expect(Promise.resolve(buffers.copy([{ src: small, srcSlot: 2, dst: large, dstSlot: 0 }], 2))).rejects.toThrow(/out of range/);
    } finally {
      small.dispose();
      large.dispose();
    }
  });
});
