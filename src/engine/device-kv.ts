import type { CapiSession, DeviceTensor } from '../runtime/capi-session.js';
import { tensorType, type ModelArray } from './dtype.js';
import { checkKvCopy, type KvBuffers } from './kv-store.js';

/**
 * GqaKv's buffers in memory the C-API runner allocated for its session's device (issue 14):
 * CUDA memory on cuda, onnxruntime's CPU allocator on cpu. Every step binds views of them as
 * GroupQueryAttention's past and present, so the cache never crosses between host and device;
 * only the rare moves (a hole filled, growth, a shared prompt's snapshot) copy, and those run on
 * the device too (CapiSession.copyMany).
 *
 * One code path for both providers: nothing here reads a cpu buffer through hostView, so the CPU
 * tests run exactly what CUDA runs, only the memory info differs.
 */
export function capiKvBuffers(session: Pick<CapiSession, 'allocate' | 'view' | 'copyMany' | 'download'>): KvBuffers<DeviceTensor> {
  // Every step feeds a view of each layer's buffers; a view lives as long as its buffer, so one per
  // step would pile up for as long as the cache keeps its size. A buffer's views are kept per slot
  // range instead (the rows of a step sit in slots [0, n), a prefill chunk in one slot: a handful
  // per buffer), die with it, and being the same objects step after step, stay bound to the run.
  const views = new WeakMap<DeviceTensor, Map<number, DeviceTensor>>();
  return {
    runtimeMemory: true,
    allocate: (dtype, dims) => session.allocate(tensorType(dtype), dims),
    view(buffer, from, to) {
      const [slots, heads, ctx, hd] = buffer.dims as [number, number, number, number];
      if (from < 0 || to > slots || from >= to) throw new Error(`slots [${from}, ${to}) are not inside a buffer of ${slots}`);
      let own = views.get(buffer);
      if (!own) views.set(buffer, (own = new Map()));
      const key = from * (slots + 1) + to;
      const known = own.get(key);
      if (known && !known.disposed) return known;
      const per = heads * ctx * hd;
      const view = session.view(buffer, from * per, [to - from, heads, ctx, hd]);
      own.set(key, view);
      return view;
    },
    async copy(moves, len) {
      if (len === 0) return;
      // a slot's positions [0, len) of one head are one contiguous [len, headDim] block on both
      // sides (slot-major, then head, then position), so a move is one block copy per head
      const views: DeviceTensor[] = [];
      const pairs: [DeviceTensor, DeviceTensor][] = [];
      try {
        for (const { src, srcSlot, dst, dstSlot } of moves) {
          checkKvCopy(src.dims, srcSlot, dst.dims, dstSlot, len);
          const [, heads, srcCtx, hd] = src.dims as [number, number, number, number];
          const dstCtx = dst.dims[2]!;
          for (let h = 0; h < heads; h++) {
            const from = session.view(src, (srcSlot * heads + h) * srcCtx * hd, [len * hd]);
            const to = session.view(dst, (dstSlot * heads + h) * dstCtx * hd, [len * hd]);
            views.push(from, to);
            pairs.push([to, from]);
          }
        }
        await session.copyMany(pairs);
      } finally {
        for (const v of views) v.dispose();
      }
    },
    async download(buffer) {
      const t = await session.download(buffer);
      const data = t.data as unknown;
      if (!(data instanceof Float32Array) && !(data instanceof Uint16Array)) throw new Error(`a KV buffer of ${buffer.type} is neither float32 nor float16`);
      return data satisfies ModelArray;
    },
    dispose: (buffer) => buffer.dispose(),
  };
}
