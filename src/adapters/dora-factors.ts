import { Worker } from 'node:worker_threads';
import { DoraNormError, type DoraModuleInput, type ServedWeightOptions } from './dora.js';

/** Where the base weights are read from, and how the graph holds them. */
export interface BaseWeightSource {
  modelPath: string;
  tokenizerPath?: string;
}

export interface DoraJob extends BaseWeightSource {
  served: ServedWeightOptions;
  modules: DoraModuleInput[];
}

/** `normOf`: the module whose row norm was 0 (DoraNormError), when that was the failure */
export type DoraReply = { factors: { name: string; factor: Float32Array }[] } | { error: string; normOf?: string };

export class DoraFactorError extends Error {
  override name = 'DoraFactorError';
}

/**
 * DoRA's g = m / ‖W + s·B·A‖ for each module (dora.ts), computed in a worker thread of its own
 * (dora-worker.ts), started through the engine's tsx-aware entry. Resolves module name → g.
 */
export async function doraFactorsOffThread(job: DoraJob): Promise<Map<string, Float32Array>> {
  const self = import.meta.url;
  const entry = new URL(self.endsWith('.ts') ? './dora-worker.ts' : './dora-worker.js', self).href;
  const worker = new Worker(new URL('../engine/worker-entry.mjs', self), { workerData: { ...job, entry } });
  try {
    const reply = await new Promise<DoraReply>((resolve, reject) => {
      worker.once('message', resolve);
      worker.once('error', reject);
      worker.once('exit', (code) => reject(new DoraFactorError(`the DoRA worker exited (code ${code}) before answering`)));
    });
    if ('error' in reply) throw reply.normOf ? new DoraNormError(reply.normOf, reply.error) : new DoraFactorError(`DoRA factors could not be computed: ${reply.error}`);
    return new Map(reply.factors.map((f) => [f.name, f.factor]));
  } finally {
    await worker.terminate();
  }
}
