import { z } from 'zod';

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
