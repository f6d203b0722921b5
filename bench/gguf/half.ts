/**
 * IEEE 754 binary16 from and to float32, as ggml stores block scales (GGML_FP32_TO_FP16 rounds to
 * nearest, ties to even; subnormals kept, overflow to infinity): the same conversions the graph
 * builder and the safetensors reader already use.
 */
export { float32ToFloat16Bits as toHalf } from '../../src/model/graph/onnx-builder.js';
export { f16ToF32 as fromHalf } from '../../src/adapters/safetensors.js';
