import { f16ToF32 } from './safetensors.js';
import { float32ToFloat16Bits } from '../model/graph/onnx-builder.js';
import { dequantizeBlockwise, quantizeBlockwise } from '../model/graph/quantize.js';
import type { ModelDtype } from '../model/manifest.js';

/**
 * DoRA's per-output factor, as PEFT computes it (tuners/lora/dora.py, DoraLinearLayer):
 *   g = m / ‖W + s·B·A‖   (the norm of each output row over the input dimension, detached)
 *   y = g ⊙ (W·x + s·B·A·x) + bias
 * fan_in_fan_out is false for every projection served here (nn.Linear; the validator refuses
 * true), so rows of the [out, in] weight are the norm's rows. g depends only on the adapter and
 * the base, so it is computed once, when the adapter is loaded.
 *
 * W is the weight the graph multiplies by, as PEFT takes it from `dequantize_module_weight`:
 * the checkpoint's values rounded to float16 in an fp16 graph, and block-quantized then
 * dequantized with WEIGHTS=int8/int4 (the same codes the graph's MatMulNBits holds), so the factor
 * normalises the weight that is actually served.
 */

export interface ServedWeightOptions {
  dtype: ModelDtype;
  weights?: 'int8' | 'int4';
}

/** [out, in] as the graph holds it (see llama.ts `projection` / `quantizedMatMul`) */
export function servedWeight(w: Float32Array, out: number, inF: number, o: ServedWeightOptions): Float32Array {
  const toHalf = (v: number) => f16ToF32(float32ToFloat16Bits(v));
  if (o.weights) {
    // the scale rounding quantizedMatMul applies, so the codes are the graph's codes
    const q = quantizeBlockwise(w, out, inF, o.weights === 'int4' ? 4 : 8, o.dtype === 'fp16' ? toHalf : Math.fround);
    return dequantizeBlockwise(q);
  }
  return o.dtype === 'fp16' ? w.map(toHalf) : w;
}

export interface DoraModuleInput {
  name: string;
  inFeatures: number;
  outFeatures: number;
  rank: number;
  /** engine layout [in, rank] */
  A: Float32Array;
  /** engine layout [rank, out], the scale already folded in */
  B: Float32Array;
  /** PEFT's lora_magnitude_vector [out] */
  magnitude: Float32Array;
}

/** A row of W + s·B·A with norm 0: PEFT's forward would give NaN there, so the adapter is refused (422 non_finite). */
export class DoraNormError extends Error {
  override name = 'DoraNormError';
  constructor(
    readonly module: string,
    message: string,
  ) {
    super(message);
  }
}

/** g [out] in float64 sums; W is [out, in] row-major */
export function doraFactor(W: Float32Array, m: DoraModuleInput): Float32Array {
  const { inFeatures: inF, outFeatures: out, rank: r, A, B, magnitude } = m;
  if (W.length !== out * inF) throw new Error(`doraFactor: ${m.name} weight holds ${W.length} values, expected ${out} × ${inF}`);
  const g = new Float32Array(out);
  const bCol = new Float64Array(r);
  for (let o = 0; o < out; o++) {
    for (let j = 0; j < r; j++) bCol[j] = B[j * out + o]!;
    let ss = 0;
    const row = o * inF;
    for (let k = 0; k < inF; k++) {
      let d = 0;
      const a = k * r;
      for (let j = 0; j < r; j++) d += A[a + j]! * bCol[j]!;
      const v = W[row + k]! + d;
      ss += v * v;
    }
    const factor = magnitude[o]! / Math.sqrt(ss);
    if (!Number.isFinite(factor)) {
      throw new DoraNormError(m.name, `${m.name}: row ${o} of W + scale·B·A has norm ${Math.sqrt(ss)}, so DoRA's factor m / ‖W + scale·B·A‖ is ${factor}; PEFT would produce non-finite outputs with this adapter on this base model.`);
    }
    g[o] = factor;
  }
  return g;
}
