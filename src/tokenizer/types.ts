/**
 * What the engine and the HTTP layer need from a tokenizer, whatever file it came from.
 * `encode` with `addBos` (default true) adds what the model expects at the start of a prompt
 * (BOS, as the tokenizer's post-processor / add_bos_token says); pass false for text that already
 * carries its special tokens (a rendered chat template). `decode` leaves out special tokens and
 * never throws on a partial UTF-8 sequence: it ends in U+FFFD instead, which the streaming layer
 * uses to hold back incomplete characters.
 */
export interface Tokenizer {
  encode(text: string, opts?: { addBos?: boolean }): number[];
  decode(ids: readonly number[]): string;
  /**
   * A lower bound on `encode(text, opts).length`, computed in time linear in the text, for
   * refusing a prompt that cannot fit the context before encoding it; absent when none is cheap.
   */
  minTokens?(text: string, opts?: { addBos?: boolean }): number;
  readonly bosId: number | null;
  readonly eosIds: number[];
  /** number of ids the tokenizer can produce (≤ the model's vocab size) */
  readonly vocabSize: number;
  readonly chatTemplate: string | null;
  /** bos_token, eos_token, … as strings, for chat templates */
  readonly specialTokens: Record<string, string>;
}
