import ort from 'onnxruntime-node';

/**
 * float16 tensors as Uint16Array bits, on every Node version.
 *
 * onnxruntime-common picks the typed array for 'float16' once, at the first Tensor it builds:
 * Float16Array when the runtime has one (Node 24 does; Node 20 does not), else Uint16Array. The
 * engine keeps fp16 weights, caches and feeds as raw bits in Uint16Array (dtype.ts), and
 * onnxruntime-node 1.30's native binding reads float16 data only as Uint16Array: with
 * Float16Array chosen, every fp16 run failed on Node 24 ("not enough space: expected 18, got 0")
 * and feeds read back as values instead of bits. So before any other tensor exists, one is built
 * with Float16Array hidden, which fixes the choice to Uint16Array for this thread.
 */
function pinFloat16Bits(): void {
  const g = globalThis as { Float16Array?: unknown };
  const saved = g.Float16Array;
  if (saved === undefined) return;
  delete g.Float16Array;
  try {
    new ort.Tensor('float32', new Float32Array(0), [0]);
  } finally {
    g.Float16Array = saved;
  }
}

pinFloat16Bits();
