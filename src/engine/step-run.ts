import type { Tensor } from 'onnxruntime-node';
import { hasRowEmbeddings, HIDDEN_OUTPUT, type Manifest } from '../model/manifest.js';
import { fetchesOf } from './head.js';
import type { KvStore, KvTensor, StepFeeds } from './kv-store.js';

/** what a step binds as outputs: a name (returned as a new host Tensor), a tensor to write in place, or null (the runtime allocates) */
export type StepFetches = readonly string[] | Readonly<Record<string, KvTensor | null>>;

/**
 * What the engine needs of a session: one run. Both runtimes fit it — the C-API runner
 * (CapiSession) takes DeviceTensors as feeds and fetches; onnxruntime-node's InferenceSession takes
 * host Tensors only, and fits the type only through TypeScript's method-parameter bivariance, so
 * the rule is: DeviceTensors (capiKvBuffers, engine/device-kv.ts) go only to a CapiSession, and
 * the worker is what pairs them (worker.ts).
 */
export interface RunSession {
  run(feeds: StepFeeds<KvTensor>, fetches: StepFetches): Promise<Record<string, Tensor>>;
  run(feeds: StepFeeds<KvTensor>): Promise<Record<string, Tensor>>;
}

/**
 * One run of the engine's graph: what it fetches follows the graph and the KV store. The hidden
 * state crosses back only when `hidden` (a row whose adapter has its own lm_head). The gqa store's
 * present outputs are passed as pre-allocated tensors — the very ones fed as the past — so the
 * runtime writes the cache in place. onnxruntime-node then still copies each of them into a new
 * array for its result (docs/resident-kv.md); nothing here reads those copies. The C-API runner
 * returns a host Tensor as itself and a DeviceTensor not at all.
 */
export async function runStep<V extends KvTensor>(session: RunSession, manifest: Manifest, kv: KvStore<V>, feeds: StepFeeds<V>, hidden: boolean): Promise<Record<string, Tensor>> {
  const bound = kv.bound(feeds);
  if (Object.keys(bound).length > 0) {
    const fetches: Record<string, Tensor | V | null> = { logits: null, ...(hidden && { [HIDDEN_OUTPUT]: null }), ...bound };
    return session.run(feeds, fetches);
  }
  return hasRowEmbeddings(manifest) ? session.run(feeds, fetchesOf(manifest, hidden)) : session.run(feeds);
}
