import { z } from 'zod';
import { ArchitectureSchema, type Architecture } from '../architecture.js';
import { ModelInputError } from './types.js';

/**
 * Pure: turns a Hugging Face `config.json` (already JSON-parsed) into our Architecture.
 * Only the decoder shapes the graph builder implements are accepted; anything that would change
 * the maths without us noticing (RoPE scaling, another activation) is refused with a sentence.
 */

const FAMILIES = {
  llama: 'LlamaForCausalLM',
  mistral: 'MistralForCausalLM',
  qwen2: 'Qwen2ForCausalLM',
} as const;
type Family = keyof typeof FAMILIES;
const SUPPORTED = Object.entries(FAMILIES).map(([t, a]) => `${t} (${a})`).join(', ');

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
  sliding_window: posInt.nullish(),
  use_sliding_window: z.boolean().nullish(),
  bos_token_id: tokenId.nullish(),
  eos_token_id: z.union([tokenId, z.array(tokenId)]).nullish(),
});

function familyOf(json: Record<string, unknown>, file: string): Family {
  const modelType = json.model_type;
  const archs = Array.isArray(json.architectures) ? json.architectures.filter((a): a is string => typeof a === 'string') : [];
  if (typeof modelType === 'string') {
    if (modelType in FAMILIES) return modelType as Family;
    throw new ModelInputError(file, `model_type "${modelType}"${archs.length ? ` (${archs.join(', ')})` : ''} is not supported; supported: ${SUPPORTED}.`);
  }
  for (const a of archs) {
    const hit = (Object.entries(FAMILIES) as [Family, string][]).find(([, cls]) => cls === a);
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

/** RoPE settings: plain rotary only; any scaling would silently change every position's angle. */
function ropeThetaOf(c: z.infer<typeof HfConfigSchema>, file: string): number {
  const rp = c.rope_parameters;
  if (rp) {
    const type = rp.rope_type ?? rp.type ?? 'default';
    if (type !== 'default') throw new ModelInputError(file, `rope_parameters.rope_type "${String(type)}" is not supported (only plain RoPE without scaling).`);
  }
  const scaling = c.rope_scaling;
  if (scaling !== undefined && scaling !== null) {
    const type = typeof scaling === 'object' ? ((scaling as Record<string, unknown>).rope_type ?? (scaling as Record<string, unknown>).type) : undefined;
    if (type !== 'default') {
      throw new ModelInputError(file, `rope_scaling ${JSON.stringify(scaling)} is not supported: only plain RoPE (rope_scaling null) is implemented.`);
    }
  }
  const fromParams = rp && typeof rp.rope_theta === 'number' && rp.rope_theta > 0 ? rp.rope_theta : undefined;
  return c.rope_theta ?? fromParams ?? 10000;
}

export function architectureFromHfConfig(json: unknown, file: string): Architecture {
  if (json === null || typeof json !== 'object' || Array.isArray(json)) throw new ModelInputError(file, 'is not a JSON object.');
  const obj = json as Record<string, unknown>;
  const family = familyOf(obj, file);
  const parsed = HfConfigSchema.safeParse(obj);
  if (!parsed.success) throw new ModelInputError(file, describeIssues(parsed.error, obj));
  const c = parsed.data;

  if (c.hidden_act && c.hidden_act !== 'silu') throw new ModelInputError(file, `hidden_act "${c.hidden_act}" is not supported (only silu).`);
  const numHeads = c.num_attention_heads;
  const numKvHeads = c.num_key_value_heads ?? numHeads;
  if (numHeads % numKvHeads !== 0) throw new ModelInputError(file, `num_attention_heads ${numHeads} is not a multiple of num_key_value_heads ${numKvHeads}.`);
  const headDim = c.head_dim ?? c.hidden_size / numHeads;
  if (!Number.isInteger(headDim)) throw new ModelInputError(file, `hidden_size ${c.hidden_size} is not divisible by num_attention_heads ${numHeads} and no head_dim is given.`);
  if (headDim % 2 !== 0) throw new ModelInputError(file, `head_dim ${headDim} is odd; rotary embeddings need an even head_dim.`);

  // The graph has no sliding-window mask: cap the context at the window so attention stays exact.
  const windowed = family === 'mistral' || (family === 'qwen2' && c.use_sliding_window === true);
  const maxPositions = windowed && c.sliding_window && c.sliding_window < c.max_position_embeddings ? c.sliding_window : c.max_position_embeddings;

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
    ropeTheta: ropeThetaOf(c, file),
    ropeLayout: 'rotate_half',
    tieWordEmbeddings: c.tie_word_embeddings ?? false,
    // Qwen2's attention always carries q/k/v biases (its config has no switch for it)
    attentionBias: family === 'qwen2' ? true : (c.attention_bias ?? false),
    // LlamaAttention gives o_proj `bias=attention_bias` and LlamaMLP every projection `bias=mlp_bias`;
    // Mistral's and Qwen2's o_proj and MLP never carry one
    outputBias: family === 'llama' && c.attention_bias === true,
    mlpBias: family === 'llama' && c.mlp_bias === true,
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
