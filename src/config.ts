import { z } from 'zod';
import { splitArgv } from './cli/argv.js';

/**
 * Every setting of the service, one schema. Values come from environment variables and are
 * overridden by `--flag value` / `--flag=value` of the same name in kebab or snake case
 * (`--max-lora-rank 32`, `--MAX_LORA_RANK=32`). README documents each.
 */
const int = (def: number) => z.coerce.number().int().nonnegative().default(def);
const csv = z
  .string()
  .default('')
  .transform((s) => s.split(',').map((x) => x.trim()).filter(Boolean));

export const ConfigSchema = z.object({
  PORT: z.coerce.number().int().min(0).max(65535).default(8080),
  HOST: z.string().default('0.0.0.0'),
  /** unset → the embedded default model (written on first start into DEFAULT_MODEL_DIR) */
  MODEL_PATH: z.string().optional(),
  /** llama2.c tokenizer.bin; default: tokenizer.bin beside MODEL_PATH */
  TOKENIZER_PATH: z.string().optional(),
  /** a Jinja chat template, as a file path or inline (as vLLM's --chat-template); replaces the model's own */
  CHAT_TEMPLATE: z.string().optional(),
  DEFAULT_MODEL_DIR: z.string().default('./data/default-model'),
  /** where built graphs are cached, one subfolder per source hash (model folders may be read-only) */
  CACHE_DIR: z.string().default('./data/model-cache'),
  ADAPTER_DIR: z.string().default('./data/adapters'),
  /** `shared`: ADAPTER_DIR is mounted by several replicas at once (see src/adapters/shared-folder.ts) */
  ADAPTER_STORE: z.enum(['local', 'shared']).default('local'),
  /** shared store: how often a replica looks for adapters replaced or deleted through another one */
  ADAPTER_SYNC_MS: z.coerce.number().int().positive().default(2000),
  /** shared store: a crashed replica's leftovers are removed once unrenewed for this long */
  ADAPTER_LEASE_MS: z.coerce.number().int().positive().default(60_000),
  /** ADAPTER_DIR=s3://bucket/prefix: the S3-compatible server (MinIO, R2, …); unset → AWS */
  S3_ENDPOINT: z.string().url().optional(),
  /** region for S3 (the SDK's standard credential chain supplies the keys) */
  AWS_REGION: z.string().optional(),
  /** adapters held in memory per replica (least recently used idle one unloaded); 0 = no limit */
  MAX_LOADED_ADAPTERS: int(0),
  DEVICE: z.enum(['auto', 'cpu', 'cuda']).default('auto'),
  /**
   * which binding runs the graph: onnxruntime-node's API, or onnxruntime's C API with IO binding
   * (src/runtime/); `auto` = capi for a gqa graph (its cache is bound as an output, which only the
   * C API leaves in place), node otherwise
   */
  RUNTIME: z.enum(['auto', 'node', 'capi']).default('auto'),
  DTYPE: z.enum(['auto', 'fp32', 'fp16']).default('auto'),
  /** base weights: plain fp32/fp16, or int8/int4 projections (MatMulNBits); auto = unquantized */
  WEIGHTS: z.enum(['auto', 'fp32', 'fp16', 'int8', 'int4']).default('auto'),
  /** MatMulNBits accuracy_level with int8/int4: 4 = int8 activations (fast), 0 = float (exact dequantized product) */
  WEIGHTS_ACCURACY_LEVEL: z.enum(['0', '4']).default('4').transform((v) => (v === '0' ? 0 : 4) as 0 | 4),
  /**
   * the KV cache: `gqa` = GroupQueryAttention writing a slot-major cache in place (graph/gqa.ts);
   * `resident` = plain-ops attention over the position-major cache (graph/kv.ts). A model gqa
   * cannot run (head_dim not a multiple of 8) is built resident, with a log line saying why.
   */
  KV: z.enum(['gqa', 'resident']).default('gqa'),
  MAX_LORA_RANK: int(64),
  /** the most memory one adapter's served weights may take, in MiB (saved embed_tokens / lm_head copies are vocab × hidden); 0 = no limit */
  ADAPTER_MEMORY_BUDGET_MB: int(4096),
  MAX_ADAPTERS: int(32),
  MAX_UPLOAD_BYTES: int(512 * 1024 * 1024),
  /** an upload body that sends nothing for this long is aborted and its staged files removed (0: never) */
  UPLOAD_IDLE_TIMEOUT_MS: int(30_000),
  /** uploads received at once (POST/PUT /v1/adapters, /validate); more get 429 with Retry-After */
  MAX_CONCURRENT_UPLOADS: z.coerce.number().int().positive().default(4),
  MAX_BATCH: z.coerce.number().int().positive().default(8),
  MAX_QUEUE: int(64),
  /** prompt tokens fed per prefill step, so a long prompt does not stall running streams */
  PREFILL_CHUNK: z.coerce.number().int().positive().default(64),
  MAX_TOKENS_DEFAULT: z.coerce.number().int().positive().default(256),
  REQUEST_TIMEOUT_MS: int(300_000),
  DRAIN_TIMEOUT_MS: int(30_000),
  API_KEYS: csv,
  ADMIN_API_KEYS: csv,
  CORS_ORIGINS: csv,
  /** refuse adapters whose base_model_name_or_path differs from the model id (else a warning) */
  STRICT_BASE_MODEL: z
    .enum(['true', 'false', '1', '0'])
    .default('false')
    .transform((v) => v === 'true' || v === '1'),
  LOG_LEVEL: z.enum(['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent']).default('info'),
});
export type Config = z.infer<typeof ConfigSchema>;
export type ConfigInput = z.input<typeof ConfigSchema>;

const KEYS = Object.keys(ConfigSchema.shape) as (keyof Config)[];

/** `--max-lora-rank 8` / `--MAX_LORA_RANK=8` → { MAX_LORA_RANK: '8' }; other args are returned as positionals. */
export function parseFlags(argv: readonly string[]): { flags: Record<string, string>; positionals: string[]; unknown: string[] } {
  const flags: Record<string, string> = {};
  const unknown: string[] = [];
  // every setting takes a value; a bare one (`--strict-base-model`) means true
  const { options, positionals } = splitArgv(argv, () => true);
  for (const o of options) {
    const key = o.name.replace(/-/g, '_').toUpperCase();
    if ((KEYS as string[]).includes(key)) flags[key] = o.value ?? 'true';
    else unknown.push(`--${o.name}`);
  }
  return { flags, positionals, unknown };
}

export class ConfigError extends Error {
  override name = 'ConfigError';
}

/** Environment first, flags override; throws ConfigError naming every bad setting. */
export function loadConfig(env: Record<string, string | undefined>, flags: Record<string, string> = {}): Config {
  const raw: Record<string, string> = {};
  for (const k of KEYS) {
    const v = flags[k] ?? env[k];
    if (v !== undefined && v !== '') raw[k] = v;
  }
  const parsed = ConfigSchema.safeParse(raw);
  if (!parsed.success) {
    const lines = parsed.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`);
    throw new ConfigError(`invalid settings: ${lines.join('; ')}`);
  }
  return parsed.data;
}

/** Config for tests and embedding: defaults plus overrides, no environment. */
export function makeConfig(overrides: Partial<ConfigInput> = {}): Config {
  return ConfigSchema.parse(overrides);
}
