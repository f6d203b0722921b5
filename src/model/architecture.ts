import { z } from 'zod';

/**
 * The dimensions of a Llama-family decoder, normalised from whatever checkpoint format they came
 * from. Everything downstream (graph builder, LoRA target table, validator) reads only this.
 */
export const ArchitectureSchema = z.object({
  family: z.enum(['llama', 'mistral', 'qwen2']),
  hiddenSize: z.number().int().positive(),
  intermediateSize: z.number().int().positive(),
  numLayers: z.number().int().positive(),
  numHeads: z.number().int().positive(),
  numKvHeads: z.number().int().positive(),
  headDim: z.number().int().positive(),
  vocabSize: z.number().int().positive(),
  maxPositions: z.number().int().positive(),
  rmsNormEps: z.number().positive(),
  ropeTheta: z.number().positive(),
  /**
   * `rotate_half`: Hugging Face layout (pairs i and i + headDim/2).
   * `interleaved`: llama2.c / Meta layout (pairs 2i and 2i+1). The graph implements both, so
   * checkpoint rows (and adapter rows) are never permuted.
   */
  ropeLayout: z.enum(['rotate_half', 'interleaved']),
  tieWordEmbeddings: z.boolean(),
  /** Qwen2 has biases on q/k/v projections. */
  attentionBias: z.boolean(),
  bosTokenId: z.number().int().nonnegative().nullable(),
  eosTokenIds: z.array(z.number().int().nonnegative()),
});
export type Architecture = z.infer<typeof ArchitectureSchema>;

export const PROJECTIONS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
export type Projection = (typeof PROJECTIONS)[number];

export function projectionBlock(p: Projection): 'self_attn' | 'mlp' {
  return p === 'q_proj' || p === 'k_proj' || p === 'v_proj' || p === 'o_proj' ? 'self_attn' : 'mlp';
}

/** in/out features of a projection, in PyTorch Linear terms (weight is [out, in]). */
export function projectionDims(a: Architecture, p: Projection): { inFeatures: number; outFeatures: number } {
  const q = a.numHeads * a.headDim;
  const kv = a.numKvHeads * a.headDim;
  switch (p) {
    case 'q_proj':
      return { inFeatures: a.hiddenSize, outFeatures: q };
    case 'k_proj':
    case 'v_proj':
      return { inFeatures: a.hiddenSize, outFeatures: kv };
    case 'o_proj':
      return { inFeatures: q, outFeatures: a.hiddenSize };
    case 'gate_proj':
    case 'up_proj':
      return { inFeatures: a.hiddenSize, outFeatures: a.intermediateSize };
    case 'down_proj':
      return { inFeatures: a.intermediateSize, outFeatures: a.hiddenSize };
  }
}
