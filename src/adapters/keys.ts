/**
 * Tensor keys of a PEFT adapter file → the module they belong to.
 *
 * PEFT saves `base_model.model.<module>.lora_A.weight` (get_peft_model_state_dict in
 * peft/utils/save_and_load.py removes the adapter name; hand-made or older files may keep it:
 * `lora_A.default.weight`, `lora_A.<name>.weight`). Everything that is not a plain LoRA A/B
 * matrix is classified so the validator can say what it is instead of "unexpected".
 */

export type KeyKind =
  /** lora_A / lora_B weight of a linear module */
  | 'lora'
  /** lora_B.bias (lora_bias=True) or a module bias (bias="all" / "lora_only") */
  | 'bias'
  /** DoRA magnitude vector */
  | 'dora_magnitude'
  /** lora_embedding_A / lora_embedding_B: LoRA on an embedding */
  | 'lora_embedding'
  /** modules_to_save copies or full base weights such as resized embeddings */
  | 'full_weight'
  /** trainable_token_indices deltas */
  | 'trainable_tokens'
  | 'other';

export interface ParsedKey {
  /** the key exactly as it is in the file */
  key: string;
  kind: KeyKind;
  /** module name relative to the base model (`model.layers.0.self_attn.q_proj`); null when none applies */
  module: string | null;
  part: 'A' | 'B' | null;
  /** the adapter-name segment when the file kept one (`default`) */
  adapterName: string | null;
  /** `module.lora_B.weight`: the key without prefix and adapter name, used in messages */
  normalized: string;
}

export const PEFT_PREFIX = 'base_model.model.';

const LORA_WEIGHT = /^(.+)\.lora_([AB])(?:\.([^.]+))?\.weight$/;
const LORA_BIAS = /^(.+)\.lora_([AB])(?:\.([^.]+))?\.bias$/;
const DORA = /^(.+)\.lora_magnitude_vector(?:\.(?!weight$)([^.]+))?(?:\.weight)?$/;
const EMBEDDING = /^(.+)\.lora_embedding_([AB])(?:\.([^.]+))?$/;
const MODULES_TO_SAVE = /^(.+)\.modules_to_save(?:\.([^.]+))?\.(weight|bias)$/;
const TRAINABLE_TOKENS = /^(.+)\.trainable_tokens_delta(?:\.([^.]+))?$/;

export function parseTensorKey(key: string): ParsedKey {
  const rest = key.startsWith(PEFT_PREFIX) ? key.slice(PEFT_PREFIX.length) : key;
  let m = LORA_WEIGHT.exec(rest);
  if (m) {
    const [, module, part, name] = m;
    return { key, kind: 'lora', module: module!, part: part as 'A' | 'B', adapterName: name ?? null, normalized: `${module}.lora_${part}.weight` };
  }
  m = LORA_BIAS.exec(rest);
  if (m) {
    const [, module, part, name] = m;
    return { key, kind: 'bias', module: module!, part: part as 'A' | 'B', adapterName: name ?? null, normalized: `${module}.lora_${part}.bias` };
  }
  m = DORA.exec(rest);
  if (m) return { key, kind: 'dora_magnitude', module: m[1]!, part: null, adapterName: m[2] ?? null, normalized: `${m[1]}.lora_magnitude_vector` };
  m = EMBEDDING.exec(rest);
  if (m) {
    const [, module, part, name] = m;
    return { key, kind: 'lora_embedding', module: module!, part: part as 'A' | 'B', adapterName: name ?? null, normalized: `${module}.lora_embedding_${part}` };
  }
  m = MODULES_TO_SAVE.exec(rest);
  if (m) return { key, kind: 'full_weight', module: m[1]!, part: null, adapterName: m[2] ?? null, normalized: `${m[1]}.${m[3]}` };
  m = TRAINABLE_TOKENS.exec(rest);
  if (m) return { key, kind: 'trainable_tokens', module: m[1]!, part: null, adapterName: m[2] ?? null, normalized: `${m[1]}.trainable_tokens_delta` };
  // A plain `<module>.weight|bias` in an adapter file: a bias trained with bias="all"/"lora_only" or a
  // full copy of a base weight (modules_to_save, resized embeddings). Which one depends on the name.
  const plain = /^(.+)\.(weight|bias)$/.exec(rest);
  if (plain) {
    const [, module, what] = plain;
    return { key, kind: what === 'bias' ? 'bias' : 'full_weight', module: module!, part: null, adapterName: null, normalized: rest };
  }
  return { key, kind: 'other', module: null, part: null, adapterName: null, normalized: rest };
}

/**
 * The part of a module name before its layer index (`model.layers`, `model.language_model.layers`),
 * or the whole name when it has none: what `no_modules_matched` shows to explain a prefix mismatch.
 */
export function layerPrefix(module: string): string {
  const m = /^(.*?)\.\d+(?:\.|$)/.exec(module);
  return m ? m[1]! : module;
}
