import { fromHalf, toHalf } from './half.js';

/**
 * ggml's F32, Q8_0 and Q4_0 tensor types, with the reference quantizers of ggml-quants.c
 * (`quantize_row_q8_0_ref`, `quantize_row_q4_0_ref`): what `llama-quantize` and
 * `convert_hf_to_gguf.py --outtype q8_0` write. Every step that ggml computes in float is done
 * through Math.fround so the bytes are the ones ggml would write.
 */

export const GGML_TYPE = { F32: 0, F16: 1, Q4_0: 2, Q8_0: 8 } as const;
export type GgmlTypeName = keyof typeof GGML_TYPE;

/** values per block and bytes per block */
export const BLOCK = {
  F32: { values: 1, bytes: 4 },
  F16: { values: 1, bytes: 2 },
  // fp16 d, then 32 int8
  Q8_0: { values: 32, bytes: 34 },
  // fp16 d, then 16 bytes: element j in the low nibble of byte j, element j + 16 in its high nibble
  Q4_0: { values: 32, bytes: 18 },
} as const satisfies Record<GgmlTypeName, { values: number; bytes: number }>;

export function tensorBytes(type: GgmlTypeName, count: number): number {
  const b = BLOCK[type];
  if (count % b.values !== 0) throw new Error(`${type}: ${count} values is not a whole number of ${b.values}-value blocks`);
  return (count / b.values) * b.bytes;
}

const fr = Math.fround;

/** C's roundf: half away from zero (Math.round rounds half up) */
function roundf(x: number): number {
  return x < 0 ? -Math.round(-x) : Math.round(x);
}

export function quantizeQ8_0(x: Float32Array): Uint8Array {
  const nb = x.length / 32;
  if (!Number.isInteger(nb)) throw new Error(`Q8_0: ${x.length} values is not a multiple of 32`);
  const out = new Uint8Array(nb * 34);
  const qs = new Int8Array(out.buffer);
  for (let i = 0; i < nb; i++) {
    let amax = 0;
    for (let j = 0; j < 32; j++) amax = Math.max(amax, Math.abs(x[i * 32 + j]));
    const d = fr(amax / 127);
    const id = d ? fr(1 / d) : 0;
    const h = toHalf(d);
    out[i * 34] = h & 0xff;
    out[i * 34 + 1] = h >> 8;
    for (let j = 0; j < 32; j++) qs[i * 34 + 2 + j] = roundf(fr(x[i * 32 + j] * id));
  }
  return out;
}

export function dequantizeQ8_0(bytes: Uint8Array, count: number): Float32Array {
  const out = new Float32Array(count);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < count / 32; i++) {
    const d = fromHalf(view.getUint16(i * 34, true));
    for (let j = 0; j < 32; j++) out[i * 32 + j] = view.getInt8(i * 34 + 2 + j) * d;
  }
  return out;
}

export function quantizeQ4_0(x: Float32Array): Uint8Array {
  const nb = x.length / 32;
  if (!Number.isInteger(nb)) throw new Error(`Q4_0: ${x.length} values is not a multiple of 32`);
  const out = new Uint8Array(nb * 18);
  const view = new DataView(out.buffer);
  for (let i = 0; i < nb; i++) {
    // the value of largest magnitude keeps its sign: d = max / -8 maps it exactly onto level 0
    let amax = 0;
    let max = 0;
    for (let j = 0; j < 32; j++) {
      const v = x[i * 32 + j];
      if (amax < Math.abs(v)) {
        amax = Math.abs(v);
        max = v;
      }
    }
    const d = fr(max / -8);
    const id = d ? fr(1 / d) : 0;
    view.setUint16(i * 18, toHalf(d), true);
    for (let j = 0; j < 16; j++) {
      const x0 = fr(x[i * 32 + j] * id);
      const x1 = fr(x[i * 32 + 16 + j] * id);
      // (int8_t) truncates toward zero; x·id ≥ -8 keeps the sum positive, so this is floor
      const q0 = Math.min(15, Math.trunc(fr(x0 + 8.5)));
      const q1 = Math.min(15, Math.trunc(fr(x1 + 8.5)));
      out[i * 18 + 2 + j] = q0 | (q1 << 4);
    }
  }
  return out;
}

export function dequantizeQ4_0(bytes: Uint8Array, count: number): Float32Array {
  const out = new Float32Array(count);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let i = 0; i < count / 32; i++) {
    const d = fromHalf(view.getUint16(i * 18, true));
    for (let j = 0; j < 16; j++) {
      const b = bytes[i * 18 + 2 + j];
      out[i * 32 + j] = ((b & 0x0f) - 8) * d;
      out[i * 32 + 16 + j] = ((b >> 4) - 8) * d;
    }
  }
  return out;
}

/** the tensor's values in `type`, as the bytes a GGUF file holds */
export function encodeTensor(type: GgmlTypeName, x: Float32Array): Uint8Array {
  switch (type) {
    case 'F32':
      return new Uint8Array(x.buffer.slice(x.byteOffset, x.byteOffset + x.byteLength));
    case 'F16': {
      const out = new Uint16Array(x.length);
      for (let i = 0; i < x.length; i++) out[i] = toHalf(x[i]);
      return new Uint8Array(out.buffer);
    }
    case 'Q8_0':
      return quantizeQ8_0(x);
    case 'Q4_0':
      return quantizeQ4_0(x);
  }
}
