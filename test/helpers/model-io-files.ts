import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { encodeSafetensors, type TensorToWrite } from '../../src/adapters/safetensors.js';

/** ../shared/fixtures relative to the repository root (this file is test/helpers/). */
export const FIXTURES = resolve(fileURLToPath(new URL('../../../shared/fixtures/', import.meta.url)));
export const STORIES_BIN = join(FIXTURES, 'stories260K', 'stories260K.bin');
export const TOK512_BIN = join(FIXTURES, 'stories260K', 'tok512.bin');
export const HAVE_STORIES = existsSync(STORIES_BIN) && existsSync(TOK512_BIN);

export function warnIfMissing(have: boolean, what: string): void {
  if (!have) console.warn(`SKIPPING ${what}: fixtures not found at ${FIXTURES} (a clone outside the workplace has no ../shared)`);
}

export async function tempDir(prefix: string): Promise<string> {
  return mkdtemp(join(tmpdir(), `loraserve-${prefix}-`));
}

/**
 * Test values that float16 and bfloat16 hold exactly (k/64 with |k| < 128, all normal numbers), so
 * the expected float32 values of a narrow-dtype tensor are known without trusting any converter.
 */
export function exactValues(n: number, seed: number): Float32Array {
  let s = seed >>> 0;
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    const k = (s >>> 24) - 128; // -128..127
    out[i] = (k === 0 ? 1 : k) / 64;
  }
  return out;
}

/** float32 bit pattern → bfloat16: the top 16 bits (exact for exactValues) */
export function toBf16Bytes(v: Float32Array): Uint8Array {
  const u32 = new Uint32Array(v.buffer, v.byteOffset, v.length);
  const out = new Uint8Array(v.length * 2);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < v.length; i++) {
    if ((u32[i]! & 0xffff) !== 0) throw new Error(`value ${v[i]} is not exact in bf16`);
    dv.setUint16(i * 2, u32[i]! >>> 16, true);
  }
  return out;
}

/** float32 → float16 by re-biasing the exponent (exact for normal values with 10-bit mantissas) */
export function toF16Bytes(v: Float32Array): Uint8Array {
  const u32 = new Uint32Array(v.buffer, v.byteOffset, v.length);
  const out = new Uint8Array(v.length * 2);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < v.length; i++) {
    const bits = u32[i]!;
    const sign = (bits >>> 31) << 15;
    const exp = ((bits >>> 23) & 0xff) - 127 + 15;
    const mant = bits & 0x7fffff;
    if (exp <= 0 || exp >= 31 || (mant & 0x1fff) !== 0) throw new Error(`value ${v[i]} is not exact in f16`);
    dv.setUint16(i * 2, sign | (exp << 10) | (mant >>> 13), true);
  }
  return out;
}

export interface TinyHfSpec {
  family?: 'llama' | 'mistral' | 'qwen2';
  tied?: boolean;
  /** dtype per tensor (default F32) */
  dtypeOf?: (name: string) => 'F32' | 'F16' | 'BF16';
  /** split into this many shards with an index (default: one model.safetensors) */
  shards?: number;
}

export const TINY = { hidden: 16, intermediate: 24, layers: 2, heads: 4, kvHeads: 2, vocab: 32, maxPos: 64 } as const;

export function tinyHfConfig(spec: TinyHfSpec = {}): Record<string, unknown> {
  const family = spec.family ?? 'llama';
  const cls = { llama: 'LlamaForCausalLM', mistral: 'MistralForCausalLM', qwen2: 'Qwen2ForCausalLM' }[family];
  return {
    architectures: [cls],
    model_type: family,
    hidden_size: TINY.hidden,
    intermediate_size: TINY.intermediate,
    num_hidden_layers: TINY.layers,
    num_attention_heads: TINY.heads,
    num_key_value_heads: TINY.kvHeads,
    vocab_size: TINY.vocab,
    max_position_embeddings: TINY.maxPos,
    rms_norm_eps: 1e-6,
    rope_theta: 500000,
    rope_scaling: null,
    hidden_act: 'silu',
    tie_word_embeddings: spec.tied ?? false,
    bos_token_id: 1,
    eos_token_id: 2,
  };
}

/** The tensors a tiny HF model of the spec needs, in [out, in] layout, with exact values. */
export function tinyHfTensors(spec: TinyHfSpec = {}): Map<string, { shape: number[]; values: Float32Array }> {
  const hd = TINY.hidden / TINY.heads;
  const q = TINY.heads * hd;
  const kv = TINY.kvHeads * hd;
  const shapes: [string, number[]][] = [['model.embed_tokens.weight', [TINY.vocab, TINY.hidden]]];
  for (let i = 0; i < TINY.layers; i++) {
    const p = `model.layers.${i}`;
    shapes.push(
      [`${p}.input_layernorm.weight`, [TINY.hidden]],
      [`${p}.post_attention_layernorm.weight`, [TINY.hidden]],
      [`${p}.self_attn.q_proj.weight`, [q, TINY.hidden]],
      [`${p}.self_attn.k_proj.weight`, [kv, TINY.hidden]],
      [`${p}.self_attn.v_proj.weight`, [kv, TINY.hidden]],
      [`${p}.self_attn.o_proj.weight`, [TINY.hidden, q]],
      [`${p}.mlp.gate_proj.weight`, [TINY.intermediate, TINY.hidden]],
      [`${p}.mlp.up_proj.weight`, [TINY.intermediate, TINY.hidden]],
      [`${p}.mlp.down_proj.weight`, [TINY.hidden, TINY.intermediate]],
    );
    if (spec.family === 'qwen2') shapes.push([`${p}.self_attn.q_proj.bias`, [q]], [`${p}.self_attn.k_proj.bias`, [kv]], [`${p}.self_attn.v_proj.bias`, [kv]]);
  }
  shapes.push(['model.norm.weight', [TINY.hidden]]);
  if (!spec.tied) shapes.push(['lm_head.weight', [TINY.vocab, TINY.hidden]]);
  return new Map(shapes.map(([name, shape], i) => [name, { shape, values: exactValues(shape.reduce((a, b) => a * b, 1), 1000 + i) }]));
}

export function encodeTensor(name: string, shape: number[], values: Float32Array, dtype: 'F32' | 'F16' | 'BF16'): TensorToWrite {
  const data = dtype === 'F32' ? values : dtype === 'F16' ? toF16Bytes(values) : toBf16Bytes(values);
  return { name, dtype, shape, data };
}

/** Writes a tiny HF model folder; returns its path and the values each tensor must read back as. */
export async function writeTinyHfFolder(dir: string, spec: TinyHfSpec = {}): Promise<Map<string, { shape: number[]; values: Float32Array }>> {
  await mkdir(dir, { recursive: true });
  const tensors = tinyHfTensors(spec);
  await writeFile(join(dir, 'config.json'), JSON.stringify(tinyHfConfig(spec), null, 2));
  const encoded = [...tensors].map(([name, t]) => encodeTensor(name, t.shape, t.values, spec.dtypeOf?.(name) ?? 'F32'));
  const shards = spec.shards ?? 1;
  if (shards === 1) {
    await writeFile(join(dir, 'model.safetensors'), encodeSafetensors(encoded));
  } else {
    const weightMap: Record<string, string> = {};
    for (let s = 0; s < shards; s++) {
      const file = `model-${String(s + 1).padStart(5, '0')}-of-${String(shards).padStart(5, '0')}.safetensors`;
      const part = encoded.filter((_, i) => i % shards === s);
      for (const t of part) weightMap[t.name] = file;
      await writeFile(join(dir, file), encodeSafetensors(part));
    }
    await writeFile(join(dir, 'model.safetensors.index.json'), JSON.stringify({ metadata: { total_size: 0 }, weight_map: weightMap }));
  }
  return tensors;
}
