import { z } from 'zod';

const factor = z.number().positive();
const positions = z.number().int().positive();

/**
 * RoPE frequency scaling, resolved from config.json's `rope_scaling` / `rope_parameters` into the
 * numbers transformers' `modeling_rope_utils.py` uses (defaults filled in), so the graph and the
 * checker never re-read config keys. Absent = plain RoPE.
 */
export const RopeScalingSchema = z.discriminatedUnion('type', [
  z.object({ type: z.literal('linear'), factor }),
  z.object({ type: z.literal('llama3'), factor, lowFreqFactor: factor, highFreqFactor: factor, originalMaxPositions: positions }),
  z.object({
    type: z.literal('yarn'),
    factor,
    originalMaxPositions: positions,
    betaFast: z.number().positive(),
    betaSlow: z.number().positive(),
    /** multiplies cos and sin (so attention logits by its square) */
    attentionFactor: z.number().positive(),
    /** round the correction range to whole dimensions (transformers' default) */
    truncate: z.boolean(),
  }),
  z.object({
    type: z.literal('longrope'),
    /** per rotated pair: frequencies are divided by these while the sequence fits the original context */
    shortFactor: z.array(z.number().positive()),
    /** ... and by these once it is longer (transformers switches per forward on max(position_ids) + 1) */
    longFactor: z.array(z.number().positive()),
    originalMaxPositions: positions,
    attentionFactor: z.number().positive(),
  }),
]);
export type RopeScaling = z.infer<typeof RopeScalingSchema>;

/**
 * The dimensions of a Llama-family decoder, normalised from whatever checkpoint format they came
 * from. Everything downstream (graph builder, LoRA target table, validator) reads only this.
 */
export const ArchitectureSchema = z.object({
  family: z.enum(['llama', 'mistral', 'qwen2', 'qwen3', 'phi3', 'gemma2', 'gemma3_text']),
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
  rope: RopeScalingSchema.optional(),
  tieWordEmbeddings: z.boolean(),
  /** biases on q/k/v (Qwen2 always; Llama with `attention_bias`) */
  attentionBias: z.boolean(),
  /** a bias on o_proj (Llama's `attention_bias` covers o_proj too; Qwen2's q/k/v biases do not) */
  outputBias: z.boolean().optional(),
  /** biases on gate/up/down (Llama's `mlp_bias`) */
  mlpBias: z.boolean().optional(),
  /** RMSNorm over head_dim on each query and key head before RoPE (Qwen3's q_norm / k_norm) */
  qkNorm: z.boolean().optional(),
  /** Phi-3: q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`, in the checkpoint and as LoRA targets */
  fusedProjections: z.boolean().optional(),
  /** a query sees only the last `slidingWindow` keys (itself included) in these layers */
  slidingWindow: z.number().int().positive().optional(),
  slidingWindowLayers: z.array(z.number().int().nonnegative()).optional(),
  // ---- Gemma 2 / Gemma 3 (all absent for the Llama-style families)
  /** RMSNorm scales by (1 + weight) (GemmaRMSNorm), every norm including q/k norms */
  normPlusOne: z.boolean().optional(),
  /** embeddings are multiplied by sqrt(hidden_size) (not the tied lm_head) */
  embedScale: z.boolean().optional(),
  /** the gated MLP's activation; absent = silu */
  activation: z.enum(['silu', 'gelu_tanh']).optional(),
  /** a norm on the attention output and pre/post norms around the MLP (pre/post_feedforward_layernorm) */
  sandwichNorms: z.boolean().optional(),
  /** attention scores scale by query_pre_attn_scalar^-0.5 instead of head_dim^-0.5 */
  queryPreAttnScalar: z.number().positive().optional(),
  /** scores → tanh(scores / cap) · cap before the mask */
  attnSoftcap: z.number().positive().optional(),
  /** logits → tanh(logits / cap) · cap */
  finalSoftcap: z.number().positive().optional(),
  /** Gemma 3: sliding-window layers use plain RoPE at this theta; `ropeTheta`/`rope` are the global layers' */
  localRopeTheta: z.number().positive().optional(),
  bosTokenId: z.number().int().nonnegative().nullable(),
  eosTokenIds: z.array(z.number().int().nonnegative()),
});
export type Architecture = z.infer<typeof ArchitectureSchema>;

/** the seven projections of a Llama-style layer */
export const PROJECTIONS = ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'] as const;
/** Phi-3's fused projections: qkv_proj = [q; k; v] rows, gate_up_proj = [gate; up] rows */
export const FUSED_PROJECTIONS = ['qkv_proj', 'gate_up_proj'] as const;
/** every module name a LoRA target may have */
export const ALL_PROJECTIONS = [...PROJECTIONS, ...FUSED_PROJECTIONS] as const;
export type Projection = (typeof ALL_PROJECTIONS)[number];

/** the projections of one layer of this architecture, in checkpoint order */
export function projectionsOf(a: Architecture): readonly Projection[] {
  return a.fusedProjections ? ['qkv_proj', 'o_proj', 'gate_up_proj', 'down_proj'] : PROJECTIONS;
}

export function projectionBlock(p: Projection): 'self_attn' | 'mlp' {
  return p === 'q_proj' || p === 'k_proj' || p === 'v_proj' || p === 'o_proj' || p === 'qkv_proj' ? 'self_attn' : 'mlp';
}

/** whether the checkpoint carries (and the graph adds) `<module>.bias` for this projection */
export function projectionHasBias(a: Architecture, p: Projection): boolean {
  if (p === 'q_proj' || p === 'k_proj' || p === 'v_proj' || p === 'qkv_proj') return a.attentionBias;
  if (p === 'o_proj') return a.outputBias ?? false;
  return a.mlpBias ?? false;
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
    case 'qkv_proj':
      return { inFeatures: a.hiddenSize, outFeatures: q + 2 * kv };
    case 'o_proj':
      return { inFeatures: q, outFeatures: a.hiddenSize };
    case 'gate_proj':
    case 'up_proj':
      return { inFeatures: a.hiddenSize, outFeatures: a.intermediateSize };
    case 'gate_up_proj':
      return { inFeatures: a.hiddenSize, outFeatures: 2 * a.intermediateSize };
    case 'down_proj':
      return { inFeatures: a.intermediateSize, outFeatures: a.hiddenSize };
  }
}

/**
 * For a fused module whose lora_B has `actualOut` rows instead of the model's, which slice
 * disagrees, when the numbers allow only one reading (head_dim kept, one slice resized);
 * null for an unfused module or when it cannot be told.
 */
export function fusedMismatch(a: Architecture, p: Projection, actualOut: number): string | null {
  const q = a.numHeads * a.headDim;
  const kv = a.numKvHeads * a.headDim;
  if (p === 'gate_up_proj') {
    return actualOut % 2 === 0 ? ` gate_up_proj is [gate; up]: the adapter's halves are ${actualOut / 2} rows each where this model's intermediate_size is ${a.intermediateSize}.` : null;
  }
  if (p !== 'qkv_proj' || actualOut === q + 2 * kv) return null;
  // a reading must still be a valid GQA layout: query heads a multiple of KV heads
  const readings: string[] = [];
  const qOnly = actualOut - 2 * kv;
  if (qOnly > 0 && qOnly % a.headDim === 0 && (qOnly / a.headDim) % a.numKvHeads === 0) {
    readings.push(`the q slice has ${qOnly} rows (${qOnly / a.headDim} heads) where this model has ${q}; k and v agree (${kv} each)`);
  }
  const kvOnly = (actualOut - q) / 2;
  if (kvOnly > 0 && Number.isInteger(kvOnly) && kvOnly % a.headDim === 0 && a.numHeads % (kvOnly / a.headDim) === 0) {
    readings.push(`the k and v slices have ${kvOnly} rows each (${kvOnly / a.headDim} KV heads) where this model has ${kv}; q agrees (${q})`);
  }
  if (readings.length === 0) return null;
  return ` qkv_proj is [q; k; v]: ${readings.join(', or ')}.`;
}
