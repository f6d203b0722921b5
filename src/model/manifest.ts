import { z } from 'zod';
import { ALL_PROJECTIONS, ArchitectureSchema, projectionBlock, projectionDims, projectionsOf, type Architecture, type Projection } from './architecture.js';

/**
 * One LoRA-capable projection of the built graph. `name` is the module name relative to the base
 * model, exactly as PEFT sees it (`model.layers.0.self_attn.q_proj`), so the validator can match
 * adapter keys and rank_pattern keys against it.
 */
export const LoraTargetSchema = z.object({
  name: z.string(),
  layer: z.number().int().nonnegative(),
  module: z.enum(ALL_PROJECTIONS),
  inFeatures: z.number().int().positive(),
  outFeatures: z.number().int().positive(),
  /** graph input names: A is [batch, in, r], B is [batch, r, out] (scale folded into B). */
  inputA: z.string(),
  inputB: z.string(),
  /** ‖W‖_F of the base projection in float64, taken once when the graph is built (relativeNorm's divisor) */
  weightNorm: z.number().nonnegative().optional(),
});
export type LoraTarget = z.infer<typeof LoraTargetSchema>;

export const ModelDtypeSchema = z.enum(['fp32', 'fp16']);
export type ModelDtype = z.infer<typeof ModelDtypeSchema>;

/**
 * The graph's I/O contract (DESIGN.md "The model graph contract"):
 *   inputs  input_ids int64 [batch, seq], position_ids int64 [batch, seq],
 *           attention_bias <dtype> [batch, 1, seq, past + seq] (0 = attend, maskValue = do not),
 *           past_key_values.{i}.key|value <dtype> [batch, kvHeads, past, headDim],
 *           every LoRA target's A and B (<dtype>), and its magnitude and bias vectors
 *           (loraMagnitudeInput / loraBiasInput, [batch | 1, 1, out | 1])
 *   outputs logits float32 [batch, seq | 1, vocab] (see `logits`),
 *           present.{i}.key|value <dtype> [batch, kvHeads, past + seq, headDim]
 */
export const ManifestSchema = z.object({
  manifestVersion: z.literal(1),
  builderVersion: z.string(),
  /** sha256 over the source files and the builder version: the cache key. */
  sourceHash: z.string(),
  modelId: z.string(),
  architecture: ArchitectureSchema,
  dtype: ModelDtypeSchema,
  /** `all`: logits for every position of the step; `last`: only for the last one ([batch, 1, vocab]). */
  logits: z.enum(['all', 'last']),
  /** when false the graph has no LoRA inputs (the benchmark's peer export uses Optimum's names instead). */
  lora: z.boolean(),
  /** the Optimum-style export (attention_mask instead of attention_bias, no LoRA inputs) */
  peer: z.boolean().optional(),
  /**
   * `concat` (absent in manifests written before it existed): past_key_values in, present (past ++
   * new) out, the contract above. `resident`: the engine's — kv_cache.i.* [past, slots, kvHeads,
   * headDim] in (held by the engine, fed as views), kv_rows/kv_lens [batch] int64 in, no
   * attention_bias; kv_new.i.* [batch, seq, kvHeads, headDim] out (see graph/kv.ts). `gqa`:
   * com.microsoft.GroupQueryAttention per layer — kv_cache.i.* [batch, kvHeads, maxCtx, headDim] in,
   * kv_present.i.* of the same shape out, both bound by the engine to one buffer (ORT's
   * past-present share-buffer mode, written in place); seqlens_k int32 [batch] and
   * total_sequence_length int32 [] in (see graph/gqa.ts).
   */
  kv: z.enum(['concat', 'resident', 'gqa']).optional(),
  /** block-quantized projections (MatMulNBits); absent = plain weights at `dtype` */
  weights: z.enum(['int8', 'int4']).optional(),
  maskValue: z.number(),
  files: z.object({ graph: z.string(), weights: z.string() }),
  loraTargets: z.array(LoraTargetSchema),
});
export type Manifest = z.infer<typeof ManifestSchema>;

export const pastKeyName = (layer: number) => `past_key_values.${layer}.key`;
export const pastValueName = (layer: number) => `past_key_values.${layer}.value`;
export const presentKeyName = (layer: number) => `present.${layer}.key`;
export const presentValueName = (layer: number) => `present.${layer}.value`;
export const KV_CACHE_PREFIX = 'kv_cache.';
export const kvCacheKeyName = (layer: number) => `${KV_CACHE_PREFIX}${layer}.key`;
export const kvCacheValueName = (layer: number) => `${KV_CACHE_PREFIX}${layer}.value`;
export const kvNewKeyName = (layer: number) => `kv_new.${layer}.key`;
export const kvNewValueName = (layer: number) => `kv_new.${layer}.value`;
/** the gqa contract's outputs: the same memory as kv_cache.i.* when the engine binds them (graph/gqa.ts) */
export const KV_PRESENT_PREFIX = 'kv_present.';
export const kvPresentKeyName = (layer: number) => `${KV_PRESENT_PREFIX}${layer}.key`;
export const kvPresentValueName = (layer: number) => `${KV_PRESENT_PREFIX}${layer}.value`;
/** gqa: per row, cached tokens + the step's tokens − 1 (GroupQueryAttention's seqlens_k), int32 [batch] */
export const KV_SEQLENS = 'seqlens_k';
/** gqa: the longest row's cached + new tokens, int32 scalar */
export const KV_TOTAL = 'total_sequence_length';
/**
 * Per-row embedding inputs and the final hidden state (graphs with LoRA inputs and an engine
 * KV contract: resident or gqa): the step's embedding is gather(embed, ids) · embed_keep +
 * embed_rows ([batch, seq, 1] and [batch, seq, hidden], broadcast from [1, 1, …]; keep 1 and rows 0
 * leave it exact), before Gemma's √hidden; `hidden_states` float32 [batch, seq | 1, hidden] is the
 * normed input of lm_head, for rows whose adapter has its own head.
 */
export const EMBED_ROWS = 'embed_rows';
export const EMBED_KEEP = 'embed_keep';
export const HIDDEN_OUTPUT = 'hidden_states';
export const hasRowEmbeddings = (m: { lora: boolean; kv?: KvContract }): boolean => m.lora && (m.kv === 'resident' || m.kv === 'gqa');
export const KV_ROWS = 'kv_rows';
export const KV_LENS = 'kv_lens';
export type KvContract = 'concat' | 'resident' | 'gqa';
/** the contracts the engine serves (its KV store: engine/kv-store.ts) */
export type EngineKv = 'resident' | 'gqa';
export const kvContractOf = (m: { kv?: KvContract }): KvContract => m.kv ?? 'concat';

/**
 * The per-row vectors of a target ([batch | 1, 1, out]): DoRA's factor m / ‖W + s·B·A‖ multiplying
 * the projection before its base bias (ones for other rows), and lora_B's bias times the scale
 * (zeros for other rows). Named from the target so manifests need no new fields.
 */
export const loraMagnitudeInput = (t: Pick<LoraTarget, 'layer' | 'module'>) => `lora.${t.layer}.${t.module}.magnitude`;
export const loraBiasInput = (t: Pick<LoraTarget, 'layer' | 'module'>) => `lora.${t.layer}.${t.module}.bias`;

export function moduleName(layer: number, p: Projection): string {
  return `model.layers.${layer}.${projectionBlock(p)}.${p}`;
}

/**
 * The LoRA target table follows from the architecture alone, which is what lets the offline
 * checker validate an adapter against a bare config.json without any weights.
 */
export function loraTargetsFor(a: Architecture): LoraTarget[] {
  const out: LoraTarget[] = [];
  for (let layer = 0; layer < a.numLayers; layer++) {
    for (const module of projectionsOf(a)) {
      const { inFeatures, outFeatures } = projectionDims(a, module);
      out.push({
        name: moduleName(layer, module),
        layer,
        module,
        inFeatures,
        outFeatures,
        inputA: `lora.${layer}.${module}.A`,
        inputB: `lora.${layer}.${module}.B`,
      });
    }
  }
  return out;
}
