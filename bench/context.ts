import type { InferenceSession } from 'onnxruntime-node';
import { FeedBuilder, kvShapeOf } from '../src/engine/batch.js';
import { ResidentKv } from '../src/engine/kv.js';
import { countTransfer, type Transfer } from '../src/engine/transfer.js';
import type { Manifest } from '../src/model/manifest.js';
import type { Provider } from '../src/model/session.js';
import { median, now } from './timing.js';

/**
 * Decode step time against context length, on the same batch: the engine's own step (FeedBuilder
 * over the resident cache, session.run, the new K/V written back) with every row at `context`
 * cached tokens. With the cache resident, the step grows only by the extra attention compute;
 * the bytes handed across per step stay the same, which this also reports.
 */
export interface ContextPoint {
  context: number;
  /** median ms of the whole step and of session.run inside it */
  stepMs: number;
  runMs: number;
  bytesPerStep: { toRuntime: number; fromRuntime: number };
}

export interface ContextScaling {
  batch: number;
  points: ContextPoint[];
  /** stepMs at the longest context ÷ at the shortest */
  ratio: number;
  what: string;
}

export async function measureContextScaling(session: InferenceSession, manifest: Manifest, provider: Provider, batch: number, contexts: readonly number[], steps: number): Promise<ContextScaling> {
  const maxPos = manifest.architecture.maxPositions;
  const usable = [...new Set(contexts.map((c) => Math.min(c, maxPos - steps - 3)))].filter((c) => c > 0);
  const points: ContextPoint[] = [];
  for (const context of usable) {
    const kv = new ResidentKv(kvShapeOf(manifest), batch, context + steps + 3, context + steps + 3);
    const feeds = new FeedBuilder(manifest, batch);
    const slots = Array.from({ length: batch }, () => kv.acquire());
    const adapters = slots.map(() => null);
    const tokens = slots.map((_, b) => 3 + b);
    // the cache's content does not change the work; zeros are as good as a prompt here
    const lens = slots.map(() => context);
    const stepTimes: number[] = [];
    const runTimes: number[] = [];
    const transfer: Transfer = { toRuntime: 0, fromRuntime: 0 };
    for (let s = 0; s < steps + 2; s++) {
      const t0 = now();
      const f = feeds.decode(tokens, slots, lens, kv, adapters);
      const r0 = now();
      const out = await session.run(f);
      const r1 = now();
      kv.write(out, slots, lens, 1);
      for (let b = 0; b < batch; b++) lens[b]++;
      // the first two steps warm up (allocations at a new shape)
      if (s >= 2) {
        stepTimes.push(now() - t0);
        runTimes.push(r1 - r0);
        countTransfer(transfer, f, out, provider);
      }
    }
    points.push({ context, stepMs: median(stepTimes), runMs: median(runTimes), bytesPerStep: { toRuntime: transfer.toRuntime / steps, fromRuntime: transfer.fromRuntime / steps } });
  }
  const first = points[0];
  const last = points[points.length - 1];
  return {
    batch,
    points,
    ratio: first && last ? last.stepMs / first.stepMs : Number.NaN,
    what: `decode step (feeds + session.run + KV write) with every one of ${batch} rows at the given context, median of ${steps} steps`,
  };
}
