import { readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { Template } from '@huggingface/jinja';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { architectureFromHfConfig } from '../src/model/checkpoint/hf-config.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { ModelInputError } from '../src/model/checkpoint/types.js';
import { embeddedModelFiles } from '../src/model/embedded.js';
import { loadTokenizer } from '../src/tokenizer/index.js';
import { HfTokenizer } from '../src/tokenizer/hf.js';
import { loadLlama2cTokenizer, parseLlama2cTokenizer, type Llama2cTokenizer, type Llama2cVocab } from '../src/tokenizer/llama2c.js';
import { PromptEncoder } from '../src/tokenizer/off-thread.js';
import type { Architecture } from '../src/model/architecture.js';
import { mulberry32 } from '../src/prng.js';
import { quadraticEncode } from './reference/llama2c-quadratic.js';
import { HAVE_STORIES, STORIES_BIN, TOK512_BIN, tempDir, warnIfMissing } from './helpers/model-io-files.js';

let root: string;
beforeAll(async () => {
  root = await tempDir('tokenizer');
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

/** tok512.bin read independently of the code under test: id → raw bytes */
async function rawVocab(): Promise<Buffer[]> {
  const b = await readFile(TOK512_BIN);
  const pieces: Buffer[] = [];
  let at = 4;
  for (let i = 0; i < 512; i++) {
    const len = b.readInt32LE(at + 4);
    pieces.push(b.subarray(at + 8, at + 8 + len));
    at += 8 + len;
  }
  return pieces;
}

describe.skipIf(!HAVE_STORIES)('llama2.c tokenizer (tok512.bin)', () => {
  warnIfMissing(HAVE_STORIES, 'the llama2.c tokenizer tests');
  let tok: Llama2cTokenizer;
  let vocab: Buffer[];
  beforeAll(async () => {
    tok = await loadLlama2cTokenizer(TOK512_BIN, 512);
    vocab = await rawVocab();
  });

  /** what run.c's merge loop guarantees when it stops: no adjacent pair concatenates to a token */
  function noMergeLeft(ids: number[]): boolean {
    const all = new Set(vocab.map((p) => p.toString('latin1')));
    for (let i = 0; i < ids.length - 1; i++) {
      if (all.has(Buffer.concat([vocab[ids[i]!]!, vocab[ids[i + 1]!]!]).toString('latin1'))) return false;
    }
    return true;
  }

  /** run.c's encode() transcribed literally (linear searches, no caching), as an independent reference */
  async function runCEncode(text: string): Promise<number[]> {
    const b = await readFile(TOK512_BIN);
    const scores: number[] = [];
    let at = 4;
    for (let i = 0; i < 512; i++) {
      scores.push(b.readFloatLE(at));
      at += 8 + b.readInt32LE(at + 4);
    }
    const lookup = (s: Buffer) => vocab.findIndex((p) => p.equals(s));
    const tokens: number[] = [1];
    const bytes = Buffer.from(text);
    if (bytes.length) tokens.push(lookup(Buffer.from(' ')));
    let buf: number[] = [];
    for (let c = 0; c < bytes.length; c++) {
      if ((bytes[c]! & 0xc0) !== 0x80) buf = [];
      buf.push(bytes[c]!);
      if (c + 1 < bytes.length && (bytes[c + 1]! & 0xc0) === 0x80 && buf.length < 4) continue;
      const id = lookup(Buffer.from(buf));
      if (id !== -1) tokens.push(id);
      else tokens.push(...buf.map((x) => x + 3));
      buf = [];
    }
    for (;;) {
      let best = -1e10;
      let bestId = -1;
      let bestIdx = -1;
      for (let i = 0; i < tokens.length - 1; i++) {
        const id = lookup(Buffer.concat([vocab[tokens[i]!]!, vocab[tokens[i + 1]!]!]));
        if (id !== -1 && scores[id]! > best) [best, bestId, bestIdx] = [scores[id]!, id, i];
      }
      if (bestIdx === -1) break;
      tokens.splice(bestIdx, 2, bestId);
    }
    return tokens;
  }

  it('matches a literal transcription of run.c encode()', async () => {
    for (const text of ['Once upon a time, there was a little girl named Lily.', 'The cat sat. "Hello!" said Tom.\nThe end', ' ', 'naïve 日本']) {
      expect(tok.encode(text), text).toEqual(await runCEncode(text));
    }
  });

  it('knows its size and special tokens', () => {
    expect(tok.vocabSize).toBe(512);
    expect(tok.bosId).toBe(1);
    expect(tok.eosIds).toEqual([2]);
    expect(tok.specialTokens).toEqual({ unk_token: vocab[0]!.toString(), bos_token: vocab[1]!.toString(), eos_token: vocab[2]!.toString() });
    expect(tok.chatTemplate).toBeNull();
  });

  it('round-trips a TinyStories sentence and encodes it as run.c would', () => {
    const text = 'Once upon a time, there was a little girl named Lily.';
    const ids = tok.encode(text);
    expect(ids[0]).toBe(1);
    // the pieces spell the dummy-prefixed text, and no further merge applies
    expect(Buffer.concat(ids.slice(1).map((i) => vocab[i]!)).toString()).toBe(' ' + text);
    expect(noMergeLeft(ids.slice(1))).toBe(true);
    expect(ids.length).toBeLessThan(text.length / 2); // merges really happened
    expect(tok.decode(ids)).toBe(text); // the space after BOS is stripped, as run.c does
    expect(tok.encode(text, { addBos: false })).toEqual(ids.slice(1));
    expect(tok.decode(ids.slice(1))).toBe(' ' + text);
  });

  it('encodes " " and "" as run.c does', () => {
    const ids = tok.encode(' ');
    expect(ids[0]).toBe(1);
    expect(Buffer.concat(ids.slice(1).map((i) => vocab[i]!)).toString()).toBe('  ');
    expect(noMergeLeft(ids.slice(1))).toBe(true);
    expect(tok.decode(ids)).toBe(' ');
    expect(tok.encode('')).toEqual([1]); // no dummy prefix for empty text
    expect(tok.encode('', { addBos: false })).toEqual([]);
    expect(tok.decode([])).toBe('');
  });

  it('falls back to bytes (byte + 3) for characters outside the vocab, and decodes them back', () => {
    const text = 'Lily saw 日本 🎉 and é!';
    const ids = tok.encode(text, { addBos: false });
    for (const ch of ['日', '本', '🎉']) {
      const bytes = [...Buffer.from(ch, 'utf8')].map((b) => b + 3);
      const at = ids.findIndex((_, i) => bytes.every((b, k) => ids[i + k] === b));
      expect(at, ch).toBeGreaterThanOrEqual(0);
      expect(vocab[bytes[0]!]!.toString()).toMatch(/^<0x[0-9A-F]{2}>$/);
    }
    expect(tok.decode([1, ...ids])).toBe(text);
  });

  it('decodes half a character to U+FFFD instead of throwing', () => {
    const ids = tok.encode('日', { addBos: false }); // dummy space, then 3 byte tokens
    const bytes = ids.slice(-3);
    expect(tok.decode(bytes.slice(0, 2)).endsWith('\uFFFD')).toBe(true);
    expect(tok.decode(bytes)).toBe('日');
  });

  it('is what a llama2.c checkpoint hands to loadTokenizer', async () => {
    const tokPath = join(root, 'tokenizer.bin');
    const binPath = join(root, 'model.bin');
    await writeFile(tokPath, await readFile(TOK512_BIN));
    await writeFile(binPath, await readFile(STORIES_BIN));
    const ck = await openCheckpoint(binPath);
    expect(ck.sourceFiles).toEqual([binPath, tokPath]);
    const t = await loadTokenizer(ck.tokenizer!, ck.architecture);
    expect(t.encode('Hello')).toEqual(tok.encode('Hello'));
  });

  it('refuses a truncated tokenizer.bin or one with more tokens than the model', async () => {
    const bytes = await readFile(TOK512_BIN);
    const cut = join(root, 'cut.bin');
    await writeFile(cut, bytes.subarray(0, 3000));
    const e1 = await loadLlama2cTokenizer(cut, 512).catch((e: unknown) => e);
    expect(e1).toBeInstanceOf(ModelInputError);
    expect((e1 as Error).message).toContain(cut);
    expect((e1 as Error).message).toContain('truncated');
    const e2 = await loadLlama2cTokenizer(TOK512_BIN, 500).catch((e: unknown) => e);
    expect(e2).toBeInstanceOf(ModelInputError);
  });
});

describe('Hugging Face tokenizer (the embedded model tokenizer.json)', () => {
  const files = embeddedModelFiles();
  const tokenizerJson = files.get('tokenizer.json')!.toString();
  const configJson = files.get('tokenizer_config.json')!.toString();
  const arch = architectureFromHfConfig(JSON.parse(files.get('config.json')!.toString()), 'config.json');
  const tj = JSON.parse(tokenizerJson) as { model: { vocab: Record<string, number>; merges: string[] }; added_tokens: { id: number; content: string }[] };
  const idOf = (s: string) => tj.model.vocab[s] ?? tj.added_tokens.find((t) => t.content === s)!.id;

  it('loads, with BOS/EOS and the chat template from the config files', async () => {
    const tok = await loadTokenizer({ kind: 'hf', tokenizerJson, tokenizerConfigJson: configJson }, arch);
    expect(tok.vocabSize).toBe(arch.vocabSize);
    expect(tok.bosId).toBe(idOf('<|begin_of_text|>'));
    expect(tok.eosIds).toEqual(expect.arrayContaining([idOf('<|end_of_text|>'), idOf('<|eot_id|>')]));
    expect(tok.specialTokens).toMatchObject({ bos_token: '<|begin_of_text|>', eos_token: '<|end_of_text|>' });
    expect(tok.chatTemplate).toContain('add_generation_prompt');
  });

  it('round-trips text, with BOS from the post-processor', () => {
    const tok = new HfTokenizer(tokenizerJson, configJson, arch);
    for (const text of ['Once upon a time, there was a little girl named Lily.', ' two  spaces\nand lines\n\n', 'unicode: héllo 日本 🎉', "It's 2024, isn't it?"]) {
      const ids = tok.encode(text);
      expect(ids[0]).toBe(tok.bosId);
      expect(ids.filter((i) => i === tok.bosId)).toHaveLength(1);
      expect(tok.decode(ids)).toBe(text);
      expect(tok.encode(text, { addBos: false })).toEqual(ids.slice(1));
    }
    expect(tok.decode([])).toBe('');
  });

  it('applies the learned merges as BPE does (lowest rank first)', () => {
    const tok = new HfTokenizer(tokenizerJson, configJson, arch);
    const rank = new Map(tj.model.merges.map((m, i) => [m, i]));
    // reference BPE over one pre-tokenized word, written out here
    const bpe = (word: string[]): string[] => {
      for (;;) {
        let best = -1;
        let bestRank = Infinity;
        for (let i = 0; i < word.length - 1; i++) {
          const r = rank.get(`${word[i]} ${word[i + 1]}`);
          if (r !== undefined && r < bestRank) [best, bestRank] = [i, r];
        }
        if (best < 0) return word;
        word = [...word.slice(0, best), word[best]! + word[best + 1]!, ...word.slice(best + 2)];
      }
    };
    const byId = new Map(Object.entries(tj.model.vocab).map(([s, i]) => [i, s]));
    const gCharOf = (b: number) => byId.get(b)!; // ids 0..255 are the byte tokens in byte order
    for (const word of [' the', ' little', 'Lily', ' Assistant', ' wonderful']) {
      const chars = [...Buffer.from(word)].map(gCharOf);
      expect(tok.encode(word, { addBos: false }), word).toEqual(bpe(chars).map((s) => tj.model.vocab[s]));
    }
    expect(tok.encode(' the', { addBos: false })).toHaveLength(1);
  });

  it('keeps special tokens whole in a rendered chat template and leaves them out of decode', () => {
    const tok = new HfTokenizer(tokenizerJson, configJson, arch);
    const prompt = new Template(tok.chatTemplate!).render({ messages: [{ role: 'user', content: 'Hi there' }], add_generation_prompt: true, ...tok.specialTokens });
    expect(prompt.startsWith('<|begin_of_text|><|start_header_id|>user<|end_header_id|>')).toBe(true);
    expect(prompt.endsWith('<|start_header_id|>assistant<|end_header_id|>\n\n')).toBe(true);
    const ids = tok.encode(prompt, { addBos: false });
    expect(ids[0]).toBe(tok.bosId);
    expect(ids.filter((i) => i === idOf('<|start_header_id|>'))).toHaveLength(2);
    expect(ids).toContain(idOf('<|eot_id|>'));
    expect(tok.decode(ids)).toBe('user\n\nHi thereassistant\n\n');
  });

  it('decodes half a character to U+FFFD instead of throwing', () => {
    const tok = new HfTokenizer(tokenizerJson, configJson, arch);
    const ids = tok.encode('日', { addBos: false });
    expect(ids).toHaveLength(3); // three byte tokens: no merge covers it
    expect(tok.decode(ids.slice(0, 2))).toBe('\uFFFD');
  });

  it('honours add_bos_token from tokenizer_config', () => {
    const cfg = JSON.parse(configJson) as Record<string, unknown>;
    const off = new HfTokenizer(tokenizerJson, JSON.stringify({ ...cfg, add_bos_token: false }), arch);
    expect(off.encode('hi')[0]).not.toBe(off.bosId);
    // no post-processor, but add_bos_token: true → BOS is still added, once
    const noPost = JSON.stringify({ ...JSON.parse(tokenizerJson), post_processor: null });
    const on = new HfTokenizer(noPost, JSON.stringify({ ...cfg, add_bos_token: true }), arch);
    expect(on.encode('hi')[0]).toBe(on.bosId);
    const plain = new HfTokenizer(noPost, configJson, arch);
    expect(plain.encode('hi')[0]).not.toBe(plain.bosId);
    // Qwen2 style: bos_token null in tokenizer_config wins over config.json's bos_token_id
    const qwenLike = new HfTokenizer(noPost, JSON.stringify({ ...cfg, bos_token: null }), arch);
    expect(qwenLike.bosId).toBeNull();
    expect(qwenLike.encode('hi')).toEqual(plain.encode('hi'));
  });

  it('refuses a tokenizer larger than the model vocab, and broken JSON', async () => {
    const small = { ...arch, vocabSize: 300 };
    await expect(loadTokenizer({ kind: 'hf', tokenizerJson, tokenizerConfigJson: configJson }, small)).rejects.toBeInstanceOf(ModelInputError);
    expect(() => new HfTokenizer('{', null, arch)).toThrow(ModelInputError);
  });
});

describe.skipIf(!HAVE_STORIES)('llama2.c merges in O(n log n), equal to the quadratic loop', () => {
  warnIfMissing(HAVE_STORIES, 'the llama2.c merge-equality tests');
  let tok: Llama2cTokenizer;
  let vocab: Llama2cVocab;
  beforeAll(async () => {
    tok = await loadLlama2cTokenizer(TOK512_BIN, 512);
    vocab = parseLlama2cTokenizer(await readFile(TOK512_BIN), 512, TOK512_BIN);
  });
  const STORY = 'Once upon a time, there was a little girl named Lily. She loved to play outside in the sunshine. One day, she saw a big, red ball in the park. "Can I play?" she asked.\n';

  /** texts mixing vocab pieces, single characters, runs (many equal-score ties) and non-ASCII */
  function randomText(rand: () => number, length: number): string {
    const chars = ['a', 'e', ' ', '  ', '\n', '.', ',', '"', 'é', '日', '🎉', 'the', 'ing', 'aaaa', '    '];
    let s = '';
    while (s.length < length) {
      const r = rand();
      if (r < 0.5) s += vocab.pieces[3 + 256 + Math.floor(rand() * (512 - 259))]!.replace(/^<0x..>$/, '');
      else if (r < 0.9) s += chars[Math.floor(rand() * chars.length)]!;
      else s += String.fromCodePoint(32 + Math.floor(rand() * 0x3000));
    }
    return s;
  }

  it('gives exactly the ids of the quadratic loop on random and real text', () => {
    const rand = mulberry32(11);
    const texts = [STORY.repeat(10), 'a'.repeat(1000), ' '.repeat(600), 'ab'.repeat(400), '日本語'.repeat(200)];
    for (let i = 0; i < 30; i++) texts.push(randomText(rand, 1 + Math.floor(rand() * 1500)));
    for (const text of texts) {
      for (const addBos of [true, false]) {
        expect(tok.encode(text, { addBos }), text.slice(0, 40)).toEqual(quadraticEncode(text, vocab.pieces, vocab.scores, addBos));
      }
    }
  });

  it('encodes a 1 MB prompt (the quadratic loop took 28 s for 64 KB), and its linear bound holds', () => {
    const text = STORY.repeat(Math.ceil((1 << 20) / STORY.length));
    const ids = tok.encode(text);
    expect(ids.length).toBeGreaterThan(100_000);
    expect(tok.decode(ids)).toBe(text);
    expect(tok.minTokens(text)).toBeLessThanOrEqual(ids.length);
    const rand = mulberry32(5);
    for (let i = 0; i < 30; i++) {
      const t = randomText(rand, Math.floor(rand() * 2000));
      for (const addBos of [true, false]) expect(tok.minTokens(t, { addBos })).toBeLessThanOrEqual(tok.encode(t, { addBos }).length);
    }
  }, 120_000);

  it('encodes long prompts in the tokenizer thread to the same ids', async () => {
    const text = STORY.repeat(200) + randomText(mulberry32(3), 5000);
    const source = { kind: 'llama2c' as const, path: TOK512_BIN };
    const arch = { vocabSize: 512 } as Architecture;
    const prompts = new PromptEncoder(tok, source, arch, 64);
    try {
      const [a, b] = await Promise.all([prompts.encode(text), prompts.encode(text.slice(7), { addBos: false })]);
      expect(a).toEqual(tok.encode(text));
      expect(b).toEqual(tok.encode(text.slice(7), { addBos: false }));
      expect(prompts.minTokens(text)).toBe(tok.minTokens(text));
    } finally {
      await prompts.close();
    }
  }, 60_000);
});

describe('Hugging Face prompts in the tokenizer thread', () => {
  it('give the same ids as inline encoding', async () => {
    const files = embeddedModelFiles();
    const tokenizerJson = files.get('tokenizer.json')!.toString();
    const configJson = files.get('tokenizer_config.json')!.toString();
    const arch = architectureFromHfConfig(JSON.parse(files.get('config.json')!.toString()), 'config.json');
    const tok = new HfTokenizer(tokenizerJson, configJson, arch);
    const prompts = new PromptEncoder(tok, { kind: 'hf', tokenizerJson, tokenizerConfigJson: configJson }, arch, 64);
    try {
      const text = 'Hello there, little robot. 日本 🎉\n'.repeat(500);
      expect(await prompts.encode(text)).toEqual(tok.encode(text));
      expect(await prompts.encode(text, { addBos: false })).toEqual(tok.encode(text, { addBos: false }));
    } finally {
      await prompts.close();
    }
  }, 60_000);
});
