import { describe, expect, it } from 'vitest';
import { FeedBuilder, kvShapeOf, type ResidentAdapter } from '../src/engine/batch.js';
import { Tensor } from 'onnxruntime-node';
import { ResidentKv, type KvShape } from '../src/engine/kv.js';
import { Scheduler, type Schedulable } from '../src/engine/scheduler.js';
import { loraTargetsFor, type Manifest } from '../src/model/manifest.js';
import { tinyArchitecture } from './helpers/random-checkpoint.js';

/** The engine's pure parts: scheduling policy, the resident KV's layout, feed assembly. */

class Req implements Schedulable {
  prefilled = 0;
  constructor(
    readonly id: number,
    readonly promptLength: number,
  ) {}
}

describe('scheduler', () => {
  it('admits up to maxBatch, queues up to maxQueue more, then reports full', () => {
    const s = new Scheduler<Req>({ maxBatch: 2, maxQueue: 1, prefillChunk: 4 });
    expect(s.enqueue(new Req(1, 3))).toBe(true);
    expect(s.enqueue(new Req(2, 3))).toBe(true);
    expect(s.enqueue(new Req(3, 3))).toBe(true);
    expect(s.full).toBe(true);
    expect(s.enqueue(new Req(4, 3))).toBe(false);
    expect([s.running, s.waiting.length]).toEqual([2, 1]);
    expect(s.remove(1)?.was).toBe('prefill');
    expect(s.admit().map((r) => r.id)).toEqual([3]);
    expect(s.remove(42)).toBeNull();
  });

  it('prefills one prompt at a time in chunks and alternates chunks with decode steps', () => {
    const s = new Scheduler<Req>({ maxBatch: 4, maxQueue: 4, prefillChunk: 4 });
    const a = new Req(1, 3);
    s.enqueue(a);
    const p = s.next();
    expect(p).toEqual({ kind: 'prefill', row: a, start: 0, end: 3 });
    a.prefilled = 3;
    s.promote(a);
    const b = new Req(2, 10);
    s.enqueue(b);
    const kinds: string[] = [];
    for (let i = 0; i < 7; i++) {
      const plan = s.next()!;
      if (plan.kind === 'prefill') {
        kinds.push(`prefill ${plan.start}-${plan.end}`);
        b.prefilled = plan.end;
        if (plan.end === b.promptLength) s.promote(b);
      } else kinds.push(`decode ${plan.rows.map((r) => r.id).join(',')}`);
    }
    // the last step was a prefill, so a decode step comes first
    expect(kinds).toEqual(['decode 1', 'prefill 0-4', 'decode 1', 'prefill 4-8', 'decode 1', 'prefill 8-10', 'decode 1,2']);
    s.remove(1);
    s.remove(2);
    expect(s.next()).toBeNull();
  });
});

const shape: KvShape = { layers: 2, kvHeads: 2, headDim: 3, dtype: 'fp32' };
const W = shape.kvHeads * shape.headDim;

/** kv_new outputs of a step: rows × S tokens, value = tag·1000 + layer·100 + token·10 + element */
function newKv(tags: readonly number[], S: number): Record<string, Tensor> {
  const out: Record<string, Tensor> = {};
  for (let l = 0; l < shape.layers; l++) {
    for (const which of ['key', 'value'] as const) {
      const d = new Float32Array(tags.length * S * W);
      tags.forEach((tag, b) => {
        for (let s = 0; s < S; s++) for (let e = 0; e < W; e++) d[(b * S + s) * W + e] = (which === 'key' ? 1 : -1) * (tag * 1000 + l * 100 + s * 10 + e);
      });
      out[`kv_new.${l}.${which}`] = new Tensor('float32', d, [tags.length, S, shape.kvHeads, shape.headDim]);
    }
  }
  return out;
}

describe('resident KV', () => {
  it('each slot keeps its tokens at [0, len); a step writes only its new tokens; rows joining or leaving move nothing', () => {
    const kv = new ResidentKv(shape, 3, 64, 4);
    const a = kv.acquire();
    const b = kv.acquire();
    expect([a, b]).toEqual([0, 1]);
    // prefill: slot a gets 3 tokens, slot b 2
    kv.write(newKv([1], 3), [a], [0], 3);
    kv.write(newKv([2], 2), [b], [0], 2);
    const before = kv.read(0, 'key', a, 3);
    // a decode step for both rows: one token each at its own length
    kv.write(newKv([3, 4], 1), [a, b], [3, 2], 1);
    expect(kv.read(0, 'key', a, 3)).toEqual(before);
    // [kvHeads, len, headDim]: head 1, position 3 of slot a is element W/2.. of the decode token
    expect(kv.read(1, 'key', a, 4)[(1 * 4 + 3) * 3 + 2]).toBe(3 * 1000 + 100 + 0 * 10 + 5);
    expect(kv.read(1, 'value', b, 3)[(0 * 3 + 2) * 3 + 1]).toBe(-(4 * 1000 + 100 + 1));
    expect(kv.read(0, 'key', b, 2)[(1 * 2 + 1) * 3 + 0]).toBe(2 * 1000 + 10 + 3);

    // a leaves, a new row takes its slot; b's cache is where it was
    const bCache = kv.read(0, 'value', b, 3);
    kv.release(a);
    expect(kv.acquire()).toBe(a);
    expect(kv.acquire()).toBe(2);
    expect(() => kv.acquire()).toThrow(/all 3 KV slots/);
    expect(kv.read(0, 'value', b, 3)).toEqual(bCache);
  });

  it('feeds are views of the prefix [0, past), position-major; capacity doubles up to the context, keeping what was written', () => {
    const kv = new ResidentKv(shape, 2, 10, 4);
    expect(kv.capacity).toBe(4);
    kv.write(newKv([7], 4), [1], [0], 4);
    const f = kv.feeds(3);
    expect(f['kv_cache.0.key'].dims).toEqual([3, 2, 2, 3]);
    expect(f['kv_cache.1.value'].data).toHaveLength(3 * 2 * W);
    // position 2 of slot 1 at offset (2·slots + 1)·W
    expect((f['kv_cache.0.key'].data as Float32Array)[(2 * 2 + 1) * W + 4]).toBe(7 * 1000 + 20 + 4);
    const viewA = f['kv_cache.0.key'].data as Float32Array;
    expect((kv.feeds(4)['kv_cache.0.key'].data as Float32Array).buffer).toBe(viewA.buffer); // same memory: nothing copied
    expect(() => kv.write(newKv([8], 1), [1], [4], 1)).toThrow(/beyond the cache's 4/);
    kv.reserve(5);
    expect(kv.capacity).toBe(8);
    kv.reserve(9);
    expect(kv.capacity).toBe(10); // capped at the context
    expect(() => kv.reserve(11)).toThrow(/do not fit a context of 10/);
    expect(kv.read(1, 'key', 1, 4)[(1 * 4 + 3) * 3 + 2]).toBe(7 * 1000 + 100 + 30 + 5);
    expect(() => kv.feeds(11)).toThrow(/beyond/);
    expect(kv.feeds(0)['kv_cache.0.key'].dims).toEqual([0, 2, 2, 3]);
  });
});

describe('feed assembly', () => {
  const arch = tinyArchitecture({ numLayers: 1 });
  const manifest: Manifest = {
    manifestVersion: 1,
    builderVersion: 'test',
    sourceHash: 'x',
    modelId: 'unit',
    architecture: arch,
    dtype: 'fp32',
    logits: 'last',
    lora: true,
    maskValue: -1e9,
    files: { graph: 'model.onnx', weights: 'model.onnx.data' },
    loraTargets: loraTargetsFor(arch),
  };
  const targets = manifest.loraTargets;
  const q = targets.findIndex((t) => t.module === 'q_proj');
  const down = targets.findIndex((t) => t.module === 'down_proj');
  const module = (rank: number, inF: number, outF: number, seed: number) => ({
    rank,
    A: Float32Array.from({ length: inF * rank }, (_, i) => seed + i),
    B: Float32Array.from({ length: rank * outF }, (_, i) => -(seed + i)),
  });
  const adapter = (id: string, ranks: Record<number, number>, seed: number): ResidentAdapter => ({
    versionId: id,
    modules: targets.map((t, i) => (ranks[i] ? module(ranks[i], t.inFeatures, t.outFeatures, seed) : null)),
  });
  const X = adapter('X', { [q]: 2, [down]: 3 }, 1);
  const Y = adapter('Y', { [q]: 4 }, 1000);

  it('one adapter for all rows → batch-1 tensors, shared, no copy; reused until the rows change', () => {
    const f = new FeedBuilder(manifest);
    const feeds = f.loraForRows([X, X, X]);
    const tq = targets[q];
    expect(feeds[tq.inputA].dims).toEqual([1, tq.inFeatures, 2]);
    expect(feeds[tq.inputA].data).toBe(X.modules[q]!.A);
    // a module the adapter lacks: rank 0, exact
    expect(feeds[targets[1].inputA].dims).toEqual([1, targets[1].inFeatures, 0]);
    expect(f.loraForRows([X, X, X])).toBe(feeds);
    expect(f.loraForRows([null, null])[tq.inputB].dims).toEqual([1, 0, tq.outFeatures]);
  });

  it('mixed rows → per-row A/B zero-padded to the largest rank of the step, zeros for rows without the module', () => {
    const f = new FeedBuilder(manifest);
    const feeds = f.loraForRows([X, null, Y]);
    const tq = targets[q];
    const A = feeds[tq.inputA];
    const B = feeds[tq.inputB];
    expect(A.dims).toEqual([3, tq.inFeatures, 4]);
    expect(B.dims).toEqual([3, 4, tq.outFeatures]);
    const a = A.data as Float32Array;
    const b = B.data as Float32Array;
    const r = 4;
    for (let k = 0; k < tq.inFeatures; k++) {
      // row 0: X's rank-2 columns then two zero columns
      expect([...a.subarray(k * r, k * r + r)]).toEqual([1 + 2 * k, 2 + 2 * k, 0, 0]);
      // row 1: the base, all zero
      expect([...a.subarray((tq.inFeatures + k) * r, (tq.inFeatures + k) * r + r)]).toEqual([0, 0, 0, 0]);
      // row 2: Y fills all four
      expect(a[(2 * tq.inFeatures + k) * r + 3]).toBe(1000 + 4 * k + 3);
    }
    expect(b[0]).toBe(-1);
    expect(b[2 * tq.outFeatures]).toBe(0); // X's B rows 2, 3 are padding
    expect(b[(2 * r + 3) * tq.outFeatures]).toBe(-(1000 + 3 * tq.outFeatures));
    // down_proj: only X has it → rank 3 for the step, Y's row zeros
    expect(feeds[targets[down].inputA].dims).toEqual([3, targets[down].inFeatures, 3]);
    // a target no row has stays empty (rank 0, broadcast)
    expect(feeds[targets[1].inputA].dims).toEqual([1, targets[1].inFeatures, 0]);
  });

  it('prefill and decode feeds are O(rows): ids, positions, slots and lengths; the cache as views; no mask tensor', () => {
    const f = new FeedBuilder(manifest);
    const kv = new ResidentKv(kvShapeOf(manifest), 4, 64, 8);
    const pf = f.prefill([7, 8, 9], 2, 2, kv, null);
    expect(pf.input_ids.dims).toEqual([1, 3]);
    expect([...(pf.position_ids.data as BigInt64Array)]).toEqual([2n, 3n, 4n]);
    expect([...(pf.kv_rows.data as BigInt64Array)]).toEqual([2n]);
    expect([...(pf.kv_lens.data as BigInt64Array)]).toEqual([2n]);
    expect(pf['kv_cache.0.key'].dims).toEqual([2, 4, 2, 16]);
    expect(pf.attention_bias).toBeUndefined();

    const dec = f.decode([5, 6], [3, 0], [0, 5], kv, [null, null]);
    expect([...(dec.position_ids.data as BigInt64Array)]).toEqual([0n, 5n]);
    expect([...(dec.kv_rows.data as BigInt64Array)]).toEqual([3n, 0n]);
    expect([...(dec.kv_lens.data as BigInt64Array)]).toEqual([0n, 5n]);
    expect(dec['kv_cache.0.value'].dims).toEqual([5, 4, 2, 16]); // up to the longest row
  });
});
