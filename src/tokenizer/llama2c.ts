import { readFile } from 'node:fs/promises';
import { ModelInputError } from '../model/checkpoint/types.js';
import type { Tokenizer } from './types.js';

/**
 * llama2.c `tokenizer.bin`: int32 max_token_length, then per token float32 score, int32 byte
 * length, bytes. No library reads it, so this follows llama2.c `run.c` (encode/decode) exactly.
 * Token strings are raw bytes; they are held as latin1 strings (one char per byte) so that byte
 * pieces that are not valid UTF-8 on their own still compare and concatenate exactly.
 */

const UNK = 0;
const BOS = 1;
const EOS = 2;
const BYTE_PIECE = /^<0x([0-9A-Fa-f]{2})>/;

export interface Llama2cVocab {
  maxTokenLength: number;
  pieces: string[];
  scores: Float32Array;
}

/** Pure: parses the file's bytes; the token count comes from the model (llama2.c does the same). */
export function parseLlama2cTokenizer(bytes: Uint8Array, vocabSize: number, file: string): Llama2cVocab {
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const need = (at: number, n: number, what: string): void => {
    if (at + n > bytes.byteLength) {
      throw new ModelInputError(file, `truncated: ${what} needs bytes ${at}..${at + n} but the file has ${bytes.byteLength}; is this the tokenizer of a model with vocab_size ${vocabSize}?`);
    }
  };
  need(0, 4, 'max_token_length');
  const maxTokenLength = dv.getInt32(0, true);
  if (maxTokenLength <= 0 || maxTokenLength > 1 << 16) throw new ModelInputError(file, `max_token_length ${maxTokenLength} is not plausible: not a llama2.c tokenizer.bin.`);
  const pieces: string[] = new Array(vocabSize);
  const scores = new Float32Array(vocabSize);
  let at = 4;
  for (let i = 0; i < vocabSize; i++) {
    need(at, 8, `token ${i}'s score and length`);
    scores[i] = dv.getFloat32(at, true);
    const len = dv.getInt32(at + 4, true);
    at += 8;
    if (len < 0 || len > maxTokenLength) throw new ModelInputError(file, `token ${i} has length ${len}, outside 0..max_token_length ${maxTokenLength}.`);
    need(at, len, `token ${i}'s bytes`);
    pieces[i] = Buffer.from(bytes.buffer, bytes.byteOffset + at, len).toString('latin1');
    at += len;
  }
  if (at !== bytes.byteLength) {
    throw new ModelInputError(file, `holds ${bytes.byteLength - at} bytes after token ${vocabSize - 1}: it has more tokens than the model's vocab_size ${vocabSize}, so it is not this model's tokenizer.`);
  }
  return { maxTokenLength, pieces, scores };
}

export class Llama2cTokenizer implements Tokenizer {
  readonly bosId = BOS;
  readonly eosIds = [EOS];
  readonly chatTemplate = null;
  readonly specialTokens: Record<string, string>;
  readonly vocabSize: number;
  private readonly lookup = new Map<string, number>();
  private readonly pairCache = new Map<number, number>();

  constructor(private readonly vocab: Llama2cVocab) {
    this.vocabSize = vocab.pieces.length;
    // run.c binary-searches a sorted copy; with duplicate strings the first id is as good as any
    vocab.pieces.forEach((p, i) => {
      if (!this.lookup.has(p)) this.lookup.set(p, i);
    });
    const latin = (i: number) => Buffer.from(vocab.pieces[i] ?? '', 'latin1').toString('utf8');
    this.specialTokens = { unk_token: latin(UNK), bos_token: latin(BOS), eos_token: latin(EOS) };
  }

  /** id of the vocab string equal to pieces[a] + pieces[b], or -1; memoised per pair */
  private merged(a: number, b: number): number {
    const key = a * this.vocabSize + b;
    let id = this.pairCache.get(key);
    if (id === undefined) {
      id = this.lookup.get(this.vocab.pieces[a]! + this.vocab.pieces[b]!) ?? -1;
      this.pairCache.set(key, id);
    }
    return id;
  }

  encode(text: string, opts: { addBos?: boolean } = {}): number[] {
    const tokens: number[] = [];
    if (opts.addBos ?? true) tokens.push(BOS);
    const bytes = Buffer.from(text, 'utf8');
    if (bytes.byteLength > 0) {
      // sentencepiece's dummy prefix: a space before non-empty text
      const space = this.lookup.get(' ');
      tokens.push(space ?? 0x20 + 3);
    }
    // group each UTF-8 lead byte with its continuation bytes (at most 4), as run.c does
    for (let i = 0; i < bytes.byteLength; ) {
      let j = i + 1;
      while (j < bytes.byteLength && (bytes[j]! & 0xc0) === 0x80 && j - i < 4) j++;
      const piece = bytes.subarray(i, j).toString('latin1');
      const id = this.lookup.get(piece);
      if (id !== undefined) tokens.push(id);
      else for (let k = i; k < j; k++) tokens.push(bytes[k]! + 3);
      i = j;
    }
    // greedily merge the adjacent pair whose merged string has the highest score (first on ties)
    for (;;) {
      let bestScore = -1e10;
      let bestId = -1;
      let bestIdx = -1;
      for (let i = 0; i < tokens.length - 1; i++) {
        const id = this.merged(tokens[i]!, tokens[i + 1]!);
        if (id !== -1 && this.vocab.scores[id]! > bestScore) {
          bestScore = this.vocab.scores[id]!;
          bestId = id;
          bestIdx = i;
        }
      }
      if (bestIdx === -1) break;
      tokens.splice(bestIdx, 2, bestId);
    }
    return tokens;
  }

  decode(ids: readonly number[]): string {
    const out: number[] = [];
    let prev = -1;
    for (const id of ids) {
      if (!Number.isInteger(id) || id < 0 || id >= this.vocabSize) throw new RangeError(`token id ${id} is outside the vocabulary (0..${this.vocabSize - 1})`);
      if (id === UNK || id === BOS || id === EOS) {
        prev = id;
        continue;
      }
      let piece = this.vocab.pieces[id]!;
      // run.c: after BOS, sentencepiece strips the leading whitespace of the first piece
      if (prev === BOS && piece.startsWith(' ')) piece = piece.slice(1);
      const byte = BYTE_PIECE.exec(piece);
      if (byte) out.push(parseInt(byte[1]!, 16));
      else for (let k = 0; k < piece.length; k++) out.push(piece.charCodeAt(k));
      prev = id;
    }
    // non-fatal: an incomplete multi-byte sequence at the end becomes U+FFFD
    return new TextDecoder('utf-8').decode(Uint8Array.from(out));
  }
}

export async function loadLlama2cTokenizer(path: string, vocabSize: number): Promise<Llama2cTokenizer> {
  let bytes: Buffer;
  try {
    bytes = await readFile(path);
  } catch (e) {
    throw new ModelInputError(path, `cannot read the llama2.c tokenizer (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}); set TOKENIZER_PATH or put tokenizer.bin beside the checkpoint.`);
  }
  return new Llama2cTokenizer(parseLlama2cTokenizer(bytes, vocabSize, path));
}
