import type { Architecture } from '../model/architecture.js';
import { ModelInputError, type TokenizerSource } from '../model/checkpoint/types.js';
import { HfTokenizer } from './hf.js';
import { loadLlama2cTokenizer } from './llama2c.js';
import type { Tokenizer } from './types.js';

export type { Tokenizer } from './types.js';

/** The checkpoint's tokenizer; refuses one that can produce ids the model has no embedding for. */
export async function loadTokenizer(source: TokenizerSource, arch: Architecture): Promise<Tokenizer> {
  const tokenizer = source.kind === 'hf' ? new HfTokenizer(source.tokenizerJson, source.tokenizerConfigJson, arch) : await loadLlama2cTokenizer(source.path, arch.vocabSize);
  const file = source.kind === 'hf' ? 'tokenizer.json' : source.path;
  if (tokenizer.vocabSize > arch.vocabSize) {
    throw new ModelInputError(file, `the tokenizer has ${tokenizer.vocabSize} tokens but the model's vocab_size is ${arch.vocabSize}: it is not this model's tokenizer.`);
  }
  return tokenizer;
}
