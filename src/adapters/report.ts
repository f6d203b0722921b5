import { z } from 'zod';
import { ALL_PROJECTIONS } from '../model/architecture.js';

/** Stable, machine-readable problem codes (DESIGN.md "Adapters: format, resolution, validation"). */
export const PROBLEM_CODES = [
  'shape_mismatch',
  'rank_mismatch',
  'rank_pattern_unmatched',
  'alpha_pattern_unmatched',
  'no_modules_matched',
  'missing_tensor',
  'missing_file',
  'unexpected_tensor',
  'unsupported_feature',
  'base_modifying_init',
  'rank_too_large',
  'bad_dtype',
  'non_finite',
  'corrupt_file',
  'invalid_config',
  'base_model_mismatch',
  'no_effect',
  'no_effect_modules',
  'large_delta',
  'over_memory_budget',
] as const;
export const ProblemCodeSchema = z.enum(PROBLEM_CODES);
export type ProblemCode = z.infer<typeof ProblemCodeSchema>;

const JsonValue: z.ZodType<unknown> = z.unknown();

export const ProblemSchema = z.object({
  code: ProblemCodeSchema,
  severity: z.enum(['error', 'warning']),
  /** the file the problem is in, when it is about a file */
  file: z.string().optional(),
  /** the tensor key as it appears in the file */
  tensor: z.string().optional(),
  /** the module name relative to the base model, e.g. model.layers.0.self_attn.q_proj */
  module: z.string().optional(),
  /** the rank_pattern / alpha_pattern / config key that decided */
  key: z.string().optional(),
  expected: JsonValue.optional(),
  actual: JsonValue.optional(),
  /** one human sentence, including the likely cause */
  message: z.string(),
  /** what to do instead */
  hint: z.string().optional(),
});
export type Problem = z.infer<typeof ProblemSchema>;

export function error(p: Omit<Problem, 'severity'>): Problem {
  return { severity: 'error', ...p };
}
export function warning(p: Omit<Problem, 'severity'>): Problem {
  return { severity: 'warning', ...p };
}

/** Problems of one code quoted one by one; past this, one more problem counts the rest. */
export const MAX_PROBLEMS_PER_CODE = 50;
const MAX_NAME = 300;
const MAX_TEXT = 2000;
const MAX_VALUE_JSON = 512;

const clip = (s: string, max: number) => (s.length <= max ? s : `${s.slice(0, max)}… (${s.length} characters)`);

function clipValue(v: unknown): unknown {
  if (v === undefined) return undefined;
  const text = JSON.stringify(v) ?? String(v);
  if (text.length <= MAX_VALUE_JSON) return v;
  // a list of records (e.g. large_delta's modules) stays a list a client can read: its leading
  // entries, within a larger budget; a list of numbers (a hostile shape) becomes clipped text
  if (Array.isArray(v) && v.length > 0 && v.every((x) => typeof x === 'object' && x !== null)) {
    const kept: unknown[] = [];
    let length = 2;
    for (const x of v) {
      length += (JSON.stringify(x) ?? '').length + 1;
      if (length > 4 * MAX_VALUE_JSON) break;
      kept.push(x);
    }
    return kept;
  }
  return clip(text, MAX_VALUE_JSON);
}

/**
 * Every echoed value bounded: a hostile upload decides the strings, shapes and lists a report
 * quotes, and the report goes into a 422 body, meta.json and log lines. Per code, the first
 * MAX_PROBLEMS_PER_CODE problems are kept and one more says how many were left out.
 */
export function boundProblems(problems: readonly Problem[]): Problem[] {
  const seen = new Map<ProblemCode, number>();
  const out: Problem[] = [];
  for (const p of problems) {
    const n = (seen.get(p.code) ?? 0) + 1;
    seen.set(p.code, n);
    if (n > MAX_PROBLEMS_PER_CODE) continue;
    out.push({
      ...p,
      ...(p.file !== undefined && { file: clip(p.file, MAX_NAME) }),
      ...(p.tensor !== undefined && { tensor: clip(p.tensor, MAX_NAME) }),
      ...(p.module !== undefined && { module: clip(p.module, MAX_NAME) }),
      ...(p.key !== undefined && { key: clip(p.key, MAX_NAME) }),
      ...(p.expected !== undefined && { expected: clipValue(p.expected) }),
      ...(p.actual !== undefined && { actual: clipValue(p.actual) }),
      message: clip(p.message, MAX_TEXT),
      ...(p.hint !== undefined && { hint: clip(p.hint, MAX_TEXT) }),
    });
  }
  for (const [code, n] of seen) {
    if (n <= MAX_PROBLEMS_PER_CODE) continue;
    const first = problems.find((p) => p.code === code)!;
    out.push({ code, severity: first.severity, message: `${n - MAX_PROBLEMS_PER_CODE} more ${code} problems are not listed (${n} in all; the first ${MAX_PROBLEMS_PER_CODE} are).` });
  }
  return out;
}

/** One targeted module of the model, as resolved from the config and found in the file. */
export const ModuleReportSchema = z.object({
  module: z.string(),
  layer: z.number().int().nonnegative(),
  projection: z.enum(ALL_PROJECTIONS),
  rank: z.number().int().positive(),
  alpha: z.number(),
  /** alpha / rank, or alpha / √rank with use_rslora: folded into B by the converter */
  scale: z.number(),
  /** the rank_pattern key that decided the rank, or 'r' */
  rankKey: z.string(),
  /** the alpha_pattern key that decided alpha, or 'lora_alpha' */
  alphaKey: z.string(),
  /** tensor keys as they appear in the file; null when missing */
  tensorA: z.string().nullable(),
  tensorB: z.string().nullable(),
  /** DoRA (use_dora): the lora_magnitude_vector key; absent or null for plain LoRA */
  tensorMagnitude: z.string().nullable().optional(),
  /** lora_bias: the lora_B.bias key; absent or null without one */
  tensorBias: z.string().nullable().optional(),
  /** ‖scale·B·A‖_F in float64 (effect.ts); null when the tensors were not read or do not fit */
  deltaNorm: z.number().nullable().optional(),
  /** deltaNorm ÷ ‖W‖_F of the base projection; null where the base weights are not at hand (loraserve check) */
  relativeNorm: z.number().nullable().optional(),
});
export type ModuleReport = z.infer<typeof ModuleReportSchema>;

/**
 * The adapter against the base, measured through the served graph on the fixed probe prompt
 * (engine/probe.ts): one row with the adapter, one without, the same tokens.
 */
export const EffectSchema = z.object({
  /** next-token distributions compared (the probe prompt's length in tokens) */
  probeTokens: z.number().int().positive(),
  /** largest |log p_adapter − log p_base| over every token of every distribution */
  maxLogprobDelta: z.number().nonnegative(),
  /** mean over positions of KL(adapter ‖ base), in nats */
  klDivergence: z.number().nonnegative(),
  /** the graph it was measured on (manifest sourceHash), so a restart on the same model reuses it */
  modelHash: z.string(),
});
export type Effect = z.infer<typeof EffectSchema>;

/**
 * What an adapter changes outside the projections (embedding-parts.ts): LoRA on the embedding,
 * trainable token rows, saved copies of embed_tokens / lm_head. Tensor keys as in the file.
 */
export const EmbeddingPartsSchema = z.object({
  /** lora_embedding_A [r, vocab] / lora_embedding_B [hidden, r]; scale folded into B by the converter */
  lora: z.object({ tensorA: z.string(), tensorB: z.string(), rank: z.number().int().positive(), alpha: z.number(), scale: z.number() }).nullable(),
  /** trainable_tokens_delta [k, hidden] of embed_tokens: rows that replace the embedding's (PEFT index_copy) */
  tokens: z.object({ tensor: z.string(), indices: z.array(z.number().int().nonnegative()), tiedHead: z.boolean() }).nullable(),
  /** trainable_tokens_delta of an untied lm_head (trainable_token_indices as a dict naming lm_head) */
  headTokens: z.object({ tensor: z.string(), indices: z.array(z.number().int().nonnegative()) }).nullable(),
  /** a full saved embed_tokens weight [vocab, hidden] (modules_to_save, or save_embedding_layers) */
  embedCopy: z.string().nullable(),
  /** a full saved lm_head weight [vocab, hidden]; with ensure_weight_tying on a tied model, the embed copy */
  headCopy: z.string().nullable(),
  /** the copies' row count when the adapter adds tokens (larger than the model's vocab_size; served with its tokenizer.json) */
  vocabSize: z.number().int().positive().optional(),
});
export type EmbeddingParts = z.infer<typeof EmbeddingPartsSchema>;

export const ValidationReportSchema = z.object({
  ok: z.boolean(),
  errors: z.array(ProblemSchema),
  warnings: z.array(ProblemSchema),
  modules: z.array(ModuleReportSchema),
  /** absent where the adapter was not run (errors, or no served graph: loraserve check) */
  effect: EffectSchema.nullable().optional(),
  /** absent: the adapter changes only projections */
  embedding: EmbeddingPartsSchema.optional(),
  /** bytes the adapter's served weights take in memory (float32): LoRA matrices plus embedding parts */
  memoryBytes: z.number().int().nonnegative().optional(),
  summary: z.object({
    peftType: z.string().nullable(),
    baseModel: z.string().nullable(),
    r: z.number().nullable(),
    loraAlpha: z.number().nullable(),
    useRslora: z.boolean().nullable(),
    targetedModules: z.number().int().nonnegative(),
    tensors: z.number().int().nonnegative(),
    parameters: z.number().int().nonnegative(),
  }),
});
export type ValidationReport = z.infer<typeof ValidationReportSchema>;
