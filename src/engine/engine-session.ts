import type { Manifest } from '../model/manifest.js';
import { createSession, resolveRuntime, type Device, type EngineSession, type Provider, type RuntimeSetting, type SessionLog, type SessionRuntime } from '../model/session.js';
import type { KvBuffers, KvTensor } from './kv-store.js';
import type { BoundOutputs } from './transfer.js';

/** what EngineCore and ProbeRun need besides the session: where the cache lives and how runs are counted */
export interface EngineSessionParts {
  session: EngineSession;
  provider: Provider;
  /** why this provider (createSession's sentence) */
  reason: string;
  runtime: SessionRuntime;
  /** the gqa cache's memory: the C-API runner's own (device memory on cuda); undefined = host typed arrays */
  kvBuffers: KvBuffers<KvTensor> | undefined;
  boundOutputs: BoundOutputs;
}

/**
 * Opens the graph the way the engine serves it (the worker, and the bench's raw loop, which must
 * measure the same thing): the runtime resolved from RUNTIME and the graph's KV contract, and with
 * the C API runner the gqa cache allocated by onnxruntime on the session's device and bound in
 * place as past and present, so it never crosses between host and device. onnxruntime-node takes
 * host arrays only, so it keeps the default host buffers, and it copies bound outputs back.
 */
export async function openEngineSession(modelDir: string, manifest: Manifest, device: Device, setting: RuntimeSetting, log: SessionLog): Promise<EngineSessionParts> {
  const { runtime, why } = resolveRuntime(setting, manifest.kv);
  log.info(`runtime ${runtime} (${why})`);
  const { session, provider, reason } = await createSession(modelDir, manifest, device, log, runtime);
  let kvBuffers: KvBuffers<KvTensor> | undefined;
  if (runtime === 'capi') {
    const [{ CapiSession }, { capiKvBuffers }] = await Promise.all([import('../runtime/capi-session.js'), import('./device-kv.js')]);
    if (!(session instanceof CapiSession)) throw new Error('RUNTIME=capi opened a session that is not the C API runner');
    kvBuffers = capiKvBuffers(session);
  }
  return { session, provider, reason, runtime, kvBuffers, boundOutputs: runtime === 'capi' ? 'in-place' : 'copied' };
}
