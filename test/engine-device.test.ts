import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { join } from 'node:path';
import { buildModel } from '../src/model/build.js';
import type { ModelDtype } from '../src/model/manifest.js';
import { referenceForward } from './reference/forward.js';
import { mergeAdapter, randomAdapter, type Adapter } from './helpers/lora-feeds.js';
import { Rng, randomCheckpoint, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';
import { collect, engineWeights, mixedRanks, startEngine, tempRoot, testDevice, testKv } from './engine-setup.js';

/**
 * Reference equality of the resident-KV engine on the test device (LORASERVE_TEST_DEVICE, default
 * cpu; scripts/gpu-check.sh sets cuda), in fp32 and fp16: a batch of rows — different prompt
 * lengths, with and without an adapter, prefilled in chunks — and each emitted token's logprob
 * against the reference forward on the merged weights, run over the same tokens (so a near tie
 * cannot make the paths diverge). Tolerances: fp32 1e-4 on cpu; on cuda 2e-3, since its fp32 MatMul
 * may use TF32; fp16 5e-2 (a logprob of a 10-bit-mantissa model).
 */

const device = testDevice();
const TOLERANCE: Record<ModelDtype, number> = { fp32: device === 'cuda' ? 2e-3 : 1e-4, fp16: 5e-2 };
const arch = tinyArchitecture({ maxPositions: 128 });
const ck = randomCheckpoint(arch, 41);
let root: Awaited<ReturnType<typeof tempRoot>>;
let adapter: Adapter;

beforeAll(async () => {
  root = await tempRoot('engine-device');
});
afterAll(async () => {
  await root?.remove();
});

function logSoftmaxAt(logits: Float32Array, token: number): number {
  let max = -Infinity;
  for (const v of logits) max = Math.max(max, v);
  let sum = 0;
  for (const v of logits) sum += Math.exp(v - max);
  return logits[token] - max - Math.log(sum);
}

describe(`resident-KV engine on ${device}`, () => {
  for (const dtype of ['fp32', 'fp16'] as const) {
    it(`${dtype}: every token's logprob equals the reference forward (≤ ${TOLERANCE[dtype]}), rows batched over adapters and chunked prefill`, async () => {
      const built = await buildModel(ck, { outDir: join(root.dir, 'models'), dtype, logits: 'last', kv: testKv() });
      adapter ??= randomAdapter(built.manifest.loraTargets, 5, mixedRanks, 2);
      const engine = await startEngine({ ck, dir: built.dir, manifest: built.manifest }, { MAX_BATCH: 4, PREFILL_CHUNK: 5 });
      try {
        await engine.loadAdapter('A@1', engineWeights(built.manifest.loraTargets, adapter));
        const rng = new Rng(17);
        const reqs = [3, 11, 7, 20].map((n, i) => ({ promptIds: randomTokens(rng, n, arch.vocabSize), adapterVersion: i % 2 === 0 ? 'A@1' : null }));
        const runs = await Promise.all(reqs.map((r) => collect(engine.generate({ ...r, maxTokens: 10, temperature: 0 }))));
        const merged = mergeAdapter(ck, built.manifest.loraTargets, adapter);
        let worst = 0;
        runs.forEach((run, i) => {
          const path = [...reqs[i].promptIds, ...run.tokens];
          const logits = referenceForward(reqs[i].adapterVersion ? merged : ck, path.slice(0, -1));
          run.events.forEach((e, k) => {
            const at = reqs[i].promptIds.length - 1 + k;
            worst = Math.max(worst, Math.abs(e.logprob - logSoftmaxAt(logits[at], e.token)));
          });
        });
        console.info(`[device] ${device} ${dtype}: worst |logprob − reference| over ${runs.reduce((n, r) => n + r.tokens.length, 0)} tokens = ${worst.toExponential(2)}`);
        expect(worst).toBeLessThanOrEqual(TOLERANCE[dtype]);
      } finally {
        await engine.close();
      }
    }, 120_000);
  }
});
