/**
 * Block quantization of a Linear weight into onnxruntime's `com.microsoft.MatMulNBits` layout.
 * Pure: Float32Array in, packed bytes out.
 *
 * MatMulNBits computes Y = A · dequant(B)ᵀ with B [N, n_blocks, blob_size] uint8, where
 * n_blocks = ceil(K / block_size) and blob_size = block_size · bits / 8; codes run along K and
 * are packed low bits first (4-bit: element 2j in the low nibble of byte j, 2j + 1 in the high one).
 * scales [N · n_blocks] (the graph's float type), zero_points uint8 [N · ceil(n_blocks · bits / 8)]
 * (4-bit: two blocks per byte, low nibble first). dequant(q) = (q − zero_point) · scale.
 *
 * Round-to-nearest, asymmetric per block (min/max): with a zero point the code range covers the
 * block's actual range instead of ±absmax, which halves the step for one-signed blocks. 0 is kept
 * exactly representable (min ≤ 0 ≤ max), so padding past K (filled with the zero point) adds 0.
 */

export type QuantBits = 4 | 8;
export const QUANT_BLOCK = 32;

export interface QuantizedWeight {
  bits: QuantBits;
  blockSize: number;
  /** output features (rows of the PyTorch [out, in] weight) */
  n: number;
  /** input features */
  k: number;
  nBlocks: number;
  /** [n, nBlocks, blockSize · bits / 8] */
  packed: Uint8Array;
  /** [n · nBlocks] */
  scales: Float32Array;
  /** [n · ceil(nBlocks · bits / 8)] */
  zeroPoints: Uint8Array;
}

/** the packed layout's sizes: blocks per row, bytes per block, zero-point bytes per row */
export function blockLayout(k: number, bits: QuantBits, blockSize = QUANT_BLOCK): { nBlocks: number; blob: number; zpRow: number } {
  const nBlocks = Math.ceil(k / blockSize);
  return { nBlocks, blob: (blockSize * bits) / 8, zpRow: Math.ceil((nBlocks * bits) / 8) };
}

/**
 * `w` is [n, k] row-major (PyTorch Linear [out, in]). `roundScale` rounds a scale to the graph's
 * float type (Math.fround for float32, a float16 round trip for fp16) before codes are chosen, so
 * the codes are the nearest ones for the scale the runtime will actually use.
 */
export function quantizeBlockwise(
  w: Float32Array,
  n: number,
  k: number,
  bits: QuantBits,
  roundScale: (s: number) => number = Math.fround,
  blockSize = QUANT_BLOCK,
): QuantizedWeight {
  if (w.length !== n * k) throw new Error(`quantizeBlockwise: ${w.length} values for [${n}, ${k}]`);
  const { nBlocks, blob, zpRow } = blockLayout(k, bits, blockSize);
  const qmax = (1 << bits) - 1;
  const packed = new Uint8Array(n * nBlocks * blob);
  const scales = new Float32Array(n * nBlocks);
  const zeroPoints = new Uint8Array(n * zpRow);
  const codes = new Uint8Array(blockSize);
  for (let r = 0; r < n; r++) {
    for (let b = 0; b < nBlocks; b++) {
      const start = b * blockSize;
      const end = Math.min(start + blockSize, k);
      let lo = 0;
      let hi = 0;
      for (let c = start; c < end; c++) {
        const v = w[r * k + c];
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      const scale = hi > lo ? roundScale((hi - lo) / qmax) : 1;
      const zp = Math.min(qmax, Math.max(0, Math.round(-lo / scale)));
      for (let j = 0; j < blockSize; j++) {
        const c = start + j;
        codes[j] = c < end ? Math.min(qmax, Math.max(0, Math.round(w[r * k + c] / scale) + zp)) : zp;
      }
      const at = (r * nBlocks + b) * blob;
      if (bits === 8) packed.set(codes, at);
      else for (let j = 0; j < blob; j++) packed[at + j] = codes[2 * j] | (codes[2 * j + 1] << 4);
      scales[r * nBlocks + b] = scale;
      if (bits === 8) zeroPoints[r * zpRow + b] = zp;
      else zeroPoints[r * zpRow + (b >> 1)] |= zp << ((b & 1) * 4);
    }
  }
  return { bits, blockSize, n, k, nBlocks, packed, scales, zeroPoints };
}

/** The [n, k] weight the runtime multiplies by: (code − zero point) · scale. */
export function dequantizeBlockwise(q: QuantizedWeight): Float32Array {
  const { n, k, nBlocks, blockSize, bits } = q;
  const { blob, zpRow } = blockLayout(k, bits, blockSize);
  const out = new Float32Array(n * k);
  for (let r = 0; r < n; r++) {
    for (let c = 0; c < k; c++) {
      const b = Math.floor(c / blockSize);
      const j = c % blockSize;
      const at = (r * nBlocks + b) * blob;
      const code = bits === 8 ? q.packed[at + j] : (q.packed[at + (j >> 1)] >> ((j & 1) * 4)) & 0xf;
      const zp = bits === 8 ? q.zeroPoints[r * zpRow + b] : (q.zeroPoints[r * zpRow + (b >> 1)] >> ((b & 1) * 4)) & 0xf;
      out[r * k + c] = Math.fround((code - zp) * q.scales[r * nBlocks + b]);
    }
  }
  return out;
}
