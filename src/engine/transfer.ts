import type { Tensor } from 'onnxruntime-node';
import type { KvTensor } from './kv-store.js';
import { KV_CACHE_PREFIX, KV_PRESENT_PREFIX } from '../model/manifest.js';
import type { Provider } from '../model/session.js';

/**
 * Bytes that cross the JS↔onnxruntime boundary, counted per run (DESIGN.md "Engine"; exported as
 * loraserve_runtime_bytes_transferred_total{direction}).
 *
 * Measured on onnxruntime-node 1.30 (docs/resident-kv.md): on the CPU
 * provider an input typed array is wrapped as the OrtValue's memory, not copied, while every
 * output — a pre-allocated one passed in `fetches` included — comes back as a fresh copy. So:
 * - out: every output's bytes the runtime hands back. The gqa store's present outputs are bound
 *   to the cache itself and written in place; onnxruntime-node nevertheless copies each of them
 *   back into a new array ([rows, kvHeads, maxCtx, headDim] per layer, K and V), so with it
 *   (`boundOutputs: 'copied'`, the default) they are counted — that is the Node API's cost, flat in
 *   the context but proportional to the cache's length. A runner that returns a bound output
 *   without copying it (the C-API runner: `boundOutputs: 'in-place'`) leaves them out.
 * - in: every input's bytes except the KV cache views (kv_cache.*), which on cpu are wrapped in
 *   place. On cuda the Node API copies each input host→device per run, the cache views too, so
 *   they are counted there. With the C-API runner's buffers (capiKvBuffers, `deviceCache`) the
 *   cache is the runtime's own memory — device memory on cuda — and never moves: only ids,
 *   positions, lengths, LoRA inputs and logits are counted, whatever the provider.
 * The counts are what each run hands over, so a step's numbers are O(rows) exactly when nothing
 * O(context) is fed or fetched.
 */
export interface Transfer {
  toRuntime: number;
  fromRuntime: number;
}

/** whether the runtime copies an output bound to a pre-allocated tensor back into a new one */
export type BoundOutputs = 'copied' | 'in-place';

export function countTransfer(
  t: Transfer,
  feeds: Readonly<Record<string, Tensor | KvTensor>>,
  out: Readonly<Record<string, Tensor>>,
  provider: Provider,
  /** deviceCache: the cache views are the runtime's own buffers (capiKvBuffers: device memory on cuda), never copied */
  opts: { boundOutputs?: BoundOutputs; deviceCache?: boolean } = {},
): void {
  for (const [name, tensor] of Object.entries(feeds)) {
    // on cpu wrapped; with a device-resident cache (deviceCache) never moved at all
    if ((provider === 'cpu' || opts.deviceCache) && name.startsWith(KV_CACHE_PREFIX)) continue;
    t.toRuntime += byteLength(tensor);
  }
  for (const [name, tensor] of Object.entries(out)) {
    if (opts.boundOutputs === 'in-place' && name.startsWith(KV_PRESENT_PREFIX)) continue;
    t.fromRuntime += byteLength(tensor);
  }
}

function byteLength(t: KvTensor): number {
  // a DeviceTensor has no host data: it is the runtime's memory and crosses nothing
  if (!('data' in t)) return 0;
  const d = t.data as unknown;
  return ArrayBuffer.isView(d) ? d.byteLength : 0;
}
