import type { Architecture } from '../../src/model/architecture.js';
import type { Checkpoint } from '../../src/model/checkpoint/types.js';
import { f32, str, u32, type MetadataValue, type TensorInfo } from './format.js';
import { BLOCK, encodeTensor, type GgmlTypeName } from './quants.js';
import { tokenizerMetadata } from './tokenizer.js';
import { writeGguf } from './writer.js';

/**
 * A checkpoint (Hugging Face tensor names, [out, in] rows) as a llama.cpp GGUF of the `llama` or
 * `qwen2` architecture, named and laid out as convert_hf_to_gguf.py writes them:
 *   model.embed_tokens → token_embd, layers.i.input_layernorm → blk.i.attn_norm,
 *   self_attn.{q,k,v,o}_proj → attn_{q,k,v,output}, post_attention_layernorm → ffn_norm,
 *   mlp.{gate,up,down}_proj → ffn_{gate,up,down}, model.norm → output_norm, lm_head → output
 *   (absent when tied: llama.cpp then uses token_embd as the output).
 * llama.cpp's `llama` architecture rotates adjacent pairs (2i, 2i+1), Hugging Face's Llama rotates
 * (i, i + d/2): the converter permutes q and k rows per head so both compute the same model, and so
 * does this. `qwen2` uses NeoX rotation in llama.cpp, Hugging Face's own layout: no permutation.
 * Llama 3 RoPE scaling becomes the converter's `rope_freqs` tensor of per-frequency factors.
 *
 * `fileType` is what llama-quantize calls F32 / Q8_0 / Q4_0: every 2-D weight (projections,
 * token_embd, output) in that type, norms, biases and rope_freqs in F32. A weight whose rows are
 * not whole 32-value blocks stays F32 (llama-quantize falls back too).
 */

export type GgufFileType = 'F32' | 'Q8_0' | 'Q4_0';
const FILE_TYPE_ID: Record<GgufFileType, number> = { F32: 0, Q4_0: 2, Q8_0: 7 };

export const GGUF_WRITER_VERSION = 1;

type GgufArch = 'llama' | 'qwen2';

function ggufArch(a: Architecture): GgufArch {
  const unsupported: string[] = [];
  if (a.outputBias) unsupported.push('o_proj bias');
  if (a.mlpBias) unsupported.push('MLP biases');
  if (a.qkNorm) unsupported.push('q/k norms');
  if (a.fusedProjections) unsupported.push('fused projections');
  if (a.normPlusOne || a.embedScale || a.sandwichNorms || a.activation || a.attnSoftcap || a.finalSoftcap || a.queryPreAttnScalar) unsupported.push('Gemma features');
  if (a.slidingWindow !== undefined) unsupported.push('sliding-window attention');
  if (a.rope && a.rope.type !== 'llama3' && a.rope.type !== 'linear') unsupported.push(`${a.rope.type} RoPE scaling`);
  if (a.family === 'qwen2' && a.ropeLayout !== 'rotate_half') unsupported.push('qwen2 with interleaved RoPE');
  if (a.family !== 'llama' && a.family !== 'mistral' && a.family !== 'qwen2') unsupported.push(`family ${a.family}`);
  if (unsupported.length) throw new Error(`GGUF writer: ${unsupported.join(', ')} not supported (llama and qwen2 layouts only)`);
  return a.family === 'qwen2' ? 'qwen2' : 'llama';
}

/** convert_hf_to_gguf's LlamaModel.permute: per head, rows (j·d/2 + i) → (2i + j) */
export function permuteRows(w: Float32Array, heads: number, rowLength: number): Float32Array {
  const rows = w.length / rowLength;
  const hd = rows / heads;
  if (!Number.isInteger(hd) || hd % 2 !== 0) throw new Error(`cannot permute ${rows} rows into ${heads} heads of even size`);
  const out = new Float32Array(w.length);
  for (let h = 0; h < heads; h++)
    for (let i = 0; i < hd / 2; i++)
      for (let j = 0; j < 2; j++) {
        const from = h * hd + j * (hd / 2) + i;
        const to = h * hd + 2 * i + j;
        out.set(w.subarray(from * rowLength, (from + 1) * rowLength), to * rowLength);
      }
  return out;
}

/** convert_hf_to_gguf's Llama 3 `rope_freqs`: the factor each frequency's wavelength is divided by */
export function llama3RopeFactors(a: Architecture): Float32Array {
  if (a.rope?.type !== 'llama3') throw new Error('not llama3 RoPE scaling');
  const { factor, lowFreqFactor, highFreqFactor, originalMaxPositions } = a.rope;
  const dim = a.headDim;
  const lowWavelen = originalMaxPositions / lowFreqFactor;
  const highWavelen = originalMaxPositions / highFreqFactor;
  const out = new Float32Array(dim / 2);
  for (let k = 0; k < dim / 2; k++) {
    const freq = 1 / a.ropeTheta ** ((2 * k) / dim);
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < highWavelen) out[k] = 1;
    else if (wavelen > lowWavelen) out[k] = factor;
    else {
      const smooth = (originalMaxPositions / wavelen - lowFreqFactor) / (highFreqFactor - lowFreqFactor);
      out[k] = 1 / ((1 - smooth) / factor + smooth);
    }
  }
  return out;
}

interface Planned extends TensorInfo {
  /** where the values come from */
  read: () => Float32Array;
}

function plan(ck: Checkpoint, fileType: GgufFileType, arch: GgufArch): Planned[] {
  const a = ck.architecture;
  const get = (name: string) => {
    const t = ck.tensor(name);
    if (!t) throw new Error(`GGUF writer: the checkpoint has no ${name}`);
    return t;
  };
  const weightType = (row: number): GgmlTypeName => (fileType !== 'F32' && row % BLOCK[fileType].values === 0 ? fileType : 'F32');
  const out: Planned[] = [];
  const add = (gguf: string, hf: string, quantize: boolean, permuteHeads = 0) => {
    const t = get(hf);
    const shape = [...t.shape];
    const type = quantize && shape.length === 2 ? weightType(shape[1]) : 'F32';
    const row = shape.length === 2 ? shape[1] : 1;
    out.push({ name: gguf, shape, type, read: permuteHeads ? () => permuteRows(t.read(), permuteHeads, row) : () => t.read() });
  };
  // llama's adjacent-pair rotation needs the permutation, unless the checkpoint already is in it (llama2.c)
  const permute = arch === 'llama' && a.ropeLayout === 'rotate_half';
  add('token_embd.weight', 'model.embed_tokens.weight', true);
  for (let i = 0; i < a.numLayers; i++) {
    const l = `model.layers.${i}`;
    const b = `blk.${i}`;
    add(`${b}.attn_norm.weight`, `${l}.input_layernorm.weight`, false);
    add(`${b}.attn_q.weight`, `${l}.self_attn.q_proj.weight`, true, permute ? a.numHeads : 0);
    add(`${b}.attn_k.weight`, `${l}.self_attn.k_proj.weight`, true, permute ? a.numKvHeads : 0);
    add(`${b}.attn_v.weight`, `${l}.self_attn.v_proj.weight`, true);
    if (a.attentionBias) {
      add(`${b}.attn_q.bias`, `${l}.self_attn.q_proj.bias`, false, permute ? a.numHeads : 0);
      add(`${b}.attn_k.bias`, `${l}.self_attn.k_proj.bias`, false, permute ? a.numKvHeads : 0);
      add(`${b}.attn_v.bias`, `${l}.self_attn.v_proj.bias`, false);
    }
    add(`${b}.attn_output.weight`, `${l}.self_attn.o_proj.weight`, true);
    add(`${b}.ffn_norm.weight`, `${l}.post_attention_layernorm.weight`, false);
    add(`${b}.ffn_gate.weight`, `${l}.mlp.gate_proj.weight`, true);
    add(`${b}.ffn_up.weight`, `${l}.mlp.up_proj.weight`, true);
    add(`${b}.ffn_down.weight`, `${l}.mlp.down_proj.weight`, true);
  }
  add('output_norm.weight', 'model.norm.weight', false);
  if (!a.tieWordEmbeddings) add('output.weight', 'lm_head.weight', true);
  if (a.rope?.type === 'llama3') {
    const factors = llama3RopeFactors(a);
    out.push({ name: 'rope_freqs.weight', shape: [factors.length], type: 'F32', read: () => factors });
  }
  return out;
}

function metadata(ck: Checkpoint, arch: GgufArch, fileType: GgufFileType, tokenizerJson: string, contextLength: number): Map<string, MetadataValue> {
  const a = ck.architecture;
  const md = new Map<string, MetadataValue>();
  md.set('general.architecture', str(arch));
  md.set('general.name', str(ck.modelId));
  md.set('general.file_type', u32(FILE_TYPE_ID[fileType]));
  if (fileType !== 'F32') md.set('general.quantization_version', u32(2));
  md.set('general.alignment', u32(32));
  const k = (key: string, v: MetadataValue) => md.set(`${arch}.${key}`, v);
  k('vocab_size', u32(a.vocabSize));
  k('context_length', u32(contextLength));
  k('embedding_length', u32(a.hiddenSize));
  k('block_count', u32(a.numLayers));
  k('feed_forward_length', u32(a.intermediateSize));
  k('attention.head_count', u32(a.numHeads));
  k('attention.head_count_kv', u32(a.numKvHeads));
  k('attention.key_length', u32(a.headDim));
  k('attention.value_length', u32(a.headDim));
  k('attention.layer_norm_rms_epsilon', f32(a.rmsNormEps));
  k('rope.dimension_count', u32(a.headDim));
  k('rope.freq_base', f32(a.ropeTheta));
  if (a.rope?.type === 'linear') {
    k('rope.scaling.type', str('linear'));
    k('rope.scaling.factor', f32(a.rope.factor));
  }
  const eos = a.eosTokenIds[0] ?? null;
  for (const [key, v] of tokenizerMetadata(tokenizerJson, a.vocabSize, { bos: a.bosTokenId, eos }, arch === 'qwen2' ? 'qwen2' : 'gpt-2')) md.set(key, v);
  return md;
}

export interface GgufWritten {
  path: string;
  bytes: number;
  /** tensor name → ggml type, as written */
  types: Map<string, GgmlTypeName>;
}

export async function writeCheckpointGguf(ck: Checkpoint, tokenizerJson: string, path: string, fileType: GgufFileType, opts: { contextLength?: number } = {}): Promise<GgufWritten> {
  const arch = ggufArch(ck.architecture);
  const tensors = plan(ck, fileType, arch);
  const md = metadata(ck, arch, fileType, tokenizerJson, opts.contextLength ?? ck.architecture.maxPositions);
  const bytes = await writeGguf(path, md, tensors, (i) => encodeTensor(tensors[i].type, tensors[i].read()));
  return { path, bytes, types: new Map(tensors.map((t) => [t.name, t.type])) };
}
