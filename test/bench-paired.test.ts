import { describe, expect, it } from 'vitest';
import { alternate, fastest } from '../bench/paired.js';
import type { Throughput } from '../bench/timing.js';

const tp = (decodeTokPerS: number): Throughput => ({ streams: 1, tokens: 10, decodeTokPerS, steady: true, e2eTokPerS: decodeTokPerS, ttftMs: 1, wallMs: 100 });

describe('bench: alternating pairs', () => {
  it('runs A B, B A, A B … and reports the median of the pairs’ B ÷ A', async () => {
    const order: string[] = [];
    // a load that drifts upward run by run: each pair sees nearly the same, the sections apart would not
    let slow = 1;
    const run = (name: string, base: number) => async () => {
      order.push(name);
      slow += 0.5;
      return tp(base / slow);
    };
    const r = await alternate('B ÷ A', 5, run('A', 100), run('B', 90));
    expect(order).toEqual(['A', 'B', 'B', 'A', 'A', 'B', 'B', 'A', 'A', 'B']);
    expect(r.ratios).toHaveLength(5);
    // pair 0: A at slow 1.5, B at 2 → (90/2)/(100/1.5) = 0.675; pair 1: B at 2.5, A at 3 → 1.08
    expect(r.ratios[0]).toBeCloseTo(0.675, 10);
    expect(r.ratios[1]).toBeCloseTo((90 / 2.5) / (100 / 3), 10);
    const sorted = [...r.ratios].sort((x, y) => x - y);
    expect(r.median).toBe(sorted[2]);
    expect([r.min, r.max]).toEqual([sorted[0], sorted[4]]);
    expect(r.a.map((t) => t.decodeTokPerS)).toEqual([100 / 1.5, 100 / 3, 100 / 3.5, 100 / 5, 100 / 5.5]);
  });

  it('refuses a pair count that is not a positive integer', async () => {
    const run = async () => tp(1);
    await expect(alternate('x', 0, run, run)).rejects.toThrow(/positive integer/);
    await expect(alternate('x', 1.5, run, run)).rejects.toThrow(/positive integer/);
  });

  it('fastest keeps the highest decode rate, skipping a NaN first run', () => {
    expect(fastest([tp(Number.NaN), tp(3), tp(7), tp(5)]).decodeTokPerS).toBe(7);
    expect(() => fastest([])).toThrow(/no runs/);
  });
});
