import { describe, expect, it } from 'vitest';
import { sample, seededRng, topN, type SamplingParams } from '../src/engine/sampler.js';

const params = (p: Partial<SamplingParams> = {}): SamplingParams => ({ temperature: 1, topK: 0, topP: 1, topLogprobs: 0, ...p });

/** log-softmax the long way, for comparison */
function logSoftmax(logits: readonly number[]): number[] {
  const z = logits.reduce((s, l) => s + Math.exp(l), 0);
  return logits.map((l) => Math.log(Math.exp(l) / z));
}

function counting(rng: () => number): { rng: () => number; calls: () => number } {
  let n = 0;
  return {
    rng: () => {
      n++;
      return rng();
    },
    calls: () => n,
  };
}

/** the reference nucleus: sort everything, keep the smallest prefix whose mass reaches p */
function nucleus(logits: readonly number[], p: number, T: number): number[] {
  const order = logits.map((_, i) => i).sort((a, b) => logits[b] - logits[a] || a - b);
  const w = order.map((i) => Math.exp(logits[i] / T));
  const total = w.reduce((a, b) => a + b, 0);
  let acc = 0;
  for (let j = 0; j < order.length; j++) {
    acc += w[j];
    if (acc >= p * total) return order.slice(0, j + 1);
  }
  return order;
}

describe('sampler', () => {
  it('greedy takes the argmax (ties to the lowest id) and draws nothing from the rng', () => {
    const c = counting(seededRng(1));
    expect(sample(Float32Array.of(0.1, 3, -2, 3, 1), params({ temperature: 0 }), c.rng).token).toBe(1);
    expect(c.calls()).toBe(0);
  });

  it('reports the log-probability of the chosen token and the top logprobs under the raw distribution', () => {
    const logits = [0.5, 2.25, -1, 1.75, 0];
    const ref = logSoftmax(logits);
    const s = sample(Float32Array.from(logits), params({ temperature: 0, topLogprobs: 3 }), seededRng(0));
    expect(s.token).toBe(1);
    expect(s.logprob).toBeCloseTo(ref[1], 6);
    expect(s.top?.map((t) => t.token)).toEqual([1, 3, 0]);
    s.top!.forEach((t) => expect(t.logprob).toBeCloseTo(ref[t.token], 6));
    // temperature shapes the draw, not the reported logprobs
    const hot = sample(Float32Array.from(logits), params({ temperature: 2.5, topLogprobs: 1 }), seededRng(3));
    expect(hot.logprob).toBeCloseTo(ref[hot.token], 6);
  });

  it('topN returns the n largest in order, ties to the lower id', () => {
    const v = Float32Array.of(1, 5, 3, 5, 2, 9, 0);
    expect(topN(v, 3)).toEqual([5, 1, 3]);
    expect(topN(v, 10)).toEqual([5, 1, 3, 2, 4, 0, 6]);
    expect(topN(v, 0)).toEqual([]);
  });

  it('a seeded rng is reproducible, seed-dependent and uniform on [0, 1)', () => {
    const a = seededRng(42);
    const b = seededRng(42);
    const c = seededRng(43);
    const xs = Array.from({ length: 20000 }, () => a());
    expect(Array.from({ length: 20000 }, () => b())).toEqual(xs);
    expect(Array.from({ length: 20 }, () => c())).not.toEqual(xs.slice(0, 20));
    expect(Math.min(...xs)).toBeGreaterThanOrEqual(0);
    expect(Math.max(...xs)).toBeLessThan(1);
    const mean = xs.reduce((s, x) => s + x, 0) / xs.length;
    expect(Math.abs(mean - 0.5)).toBeLessThan(0.01);
    // big and negative seeds are fine
    expect(seededRng(2 ** 53 - 1)()).not.toBe(seededRng(-5)());
  });

  it('temperature sampling follows softmax(logits / T)', () => {
    const logits = [1, 0, 2, -1];
    const T = 0.7;
    const z = logits.reduce((s, l) => s + Math.exp(l / T), 0);
    const expected = logits.map((l) => Math.exp(l / T) / z);
    const rng = seededRng(7);
    const n = 40000;
    const counts = [0, 0, 0, 0];
    for (let i = 0; i < n; i++) counts[sample(Float32Array.from(logits), params({ temperature: T }), rng).token]++;
    counts.forEach((c, i) => expect(Math.abs(c / n - expected[i])).toBeLessThan(4 * Math.sqrt((expected[i] * (1 - expected[i])) / n) + 1e-3));
  });

  it('top-k samples only among the k most likely, renormalised', () => {
    const logits = Float32Array.of(0, 3, 1, 2.5, -1, 2);
    const rng = seededRng(11);
    const counts = new Map<number, number>();
    const n = 30000;
    for (let i = 0; i < n; i++) {
      const t = sample(logits, params({ topK: 2 }), rng).token;
      counts.set(t, (counts.get(t) ?? 0) + 1);
    }
    expect([...counts.keys()].sort()).toEqual([1, 3]);
    const p1 = Math.exp(3) / (Math.exp(3) + Math.exp(2.5));
    expect(Math.abs(counts.get(1)! / n - p1)).toBeLessThan(0.015);
  });

  it('top-p keeps exactly the reference nucleus, also on a large vocabulary', () => {
    const gen = seededRng(5);
    for (let trial = 0; trial < 20; trial++) {
      const V = 3000;
      const logits = Array.from({ length: V }, () => (gen() - 0.5) * 12);
      const p = [0.1, 0.5, 0.9, 0.99][trial % 4];
      const T = [0.5, 1, 1.7][trial % 3];
      const allowed = new Set(nucleus(logits, p, T));
      const f = Float32Array.from(logits);
      const rng = seededRng(trial);
      const seen = new Set<number>();
      for (let i = 0; i < 300; i++) {
        const t = sample(f, params({ topP: p, temperature: T }), rng).token;
        expect(allowed.has(t)).toBe(true);
        seen.add(t);
      }
      // the draw covers the nucleus rather than sticking to its head
      if (allowed.size >= 2) expect(seen.size).toBeGreaterThan(1);
    }
  });

  it('the same seed on the same logits gives the same tokens', () => {
    const gen = seededRng(9);
    const rows = Array.from({ length: 30 }, () => Float32Array.from({ length: 50 }, () => gen() * 4));
    const run = (seed: number) => {
      const rng = seededRng(seed);
      return rows.map((l) => sample(l, params({ temperature: 1.2, topP: 0.9, topK: 20 }), rng).token);
    };
    expect(run(123)).toEqual(run(123));
    expect(run(123)).not.toEqual(run(124));
  });
});
