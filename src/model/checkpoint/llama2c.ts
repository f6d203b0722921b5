import { closeSync, openSync, readSync } from 'node:fs';
import { open, stat } from 'node:fs/promises';
import { basename, dirname, extname, join, resolve } from 'node:path';
import { ArchitectureSchema, type Architecture } from '../architecture.js';
import { ModelInputError, type Checkpoint, type CheckpointTensor } from './types.js';

/**
 * llama2.c checkpoint, legacy version-0 layout: a header of 7 little-endian int32
 * (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len), then float32 arrays
 * in a fixed order. A negative vocab_size means the classifier (wcls) is stored separately at the
 * end. Matrices are [out, in]. Rows are exposed in the file's own order: llama2.c rotates adjacent
 * pairs, so the architecture says `interleaved` and the graph applies that layout.
 */

const HEADER_BYTES = 7 * 4;

export interface Llama2cLayout {
  architecture: Architecture;
  /** HF name → [byte offset, shape] */
  tensors: Map<string, { offset: number; shape: number[] }>;
  /** the exact file size the header implies */
  expectedBytes: number;
}

/** Pure: header ints → architecture and the byte layout of every array. */
export function llama2cLayout(ints: Int32Array, file: string): Llama2cLayout {
  const [dim, hiddenDim, nLayers, nHeads, nKvHeads, rawVocab, seqLen] = Array.from(ints);
  const vocab = Math.abs(rawVocab);
  const bad = (what: string): never => {
    throw new ModelInputError(file, `invalid llama2.c header (dim=${dim}, hidden_dim=${hiddenDim}, n_layers=${nLayers}, n_heads=${nHeads}, n_kv_heads=${nKvHeads}, vocab_size=${rawVocab}, seq_len=${seqLen}): ${what}. Only the legacy version-0 format is read.`);
  };
  for (const [k, v] of Object.entries({ dim, hidden_dim: hiddenDim, n_layers: nLayers, n_heads: nHeads, n_kv_heads: nKvHeads, vocab_size: vocab, seq_len: seqLen })) {
    if (!(v > 0)) bad(`${k} must be positive`);
  }
  if (dim % nHeads !== 0) bad('dim is not a multiple of n_heads');
  if (nHeads % nKvHeads !== 0) bad('n_heads is not a multiple of n_kv_heads');
  const headDim = dim / nHeads;
  if (headDim % 2 !== 0) bad('head size is odd');
  const kvDim = nKvHeads * headDim;
  const shared = rawVocab > 0;

  const tensors = new Map<string, { offset: number; shape: number[] }>();
  let offset = HEADER_BYTES;
  // one stacked array [n_layers, ...shape]: layer i's slice starts i * prod(shape) floats in
  const stacked = (hf: (i: number) => string, shape: number[]): void => {
    const n = shape.reduce((a, b) => a * b, 1);
    for (let i = 0; i < nLayers; i++) tensors.set(hf(i), { offset: offset + i * n * 4, shape });
    offset += nLayers * n * 4;
  };
  const single = (name: string | null, shape: number[]): void => {
    if (name) tensors.set(name, { offset, shape });
    offset += shape.reduce((a, b) => a * b, 1) * 4;
  };
  const L = (i: number) => `model.layers.${i}`;
  single('model.embed_tokens.weight', [vocab, dim]);
  stacked((i) => `${L(i)}.input_layernorm.weight`, [dim]);
  stacked((i) => `${L(i)}.self_attn.q_proj.weight`, [dim, dim]);
  stacked((i) => `${L(i)}.self_attn.k_proj.weight`, [kvDim, dim]);
  stacked((i) => `${L(i)}.self_attn.v_proj.weight`, [kvDim, dim]);
  stacked((i) => `${L(i)}.self_attn.o_proj.weight`, [dim, dim]);
  stacked((i) => `${L(i)}.post_attention_layernorm.weight`, [dim]);
  stacked((i) => `${L(i)}.mlp.gate_proj.weight`, [hiddenDim, dim]); // w1
  stacked((i) => `${L(i)}.mlp.down_proj.weight`, [dim, hiddenDim]); // w2
  stacked((i) => `${L(i)}.mlp.up_proj.weight`, [hiddenDim, dim]); // w3
  single('model.norm.weight', [dim]);
  // freq_cis_real / freq_cis_imag: written by the legacy exporter, never used by run.c
  single(null, [seqLen, headDim / 2]);
  single(null, [seqLen, headDim / 2]);
  if (!shared) single('lm_head.weight', [vocab, dim]);

  const architecture = ArchitectureSchema.parse({
    family: 'llama',
    hiddenSize: dim,
    intermediateSize: hiddenDim,
    numLayers: nLayers,
    numHeads: nHeads,
    numKvHeads: nKvHeads,
    headDim,
    vocabSize: vocab,
    maxPositions: seqLen,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeLayout: 'interleaved',
    tieWordEmbeddings: shared,
    attentionBias: false,
    bosTokenId: 1,
    eosTokenIds: [2],
  } satisfies Architecture);
  return { architecture, tensors, expectedBytes: offset };
}

async function readLayout(path: string): Promise<Llama2cLayout> {
  let fh;
  try {
    fh = await open(path, 'r');
  } catch (e) {
    throw new ModelInputError(path, `cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}).`);
  }
  try {
    const size = (await fh.stat()).size;
    if (size < HEADER_BYTES) throw new ModelInputError(path, `is ${size} bytes, shorter than the 28-byte llama2.c header: truncated or not a llama2.c checkpoint.`);
    const buf = Buffer.alloc(HEADER_BYTES);
    await fh.read(buf, 0, HEADER_BYTES, 0);
    if (buf.readUInt32LE(0) === 0x04034b50) {
      throw new ModelInputError(path, 'is a zip archive (a PyTorch pickle checkpoint?), not a llama2.c checkpoint; pickles are never loaded: convert to safetensors in a Hugging Face folder.');
    }
    if (buf.readUInt32LE(0) === 0x616b3432) {
      throw new ModelInputError(path, `is a llama2.c version-${buf.readInt32LE(4)} export ("ak42" magic); only the legacy version-0 format is read: export with --version 0.`);
    }
    const ints = new Int32Array(7);
    for (let i = 0; i < 7; i++) ints[i] = buf.readInt32LE(i * 4);
    const layout = llama2cLayout(ints, path);
    if (size !== layout.expectedBytes) {
      const what = size < layout.expectedBytes ? 'the file is truncated' : 'the file is longer than the header implies (not a legacy version-0 checkpoint, or a wrong header)';
      throw new ModelInputError(path, `expected ${layout.expectedBytes} bytes from its header (dim=${ints[0]}, n_layers=${ints[2]}, vocab_size=${ints[5]}, seq_len=${ints[6]}), actual ${size} bytes: ${what}.`);
    }
    return layout;
  } finally {
    await fh.close();
  }
}

export async function readLlama2cHeader(path: string): Promise<Architecture> {
  return (await readLayout(path)).architecture;
}

export function llama2cModelId(path: string): string {
  return basename(path, extname(path));
}

export async function openLlama2c(pathIn: string, tokenizerPath?: string): Promise<Checkpoint> {
  const path = resolve(pathIn);
  const layout = await readLayout(path);
  const tokPath = resolve(tokenizerPath ?? join(dirname(path), 'tokenizer.bin'));
  const tokExists = await stat(tokPath).then(
    (s) => s.isFile(),
    () => false,
  );
  const views = new Map<string, CheckpointTensor>();
  const view = (name: string, offset: number, shape: number[]): CheckpointTensor => ({
    shape,
    dtype: 'F32',
    read(): Float32Array {
      const out = new Float32Array(shape.reduce((a, b) => a * b, 1));
      const bytes = new Uint8Array(out.buffer);
      const fd = openSync(path, 'r');
      try {
        let done = 0;
        while (done < bytes.byteLength) {
          const n = readSync(fd, bytes, done, bytes.byteLength - done, offset + done);
          if (n === 0) throw new ModelInputError(path, `${name}: short read (the file shrank after it was opened).`);
          done += n;
        }
      } finally {
        closeSync(fd);
      }
      // float32 arrays are little-endian on disk and in every platform Node runs on here
      return out;
    },
  });
  return {
    architecture: layout.architecture,
    modelId: llama2cModelId(path),
    sourceFiles: tokExists ? [path, tokPath] : [path],
    tokenizer: { kind: 'llama2c', path: tokPath },
    names: () => [...layout.tensors.keys()],
    tensor(name: string): CheckpointTensor | undefined {
      const t = layout.tensors.get(name);
      if (!t) return undefined;
      let v = views.get(name);
      if (!v) views.set(name, (v = view(name, t.offset, t.shape)));
      return v;
    },
  };
}
