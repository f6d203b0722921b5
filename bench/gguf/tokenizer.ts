import { z } from 'zod';
import { str, type MetadataValue } from './format.js';

/**
 * A Hugging Face byte-level BPE tokenizer.json as GGUF `tokenizer.ggml.*` metadata (the `gpt2`
 * tokenizer model of llama.cpp), the way convert_hf_to_gguf.py writes it: the tokens in id order,
 * their types (1 normal, 3 control for special added tokens, 4 user-defined for other added
 * tokens, 5 unused for the padding up to the model's vocabulary), the merges as "a b" strings.
 * The model's embedding may have more rows than the tokenizer has tokens (the bench presets pad
 * theirs): those ids become `[PAD<id>]`, as the converter pads.
 */

const TokenizerJsonSchema = z.object({
  model: z.object({
    type: z.literal('BPE', { error: 'only BPE tokenizer.json models are written to GGUF' }),
    vocab: z.record(z.string(), z.number().int().nonnegative()),
    merges: z.array(z.union([z.string(), z.tuple([z.string(), z.string()])])),
  }),
  added_tokens: z.array(z.object({ id: z.number().int().nonnegative(), content: z.string(), special: z.boolean() })).default([]),
  pre_tokenizer: z.unknown().optional(),
});

const TOKEN_TYPE = { normal: 1, control: 3, userDefined: 4, unused: 5 } as const;

export function tokenizerMetadata(tokenizerJson: string, vocabSize: number, ids: { bos: number | null; eos: number | null }, pre: string): Map<string, MetadataValue> {
  let raw: unknown;
  try {
    raw = JSON.parse(tokenizerJson);
  } catch (e) {
    throw new Error(`tokenizer.json is not JSON: ${(e as Error).message}`);
  }
  const tj = TokenizerJsonSchema.parse(raw);
  const tokens: (string | undefined)[] = new Array<string | undefined>(vocabSize);
  const types = new Array<number>(vocabSize).fill(TOKEN_TYPE.unused);
  const place = (id: number, text: string, type: number) => {
    if (id >= vocabSize) throw new Error(`tokenizer.json has token id ${id} (${JSON.stringify(text)}), past the model's vocabulary of ${vocabSize}`);
    tokens[id] = text;
    types[id] = type;
  };
  for (const [text, id] of Object.entries(tj.model.vocab)) place(id, text, TOKEN_TYPE.normal);
  for (const t of tj.added_tokens) place(t.id, t.content, t.special ? TOKEN_TYPE.control : TOKEN_TYPE.userDefined);
  const filled = Array.from(tokens, (t, i) => t ?? `[PAD${i}]`);
  const merges = tj.model.merges.map((m) => (typeof m === 'string' ? m : `${m[0]} ${m[1]}`));
  const md = new Map<string, MetadataValue>();
  md.set('tokenizer.ggml.model', str('gpt2'));
  md.set('tokenizer.ggml.pre', str(pre));
  md.set('tokenizer.ggml.tokens', { type: 'array', of: 'string', value: filled });
  md.set('tokenizer.ggml.token_type', { type: 'array', of: 'i32', value: types });
  md.set('tokenizer.ggml.merges', { type: 'array', of: 'string', value: merges });
  if (ids.bos !== null && ids.bos < vocabSize) md.set('tokenizer.ggml.bos_token_id', { type: 'u32', value: ids.bos });
  if (ids.eos !== null && ids.eos < vocabSize) md.set('tokenizer.ggml.eos_token_id', { type: 'u32', value: ids.eos });
  // the bench feeds token ids, never text: nothing is added in front of them
  md.set('tokenizer.ggml.add_bos_token', { type: 'bool', value: false });
  return md;
}
