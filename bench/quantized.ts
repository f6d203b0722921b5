import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Checkpoint } from '../src/model/checkpoint/types.js';
import { buildModel } from '../src/model/build.js';
import type { Config } from '../src/config.js';
import { adapterForm, concurrentStreams, postForm, startServer } from './api.js';
import { peftAdapter } from './adapters.js';
import { openCore, runCore, type GenSpec } from './raw.js';
import type { Throughput } from './timing.js';

/**
 * Our side of the llama.cpp comparison with quantized base weights (WEIGHTS=int8 / int4:
 * MatMulNBits projections and LM head, block 32, accuracy level 4, the KV contract as served): batch 1 through the
 * raw core loop (as the fp32 "raw b1" line), and 8 streams on 8 different adapters over HTTP with
 * int4 weights (as "api-8-mixed"). Same prompt ids and token counts as every other line; CPU only.
 */

export interface QuantizedLines {
  int8B1: Throughput;
  int4B1: Throughput;
  /** 8 SSE streams at once on 8 different rank-r adapters, int4 base */
  int4Mixed8: Throughput;
}

async function bestOf(reps: number, f: () => Promise<Throughput>): Promise<Throughput> {
  let top = await f();
  for (let i = 1; i < reps; i++) {
    const next = await f();
    if (next.decodeTokPerS > top.decodeTokPerS || !Number.isFinite(top.decodeTokPerS)) top = next;
  }
  return top;
}

export async function measureQuantized(
  ck: Checkpoint,
  o: { modelPath: string; buildDir: string; kv: Config['KV']; spec: GenSpec; prompt: string; rank: number; reps: number; progress: (l: string) => void },
): Promise<QuantizedLines> {
  const b1: Partial<Record<'int8' | 'int4', Throughput>> = {};
  for (const weights of ['int8', 'int4'] as const) {
    o.progress(`quantized: ${weights} weights, raw b1`);
    // the options the server builds with (runtime.ts servedBuildOptions, WEIGHTS_ACCURACY_LEVEL 4),
    // so the cache serves both and b1 runs what is served
    const built = await buildModel(ck, { outDir: o.buildDir, dtype: 'fp32', logits: 'last', kv: o.kv, provider: 'cpu', weights, accuracyLevel: 4, onProgress: o.progress });
    const core = await openCore(built.dir, built.manifest, 'cpu');
    try {
      await runCore(core.session, built.manifest, { ...o.spec, maxTokens: 2 }, 1, 'cpu');
      b1[weights] = await bestOf(o.reps, async () => (await runCore(core.session, built.manifest, o.spec, 1, 'cpu')).throughput);
    } finally {
      await core.close();
    }
  }
  o.progress('quantized: int4 weights, 8 streams on 8 different adapters over HTTP');
  const adapterDir = await mkdtemp(join(tmpdir(), 'loraserve-bench-int4-'));
  let int4Mixed8: Throughput;
  try {
    const server = await startServer({ modelPath: o.modelPath, cacheDir: o.buildDir, adapterDir, maxBatch: 8, device: 'cpu', dtype: 'fp32', weights: 'int4', kv: o.kv });
    try {
      const names = Array.from({ length: 8 }, (_, i) => `q-${i}`);
      for (const [i, name] of names.entries()) {
        const files = peftAdapter(ck.architecture, { modelId: ck.modelId, rank: o.rank, seed: 1000 + i });
        const r = await postForm(`${server.base}/v1/adapters`, adapterForm(name, files.config, files.weights));
        if (r.status !== 201) throw new Error(`upload of ${name} → ${r.status}: ${r.body.slice(0, 300)}`);
      }
      await concurrentStreams(server.base, o.prompt, 2, names);
      int4Mixed8 = await bestOf(o.reps, () => concurrentStreams(server.base, o.prompt, o.spec.maxTokens, names));
    } finally {
      await server.close();
    }
  } finally {
    await rm(adapterDir, { recursive: true, force: true });
  }
  if (!b1.int8 || !b1.int4) throw new Error('quantized: a batch-1 line was not measured');
  return { int8B1: b1.int8, int4B1: b1.int4, int4Mixed8 };
}
