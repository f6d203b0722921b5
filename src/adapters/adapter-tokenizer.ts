import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Architecture } from '../model/architecture.js';
import { HfTokenizer } from '../tokenizer/hf.js';
import type { AdapterTokenizerFacts } from './embedding-parts.js';
import { error } from './report.js';
import { TOKENIZER_FILES } from './store.js';

/**
 * The tokenizer files an adapter folder carries (tokenizer.json, tokenizer_config.json, as PEFT
 * output folders of fine-tunes that add tokens have them), loaded with the library that loads the
 * base's: what the validator needs to know of it (its vocabulary size) and, for an adapter that adds
 * tokens, the tokenizer its requests are encoded and decoded with.
 */
export interface AdapterTokenizer {
  facts: AdapterTokenizerFacts | null;
  /** null when the folder has no tokenizer.json or it does not load */
  tokenizer: HfTokenizer | null;
}

export async function readAdapterTokenizer(dir: string, files: readonly string[], arch: Architecture): Promise<AdapterTokenizer> {
  const [json, config] = TOKENIZER_FILES;
  if (!files.includes(json)) return { facts: null, tokenizer: null };
  const text = await readFile(join(dir, json), 'utf8');
  const configText = files.includes(config) ? await readFile(join(dir, config), 'utf8') : null;
  try {
    const tokenizer = new HfTokenizer(text, configText, arch);
    // ids with no token: a count short of vocabSize means holes, named by id only when there are some
    const missingIds = tokenizer.idCount === tokenizer.vocabSize ? [] : holes(tokenizer);
    return { facts: { vocabSize: tokenizer.vocabSize, missingIds, problems: [] }, tokenizer };
  } catch (e) {
    const message = (e as Error).message;
    const file = message.startsWith(config) ? config : json;
    return { facts: { vocabSize: 0, missingIds: [], problems: [error({ code: 'corrupt_file', file, message: `${message}`, hint: 'Upload the tokenizer files that tokenizer.save_pretrained(dir) wrote.' })] }, tokenizer: null };
  }
}

function holes(t: HfTokenizer): number[] {
  const out: number[] = [];
  for (let id = 0; id < t.vocabSize && out.length < 8; id++) if (t.tokenOf(id) === undefined) out.push(id);
  return out;
}
