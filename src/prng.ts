/**
 * mulberry32: a tiny seeded generator with integer arithmetic only, so generated weights (the
 * embedded default model, benchmark presets, test models) are the same bytes on every machine.
 * Not for sampling: the engine's per-request generator is in engine/sampler.ts.
 */
export function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
