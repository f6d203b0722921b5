import { z } from 'zod';
import { ArchitectureSchema, type Architecture, type RopeScaling } from '../architecture.js';
import { ModelInputError } from './types.js';

/**
 * Pure: turns a Hugging Face `config.json` (already JSON-parsed) into our Architecture.
 * Only the decoder shapes the graph builder implements are accepted; anything that would change
 * the maths without us noticing (an unknown RoPE scaling, another activation) is refused with a sentence.
 */

type HfConfig = z.infer<typeof HfConfigSchema>;

/**
 * What a family changes relative to Llama, read off its config the way its transformers
 * `modeling_<model_type>.py` reads it. The graph builder and the tensor list follow from these
 * fields alone (architecture.ts, tensors.ts); a new family is a row here plus its hooks there.
 */
interface FamilyTraits {
  attentionBias: boolean;
  outputBias: boolean;
  mlpBias: boolean;
  qkNorm: boolean;
  fusedProjections?: boolean;
  /** Gemma's differences from Llama (architecture.ts), read from its config */
  extras?: Partial<Architecture>;
  /** tie_word_embeddings when config.json leaves it out (Gemma's configs default to true) */
  tiedByDefault?: boolean;
  /** the activation transformers' MLP uses (config key, value); others are refused */
  activation?: { key: 'hidden_act' | 'hidden_activation'; value: string };
  /** the layers whose attention config.sliding_window limits (none when null) */
  windowLayers: number[] | null;
}

const allLayers = (c: HfConfig) => Array.from({ length: c.num_hidden_layers }, (_, i) => i);

/**
 * Qwen2/Qwen3: the window applies only with use_sliding_window, and then to the layers
 * `layer_types` marks "sliding_attention" (transformers >= 4.53 writes it), else to layers from
 * max_window_layers on.
 */
function qwenWindowLayers(c: HfConfig): number[] | null {
  if (c.use_sliding_window !== true || !c.sliding_window) return null;
  if (c.layer_types) return c.layer_types.flatMap((t, i) => (t === 'sliding_attention' ? [i] : []));
  const from = c.max_window_layers ?? 28;
  return allLayers(c).filter((i) => i >= from);
}

const FAMILIES: Record<string, { architecture: string; traits(c: HfConfig): FamilyTraits }> = {
  // LlamaAttention: q/k/v/o all `bias=attention_bias`; LlamaMLP: `bias=mlp_bias`
  llama: {
    architecture: 'LlamaForCausalLM',
    traits: (c) => ({ attentionBias: c.attention_bias ?? false, outputBias: c.attention_bias ?? false, mlpBias: c.mlp_bias ?? false, qkNorm: false, windowLayers: null }),
  },
  mistral: {
    architecture: 'MistralForCausalLM',
    traits: (c) => ({ attentionBias: false, outputBias: false, mlpBias: false, qkNorm: false, windowLayers: c.sliding_window ? allLayers(c) : null }),
  },
  // Qwen2Attention: q/k/v always biased (no config switch), o_proj never
  qwen2: {
    architecture: 'Qwen2ForCausalLM',
    traits: (c) => ({ attentionBias: true, outputBias: false, mlpBias: false, qkNorm: false, windowLayers: qwenWindowLayers(c) }),
  },
  // Qwen3Attention: q/k/v/o `bias=attention_bias` (false in every released model), RMSNorm over
  // head_dim on q and k before RoPE
  qwen3: {
    architecture: 'Qwen3ForCausalLM',
    traits: (c) => ({ attentionBias: c.attention_bias ?? false, outputBias: c.attention_bias ?? false, mlpBias: false, qkNorm: true, windowLayers: qwenWindowLayers(c) }),
  },
  // Phi3Attention: one qkv_proj and Phi3MLP one gate_up_proj, never biased; the window is Phi3's own sliding_window
  phi3: {
    architecture: 'Phi3ForCausalLM',
    traits: (c) => ({ attentionBias: false, outputBias: false, mlpBias: false, qkNorm: false, fusedProjections: true, windowLayers: c.sliding_window ? allLayers(c) : null }),
  },
  // Gemma2: (1 + w) RMSNorm, embeddings × sqrt(hidden), gelu_pytorch_tanh, pre/post feed-forward
  // norms, query_pre_attn_scalar, attention and final logit soft-capping, sliding window on even layers
  gemma2: {
    architecture: 'Gemma2ForCausalLM',
    traits: (c) => ({
      ...gemmaCommon(c),
      windowLayers: c.sliding_window ? (c.layer_types ? slidingOf(c.layer_types) : allLayers(c).filter((i) => i % 2 === 0)) : null,
      extras: { ...gemmaCommon(c).extras, ...(c.attn_logit_softcapping ? { attnSoftcap: c.attn_logit_softcapping } : {}), ...(c.final_logit_softcapping ? { finalSoftcap: c.final_logit_softcapping } : {}) },
    }),
  },
  // Gemma3 text: as Gemma2 plus (1 + w) q/k norms, no soft-capping in released models, every
  // sliding_window_pattern-th layer global with rope_theta (+ rope_scaling), the others local at rope_local_base_freq
  gemma3_text: {
    architecture: 'Gemma3ForCausalLM',
    traits: (c) => ({
      ...gemmaCommon(c),
      qkNorm: true,
      windowLayers: c.sliding_window ? (c.layer_types ? slidingOf(c.layer_types) : allLayers(c).filter((i) => (i + 1) % (c.sliding_window_pattern ?? 6) !== 0)) : null,
      extras: {
        ...gemmaCommon(c).extras,
        ...(c.attn_logit_softcapping ? { attnSoftcap: c.attn_logit_softcapping } : {}),
        ...(c.final_logit_softcapping ? { finalSoftcap: c.final_logit_softcapping } : {}),
        localRopeTheta: c.rope_local_base_freq ?? 10000,
      },
    }),
  },
};
type Family = Architecture['family'];

/** a per-layer-type rope_parameters: its local theta is Gemma 3's; elsewhere both types must agree */
function localThetaFor(traits: FamilyTraits, localTheta: number, file: string): Partial<Architecture> {
  if (traits.extras?.localRopeTheta !== undefined) return { localRopeTheta: localTheta };
  throw new ModelInputError(file, `rope_parameters gives sliding_attention layers their own RoPE (rope_theta ${localTheta}), which this model_type does not have.`);
}

const slidingOf = (types: string[]) => types.flatMap((t, i) => (t === 'sliding_attention' ? [i] : []));

function gemmaCommon(c: HfConfig): FamilyTraits & { extras: Partial<Architecture> } {
  const bias = c.attention_bias ?? false;
  return {
    attentionBias: bias,
    outputBias: bias,
    mlpBias: false,
    qkNorm: false,
    windowLayers: null,
    tiedByDefault: true,
    activation: c.hidden_activation ? { key: 'hidden_activation', value: c.hidden_activation } : { key: 'hidden_act', value: c.hidden_act ?? 'gelu_pytorch_tanh' },
    extras: { normPlusOne: true, embedScale: true, activation: 'gelu_tanh', sandwichNorms: true, queryPreAttnScalar: c.query_pre_attn_scalar ?? 256 },
  };
}
const SUPPORTED = Object.entries(FAMILIES).map(([t, f]) => `${t} (${f.architecture})`).join(', ');

const posInt = z.number().int().positive();
const tokenId = z.number().int().nonnegative();

const HfConfigSchema = z.object({
  model_type: z.string().optional(),
  architectures: z.array(z.string()).nullish(),
  hidden_size: posInt,
  intermediate_size: posInt,
  num_hidden_layers: posInt,
  num_attention_heads: posInt,
  num_key_value_heads: posInt.nullish(),
  head_dim: posInt.nullish(),
  vocab_size: posInt,
  max_position_embeddings: posInt,
  rms_norm_eps: z.number().positive(),
  rope_theta: z.number().positive().nullish(),
  rope_scaling: z.unknown().optional(),
  // transformers >= 4.57 writes RoPE settings here instead of rope_theta / rope_scaling
  rope_parameters: z.record(z.string(), z.unknown()).nullish(),
  tie_word_embeddings: z.boolean().nullish(),
  attention_bias: z.boolean().nullish(),
  mlp_bias: z.boolean().nullish(),
  hidden_act: z.string().nullish(),
  hidden_activation: z.string().nullish(),
  query_pre_attn_scalar: z.number().positive().nullish(),
  attn_logit_softcapping: z.number().positive().nullish(),
  final_logit_softcapping: z.number().positive().nullish(),
  rope_local_base_freq: z.number().positive().nullish(),
  sliding_window_pattern: posInt.nullish(),
  sliding_window: posInt.nullish(),
  use_sliding_window: z.boolean().nullish(),
  max_window_layers: z.number().int().nonnegative().nullish(),
  layer_types: z.array(z.string()).nullish(),
  // Phi-3 keeps the pretraining context here (LongRoPE), older transformers at the top level
  original_max_position_embeddings: posInt.nullish(),
  partial_rotary_factor: z.number().positive().max(1).nullish(),
  bos_token_id: tokenId.nullish(),
  eos_token_id: z.union([tokenId, z.array(tokenId)]).nullish(),
});

function familyOf(json: Record<string, unknown>, file: string): Family {
  const modelType = json.model_type;
  const archs = Array.isArray(json.architectures) ? json.architectures.filter((a): a is string => typeof a === 'string') : [];
  if (typeof modelType === 'string') {
    if (Object.hasOwn(FAMILIES, modelType)) return modelType as Family;
    throw new ModelInputError(file, `model_type "${modelType}"${archs.length ? ` (${archs.join(', ')})` : ''} is not supported; supported: ${SUPPORTED}.`);
  }
  for (const a of archs) {
    const hit = (Object.entries(FAMILIES) as [Family, { architecture: string }][]).find(([, f]) => f.architecture === a);
    if (hit) return hit[0];
  }
  if (archs.length) throw new ModelInputError(file, `architectures ${JSON.stringify(archs)} are not supported; supported: ${SUPPORTED}.`);
  throw new ModelInputError(file, `missing required key "model_type" (and no "architectures"); supported: ${SUPPORTED}.`);
}

function describeIssues(error: z.ZodError, json: Record<string, unknown>): string {
  return error.issues
    .map((i) => {
      const key = i.path.join('.');
      const top = i.path[0];
      if (typeof top === 'string' && json[top] === undefined) return `missing required key "${key}"`;
      return `key "${key}" is invalid (${JSON.stringify(top === undefined ? undefined : json[String(top)])}): ${i.message}`;
    })
    .join('; ');
}

/** The RoPE kinds the graph implements (README lists them); "dynamic" NTK is refused on purpose. */
export const ROPE_TYPES = ['default', 'linear', 'llama3', 'yarn', 'longrope'] as const;

/**
 * RoPE settings from either layout: `rope_parameters` (transformers >= 4.57: rope_type,
 * rope_theta and the scaling keys in one object) or the older `rope_theta` + `rope_scaling`
 * (whose kind may be under `rope_type` or the legacy `type`). Defaults are transformers'.
 */
function ropeOf(c: HfConfig, file: string): { theta: number; rope: RopeScaling | undefined; localTheta?: number } {
  const perType = c.rope_parameters && typeof c.rope_parameters.full_attention === 'object' && c.rope_parameters.full_attention !== null;
  if (perType) {
    // transformers >= 4.57 for models with local and global layers (Gemma 3): one entry per layer type
    const params = c.rope_parameters as Record<string, unknown>;
    const global = ropeOf({ ...c, rope_theta: undefined, rope_scaling: undefined, rope_parameters: params.full_attention as Record<string, unknown> }, file);
    const sliding = params.sliding_attention;
    if (sliding === undefined) return global;
    const local = ropeOf({ ...c, rope_theta: undefined, rope_scaling: undefined, rope_parameters: sliding as Record<string, unknown> }, file);
    if (local.rope) throw new ModelInputError(file, `rope_parameters.sliding_attention: only plain RoPE is supported on local layers, got ${JSON.stringify(sliding)}.`);
    return { ...global, localTheta: local.theta };
  }
  const fromParams = c.rope_parameters ?? null;
  const scaling = fromParams ?? c.rope_scaling ?? null;
  const key = fromParams ? 'rope_parameters' : 'rope_scaling';
  const theta = c.rope_theta ?? (fromParams && typeof fromParams.rope_theta === 'number' && fromParams.rope_theta > 0 ? fromParams.rope_theta : undefined) ?? 10000;
  if (scaling === null) return { theta, rope: undefined };
  if (typeof scaling !== 'object' || Array.isArray(scaling)) throw new ModelInputError(file, `${key} ${JSON.stringify(scaling)} is not an object.`);
  const p = scaling as Record<string, unknown>;
  const type = p.rope_type ?? p.type ?? 'default';
  const bad = (detail: string) => new ModelInputError(file, `${key}: ${detail}`);
  const num = (name: string, fallback?: number): number => {
    const v = p[name] ?? fallback;
    if (typeof v !== 'number' || !Number.isFinite(v) || v <= 0) throw bad(v === undefined || v === null ? `missing required key "${key}.${name}" for rope_type "${String(type)}".` : `key "${key}.${name}" must be a positive number, got ${JSON.stringify(v)}.`);
    return v;
  };
  const origMax = (fallback?: number) => {
    const v = num('original_max_position_embeddings', fallback);
    if (!Number.isInteger(v)) throw bad(`key "${key}.original_max_position_embeddings" must be an integer, got ${v}.`);
    return v;
  };
  switch (type) {
    case 'default':
      return { theta, rope: undefined };
    case 'linear':
      return { theta, rope: { type: 'linear', factor: num('factor') } };
    case 'llama3':
      return { theta, rope: { type: 'llama3', factor: num('factor'), lowFreqFactor: num('low_freq_factor'), highFreqFactor: num('high_freq_factor'), originalMaxPositions: origMax() } };
    case 'yarn': {
      const originalMaxPositions = origMax(c.max_position_embeddings);
      const factor = num('factor', c.max_position_embeddings / originalMaxPositions);
      // transformers: 0.1·mscale·ln(factor) + 1 (1 when factor <= 1); DeepSeek-style configs give a ratio of two
      const mscaleOf = (m: number) => (factor <= 1 ? 1 : 0.1 * m * Math.log(factor) + 1);
      const mscale = typeof p.mscale === 'number' ? p.mscale : 0;
      const mscaleAllDim = typeof p.mscale_all_dim === 'number' ? p.mscale_all_dim : 0;
      const attentionFactor = p.attention_factor != null ? num('attention_factor') : mscale && mscaleAllDim ? mscaleOf(mscale) / mscaleOf(mscaleAllDim) : mscaleOf(1);
      const truncate = p.truncate ?? true;
      if (typeof truncate !== 'boolean') throw bad(`key "${key}.truncate" must be a boolean, got ${JSON.stringify(truncate)}.`);
      // `beta_fast or 32` in transformers: a null or 0 falls back too
      const beta = (name: string, fallback: number) => (p[name] ? num(name) : fallback);
      return { theta, rope: { type: 'yarn', factor, originalMaxPositions, betaFast: beta('beta_fast', 32), betaSlow: beta('beta_slow', 1), attentionFactor, truncate } };
    }
    case 'longrope': {
      const originalMaxPositions = origMax(c.original_max_position_embeddings ?? undefined);
      const factor = num('factor', c.max_position_embeddings / originalMaxPositions);
      const attentionFactor = p.attention_factor != null ? num('attention_factor') : factor <= 1 ? 1 : Math.sqrt(1 + Math.log(factor) / Math.log(originalMaxPositions));
      const factors = (name: string): number[] => {
        const v = p[name];
        const half = (c.head_dim ?? c.hidden_size / c.num_attention_heads) / 2;
        if (!Array.isArray(v) || v.length !== half || !v.every((x) => typeof x === 'number' && Number.isFinite(x) && x > 0)) {
          throw bad(`key "${key}.${name}" must list ${half} positive numbers (one per rotated pair of head_dim), got ${Array.isArray(v) ? `${v.length} entries` : JSON.stringify(v)}.`);
        }
        return v as number[];
      };
      return { theta, rope: { type: 'longrope', shortFactor: factors('short_factor'), longFactor: factors('long_factor'), originalMaxPositions, attentionFactor } };
    }
    case 'dynamic':
      throw bad(
        `rope_type "dynamic" (dynamic NTK) is not supported: its frequencies change with the length of each sequence, so cached keys and new ones would be rotated by different tables. Supported rope types: ${ROPE_TYPES.join(', ')}.`,
      );
    default:
      throw bad(`rope_type ${JSON.stringify(type)} is not supported; supported rope types: ${ROPE_TYPES.join(', ')}.`);
  }
}

export function architectureFromHfConfig(json: unknown, file: string): Architecture {
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new ModelInputError(file, 'is not a JSON object.');
  const obj = json as Record<string, unknown>;
  const family = familyOf(obj, file);
  const parsed = HfConfigSchema.safeParse(obj);
  if (!parsed.success) throw new ModelInputError(file, describeIssues(parsed.error, obj));
  const c = parsed.data;

  const traits = FAMILIES[family]!.traits(c);
  const act = traits.activation ?? { key: 'hidden_act', value: c.hidden_act ?? 'silu' };
  const expectedAct = traits.activation ? 'gelu_pytorch_tanh' : 'silu';
  if (act.value !== expectedAct) throw new ModelInputError(file, `${act.key} "${act.value}" is not supported for ${family} (only ${expectedAct}).`);
  const numHeads = c.num_attention_heads;
  const numKvHeads = c.num_key_value_heads ?? numHeads;
  if (numHeads % numKvHeads !== 0) throw new ModelInputError(file, `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}.`);
  const headDim = c.head_dim ?? c.hidden_size / numHeads;
  if (!Number.isInteger(headDim)) throw new ModelInputError(file, `hidden_size ${c.hidden_size} is not divisible by num_attention_heads ${numHeads} and no head_dim is given.`);
  if (headDim % 2 !== 0) throw new ModelInputError(file, `head_dim ${headDim} is odd; rotary embeddings need an even head_dim.`);

  if (c.layer_types && c.layer_types.length !== c.num_hidden_layers) throw new ModelInputError(file, `layer_types lists ${c.layer_types.length} layers but num_hidden_layers is ${c.num_hidden_layers}.`);
  // a window as long as the context never masks anything and is dropped, except where the local
  // layers also differ in their RoPE (Gemma 3)
  const keepWindow = traits.extras?.localRopeTheta !== undefined;
  const windowLayers = traits.windowLayers && traits.windowLayers.length > 0 && c.sliding_window && (keepWindow || c.sliding_window < c.max_position_embeddings) ? traits.windowLayers : null;
  const maxPositions = c.max_position_embeddings;

  const rope = ropeOf(c, file);
  const partial = c.partial_rotary_factor ?? (c.rope_parameters && typeof c.rope_parameters.partial_rotary_factor === 'number' ? c.rope_parameters.partial_rotary_factor : 1);
  if (partial !== 1) throw new ModelInputError(file, `partial_rotary_factor ${partial} is not supported (RoPE over the whole head_dim only).`);
  const eos = c.eos_token_id;
  const arch: Architecture = {
    family,
    hiddenSize: c.hidden_size,
    intermediateSize: c.intermediate_size,
    numLayers: c.num_hidden_layers,
    numHeads,
    numKvHeads,
    headDim,
    vocabSize: c.vocab_size,
    maxPositions,
    rmsNormEps: c.rms_norm_eps,
    ropeTheta: rope.theta,
    ...(rope.rope ? { rope: rope.rope } : {}),
    ropeLayout: 'rotate_half',
    tieWordEmbeddings: c.tie_word_embeddings ?? traits.tiedByDefault ?? false,
    attentionBias: traits.attentionBias,
    outputBias: traits.outputBias,
    mlpBias: traits.mlpBias,
    ...(traits.qkNorm ? { qkNorm: true } : {}),
    ...(traits.fusedProjections ? { fusedProjections: true } : {}),
    ...(windowLayers ? { slidingWindow: c.sliding_window!, slidingWindowLayers: windowLayers } : {}),
    ...traits.extras,
    ...(rope.localTheta !== undefined ? localThetaFor(traits, rope.localTheta, file) : {}),
    bosTokenId: c.bos_token_id ?? null,
    eosTokenIds: eos === undefined || eos === null ? [] : Array.isArray(eos) ? [...new Set(eos)] : [eos],
  };
  return ArchitectureSchema.parse(arch);
}

/**
 * generation_config.json may list more end-of-sequence ids than config.json (Llama 3 instruct
 * models stop on <|eot_id|> too); generation stops on the union, as transformers' generate does.
 */
export function eosFromGenerationConfig(json: unknown): number[] {
  if (json === null || typeof json !== 'object' || Array.isArray(json)) return [];
  const eos = (json as Record<string, unknown>).eos_token_id;
  const ok = (v: unknown): v is number => typeof v === 'number' && Number.isInteger(v) && v >= 0;
  if (ok(eos)) return [eos];
  if (Array.isArray(eos)) return eos.filter(ok);
  return [];
}
