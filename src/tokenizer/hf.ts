import { Tokenizer as HfLibTokenizer } from '@huggingface/tokenizers';
import type { Architecture } from '../model/architecture.js';
import { ModelInputError } from '../model/checkpoint/types.js';
import type { Tokenizer } from './types.js';

/**
 * tokenizer.json (+ tokenizer_config.json) through @huggingface/tokenizers. The library applies
 * the post-processor (e.g. Llama 3's TemplateProcessing that prepends <|begin_of_text|>) but not
 * tokenizer_config's `add_bos_token`; that flag is honoured here the way transformers' slow/fast
 * Llama tokenizers do: true → BOS is added even without a post-processor that adds it,
 * false → no special tokens are added.
 */

type Json = Record<string, unknown>;

function parseObject(text: string, file: string): Json {
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new ModelInputError(file, `is not valid JSON (${(e as Error).message}).`);
  }
  if (v === null || typeof v !== 'object' || Array.isArray(v)) throw new ModelInputError(file, 'is not a JSON object.');
  return v as Json;
}

/** tokenizer_config writes special tokens as a string or as a serialised AddedToken */
function tokenString(v: unknown): string | null {
  if (typeof v === 'string') return v;
  if (v && typeof v === 'object' && typeof (v as Json).content === 'string') return (v as Json).content as string;
  return null;
}

/** chat_template is a string, or (older transformers) a list of {name, template} */
function chatTemplateOf(config: Json): string | null {
  const t = config.chat_template;
  if (typeof t === 'string') return t;
  if (Array.isArray(t)) {
    const named = t.filter((x): x is { name: string; template: string } => !!x && typeof x === 'object' && typeof (x as Json).template === 'string');
    return (named.find((x) => x.name === 'default') ?? named[0])?.template ?? null;
  }
  return null;
}

export class HfTokenizer implements Tokenizer {
  readonly bosId: number | null;
  readonly eosIds: number[];
  readonly vocabSize: number;
  /** distinct ids in the vocabulary (added tokens included): vocabSize when it has no holes */
  readonly idCount: number;
  readonly chatTemplate: string | null;
  readonly specialTokens: Record<string, string>;
  private readonly lib: HfLibTokenizer;
  private readonly addBosToken: boolean | null;

  constructor(tokenizerJson: string, tokenizerConfigJson: string | null, arch: Architecture) {
    const tj = parseObject(tokenizerJson, 'tokenizer.json');
    const config = tokenizerConfigJson === null ? {} : parseObject(tokenizerConfigJson, 'tokenizer_config.json');
    try {
      this.lib = new HfLibTokenizer(tj, config);
    } catch (e) {
      throw new ModelInputError('tokenizer.json', `cannot be loaded by @huggingface/tokenizers: ${(e as Error).message}`);
    }
    this.addBosToken = typeof config.add_bos_token === 'boolean' ? config.add_bos_token : null;
    let maxId = -1;
    const ids = new Set<number>();
    for (const id of this.lib.get_vocab(true).values()) {
      maxId = Math.max(maxId, id);
      ids.add(id);
    }
    this.vocabSize = maxId + 1;
    this.idCount = ids.size;
    this.chatTemplate = chatTemplateOf(config);

    const special: Record<string, string> = {};
    for (const key of ['bos_token', 'eos_token', 'unk_token', 'pad_token', 'sep_token', 'cls_token', 'mask_token']) {
      const s = tokenString(config[key]);
      if (s !== null) special[key] = s;
    }
    const idOf = (s: string | undefined) => (s === undefined ? undefined : this.lib.token_to_id(s));
    // tokenizer_config says what the tokenizer uses (Qwen2 writes bos_token: null, while its
    // config.json still names a bos_token_id that is never added); config.json fills the gaps
    const bosFromConfig = idOf(special.bos_token);
    this.bosId = config.bos_token === null ? null : (bosFromConfig ?? arch.bosTokenId ?? null);
    if (special.bos_token === undefined && this.bosId !== null) {
      const s = this.lib.id_to_token(this.bosId);
      if (s !== undefined) special.bos_token = s;
    }
    const eosFromConfig = idOf(special.eos_token);
    this.eosIds = [...new Set([...arch.eosTokenIds, ...(eosFromConfig === undefined ? [] : [eosFromConfig])])];
    if (special.eos_token === undefined && this.eosIds.length) {
      const s = this.lib.id_to_token(this.eosIds[0]!);
      if (s !== undefined) special.eos_token = s;
    }
    this.specialTokens = special;
  }

  encode(text: string, opts: { addBos?: boolean } = {}): number[] {
    const addBos = opts.addBos ?? true;
    const ids = this.lib.encode(text, { add_special_tokens: addBos && this.addBosToken !== false }).ids;
    if (addBos && this.addBosToken === true && this.bosId !== null && ids[0] !== this.bosId) ids.unshift(this.bosId);
    return ids;
  }

  /** the token string of an id, undefined when the vocabulary has none */
  tokenOf(id: number): string | undefined {
    return this.lib.id_to_token(id) ?? undefined;
  }

  decode(ids: readonly number[]): string {
    if (ids.length === 0) return ''; // the library throws on an empty list
    return this.lib.decode([...ids], { skip_special_tokens: true });
  }
}
