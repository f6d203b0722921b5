import { describe, expect, it } from 'vitest';
import { GqaKv, hostKvBuffers, type KvPrefix } from '../src/engine/kv-store.js';
import { ResidentKv, type KvShape } from '../src/engine/kv.js';
import { kvCacheKeyName, kvCacheValueName, kvPresentKeyName, KV_SEQLENS, KV_TOTAL } from '../src/model/manifest.js';

/**
 * GqaKv's bookkeeping without a session (the graph tests run it against onnxruntime): what a
 * step feeds and binds, how running rows are kept in consecutive slots, which copies that costs,
 * growth, snapshots, and the errors for steps GroupQueryAttention cannot run.
 */

const shape: KvShape = { layers: 2, kvHeads: 2, headDim: 8, dtype: 'fp32' };

/** Writes `len` positions of recognisable values into a row's slot through the step's views, as the op would. */
function fill(kv: GqaKv, handle: number, len: number, tag: number): void {
  const feeds = kv.step([handle], [0], len);
  for (let l = 0; l < shape.layers; l++) {
    for (const [name, which] of [[kvCacheKeyName(l), 0], [kvCacheValueName(l), 1]] as const) {
      const t = feeds[name]!;
      const [, H, cap, D] = t.dims as [number, number, number, number];
      const d = t.data as Float32Array;
      for (let h = 0; h < H; h++) for (let p = 0; p < len; p++) for (let j = 0; j < D; j++) d[(h * cap + p) * D + j] = tag * 1000 + l * 100 + which * 50 + h * 10 + p + j / 100;
    }
  }
  kv.write({}, [handle], [0], len);
}

async function expectTagged(kv: GqaKv, handle: number, len: number, tag: number): Promise<void> {
  for (let l = 0; l < shape.layers; l++) {
    const k = await kv.read(l, 'key', handle, len);
    const v = await kv.read(l, 'value', handle, len);
    for (let h = 0; h < shape.kvHeads; h++) {
      for (let p = 0; p < len; p++) {
        expect(k[(h * len + p) * shape.headDim + 3]).toBeCloseTo(tag * 1000 + l * 100 + h * 10 + p + 0.03, 3);
        expect(v[(h * len + p) * shape.headDim + 3]).toBeCloseTo(tag * 1000 + l * 100 + 50 + h * 10 + p + 0.03, 3);
      }
    }
  }
}

describe('GqaKv', () => {
  it('feeds a view of the step’s slots as past, binds the same tensor as present, and int32 lengths', async () => {
    const kv = new GqaKv(shape, 3, 64, hostKvBuffers, 16);
    const a = kv.acquire();
    const b = kv.acquire();
    const feeds = kv.step([a, b], [5, 2], 1);
    expect(feeds[kvCacheKeyName(0)]!.dims).toEqual([2, 2, 16, 8]);
    expect(Array.from(feeds[KV_SEQLENS]!.data as Int32Array)).toEqual([5, 2]);
    expect(feeds[KV_TOTAL]!.dims).toEqual([]);
    expect(Array.from(feeds[KV_TOTAL]!.data as Int32Array)).toEqual([6]);
    const bound = kv.bound(feeds);
    expect(bound[kvPresentKeyName(1)]).toBe(feeds[kvCacheKeyName(1)]);
    expect(Object.keys(bound)).toHaveLength(2 * shape.layers);
    // the resident store binds nothing: its graph returns only the new keys and values
    expect(new ResidentKv(shape, 2, 64).bound()).toEqual({});
  });

  it('keeps running rows in slots [0, n): an ended row’s hole is filled by one move, data intact; nothing moves otherwise', async () => {
    const kv = new GqaKv(shape, 4, 64, hostKvBuffers, 16);
    const h = [kv.acquire(), kv.acquire(), kv.acquire(), kv.acquire()];
    h.forEach((x, i) => fill(kv, x, 3 + i, i + 1));
    expect(await kv.order(h)).toEqual([0, 1, 2, 3]);
    expect(kv.moves).toBe(0);
    kv.release(h[1]!);
    const rows = [h[0]!, h[2]!, h[3]!];
    const order = await kv.order(rows);
    expect(kv.moves).toBe(1);
    // the step runs its rows in slot order; the same rows again move nothing
    const stepRows = order.map((i) => rows[i]!);
    expect(() => kv.step(stepRows, [3, 5, 6], 1)).not.toThrow();
    await kv.order(rows);
    expect(kv.moves).toBe(1);
    await expectTagged(kv, h[0]!, 3, 1);
    await expectTagged(kv, h[2]!, 5, 3);
    await expectTagged(kv, h[3]!, 6, 4);
  });

  it('a prompt prefilled into the hole steps aside (through the scratch slot when no slot is free), its data intact', async () => {
    const kv = new GqaKv(shape, 3, 64, hostKvBuffers, 16);
    const h = [kv.acquire(), kv.acquire(), kv.acquire()];
    h.forEach((x, i) => fill(kv, x, 2 + i, i + 1));
    kv.release(h[1]!);
    const late = kv.acquire();
    fill(kv, late, 7, 9);
    const rows = [h[0]!, h[2]!];
    const order = await kv.order(rows);
    expect(kv.moves).toBe(3);
    expect(() => kv.step(order.map((i) => rows[i]!), [2, 4], 1)).not.toThrow();
    await expectTagged(kv, h[2]!, 4, 3);
    await expectTagged(kv, late, 7, 9);
  });

  it('grows by doubling up to the context, keeping every held row’s positions', async () => {
    const kv = new GqaKv(shape, 2, 40, hostKvBuffers, 4);
    const a = kv.acquire();
    const b = kv.acquire();
    fill(kv, a, 3, 1);
    fill(kv, b, 4, 2);
    await kv.reserve(9);
    expect(kv.capacity).toBe(16);
    await expectTagged(kv, a, 3, 1);
    await expectTagged(kv, b, 4, 2);
    await kv.reserve(33);
    expect(kv.capacity).toBe(40);
    await expect(kv.reserve(41)).rejects.toThrow(/41 positions do not fit a context of 40/);
  });

  it('snapshots one slot and restores it into another; a snapshot of another store is refused', async () => {
    const kv = new GqaKv(shape, 2, 32, hostKvBuffers, 8);
    const a = kv.acquire();
    fill(kv, a, 5, 7);
    const snap = await kv.snapshot(a, 5);
    const b = kv.acquire();
    await kv.restore(snap, b);
    await expectTagged(kv, b, 5, 7);
    const foreign: KvPrefix = new ResidentKv(shape, 1, 8).snapshot(0, 2);
    await expect(kv.restore(foreign, b)).rejects.toThrow(/another store/);
  });

  it('refuses steps GroupQueryAttention cannot run: rows out of slot order, S > 1 with a past in a batch, past the capacity', async () => {
    const kv = new GqaKv(shape, 3, 64, hostKvBuffers, 8);
    const a = kv.acquire();
    const b = kv.acquire();
    expect(() => kv.step([b, a], [1, 1], 1)).toThrow(/consecutive slots/);
    expect(() => kv.step([a, b], [2, 0], 3)).toThrow(/one row/);
    expect(() => kv.step([a], [6], 3)).toThrow(/beyond the cache's 8 \(call reserve first\)/);
    expect(() => kv.step([2], [0], 1)).toThrow(/not held/);
    expect(() => new GqaKv(shape, 0, 8, hostKvBuffers)).toThrow(/at least one slot/);
    kv.acquire();
    expect(() => kv.acquire()).toThrow(/all 3 KV slots are in use/);
  });
});
