import { parentPort, workerData } from 'node:worker_threads';
import { openCheckpoint } from '../model/checkpoint/index.js';
import { doraFactor, DoraNormError, servedWeight } from './dora.js';
import type { DoraJob, DoraReply } from './dora-factors.js';

/**
 * One DoRA adapter's factors, in a thread of their own: reading W from the checkpoint and the
 * O(out·in·r) norms would block whichever thread ran them (the HTTP thread must answer /healthz,
 * the inference worker must keep decoding).
 */
const job = workerData as DoraJob;
const post = (m: DoraReply, transfer: ArrayBuffer[] = []) => parentPort!.postMessage(m, transfer);

try {
  const ck = await openCheckpoint(job.modelPath, job.tokenizerPath);
  const factors: { name: string; factor: Float32Array }[] = [];
  for (const m of job.modules) {
    const t = ck.tensor(`${m.name}.weight`);
    if (!t) throw new Error(`the base checkpoint has no ${m.name}.weight`);
    if (t.shape.length !== 2 || t.shape[0] !== m.outFeatures || t.shape[1] !== m.inFeatures) throw new Error(`the base checkpoint's ${m.name}.weight is [${t.shape.join(', ')}], expected [${m.outFeatures}, ${m.inFeatures}]`);
    factors.push({ name: m.name, factor: doraFactor(servedWeight(t.read(), m.outFeatures, m.inFeatures, job.served), m) });
  }
  post({ factors }, factors.map((f) => f.factor.buffer as ArrayBuffer));
} catch (e) {
  post({ error: e instanceof Error ? e.message : String(e), ...(e instanceof DoraNormError && { normOf: e.module }) });
}
