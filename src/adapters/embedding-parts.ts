import type { Architecture } from '../model/architecture.js';
import { parseTensorKey } from './keys.js';
import { patternKeyMatch } from './pattern.js';
import { CONFIG_FILE, type PeftConfig } from './peft-config.js';
import { error, type EmbeddingParts, type Problem } from './report.js';
import type { TensorHeader } from './safetensors.js';

/**
 * The parts of a PEFT adapter outside the projections, checked against the model (DESIGN.md
 * "The model graph contract": embedding rows and a saved lm_head are per-row inputs):
 * - LoRA on embed_tokens (peft/tuners/lora/layer.py `Embedding`): `lora_embedding_A` [r, vocab],
 *   `lora_embedding_B` [hidden, r]; Δ(token) = scale · B · A[:, token]. Only the embedding's
 *   forward is wrapped, so a tied lm_head is unchanged.
 * - trainable tokens (peft/tuners/trainable_tokens/layer.py): `token_adapter.trainable_tokens_delta`
 *   [k, hidden] holds the *values* of rows `trainable_token_indices` (index_copy into the weight);
 *   on a tied model PEFT ties lm_head's token adapter to the embedding's (utils/other.py,
 *   `_set_trainable` with `tied_adapter`), so the same rows replace lm_head's too.
 * - modules_to_save of embed_tokens / lm_head (ModulesToSaveWrapper), saved by
 *   get_peft_model_state_dict as `base_model.model.model.embed_tokens.weight` /
 *   `base_model.model.lm_head.weight` (also what save_embedding_layers writes).
 * Pure, like validate.ts; every problem is collected.
 */

export const EMBED_MODULE = 'model.embed_tokens';
export const TOKENIZER_FILE = 'tokenizer.json';

/** What the upload's own tokenizer files say (folder.ts reads them); absent files: vocabSize null. */
export interface AdapterTokenizerFacts {
  /** ids the tokenizer can produce: its largest id (model vocab and added_tokens) + 1 */
  vocabSize: number | null;
  /** ids in [0, vocabSize) that map to no token (holes the embedding rows would never be reached by) */
  missingIds: number[];
  /** the files would not load */
  problems: Problem[];
}
export const HEAD_MODULE = 'lm_head';

export interface EmbeddingPartsResult {
  problems: Problem[];
  /** null: the adapter has none of these parts */
  parts: EmbeddingParts | null;
  /** tensor keys this function has judged (validate.ts does not classify them again) */
  claimed: Set<string>;
  /** modules_to_save entries that are neither embed_tokens nor lm_head: still refused */
  otherModulesToSave: string[];
  /** float32 bytes the parts hold once loaded */
  bytes: number;
}

const fmt = (shape: readonly number[]) => `[${shape.join(', ')}]`;
/** PEFT's `_set_trainable` / trainable_token_indices keys: the module name or a dotted suffix of it */
const names = (entry: string, module: string) => module === entry || module.endsWith(`.${entry}`);
const moduleOf = (entry: string): string | null => (names(entry, EMBED_MODULE) ? EMBED_MODULE : names(entry, HEAD_MODULE) ? HEAD_MODULE : null);

/** modules_to_save entries this server does not serve (everything but embed_tokens and lm_head) */
export const unservedModulesToSave = (entries: readonly string[]): string[] => entries.filter((e) => moduleOf(e) === null);

/** trainable_token_indices: a list (the input embedding) or a dict layer name → list. */
function tokenIndexConfig(raw: unknown, problems: Problem[]): Map<string, number[]> {
  const out = new Map<string, number[]>();
  if (raw === null || raw === undefined) return out;
  const bad = (key: string, actual: unknown, message: string) => problems.push(error({ code: 'invalid_config', file: CONFIG_FILE, key, actual, message, hint: 'trainable_token_indices is a list of token ids, or a dict {"embed_tokens": [ids…]}, as PEFT writes it.' }));
  const list = (key: string, v: unknown): number[] | null => {
    if (!Array.isArray(v) || !v.every((x) => Number.isInteger(x) && (x as number) >= 0)) {
      bad(key, Array.isArray(v) ? v.slice(0, 8) : v, `${key} must be a list of non-negative token ids.`);
      return null;
    }
    return v as number[];
  };
  if (Array.isArray(raw)) {
    const l = list('trainable_token_indices', raw);
    if (l) out.set(EMBED_MODULE, l);
    return out;
  }
  if (typeof raw !== 'object') {
    bad('trainable_token_indices', raw, 'trainable_token_indices must be a list or a dict.');
    return out;
  }
  for (const [key, v] of Object.entries(raw as Record<string, unknown>)) {
    const module = moduleOf(key);
    const l = list(`trainable_token_indices.${key}`, v);
    if (!l) continue;
    if (!module) {
      problems.push(error({ code: 'unsupported_feature', file: CONFIG_FILE, key: 'trainable_token_indices', actual: key, message: `trainable_token_indices names "${key}", which is neither embed_tokens nor lm_head of this model.`, hint: 'Only the token rows of embed_tokens (and lm_head) are served.' }));
      continue;
    }
    out.set(module, l);
  }
  return out;
}

export function validateEmbeddingParts(config: PeftConfig | null, tensors: readonly TensorHeader[], a: Architecture, otherTargeted: readonly string[], maxLoraRank: number, file: string, tokenizer: AdapterTokenizerFacts | null = null): EmbeddingPartsResult {
  const problems: Problem[] = [];
  const claimed = new Set<string>();
  const V = a.vocabSize;
  const H = a.hiddenSize;
  const mts = config?.modulesToSave ?? [];
  const savedModules = new Set(mts.map(moduleOf).filter((m): m is string => m !== null));
  const otherModulesToSave = mts.filter((e) => moduleOf(e) === null);
  const tokenIndices = config ? tokenIndexConfig(config.raw.trainable_token_indices, problems) : new Map<string, number[]>();
  const embedTargeted = otherTargeted.includes(EMBED_MODULE);

  // the file's tensors for these modules
  let loraA: TensorHeader | null = null;
  let loraB: TensorHeader | null = null;
  const deltas = new Map<string, TensorHeader>();
  const copies = new Map<string, TensorHeader>();
  for (const t of tensors) {
    const pk = parseTensorKey(t.name);
    if (pk.kind === 'lora_embedding' && pk.module === EMBED_MODULE) {
      if (pk.part === 'A') loraA = t;
      else loraB = t;
      claimed.add(t.name);
    } else if (pk.kind === 'trainable_tokens' && pk.module !== null) {
      const module = pk.module.replace(/\.token_adapter$/, '');
      if (module === EMBED_MODULE || module === HEAD_MODULE) {
        deltas.set(module, t);
        claimed.add(t.name);
      }
    } else if (pk.kind === 'full_weight' && (pk.module === EMBED_MODULE || pk.module === HEAD_MODULE) && pk.normalized.endsWith('.weight')) {
      copies.set(pk.module, t);
      claimed.add(t.name);
    }
  }

  // ---- LoRA on the embedding
  let lora: EmbeddingParts['lora'] = null;
  if (loraA || loraB || embedTargeted) {
    if (!config) {
      // without a config the rank and alpha are unknown: validate.ts already reported the config
    } else if (!embedTargeted) {
      for (const t of [loraA, loraB]) if (t) problems.push(error({ code: 'unexpected_tensor', file, tensor: t.name, module: EMBED_MODULE, message: `${t.name} is LoRA on ${EMBED_MODULE}, which adapter_config.json does not target; PEFT would ignore it.`, hint: 'Add "embed_tokens" to target_modules, or drop the tensor.' }));
    } else {
      const rk = Object.keys(config.rankPattern).find((k) => patternKeyMatch(k)(EMBED_MODULE));
      const ak = Object.keys(config.alphaPattern).find((k) => patternKeyMatch(k)(EMBED_MODULE));
      const rank = rk === undefined ? config.r : config.rankPattern[rk]!;
      const alpha = ak === undefined ? config.loraAlpha : config.alphaPattern[ak]!;
      const want = { A: [rank, V], B: [H, rank] };
      let ok = true;
      for (const [part, t] of [['A', loraA], ['B', loraB]] as const) {
        const name = `${EMBED_MODULE}.lora_embedding_${part}`;
        if (!t) {
          ok = false;
          problems.push(error({ code: 'missing_tensor', file, module: EMBED_MODULE, tensor: name, expected: want[part], message: `${name} ${fmt(want[part])} is missing: adapter_config.json targets embed_tokens, so PEFT saves both lora_embedding_A and lora_embedding_B.` }));
          continue;
        }
        const s = t.shape;
        if (s.length !== 2 || s[0] !== want[part][0] || s[1] !== want[part][1]) {
          ok = false;
          const which = part === 'A' ? `[r, vocab_size] = ${fmt(want.A)}` : `[hidden_size, r] = ${fmt(want.B)}`;
          problems.push(error({ code: 'shape_mismatch', file, tensor: t.name, module: EMBED_MODULE, expected: want[part], actual: s, message: `${name} has shape ${fmt(s)}; this model's embedding (vocab_size ${V}, hidden_size ${H}) with rank ${rank}${rk === undefined ? '' : ` (rank_pattern "${rk}")`} needs ${which}.` }));
        }
      }
      if (rank > maxLoraRank) {
        ok = false;
        problems.push(error({ code: 'rank_too_large', file: CONFIG_FILE, key: rk ?? 'r', module: EMBED_MODULE, expected: `<= ${maxLoraRank}`, actual: rank, message: `The embedding LoRA has rank ${rank}, over this server's MAX_LORA_RANK of ${maxLoraRank}.`, hint: 'Retrain with a smaller rank, or raise MAX_LORA_RANK.' }));
      }
      if (ok && loraA && loraB) lora = { tensorA: loraA.name, tensorB: loraB.name, rank, alpha, scale: config.useRslora ? alpha / Math.sqrt(rank) : alpha / rank };
    }
  }

  // ---- saved copies
  /** copies with more rows than the vocabulary (added tokens): judged together below */
  const larger = new Map<string, TensorHeader>();
  const copyOf = (module: string): string | null => {
    const t = copies.get(module);
    if (!t) return null;
    const s = t.shape;
    if (s.length === 2 && s[0] === V && s[1] === H) return t.name;
    if (s.length === 2 && s[1] === H && s[0]! > V) {
      larger.set(module, t);
      return t.name;
    }
    problems.push(error({ code: 'shape_mismatch', file, tensor: t.name, module, expected: [V, H], actual: s, message: `${t.name} has shape ${fmt(s)}; this model's ${module} is [vocab_size, hidden_size] = ${fmt([V, H])}.` }));
    return null;
  };
  let embedCopy = copyOf(EMBED_MODULE);
  let headCopy = copyOf(HEAD_MODULE);
  for (const module of savedModules) {
    if (!copies.has(module)) problems.push(error({ code: 'missing_tensor', file, module, tensor: `${module}.weight`, expected: [V, H], message: `modules_to_save lists ${module}, but ${file} holds no ${module}.weight; PEFT saves the trained copy under base_model.model.${module}.weight.` }));
  }
  // ensure_weight_tying on a tied model: lm_head's copy is the embedding's (utils/other.py, modules_to_tie)
  if (!headCopy && embedCopy && a.tieWordEmbeddings && config?.raw.ensure_weight_tying === true) headCopy = embedCopy;

  // ---- a larger vocabulary (resize_token_embeddings before training): served with the adapter's tokenizer
  let vocabSize: number | undefined;
  if (larger.size) {
    const ok = largerVocabulary(larger, { embedCopy, headCopy }, V, H, file, tokenizer, problems);
    if (ok === null) {
      embedCopy = larger.has(EMBED_MODULE) ? null : embedCopy;
      headCopy = larger.has(HEAD_MODULE) || (headCopy !== null && headCopy === larger.get(EMBED_MODULE)?.name) ? null : headCopy;
    } else vocabSize = ok;
  }

  // ---- trainable tokens
  let tokens: EmbeddingParts['tokens'] = null;
  let headTokens: EmbeddingParts['headTokens'] = null;
  for (const [module, t] of deltas) {
    if (!tokenIndices.has(module)) problems.push(error({ code: 'unexpected_tensor', file, tensor: t.name, module, message: `${t.name} holds trained token rows, but adapter_config.json has no trainable_token_indices for ${module}, so which rows they replace is unknown.`, hint: 'Upload the adapter_config.json saved with these weights.' }));
  }
  for (const [module, indices] of tokenIndices) {
    const key = module === EMBED_MODULE ? 'trainable_token_indices' : `trainable_token_indices.${module}`;
    const t = deltas.get(module);
    const name = `${module}.token_adapter.trainable_tokens_delta`;
    let ok = true;
    const outside = indices.filter((i) => i >= V);
    if (outside.length) {
      ok = false;
      problems.push(error({ code: 'shape_mismatch', file: CONFIG_FILE, key, module, expected: `token ids < ${V}`, actual: outside.slice(0, 8), message: `trainable_token_indices lists ${outside.length} token id${outside.length === 1 ? '' : 's'} (e.g. ${outside[0]}) outside this model's vocabulary of ${V} tokens.`, hint: 'The adapter was trained on a model with a larger vocabulary (added tokens); serve that model.' }));
    }
    if (new Set(indices).size !== indices.length) {
      ok = false;
      problems.push(error({ code: 'invalid_config', file: CONFIG_FILE, key, module, message: 'trainable_token_indices lists a token id twice; index_copy with repeated ids has no defined result.' }));
    }
    if (!t) {
      problems.push(error({ code: 'missing_tensor', file, module, tensor: name, expected: [indices.length, H], message: `trainable_token_indices is set for ${module}, but ${file} holds no ${name} [${indices.length}, ${H}].` }));
      continue;
    }
    const s = t.shape;
    if (s.length !== 2 || s[0] !== indices.length || s[1] !== H) {
      ok = false;
      problems.push(error({ code: 'shape_mismatch', file, tensor: t.name, module, expected: [indices.length, H], actual: s, message: `${name} has shape ${fmt(s)}; trainable_token_indices lists ${indices.length} tokens and this model's hidden_size is ${H}, so ${fmt([indices.length, H])} was expected.` }));
    }
    if (!ok) continue;
    // on a tied model, lm_head follows the embedding's adapter unless the dict gives it indices of its own
    if (module === EMBED_MODULE) tokens = { tensor: t.name, indices, tiedHead: a.tieWordEmbeddings && !tokenIndices.has(HEAD_MODULE) };
    else headTokens = { tensor: t.name, indices };
  }
  if (tokens && tokenIndices.has(HEAD_MODULE) && a.tieWordEmbeddings) {
    const same = JSON.stringify(tokenIndices.get(HEAD_MODULE)) === JSON.stringify(tokens.indices);
    // equal indices on a tied model: lm_head follows the embedding's adapter and saves nothing of its own
    if (same && !deltas.has(HEAD_MODULE)) tokens = { ...tokens, tiedHead: true };
  }

  // ---- combinations PEFT itself refuses or that replace the same rows twice
  const combo = (what: string, hint: string) => problems.push(error({ code: 'unsupported_feature', file: CONFIG_FILE, module: EMBED_MODULE, message: `The adapter has ${what} on embed_tokens; one way of changing the embedding per adapter is served.`, hint }));
  if (lora && (embedCopy || tokens)) combo(embedCopy ? 'both LoRA and a saved full copy' : 'both LoRA and trainable tokens', 'Merge the adapter into the base model with PEFT merge_and_unload() and serve the merged model.');
  if (embedCopy && tokenIndices.has(EMBED_MODULE)) combo('both a saved full copy and trainable tokens', 'PEFT refuses this combination too: keep embed_tokens in modules_to_save or in trainable_token_indices, not both.');
  if (headCopy && tokenIndices.has(HEAD_MODULE)) problems.push(error({ code: 'unsupported_feature', file: CONFIG_FILE, module: HEAD_MODULE, message: 'The adapter has both a saved lm_head and trainable tokens of lm_head.', hint: 'PEFT refuses this combination too.' }));

  // ensure_weight_tying with LoRA on the embedding (tuners_utils.py `_add_targets_to_tie`): PEFT also
  // gives the tied lm_head a LoRA made of the embedding's matrices, which is not served
  if (lora && a.tieWordEmbeddings && config?.raw.ensure_weight_tying === true) {
    problems.push(error({ code: 'unsupported_feature', file: CONFIG_FILE, key: 'ensure_weight_tying', module: HEAD_MODULE, actual: true, message: 'ensure_weight_tying is true with LoRA on embed_tokens of a tied model: PEFT then also applies that LoRA, transposed, to lm_head, which is not served.', hint: 'Merge the adapter into the base model with PEFT merge_and_unload() and serve the merged model, or retrain with ensure_weight_tying=false.' }));
  }

  const any = lora || tokens || headTokens || embedCopy || headCopy;
  const parts: EmbeddingParts | null = any ? { lora, tokens, headTokens, embedCopy, headCopy, ...(vocabSize !== undefined && { vocabSize }) } : null;
  const bytes = parts ? embeddingPartsBytes(parts, a) : 0;
  return { problems, parts, claimed, otherModulesToSave, bytes };
}

/** float32 bytes the parts hold once loaded (a head that is the embedding's copy is counted once). */
export function embeddingPartsBytes(p: EmbeddingParts, a: Architecture): number {
  const H = a.hiddenSize;
  let n = 0;
  if (p.lora) n += p.lora.rank * (a.vocabSize + H);
  if (p.tokens) n += p.tokens.indices.length * H;
  if (p.headTokens) n += p.headTokens.indices.length * H;
  const copyRows = p.vocabSize ?? a.vocabSize;
  if (p.embedCopy) n += copyRows * H;
  if (p.headCopy && p.headCopy !== p.embedCopy) n += copyRows * H;
  return 4 * n;
}

/**
 * Saved copies with more rows than the model's vocabulary: the adapter was trained after
 * resize_token_embeddings, so its added tokens exist only in its own tokenizer. Served when both the
 * embedding and lm_head have the same larger row count (a token the embedding knows can be generated,
 * and a generated one can be fed back) and the upload's tokenizer.json produces exactly those ids.
 * Returns the adapter's vocabulary size, or null after reporting why not.
 */
function largerVocabulary(larger: ReadonlyMap<string, TensorHeader>, copies: { embedCopy: string | null; headCopy: string | null }, V: number, H: number, file: string, tokenizer: AdapterTokenizerFacts | null, problems: Problem[]): number | null {
  const rows = [...larger.values()].map((t) => t.shape[0]!);
  const Vp = Math.max(...rows);
  const first = [...larger.values()][0]!;
  const sizes = `the adapter's vocabulary is ${Vp} tokens (${first.name} has ${first.shape[0]} rows), the served model's is ${V}`;
  const before = problems.length;
  const embed = larger.get(EMBED_MODULE);
  const head = larger.get(HEAD_MODULE);
  if (embed && head && embed.shape[0] !== head.shape[0]) {
    problems.push(error({ code: 'shape_mismatch', file, tensor: head.name, module: HEAD_MODULE, expected: [embed.shape[0], H], actual: head.shape, message: `${head.name} has ${head.shape[0]} rows but ${embed.name} has ${embed.shape[0]}: the embedding and lm_head of an adapter that adds tokens must cover the same vocabulary.` }));
  }
  const headLarger = head !== undefined || (embed !== undefined && copies.headCopy === embed.name);
  if (!embed || !headLarger) {
    const [has, lacks] = embed ? [EMBED_MODULE, HEAD_MODULE] : [HEAD_MODULE, EMBED_MODULE];
    const t = (embed ?? head)!;
    problems.push(error({ code: 'shape_mismatch', file, tensor: t.name, module: lacks, expected: [t.shape[0], H], actual: [V, H], message: `${sizes}, but only ${has} covers the added tokens; ${lacks} is the base's ${V} rows, so the added tokens could ${embed ? 'never be generated' : 'not be read back as input'}.`, hint: `Save both: modules_to_save=["embed_tokens", "lm_head"] (or save_embedding_layers=True with an untied lm_head).` }));
  }
  if (!tokenizer || tokenizer.vocabSize === null) {
    problems.push(error({ code: 'missing_file', file: TOKENIZER_FILE, tensor: first.name, expected: Vp, actual: V, message: `${sizes}; the upload has no ${TOKENIZER_FILE}, and only the adapter's own tokenizer can produce the added ids ${V}…${Vp - 1}.`, hint: `Upload ${TOKENIZER_FILE} (and tokenizer_config.json) from the adapter's folder with it: tokenizer.save_pretrained(dir) beside model.save_pretrained(dir).` }));
  } else if (tokenizer.problems.length) {
    problems.push(...tokenizer.problems);
  } else if (tokenizer.vocabSize !== Vp) {
    problems.push(error({ code: 'shape_mismatch', file: TOKENIZER_FILE, tensor: first.name, expected: Vp, actual: tokenizer.vocabSize, message: `${TOKENIZER_FILE} has ${tokenizer.vocabSize} tokens (its largest id + 1, added_tokens included), but ${sizes}: the tokenizer is not the one the adapter was trained with.`, hint: 'Upload the tokenizer saved with this adapter.' }));
  } else if (tokenizer.missingIds.length) {
    problems.push(error({ code: 'invalid_config', file: TOKENIZER_FILE, actual: tokenizer.missingIds.slice(0, 8), message: `${TOKENIZER_FILE} has no token for ${tokenizer.missingIds.length} id${tokenizer.missingIds.length === 1 ? '' : 's'} below ${Vp} (e.g. ${tokenizer.missingIds[0]}): the adapter's rows and its tokenizer's ids do not line up.` }));
  }
  return problems.length === before ? Vp : null;
}
