import type { Tokenizer } from '../tokenizer/types.js';

/** What the incremental decoder needs from a tokenizer. */
export type IdDecoder = Pick<Tokenizer, 'decode'>;

/**
 * Incremental detokenizer. Decoding token by token is wrong in two ways: byte-fallback tokens
 * carry parts of one UTF-8 character, and SentencePiece-style decoders drop the leading space of
 * the first token of a decode. So each step decodes a short window that starts a few tokens back
 * (the same scheme as Hugging Face TGI and vLLM) and emits only what is new; while the new text
 * ends in U+FFFD (a character still incomplete) it emits nothing and waits for the next token.
 *
 * `context` is the tail of the prompt: it gives the first generated token its left neighbour, so
 * its leading space survives. Its own text is never emitted.
 */
export class IncrementalDecoder {
  private readonly ids: number[];
  private prefixOffset = 0;
  private readOffset: number;

  constructor(
    private readonly tokenizer: IdDecoder,
    context: readonly number[] = [],
  ) {
    this.ids = context.slice(Math.max(0, context.length - CONTEXT_TOKENS));
    this.readOffset = this.ids.length;
  }

  /** Adds one token; returns the text that became final. */
  push(id: number): string {
    this.ids.push(id);
    return this.emit(false);
  }

  /** End of the stream: returns whatever was held back, incomplete character included. */
  flush(): string {
    return this.emit(true);
  }

  private emit(final: boolean): string {
    if (this.readOffset >= this.ids.length) return '';
    const prefix = this.tokenizer.decode(this.ids.slice(this.prefixOffset, this.readOffset));
    const full = this.tokenizer.decode(this.ids.slice(this.prefixOffset));
    // Nothing new yet (a decoder may merge the new token into the window's text), or the last
    // character is still incomplete: wait for the next token.
    if (full.length <= prefix.length) return '';
    if (!final && full.endsWith('\uFFFD')) return '';
    this.prefixOffset = this.readOffset;
    this.readOffset = this.ids.length;
    return full.slice(prefix.length);
  }
}

/** How many prompt tokens give enough left context for the first generated token. */
const CONTEXT_TOKENS = 6;
