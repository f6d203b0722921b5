import type { Tensor } from 'onnxruntime-node';
import { KV_CACHE_PREFIX } from '../model/manifest.js';
import type { Provider } from '../model/session.js';

/**
 * Bytes that cross the JS↔onnxruntime boundary, counted per run (DESIGN.md "Engine"; exported as
 * loraserve_runtime_bytes_transferred_total{direction}).
 *
 * Measured on onnxruntime-node 1.30 (docs/resident-kv.md): on the CPU
 * provider an input typed array is wrapped as the OrtValue's memory, not copied, while every
 * output — a pre-allocated one passed in `fetches` included — comes back as a fresh copy. So:
 * - out: every output's bytes, always;
 * - in: every input's bytes except the resident KV cache views, which on cpu are wrapped in place.
 *   On cuda the Node API copies each input host→device per run, the cache views too, so they are
 *   counted there: that number is what IO binding through the C API has to remove.
 * The counts are what each run hands over, so a step's numbers are O(rows) exactly when nothing
 * O(context) is fed or fetched.
 */
export interface Transfer {
  toRuntime: number;
  fromRuntime: number;
}

export function countTransfer(t: Transfer, feeds: Readonly<Record<string, Tensor>>, out: Readonly<Record<string, Tensor>>, provider: Provider): void {
  for (const [name, tensor] of Object.entries(feeds)) {
    if (provider === 'cpu' && name.startsWith(KV_CACHE_PREFIX)) continue;
    t.toRuntime += byteLength(tensor);
  }
  for (const tensor of Object.values(out)) t.fromRuntime += byteLength(tensor);
}

function byteLength(t: Tensor): number {
  const d = t.data as unknown;
  return ArrayBuffer.isView(d) ? d.byteLength : 0;
}
