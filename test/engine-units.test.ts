import { describe, expect, it } from 'vitest';
import { FeedBuilder, kvShapeOf, type ResidentAdapter } from '../src/engine/batch.js';
import { BatchKv, emptySeqKv, type KvShape, type SeqKv } from '../src/engine/kv.js';
import { Scheduler, type Schedulable } from '../src/engine/scheduler.js';
import { loraTargetsFor, type Manifest } from '../src/model/manifest.js';
import { tinyArchitecture } from './helpers/random-checkpoint.js';

/** The engine's pure parts: scheduling policy, KV re-padding, feed assembly. */

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

/** a sequence whose cache value encodes (layer, head, position, d) so every move is checkable */
function seq(tag: number, len: number): SeqKv {
  const layers = Array.from({ length: shape.layers }, (_, l) => {
    const key = new Float32Array(shape.kvHeads * len * shape.headDim);
    const value = new Float32Array(key.length);
    for (let h = 0; h < shape.kvHeads; h++)
      for (let p = 0; p < len; p++)
        for (let d = 0; d < shape.headDim; d++) {
          const i = (h * len + p) * shape.headDim + d;
          key[i] = tag * 10000 + l * 1000 + h * 100 + p * 10 + d;
          value[i] = -key[i];
        }
    return { key, value };
  });
  return { len, layers };
}

/** cache entry of batch row b, head h, real position p (counted from the row's first real token) */
function at(kv: BatchKv, l: number, b: number, h: number, p: number, d: number): number {
  return kv.layers[l].key[((b * shape.kvHeads + h) * kv.past + kv.pad(b) + p) * shape.headDim + d];
}

describe('batch KV', () => {
  it('left-pads rows to the longest, keeps padding zero, and re-pads when rows join and leave', () => {
    const kv = BatchKv.compose(shape, null, [{ seq: seq(1, 2) }, { seq: seq(2, 5) }]);
    expect(kv.past).toBe(5);
    expect(kv.lens).toEqual([2, 5]);
    expect(kv.pad(0)).toBe(3);
    expect(at(kv, 1, 0, 1, 1, 2)).toBe(1 * 10000 + 1000 + 100 + 10 + 2);
    expect(at(kv, 0, 1, 0, 4, 0)).toBe(2 * 10000 + 40);
    expect(kv.layers[0].key[0]).toBe(0); // row 0, head 0, slot 0 is padding
    expect(kv.realTokens).toBe(7);

    // a step: the presents (past + 1) become the cache as they are
    const presents = kv.layers.map(() => ({ key: new Float32Array(2 * 2 * 6 * 3), value: new Float32Array(2 * 2 * 6 * 3) }));
    const next = kv.advance(presents);
    expect(next.layers[0].key).toBe(presents[0].key);
    expect(next.lens).toEqual([3, 6]);

    // the long row leaves, a new one joins: the common padding disappears
    const k2 = BatchKv.compose(shape, kv, [{ batchRow: 0 }, { seq: seq(3, 1) }]);
    expect(k2.past).toBe(2);
    expect(k2.lens).toEqual([2, 1]);
    expect(at(k2, 0, 0, 1, 0, 1)).toBe(1 * 10000 + 100 + 1);
    expect(at(k2, 1, 1, 0, 0, 2)).toBe(3 * 10000 + 1000 + 2);
    expect(() => kv.advance(kv.layers)).toThrow(/expected/);
    expect(BatchKv.compose(shape, null, [{ seq: emptySeqKv(shape) }]).past).toBe(0);
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

  it('prefill and decode masks: causal within a chunk, left padding masked per row', () => {
    const f = new FeedBuilder(manifest);
    const shapeM = kvShapeOf(manifest);
    const s = { ...emptySeqKv(shapeM), len: 2 };
    s.layers = s.layers.map(() => ({ key: new Float32Array(2 * 2 * 16), value: new Float32Array(2 * 2 * 16) }));
    const pf = f.prefill([7, 8, 9], s, null);
    expect(pf.input_ids.dims).toEqual([1, 3]);
    expect([...(pf.position_ids.data as BigInt64Array)]).toEqual([2n, 3n, 4n]);
    const bias = [...(pf.attention_bias.data as Float32Array)];
    const M = -1e9;
    expect(bias).toEqual([0, 0, 0, M, M, 0, 0, 0, 0, M, 0, 0, 0, 0, 0]);

    const kv = BatchKv.compose(shapeM, null, [{ seq: { ...emptySeqKv(shapeM), len: 0 } }, { seq: s }]);
    const dec = f.decode([5, 6], kv, [null, null]);
    expect([...(dec.position_ids.data as BigInt64Array)]).toEqual([0n, 2n]);
    expect([...(dec.attention_bias.data as Float32Array)]).toEqual([M, M, 0, 0, 0, 0]);
    expect(dec['past_key_values.0.key'].dims).toEqual([2, 2, 2, 16]);
  });
});
