import type { Architecture } from '../../src/model/architecture.js';
import { projectionBlock, projectionDims, projectionHasBias, projectionsOf } from '../../src/model/architecture.js';
import type { Checkpoint, CheckpointTensor } from '../../src/model/checkpoint/types.js';
import { mulberry32 } from '../../src/prng.js';

/** seeded (mulberry32), so every test model is the same on every run */
export class Rng {
  readonly next: () => number;
  constructor(seed: number) {
    this.next = mulberry32(seed);
  }
  /** uniform in [-1, 1) scaled so the standard deviation is `std` */
  uniform(std: number): number {
    return (this.next() * 2 - 1) * std * Math.sqrt(3);
  }
  array(n: number, std: number, mean = 0): Float32Array {
    const out = new Float32Array(n);
    for (let i = 0; i < n; i++) out[i] = mean + this.uniform(std);
    return out;
  }
  int(maxExclusive: number): number {
    return Math.floor(this.next() * maxExclusive);
  }
}

export function tinyArchitecture(overrides: Partial<Architecture> = {}): Architecture {
  return {
    family: 'llama',
    hiddenSize: 64,
    intermediateSize: 96,
    numLayers: 2,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 16,
    vocabSize: 128,
    maxPositions: 64,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeLayout: 'rotate_half',
    tieWordEmbeddings: true,
    attentionBias: false,
    bosTokenId: 1,
    eosTokenIds: [2],
    ...overrides,
  };
}

export interface MemoryTensor {
  shape: number[];
  data: Float32Array;
}

/** A `Checkpoint` held in memory, with HF tensor names. */
export class MemoryCheckpoint implements Checkpoint {
  readonly tokenizer = null;
  constructor(
    readonly architecture: Architecture,
    readonly tensors: ReadonlyMap<string, MemoryTensor>,
    readonly modelId = 'random-test-model',
    /** normally none (the build then hashes the tensors); tests of the file-based cache key set some */
    readonly sourceFiles: readonly string[] = [],
  ) {}
  names(): string[] {
    return [...this.tensors.keys()];
  }
  tensor(name: string): CheckpointTensor | undefined {
    const t = this.tensors.get(name);
    if (!t) return undefined;
    return { shape: t.shape, dtype: 'F32', read: () => t.data.slice() };
  }
  /** a copy with some tensors replaced */
  with(replaced: ReadonlyMap<string, MemoryTensor>, modelId = this.modelId): MemoryCheckpoint {
    return new MemoryCheckpoint(this.architecture, new Map([...this.tensors, ...replaced]), modelId, this.sourceFiles);
  }
}

/**
 * Random weights scaled so activations stay O(1) through the layers and attention scores spread
 * by about 1: then masking, RoPE and GQA mistakes all move the logits visibly.
 */
export function randomCheckpoint(a: Architecture, seed: number, modelId = `random-${a.family}-${seed}`): MemoryCheckpoint {
  const rng = new Rng(seed);
  const t = new Map<string, MemoryTensor>();
  const put = (name: string, shape: number[], std: number, mean = 0) => t.set(name, { shape, data: rng.array(shape.reduce((x, y) => x * y, 1), std, mean) });
  // Gemma stores norm weights as offsets from 1 (its RMSNorm scales by 1 + w)
  const normMean = a.normPlusOne ? 0 : 1;
  // Gemma scales embeddings by sqrt(hidden): keep the residual stream O(1) all the same
  put('model.embed_tokens.weight', [a.vocabSize, a.hiddenSize], a.embedScale ? 1 / Math.sqrt(a.hiddenSize) : 1);
  for (let i = 0; i < a.numLayers; i++) {
    put(`model.layers.${i}.input_layernorm.weight`, [a.hiddenSize], 0.2, normMean);
    put(`model.layers.${i}.post_attention_layernorm.weight`, [a.hiddenSize], 0.2, normMean);
    if (a.sandwichNorms) {
      put(`model.layers.${i}.pre_feedforward_layernorm.weight`, [a.hiddenSize], 0.2, normMean);
      put(`model.layers.${i}.post_feedforward_layernorm.weight`, [a.hiddenSize], 0.2, normMean);
    }
    if (a.qkNorm) {
      put(`model.layers.${i}.self_attn.q_norm.weight`, [a.headDim], 0.2, normMean);
      put(`model.layers.${i}.self_attn.k_norm.weight`, [a.headDim], 0.2, normMean);
    }
    for (const p of projectionsOf(a)) {
      const { inFeatures, outFeatures } = projectionDims(a, p);
      const base = `model.layers.${i}.${projectionBlock(p)}.${p}`;
      put(`${base}.weight`, [outFeatures, inFeatures], 1 / Math.sqrt(inFeatures));
      if (projectionHasBias(a, p)) put(`${base}.bias`, [outFeatures], 0.5);
    }
  }
  put('model.norm.weight', [a.hiddenSize], 0.2, normMean);
  if (!a.tieWordEmbeddings) put('lm_head.weight', [a.vocabSize, a.hiddenSize], 0.5);
  return new MemoryCheckpoint(a, t, modelId);
}

export function randomTokens(rng: Rng, n: number, vocab: number): number[] {
  return Array.from({ length: n }, () => rng.int(vocab));
}
