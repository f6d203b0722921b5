import ort from 'onnxruntime-node';
import { cpuSessionOptions } from '../src/model/session.js';
import { median, now } from './timing.js';

/**
 * The median time of one run of a graph file on a CPU session opened as the engine opens its own,
 * after `warmups` untimed runs; each timed run's `output` must start with a finite float32 (a
 * graph that overflows or reads garbage is an error, not a time). The session is released after.
 */
export async function medianRunMs(path: string, feeds: Record<string, ort.Tensor>, o: { runs: number; warmups: number; output: string; what: string }): Promise<number> {
  const session = await ort.InferenceSession.create(path, cpuSessionOptions());
  try {
    for (let i = 0; i < o.warmups; i++) await session.run(feeds);
    const times: number[] = [];
    for (let i = 0; i < o.runs; i++) {
      const t0 = now();
      const out = await session.run(feeds);
      times.push(now() - t0);
      const y = out[o.output]?.data;
      if (!(y instanceof Float32Array) || !Number.isFinite(y[0])) throw new Error(`${o.what} produced a non-finite value`);
    }
    return median(times);
  } finally {
    await session.release();
  }
}
