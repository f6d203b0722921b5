import { median, type Throughput } from './timing.js';

/**
 * A ratio between two sections, measured in pairs that take turns (A B, B A, A B, …) in one
 * process, reported as the median of the pairs' ratios. Two sections measured minutes apart on a
 * shared machine each see a different load, and the drift between them used to move a ratio by
 * more than the effect measured (api-1 ÷ raw read 0.82 and 1.07 for the same code); within one
 * pair the load is nearly the same for both, and the order flips so that neither side always
 * runs on the warmer (or busier) turn.
 */
export interface PairedRatio {
  /** what is divided by what */
  what: string;
  /** decode tokens/s of B ÷ A, one per pair */
  ratios: number[];
  median: number;
  /** the spread of the pairs, so a reader sees how far one pair could be off */
  min: number;
  max: number;
  a: Throughput[];
  b: Throughput[];
}

export async function alternate(what: string, pairs: number, runA: () => Promise<Throughput>, runB: () => Promise<Throughput>): Promise<PairedRatio> {
  if (!Number.isInteger(pairs) || pairs < 1) throw new Error(`pairs must be a positive integer, got ${pairs}`);
  const a: Throughput[] = [];
  const b: Throughput[] = [];
  for (let i = 0; i < pairs; i++) {
    if (i % 2 === 0) {
      a.push(await runA());
      b.push(await runB());
    } else {
      b.push(await runB());
      a.push(await runA());
    }
  }
  const ratios = a.map((x, i) => b[i].decodeTokPerS / x.decodeTokPerS);
  return { what, ratios, median: median(ratios), min: Math.min(...ratios), max: Math.max(...ratios), a, b };
}

/** the run with the highest decode rate (noise on a shared machine only slows) */
export function fastest(runs: readonly Throughput[]): Throughput {
  let top = runs[0];
  if (!top) throw new Error('no runs');
  for (const t of runs) if (t.decodeTokPerS > top.decodeTokPerS || !Number.isFinite(top.decodeTokPerS)) top = t;
  return top;
}
