import type { InferenceSession, Tensor } from 'onnxruntime-node';
import { hasRowEmbeddings, HIDDEN_OUTPUT, type Manifest } from '../model/manifest.js';
import { fetchesOf } from './head.js';
import type { Feeds, KvStore } from './kv-store.js';

export type RunSession = Pick<InferenceSession, 'run'>;

/**
 * One run of the engine's graph: what it fetches follows the graph and the KV store. The hidden
 * state crosses back only when `hidden` (a row whose adapter has its own lm_head). The gqa store's
 * present outputs are passed as pre-allocated tensors — the very ones fed as the past — so the
 * runtime writes the cache in place. onnxruntime-node then still copies each of them into a new
 * array for its result (docs/resident-kv.md); nothing here reads those copies.
 */
export async function runStep(session: RunSession, manifest: Manifest, kv: KvStore, feeds: Feeds, hidden: boolean): Promise<InferenceSession.ReturnType> {
  const bound = kv.bound(feeds);
  if (Object.keys(bound).length > 0) {
    const fetches: Record<string, Tensor | null> = { logits: null, ...(hidden && { [HIDDEN_OUTPUT]: null }), ...bound };
    return session.run(feeds, fetches);
  }
  return hasRowEmbeddings(manifest) ? session.run(feeds, fetchesOf(manifest, hidden)) : session.run(feeds);
}
