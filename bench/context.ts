import { join, resolve } from 'node:path';
import { pathToFileURL } from 'node:url';
import { FeedBuilder } from '../src/engine/batch.js';
import { kvStoreFor } from '../src/engine/kv-store.js';
import { runStep } from '../src/engine/step-run.js';
import { countTransfer, type Transfer } from '../src/engine/transfer.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { buildModel } from '../src/model/build.js';
import type { EngineKv, Manifest } from '../src/model/manifest.js';
import type { Provider } from '../src/model/session.js';
import { openEngineSession, type EngineSessionParts } from '../src/engine/engine-session.js';
import { ensurePreset, isPresetName, PRESET_NAMES } from './presets.js';
import { median, now } from './timing.js';

/**
 * Decode step time against context length, on the same batch: the engine's own step (FeedBuilder
 * over the engine's KV store, session.run, the store's write) with every row at `context` cached
 * tokens, for whichever KV contract the graph was built with (manifest.kv). With the cache
 * resident, the step grows only by the attention compute; the bytes handed across per step stay
 * the same, which this also reports.
 *
 * The gqa store is sized as the server sizes it, for the longest context measured, at every point:
 * through onnxruntime-node its bound present buffers come back copied whole each step (flat in the
 * context, proportional to that length; docs/resident-kv.md), and the numbers show that cost.
 *
 * Standalone: `npx tsx bench/context.ts [--preset tiny|…] [--steps N] [--batch N] [--cache <dir>]` builds the
 * preset with kv: resident and kv: gqa and prints the two side by side (CPU, fp32).
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
  /** the graph's KV contract */
  kv: EngineKv;
  points: ContextPoint[];
  /** stepMs at the longest context ÷ at the shortest */
  ratio: number;
  what: string;
}

export async function measureContextScaling(opened: EngineSessionParts, manifest: Manifest, provider: Provider, batch: number, contexts: readonly number[], steps: number): Promise<ContextScaling> {
  const kvContract = manifest.kv;
  if (kvContract !== 'resident' && kvContract !== 'gqa') throw new Error(`the graph has the ${manifest.kv ?? 'concat'} KV contract; the engine's are resident and gqa`);
  const maxPos = manifest.architecture.maxPositions;
  const usable = [...new Set(contexts.map((c) => Math.min(c, maxPos - steps - 3)))].filter((c) => c > 0);
  const longest = Math.max(...usable) + steps + 3;
  const points: ContextPoint[] = [];
  const { session, kvBuffers, boundOutputs } = opened;
  for (const context of usable) {
    const cap = kvContract === 'gqa' ? longest : context + steps + 3;
    // the store the worker makes: with the C API runner the cache is its memory, bound in place
    const kv = kvStoreFor(manifest, batch, cap, { initialCapacity: cap, ...(kvBuffers && { buffers: kvBuffers }) });
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
      await kv.reserve(Math.max(...lens) + 1);
      const f = feeds.decode(tokens, slots, lens, kv, adapters);
      const r0 = now();
      const out = await runStep(session, manifest, kv, f, false);
      const r1 = now();
      kv.write(out, slots, lens, 1);
      for (let b = 0; b < batch; b++) lens[b]++;
      // the first two steps warm up (allocations at a new shape)
      if (s >= 2) {
        stepTimes.push(now() - t0);
        runTimes.push(r1 - r0);
        countTransfer(transfer, f, out, provider, { boundOutputs, deviceCache: kv.runtimeMemory });
      }
    }
    kv.dispose();
    points.push({ context, stepMs: median(stepTimes), runMs: median(runTimes), bytesPerStep: { toRuntime: transfer.toRuntime / steps, fromRuntime: transfer.fromRuntime / steps } });
  }
  const first = points[0];
  const last = points[points.length - 1];
  return {
    batch,
    kv: kvContract,
    points,
    ratio: first && last ? last.stepMs / first.stepMs : Number.NaN,
    what: `decode step (feeds + session.run + KV write, kv ${kvContract}) with every one of ${batch} rows at the given context, median of ${steps} steps`,
  };
}

export function contextLine(cx: ContextScaling): string {
  const f = (v: number, d: number) => v.toFixed(d);
  return (
    `kv ${cx.kv}, batch ${cx.batch}: ` +
    cx.points.map((p) => `context ${p.context}: step ${f(p.stepMs, 2)} ms (run ${f(p.runMs, 2)} ms), ${f(p.bytesPerStep.toRuntime, 0)} B in / ${f(p.bytesPerStep.fromRuntime, 0)} B out per step`).join('; ') +
    `; ratio ${f(cx.ratio, 2)}×`
  );
}

async function main(argv: readonly string[]): Promise<void> {
  let preset = 'tiny';
  let steps = 4;
  let batch = 8;
  let cache = './data/bench-models';
  for (let i = 0; i < argv.length; i++) {
    const v = argv[i + 1];
    if (argv[i] === '--preset' && v) preset = v;
    else if (argv[i] === '--steps' && v) steps = Number(v);
    else if (argv[i] === '--batch' && v) batch = Number(v);
    else if (argv[i] === '--cache' && v) cache = v;
    else throw new Error(`usage: tsx bench/context.ts [--preset ${PRESET_NAMES.join('|')}] [--steps N] [--batch N] [--cache <dir>]`);
    i++;
  }
  if (!isPresetName(preset)) throw new Error(`unknown preset ${preset}`);
  if (!Number.isInteger(steps) || steps < 1) throw new Error(`--steps must be a positive integer`);
  if (!Number.isInteger(batch) || batch < 1) throw new Error(`--batch must be a positive integer`);
  const progress = (l: string) => console.error(l);
  const ck = await openCheckpoint(await ensurePreset(preset, resolve(cache), progress));
  for (const kv of ['resident', 'gqa'] as const) {
    const built = await buildModel(ck, { outDir: join(resolve(cache), 'built'), dtype: 'fp32', logits: 'last', kv, onProgress: progress });
    // RUNTIME=auto: onnxruntime-node for resident, the C API runner for gqa (as the server)
    const opened = await openEngineSession(built.dir, built.manifest, 'cpu', 'auto', { info: () => {}, warn: () => {} });
    try {
      console.log(`${preset} ${contextLine(await measureContextScaling(opened, built.manifest, 'cpu', batch, [128, 2048], steps))} (runtime ${opened.runtime})`);
    } finally {
      await opened.session.release();
    }
  }
}

if (import.meta.url === pathToFileURL(process.argv[1] ?? '').href) {
  main(process.argv.slice(2)).catch((e: unknown) => {
    console.error(e instanceof Error ? e.message : e);
    process.exit(1);
  });
}
