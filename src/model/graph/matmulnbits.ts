import { GraphBuilder, int } from './onnx-builder.js';
import { blockLayout, type QuantizedWeight } from './quantize.js';

/**
 * x · Wᵀ as one `com.microsoft.MatMulNBits` over a block-quantized W (graph/quantize.ts layout),
 * its initializers named after the checkpoint tensor (`<name>.q<bits>`, `.scales` in the graph's
 * float type, `.zero_points`). The served graph and the bench's kernel-only graph both emit it
 * here, so they hold the same products.
 */
export async function matMulNBits(g: GraphBuilder, name: string, x: string, q: QuantizedWeight, floatType: 'float32' | 'float16', accuracyLevel: number): Promise<string> {
  const { blob } = blockLayout(q.k, q.bits, q.blockSize);
  const packed = await g.bytesWeight(`${name}.q${q.bits}`, [q.n, q.nBlocks, blob], q.packed);
  const scales = await g.weight(`${name}.scales`, floatType, [q.n * q.nBlocks], q.scales);
  const zeroPoints = await g.bytesWeight(`${name}.zero_points`, [q.zeroPoints.length], q.zeroPoints);
  const attrs = { K: int(q.k), N: int(q.n), bits: int(q.bits), block_size: int(q.blockSize), accuracy_level: int(accuracyLevel) };
  return g.op('MatMulNBits', [x, packed, scales, zeroPoints], attrs, 'com.microsoft');
}
