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
const PAIR_CACHE_MAX = 1 << 20;

/** Candidate merges: a binary max-heap over (score, then the leftmost position) in typed arrays. */
class PairHeap {
  private score: Float64Array;
  private left: Int32Array;
  private leftVersion: Uint32Array;
  private rightVersion: Uint32Array;
  private id: Int32Array;
  size = 0;

  constructor(capacity: number) {
    const c = Math.max(16, capacity);
    this.score = new Float64Array(c);
    this.left = new Int32Array(c);
    this.leftVersion = new Uint32Array(c);
    this.rightVersion = new Uint32Array(c);
    this.id = new Int32Array(c);
  }

  /** does entry a come out before entry b? */
  private before(a: number, b: number): boolean {
    const sa = this.score[a]!;
    const sb = this.score[b]!;
    return sa > sb || (sa === sb && this.left[a]! < this.left[b]!);
  }

  private swap(a: number, b: number): void {
    const s = this.score[a]!;
    this.score[a] = this.score[b]!;
    this.score[b] = s;
    const l = this.left[a]!;
    this.left[a] = this.left[b]!;
    this.left[b] = l;
    const lv = this.leftVersion[a]!;
    this.leftVersion[a] = this.leftVersion[b]!;
    this.leftVersion[b] = lv;
    const rv = this.rightVersion[a]!;
    this.rightVersion[a] = this.rightVersion[b]!;
    this.rightVersion[b] = rv;
    const id = this.id[a]!;
    this.id[a] = this.id[b]!;
    this.id[b] = id;
  }

  private grow(): void {
    const c = this.score.length * 2;
    const widen = <T extends Float64Array | Int32Array | Uint32Array>(a: T, make: (n: number) => T): T => {
      const b = make(c);
      b.set(a);
      return b;
    };
    this.score = widen(this.score, (k) => new Float64Array(k));
    this.left = widen(this.left, (k) => new Int32Array(k));
    this.leftVersion = widen(this.leftVersion, (k) => new Uint32Array(k));
    this.rightVersion = widen(this.rightVersion, (k) => new Uint32Array(k));
    this.id = widen(this.id, (k) => new Int32Array(k));
  }

  push(score: number, left: number, leftVersion: number, rightVersion: number, id: number): void {
    if (this.size === this.score.length) this.grow();
    let i = this.size++;
    this.score[i] = score;
    this.left[i] = left;
    this.leftVersion[i] = leftVersion;
    this.rightVersion[i] = rightVersion;
    this.id[i] = id;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (!this.before(i, p)) break;
      this.swap(i, p);
      i = p;
    }
  }

  pop(): { left: number; leftVersion: number; rightVersion: number; id: number } {
    const top = { left: this.left[0]!, leftVersion: this.leftVersion[0]!, rightVersion: this.rightVersion[0]!, id: this.id[0]! };
    const last = --this.size;
    if (last > 0) {
      this.swap(0, last);
      let i = 0;
      for (;;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < last && this.before(l, m)) m = l;
        if (r < last && this.before(r, m)) m = r;
        if (m === i) break;
        this.swap(i, m);
        i = m;
      }
    }
    return top;
  }
}

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
  /** merged ids of pairs seen so far; cleared when it grows past PAIR_CACHE_MAX (hostile prompts) */
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
      if (this.pairCache.size >= PAIR_CACHE_MAX) this.pairCache.clear();
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
    return this.mergeAll(tokens);
  }

  /**
   * A lower bound on `encode(text).length`, in time linear in the text: every piece covers at
   * most max_token_length bytes of the text (a byte-fallback piece `<0xNN>` covers one byte with
   * six; a merged piece covers no more than its parts), plus the dummy-prefix space. Lets a caller
   * refuse a prompt that cannot fit the context before paying for the merges.
   */
  minTokens(text: string, opts: { addBos?: boolean } = {}): number {
    const bytes = Buffer.byteLength(text, 'utf8');
    const bos = (opts.addBos ?? true) ? 1 : 0;
    return bos + (bytes === 0 ? 0 : Math.ceil((bytes + 1) / this.vocab.maxTokenLength));
  }

  /**
   * run.c's merge rule — repeatedly merge the adjacent pair whose merged string has the highest
   * score, the leftmost on ties — in O(n log n) instead of O(n²), the way SentencePiece's BPE
   * does it: the tokens are a linked list, the candidate pairs a heap ordered by (score desc,
   * position asc), and a candidate whose tokens changed since it was pushed is dropped when it
   * surfaces (each node's version counts its changes). Merging keeps the left node, so a node's
   * index is its position order and ties resolve exactly as the left-to-right scan did.
   * BOS takes part in pairs like any other token, as in run.c.
   */
  private mergeAll(tokens: number[]): number[] {
    const n = tokens.length;
    if (n < 2) return tokens;
    const tok = Int32Array.from(tokens);
    const next = new Int32Array(n);
    const prev = new Int32Array(n);
    const version = new Uint32Array(n);
    for (let i = 0; i < n; i++) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    const heap = new PairHeap(n);
    const push = (left: number): void => {
      const right = next[left]!;
      if (right === -1) return;
      const id = this.merged(tok[left]!, tok[right]!);
      if (id === -1) return;
      const score = this.vocab.scores[id]!;
      // run.c starts its best score at -1e10 and compares with `>`: such merges (and NaN) never happen
      if (!(score > -1e10)) return;
      heap.push(score, left, version[left]!, version[right]!, id);
    };
    for (let i = 0; i + 1 < n; i++) push(i);
    while (heap.size > 0) {
      const { left, leftVersion, rightVersion, id } = heap.pop();
      const right = next[left]!;
      if (right === -1 || version[left] !== leftVersion || version[right] !== rightVersion) continue;
      tok[left] = id;
      version[left]!++;
      // the right node leaves the list; its version moves on so pairs naming it go stale
      version[right]!++;
      const after = next[right]!;
      next[left] = after;
      if (after !== -1) prev[after] = left;
      if (prev[left] !== -1) push(prev[left]!);
      push(left);
    }
    const out: number[] = [];
    for (let i = 0; i !== -1; i = next[i]!) out.push(tok[i]!);
    return out;
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
