import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { ensurePreset, isPresetName, PRESET_NAMES, type PresetName } from './presets.js';
import { startServer, streamGenerate } from './api.js';
import { median } from './timing.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { buildModel } from '../src/model/build.js';
import { createSession } from '../src/model/session.js';
import { FeedBuilder, kvShapeOf, type ResidentAdapter } from '../src/engine/batch.js';
import { ResidentKv } from '../src/engine/kv.js';
import { seededRng } from '../src/engine/sampler.js';

/**
 * The two measurements behind bench/RESULTS.md "Where api-1 and mixed lose time":
 *
 *   npx tsx bench/overhead.ts api-cpu [preset] [streams]
 *     api-1 streams of 64 tokens back to back on one server in this process; CPU time per token
 *     of every thread that used any (Linux: /proc/self/task/<tid>/stat, 10 ms ticks, so use
 *     enough streams). CPU time, not wall time: a thread preempted by other work is not charged.
 *   npx tsx bench/overhead.ts mixed-step [preset] [steps]
 *     one decode step at batch 8 (context 64) on the base model, 8 rows on one rank-16 adapter,
 *     8 rows on 8 different ones, taking turns step by step on one session (the order flips
 *     every step); medians of session.run. The ratio same ÷ mixed bounds api-8-mixed ÷ api-8-same.
 *
 * Presets come from ./data/bench-models (written by `npm run bench` on its first run).
 */

const PROMPT = 'Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.';

async function threadCpuMs(): Promise<Map<number, { name: string; ms: number }>> {
  const out = new Map<number, { name: string; ms: number }>();
  for (const tid of (await readdir('/proc/self/task')).map(Number)) {
    try {
      const stat = (await readFile(`/proc/self/task/${tid}/stat`, 'utf8')).split(') ')[1]!.split(' ');
      const name = (await readFile(`/proc/self/task/${tid}/comm`, 'utf8')).trim();
      // fields 14 and 15 of stat (utime, stime), counted after the ") " that ends the name
      out.set(tid, { name, ms: (Number(stat[11]) + Number(stat[12])) * 10 });
    } catch {
      // the thread ended meanwhile
    }
  }
  return out;
}

async function apiCpu(modelPath: string, cache: string, streams: number): Promise<void> {
  const adapterDir = await mkdtemp(join(tmpdir(), 'loraserve-overhead-'));
  const server = await startServer({ modelPath, cacheDir: join(cache, 'built'), adapterDir, maxBatch: 8 });
  try {
    for (let i = 0; i < 3; i++) await streamGenerate(server.base, { prompt: PROMPT, maxTokens: 16, adapter: null });
    const before = await threadCpuMs();
    let tokens = 0;
    for (let i = 0; i < streams; i++) tokens += (await streamGenerate(server.base, { prompt: PROMPT, maxTokens: 64, adapter: null })).tokens.length;
    const after = await threadCpuMs();
    console.log(`${streams} api-1 streams, ${tokens} tokens; CPU ms per token by thread:`);
    for (const [tid, t] of after) {
      const ms = t.ms - (before.get(tid)?.ms ?? 0);
      if (ms > 0) console.log(`  ${tid === process.pid ? 'main (HTTP, route, client)' : `${t.name} ${tid}`}: ${(ms / tokens).toFixed(3)}`);
    }
  } finally {
    await server.close();
    await rm(adapterDir, { recursive: true, force: true });
  }
}

async function mixedStep(modelPath: string, cache: string, steps: number): Promise<void> {
  const built = await buildModel(await openCheckpoint(modelPath), { outDir: join(cache, 'built'), dtype: 'fp32', logits: 'last', kv: 'resident', onProgress: () => {} });
  const m = built.manifest;
  const { session } = await createSession(built.dir, m, 'cpu', { info: () => {}, warn: () => {} });
  try {
    const g = seededRng(1);
    const rank = 16;
    const adapter = (versionId: string): ResidentAdapter => ({
      versionId,
      modules: m.loraTargets.map((t) => ({
        rank,
        A: Float32Array.from({ length: t.inFeatures * rank }, () => (g() - 0.5) * 0.02),
        B: Float32Array.from({ length: rank * t.outFeatures }, () => (g() - 0.5) * 0.02),
      })),
    });
    const adapters = Array.from({ length: 8 }, (_, i) => adapter(`a${i}`));
    const kv = new ResidentKv(kvShapeOf(m), 8, 512, 512);
    const slots = adapters.map(() => kv.acquire());
    kv.reserve(65);
    const lens = slots.map(() => 64);
    const tokens = slots.map((_, i) => 10 + i);
    // one FeedBuilder each: a builder switching adapters would re-gather rows between turns
    const configs = [
      { name: 'base', fb: new FeedBuilder(m, 8), rows: slots.map(() => null) },
      { name: 'same', fb: new FeedBuilder(m, 8), rows: slots.map(() => adapters[0]!) },
      { name: 'mixed', fb: new FeedBuilder(m, 8), rows: adapters },
    ];
    const times = new Map(configs.map((c) => [c.name, [] as number[]]));
    const warm = 3;
    for (let s = 0; s < steps + warm; s++) {
      for (const c of s % 2 ? [...configs].reverse() : configs) {
        const feeds = c.fb.decode(tokens, slots, lens, kv, c.rows);
        const t0 = performance.now();
        await session.run(feeds);
        if (s >= warm) times.get(c.name)!.push(performance.now() - t0);
      }
    }
    const med = (name: string) => median(times.get(name)!);
    console.log(`batch 8, rank ${rank}, context 64, ${steps} turns: session.run median base ${med('base').toFixed(2)} ms, same ${med('same').toFixed(2)} ms, mixed ${med('mixed').toFixed(2)} ms`);
    console.log(`mixed step ÷ same step ${(med('mixed') / med('same')).toFixed(3)}; the rate bound mixed ÷ same ${(med('same') / med('mixed')).toFixed(3)}`);
  } finally {
    await session.release();
  }
}

const [mode, presetArg = 'llama-60m', countArg] = process.argv.slice(2);
if ((mode !== 'api-cpu' && mode !== 'mixed-step') || !isPresetName(presetArg)) {
  console.error(`usage: npx tsx bench/overhead.ts api-cpu|mixed-step [${PRESET_NAMES.join('|')}] [count]`);
  process.exit(2);
}
const preset: PresetName = presetArg;
const cache = resolve(process.env.BENCH_CACHE ?? './data/bench-models');
const modelPath = await ensurePreset(preset, cache, (l) => process.stderr.write(`${l}\n`));
const count = countArg === undefined ? (mode === 'api-cpu' ? 20 : 40) : Number(countArg);
if (!Number.isInteger(count) || count < 1) throw new Error(`count must be a positive integer, got ${countArg}`);
await (mode === 'api-cpu' ? apiCpu(modelPath, cache, count) : mixedStep(modelPath, cache, count));
