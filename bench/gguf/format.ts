import type { GgmlTypeName } from './quants.js';

/**
 * The GGUF container (ggml's docs/gguf.md, version 3, little-endian): "GGUF", version u32, tensor
 * count u64, metadata count u64; each metadata entry is a string key, a u32 value type and the
 * value; each tensor info is a name, n_dims u32, the dims u64 innermost first (ne[0] is the
 * length of a row: a PyTorch [out, in] weight is written as [in, out]), the ggml type u32 and
 * the data offset u64 relative to the data section; the data section starts at the next multiple
 * of `general.alignment` (32 unless set) and every tensor's data is aligned to it too.
 */

export const GGUF_MAGIC = 0x46554747;
export const GGUF_VERSION = 3;
export const GGUF_ALIGNMENT = 32;

export const VALUE_TYPE = { u8: 0, i8: 1, u16: 2, i16: 3, u32: 4, i32: 5, f32: 6, bool: 7, string: 8, array: 9, u64: 10, i64: 11, f64: 12 } as const;

export type MetadataValue =
  | { type: 'u32'; value: number }
  | { type: 'i32'; value: number }
  | { type: 'f32'; value: number }
  | { type: 'bool'; value: boolean }
  | { type: 'string'; value: string }
  | { type: 'array'; of: 'string'; value: readonly string[] }
  | { type: 'array'; of: 'i32'; value: readonly number[] }
  | { type: 'array'; of: 'f32'; value: readonly number[] };

export const u32 = (value: number): MetadataValue => ({ type: 'u32', value });
export const f32 = (value: number): MetadataValue => ({ type: 'f32', value });
export const str = (value: string): MetadataValue => ({ type: 'string', value });
export const bool = (value: boolean): MetadataValue => ({ type: 'bool', value });

export interface TensorInfo {
  name: string;
  /** PyTorch order (outermost first); written reversed */
  shape: readonly number[];
  type: GgmlTypeName;
}
