import { z } from 'zod';
import { error, type Problem } from './report.js';

/**
 * adapter_config.json as written by every PEFT version we have seen. Older versions omit keys or
 * write `null` where newer ones write `{}` / `false`; newer versions add keys we do not know. So:
 * every field is optional and nullable, unknown keys pass through, and `normalizePeftConfig`
 * turns the result into one plain shape with PEFT's own defaults (peft/tuners/lora/config.py,
 * `LoraConfig`: r=8, lora_alpha=8, bias="none").
 */

const nullable = <T extends z.ZodType>(t: T) => t.nullable().optional();
const positiveInt = z.number().int().positive();
const stringOrList = z.union([z.string(), z.array(z.string())]);

export const PeftConfigSchema = z.looseObject({
  peft_type: nullable(z.string()),
  task_type: nullable(z.string()),
  base_model_name_or_path: nullable(z.string()),
  r: nullable(positiveInt),
  // PEFT does not restrict alpha: 0 makes a no-op, a negative alpha flips the delta
  lora_alpha: nullable(z.number()),
  /** a list of module names (exact or suffix after a dot), a full-match regex, or "all-linear" */
  target_modules: nullable(stringOrList),
  exclude_modules: nullable(stringOrList),
  rank_pattern: nullable(z.record(z.string(), positiveInt)),
  alpha_pattern: nullable(z.record(z.string(), z.number())),
  use_rslora: nullable(z.boolean()),
  use_dora: nullable(z.boolean()),
  layers_to_transform: nullable(z.union([z.number().int().nonnegative(), z.array(z.number().int().nonnegative())])),
  layers_pattern: nullable(stringOrList),
  modules_to_save: nullable(z.array(z.string())),
  bias: nullable(z.string()),
  lora_bias: nullable(z.boolean()),
  fan_in_fan_out: nullable(z.boolean()),
  /** true/false, or the name of an initialisation: "gaussian", "pissa", "pissa_niter_4", "olora", "loftq", … */
  init_lora_weights: nullable(z.union([z.boolean(), z.string()])),
  target_parameters: nullable(z.array(z.string())),
  layer_replication: nullable(z.array(z.unknown())),
  trainable_token_indices: nullable(z.unknown()),
  alora_invocation_tokens: nullable(z.unknown()),
  use_qalora: nullable(z.boolean()),
});
export type RawPeftConfig = z.infer<typeof PeftConfigSchema>;

/** The config with PEFT's defaults applied; `raw` keeps every original key for reporting. */
export interface PeftConfig {
  peftType: string;
  baseModel: string | null;
  r: number;
  loraAlpha: number;
  /** null = not given (PEFT then picks the architecture's default targets) */
  targetModules: string | string[] | null;
  excludeModules: string | string[] | null;
  rankPattern: Record<string, number>;
  alphaPattern: Record<string, number>;
  useRslora: boolean;
  useDora: boolean;
  layersToTransform: number | number[] | null;
  layersPattern: string | string[] | null;
  modulesToSave: string[] | null;
  bias: string;
  loraBias: boolean;
  fanInFanOut: boolean;
  initLoraWeights: boolean | string;
  targetParameters: string[] | null;
  raw: RawPeftConfig;
}

export type ParsedPeftConfig = { config: PeftConfig; problems: Problem[] } | { config: null; problems: Problem[] };

export const CONFIG_FILE = 'adapter_config.json';

/** What a key must hold, for the keys whose zod message would only say "Invalid input". */
const EXPECTED: Record<string, string> = {
  target_modules: 'a list of module names, a regular expression string, or "all-linear"',
  exclude_modules: 'a list of module names or a regular expression string',
  layers_to_transform: 'a layer index or a list of layer indices',
  layers_pattern: 'a string or a list of strings',
  init_lora_weights: 'true, false, or the name of an initialisation',
};

function issuePath(path: readonly PropertyKey[]): string {
  if (path.length === 0) return '(top level)';
  const text = path.map((p) => String(p)).join('.');
  return text.length > 120 ? `${text.slice(0, 120)}…` : text;
}

export function normalizePeftConfig(raw: RawPeftConfig): PeftConfig {
  return {
    peftType: raw.peft_type ?? 'LORA',
    baseModel: raw.base_model_name_or_path ?? null,
    r: raw.r ?? 8,
    loraAlpha: raw.lora_alpha ?? 8,
    targetModules: raw.target_modules ?? null,
    excludeModules: raw.exclude_modules ?? null,
    rankPattern: raw.rank_pattern ?? {},
    alphaPattern: raw.alpha_pattern ?? {},
    useRslora: raw.use_rslora ?? false,
    useDora: raw.use_dora ?? false,
    layersToTransform: raw.layers_to_transform ?? null,
    layersPattern: raw.layers_pattern ?? null,
    modulesToSave: raw.modules_to_save ?? null,
    bias: raw.bias ?? 'none',
    loraBias: raw.lora_bias ?? false,
    fanInFanOut: raw.fan_in_fan_out ?? false,
    initLoraWeights: raw.init_lora_weights ?? true,
    targetParameters: raw.target_parameters ?? null,
    raw,
  };
}

/** A JSON value as text in a message: its first `max` characters, whatever the upload holds. */
export function jsonExcerpt(value: unknown, max = 80): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length <= max ? text : `${text.slice(0, max)}… (${text.length} characters)`;
}

/** A JSON value echoed in a problem's `actual`: itself when short, else an excerpt of its text. */
export function boundedJson(value: unknown, max = 200): unknown {
  if (value === undefined) return undefined;
  const text = JSON.stringify(value) ?? String(value);
  return text.length <= max ? value : jsonExcerpt(value, max);
}

/** Config problems quoted one by one; past this many, one more problem counts the rest. */
const MAX_CONFIG_ISSUES = 20;

/**
 * What to say about an adapter of another PEFT method. Such a config has other keys, or the same
 * keys with other meanings (AdaLoRA's rank_pattern holds boolean masks), so nothing else in it
 * is read: the method itself is the answer.
 */
export function foreignPeftType(type: string): { message: string; hint: string } {
  const merge = 'merge it into the base model with PEFT merge_and_unload() and serve the merged model';
  if (type.toUpperCase() === 'ADALORA') {
    return {
      message: 'peft_type is ADALORA: this is an AdaLoRA adapter (SVD-form lora_A · diag(lora_E) · lora_B with ranks pruned during training), not a LoRA adapter; only plain LoRA is served.',
      hint: `Either ${merge}, or save it as plain LoRA: fold each module's lora_E and its scaling into lora_B, keep the ranks AdaLoRA did not prune, and write peft_type "LORA" with those ranks in rank_pattern.`,
    };
  }
  const shown = type.length > 40 ? `${type.slice(0, 40)}…` : type;
  return {
    message: `peft_type is ${JSON.stringify(shown)}: this adapter was made with another PEFT method than LoRA; only plain LoRA adapters (peft_type "LORA") are served.`,
    hint: `${merge[0]!.toUpperCase()}${merge.slice(1)}, or retrain with LoraConfig.`,
  };
}

/**
 * Pure: adapter_config.json text → config or `invalid_config` problems. Never throws: an upload
 * is hostile input and the caller wants a report, not an exception.
 */
export function parsePeftConfig(text: string, file = CONFIG_FILE): ParsedPeftConfig {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    return {
      config: null,
      problems: [error({ code: 'invalid_config', file, message: `${file} is not valid JSON (${(e as Error).message}).`, hint: 'Use the adapter_config.json written by PEFT save_pretrained.' })],
    };
  }
  if (json === null || typeof json !== 'object' || Array.isArray(json)) {
    return { config: null, problems: [error({ code: 'invalid_config', file, actual: Array.isArray(json) ? 'array' : typeof json, message: `${file} must hold a JSON object.` })] };
  }
  // the method first: another method's keys (AdaLoRA's rank_pattern of boolean masks) are not
  // LoRA's keys gone wrong, and reading them as such only buries the one answer that matters
  const type = (json as Record<string, unknown>).peft_type;
  if (typeof type === 'string' && type.toUpperCase() !== 'LORA') {
    const base = (json as Record<string, unknown>).base_model_name_or_path;
    return { config: normalizePeftConfig({ peft_type: type, base_model_name_or_path: typeof base === 'string' ? base : null }), problems: [] };
  }
  const parsed = PeftConfigSchema.safeParse(json);
  if (!parsed.success) {
    const issues = parsed.error.issues;
    const problems = issues.slice(0, MAX_CONFIG_ISSUES).map((issue) => {
      const key = issuePath(issue.path);
      const top = issue.path[0];
      // the value the issue is about (rank_pattern["x"]), not the whole key's value
      let actual: unknown = json;
      for (const step of issue.path) actual = actual !== null && typeof actual === 'object' ? (actual as Record<PropertyKey, unknown>)[step] : undefined;
      const want = typeof top === 'string' && issue.code === 'invalid_union' ? EXPECTED[top] : undefined;
      const detail = want ? `must be ${want}, not ${jsonExcerpt(actual)}` : issue.message;
      return error({ code: 'invalid_config', file, key, actual: boundedJson(actual), expected: want, message: `${file}: ${key}: ${detail}.` });
    });
    if (issues.length > MAX_CONFIG_ISSUES) {
      problems.push(error({ code: 'invalid_config', file, message: `${file}: ${issues.length - MAX_CONFIG_ISSUES} more values have the wrong type (${issues.length} in all; the first ${MAX_CONFIG_ISSUES} are listed).` }));
    }
    return { config: null, problems };
  }
  return { config: normalizePeftConfig(parsed.data), problems: [] };
}
