// float16 as Uint16Array bits on every Node version (see ort-float16.ts)
import '../model/ort-float16.js';
import { float32ToFloat16Bits, toFloat16Bits } from '../model/graph/onnx-builder.js';
import type { ModelDtype } from '../model/manifest.js';

/**
 * Storage for tensors in the model's dtype. onnxruntime-node holds float16 in a Uint16Array of
 * raw bits (Node 20 has no Float16Array).
 */
export type ModelArray = Float32Array | Uint16Array;
export type ModelTensorType = 'float32' | 'float16';

export function tensorType(dtype: ModelDtype): ModelTensorType {
  return dtype === 'fp16' ? 'float16' : 'float32';
}

export function allocModel(dtype: ModelDtype, n: number): ModelArray {
  return dtype === 'fp16' ? new Uint16Array(n) : new Float32Array(n);
}

/** fp32 data is taken as is (no copy); fp16 is converted once. */
export function toModelArray(dtype: ModelDtype, data: Float32Array): ModelArray {
  return dtype === 'fp32' ? data : toFloat16Bits(data);
}

/** One value in the model's dtype, as stored in a ModelArray. */
export function modelScalar(dtype: ModelDtype, v: number): number {
  return dtype === 'fp16' ? float32ToFloat16Bits(v) : v;
}
