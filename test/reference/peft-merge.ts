import type { MemoryCheckpoint, MemoryTensor } from '../helpers/random-checkpoint.js';

/**
 * PEFT's `merge_and_unload` for the LoRA variants, written from peft/tuners/lora (layer.py
 * `Linear.merge`, variants.py `DoraLinearVariant.merge_safe`, dora.py `get_weight_norm`), in
 * float64, in PyTorch's [out, in] layout. It shares nothing with the server's code: the served
 * output must equal the reference forward of the checkpoint this returns.
 *
 *   ΔW = scaling · (lora_B.weight @ lora_A.weight)
 *   plain LoRA:  W ← W + ΔW
 *   DoRA:        norm = ‖W + ΔW‖ over dim 1 (fan_in_fan_out false: rows of [out, in]),
 *                W ← (m / norm).view(-1, 1) · (W + ΔW)
 *   lora_bias:   bias ← bias + lora_B.bias · scaling   (PEFT refuses to merge without a base bias)
 */
export interface PeftModule {
  /** lora_A.weight [r, in] */
  A: Float32Array;
  /** lora_B.weight [out, r] */
  B: Float32Array;
  rank: number;
  scaling: number;
  /** lora_magnitude_vector [out] (use_dora) */
  magnitude?: Float32Array;
  /** lora_B.bias [out] (lora_bias) */
  biasB?: Float32Array;
}

export function peftMerge(base: MemoryCheckpoint, modules: ReadonlyMap<string, PeftModule>, label = 'peft-merged'): MemoryCheckpoint {
  const replaced = new Map<string, MemoryTensor>();
  for (const [name, m] of modules) {
    const w = base.tensors.get(`${name}.weight`);
    if (!w) throw new Error(`peftMerge: the base has no ${name}.weight`);
    const [out, inF] = w.shape as [number, number];
    const merged = new Float64Array(out * inF);
    for (let o = 0; o < out; o++) {
      for (let i = 0; i < inF; i++) {
        let d = 0;
        for (let j = 0; j < m.rank; j++) d += m.B[o * m.rank + j]! * m.A[j * inF + i]!;
        merged[o * inF + i] = w.data[o * inF + i]! + m.scaling * d;
      }
    }
    if (m.magnitude) {
      for (let o = 0; o < out; o++) {
        let ss = 0;
        for (let i = 0; i < inF; i++) ss += merged[o * inF + i]! ** 2;
        const factor = m.magnitude[o]! / Math.sqrt(ss);
        for (let i = 0; i < inF; i++) merged[o * inF + i]! *= factor;
      }
    }
    replaced.set(`${name}.weight`, { shape: w.shape, data: Float32Array.from(merged) });
    if (m.biasB) {
      const b = base.tensors.get(`${name}.bias`);
      if (!b) throw new Error(`peftMerge: ${name} has no base bias; PEFT cannot merge lora_bias into it`);
      replaced.set(`${name}.bias`, { shape: b.shape, data: b.data.map((v, o) => v + m.biasB![o]! * m.scaling) });
    }
  }
  return base.with(replaced, `${base.modelId}+${label}`);
}

/** ‖W_o‖ per output row of a [out, in] weight (DoRA's magnitude at initialisation) */
export function rowNorms(w: Float32Array, out: number, inF: number): Float64Array {
  const n = new Float64Array(out);
  for (let o = 0; o < out; o++) {
    let ss = 0;
    for (let i = 0; i < inF; i++) ss += w[o * inF + i]! ** 2;
    n[o] = Math.sqrt(ss);
  }
  return n;
}
