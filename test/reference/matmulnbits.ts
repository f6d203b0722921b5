/**
 * Dequantization of onnxruntime's com.microsoft.MatMulNBits weights, written from the contrib op's
 * documented semantics (docs/ContribOperators.md) and not from src/model/graph/quantize.ts:
 *   B           uint8 [N, k_blocks, block_size·bits/8], codes along K, low bits first;
 *   scales      [N · k_blocks];
 *   zero_points uint8 [N · ceil(k_blocks·bits/8)], packed like B (absent: 2^(bits−1));
 *   W[n, k] = (code(n, k) − zp(n, k / block_size)) · scale(n, k / block_size).
 * Returns W as [N, K] (PyTorch Linear layout), so Y = A · Wᵀ.
 */
export function dequantizeMatMulNBits(
  B: Uint8Array,
  scales: Float32Array,
  zeroPoints: Uint8Array | null,
  o: { N: number; K: number; bits: number; blockSize: number },
): Float32Array {
  const kBlocks = Math.ceil(o.K / o.blockSize);
  const blobBytes = (o.blockSize * o.bits) / 8;
  const perByte = 8 / o.bits;
  const mask = (1 << o.bits) - 1;
  /** the index-th `bits`-wide field of a byte run starting at `base` */
  const field = (bytes: Uint8Array, base: number, index: number) => (bytes[base + Math.floor(index / perByte)] >> ((index % perByte) * o.bits)) & mask;
  const zpBytesPerRow = Math.ceil((kBlocks * o.bits) / 8);
  const W = new Float32Array(o.N * o.K);
  for (let n = 0; n < o.N; n++) {
    for (let k = 0; k < o.K; k++) {
      const blk = Math.floor(k / o.blockSize);
      const code = field(B, (n * kBlocks + blk) * blobBytes, k % o.blockSize);
      const zp = zeroPoints ? field(zeroPoints, n * zpBytesPerRow, blk) : 1 << (o.bits - 1);
      W[n * o.K + k] = (code - zp) * scales[n * kBlocks + blk];
    }
  }
  return W;
}
