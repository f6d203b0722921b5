import { randomBytes } from 'node:crypto';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import { basename, dirname, join, resolve } from 'node:path';
import { encodeSafetensors, type TensorToWrite } from '../adapters/safetensors.js';
import { writeFileDurably } from '../durable-fs.js';
import { mulberry32 } from '../prng.js';

/**
 * The embedded default model: a small, deterministic-random Llama written as a Hugging Face
 * folder, so a fresh machine serves something with no download. Its weights are noise (the text
 * it generates is gibberish), but every format on the path is the real one: config.json,
 * model.safetensors, a byte-level BPE tokenizer.json that @huggingface/tokenizers (and Python
 * `tokenizers`) load, and a tokenizer_config.json with a chat template.
 *
 * Determinism: everything below is integer arithmetic (mulberry32, Math.imul) or IEEE
 * add/multiply, rounded to float32; no Math.log/sin (whose last bit may differ between engines),
 * no Map/Set iteration over unordered data, no clock. The same bytes on every run and machine.
 */

export const EMBEDDED_MODEL_VERSION = 1;
export const EMBEDDED_MODEL_FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json'] as const;

const SEED = 0x10ad5e7e;
const DIMS = {
  hidden: 64,
  intermediate: 172,
  layers: 4,
  heads: 8,
  kvHeads: 4,
  headDim: 8,
  maxPositions: 512,
  std: 0.05,
} as const;

const BOS = '<|begin_of_text|>';
const EOS = '<|end_of_text|>';
const SPECIAL_TOKENS = [BOS, EOS, '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>'] as const;
/** 256 byte tokens + learned merges + the special tokens = 512 */
const VOCAB_SIZE = 512;
const BASE_VOCAB = VOCAB_SIZE - SPECIAL_TOKENS.length;

const CHAT_TEMPLATE =
  "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>{% endfor %}" +
  '{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}';

/** What the BPE merges are learned from: plain English, a little chat, digits and punctuation. */
const CORPUS = `Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.
One day, the sun was warm and the sky was blue. Lily saw a big red ball under a tree. She ran to the ball and
picked it up. "Look, Mom! I found a ball!" she said. Her mother smiled and said, "That is a nice ball. Do you
want to play with it?" Lily nodded and threw the ball to her dog. The dog jumped and caught it in the air.
They played together all afternoon, and when the stars came out, they went home to eat dinner.

The next morning, Tom came to visit. Tom was a happy boy who loved trees, birds and boats. He had a small
wooden boat that his father made for him. "Can we go to the pond?" Tom asked. "Yes, let's go!" said Lily.
At the pond, the water was still and clear. They put the boat on the water and watched it float away. A
little bird sat on the boat and sang a song. The children laughed. When the wind blew, the boat came back
to the shore, and the bird flew up into the tree. It was the best day of the summer.

User: Hello! How are you today?
Assistant: I am fine, thank you. How can I help you?
User: Please tell me a short story about a cat and a dog.
Assistant: Sure. There was a cat who lived in a house with a dog. At first they did not like each other,
but one day the dog helped the cat get down from a tall tree. After that, they were friends for the rest of
their lives. The end.
User: What is 12 + 30?
Assistant: 12 + 30 is 42.
User: What time is it in the story?
Assistant: It is the evening, and the children are going to sleep.

In the beginning there were only numbers: 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 100, 2024 and 1000000. People
counted sheep, stars and the days of the year. They wrote what they learned in books, and the books were
kept in a library, where anyone could read them. Reading is a good way to learn new things; writing is a
good way to remember them. The teacher said: "Every day, read one page and write one line."
The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore. It's a nice day, isn't
it? We'll see what they've done, and I'd like to know what you're thinking.
`;

/** GPT-2's reversible byte → printable-unicode table (what the ByteLevel pre-tokenizer uses) */
function bytesToUnicode(): string[] {
  const bs: number[] = [];
  for (let b = 33; b <= 126; b++) bs.push(b);
  for (let b = 161; b <= 172; b++) bs.push(b);
  for (let b = 174; b <= 255; b++) bs.push(b);
  const cs = [...bs];
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bs.includes(b)) {
      bs.push(b);
      cs.push(256 + n++);
    }
  }
  const table: string[] = new Array(256);
  bs.forEach((b, i) => (table[b] = String.fromCodePoint(cs[i]!)));
  return table;
}

/** the same pattern as the ByteLevel pre-tokenizer (use_regex: true) */
const PRE_TOKENIZE = /'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+/gu;

/**
 * A tiny BPE trainer: count pre-tokenized words, then repeatedly merge the most frequent adjacent
 * pair (ties: the lexicographically smallest pair) until the vocab has `vocabSize` tokens.
 */
export function trainByteLevelBpe(corpus: string, vocabSize: number): { vocab: string[]; merges: [string, string][] } {
  const byteChar = bytesToUnicode();
  const enc = new TextEncoder();
  const counts = new Map<string, number>();
  for (const w of corpus.match(PRE_TOKENIZE) ?? []) {
    const mapped = Array.from(enc.encode(w), (b) => byteChar[b]!).join('');
    counts.set(mapped, (counts.get(mapped) ?? 0) + 1);
  }
  // fixed order, independent of Map insertion details
  const words = [...counts.entries()].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0)).map(([w, c]) => ({ symbols: Array.from(w), count: c }));
  const vocab = [...byteChar];
  const known = new Set(vocab);
  const merges: [string, string][] = [];
  while (vocab.length < vocabSize) {
    const pairs = new Map<string, { a: string; b: string; n: number }>();
    for (const { symbols, count } of words) {
      for (let i = 0; i < symbols.length - 1; i++) {
        const key = symbols[i]! + '\u0000' + symbols[i + 1]!;
        const p = pairs.get(key);
        if (p) p.n += count;
        else pairs.set(key, { a: symbols[i]!, b: symbols[i + 1]!, n: count });
      }
    }
    let best: { a: string; b: string; n: number } | null = null;
    for (const p of pairs.values()) {
      if (!best || p.n > best.n || (p.n === best.n && (p.a < best.a || (p.a === best.a && p.b < best.b)))) best = p;
    }
    if (!best) throw new Error(`the BPE corpus is too small for a vocab of ${vocabSize}`);
    const { a, b } = best;
    merges.push([a, b]);
    const merged = a + b;
    if (!known.has(merged)) {
      known.add(merged);
      vocab.push(merged);
    }
    for (const w of words) {
      const out: string[] = [];
      for (let i = 0; i < w.symbols.length; i++) {
        if (i < w.symbols.length - 1 && w.symbols[i] === a && w.symbols[i + 1] === b) {
          out.push(merged);
          i++;
        } else out.push(w.symbols[i]!);
      }
      w.symbols = out;
    }
  }
  return { vocab, merges };
}

function tokenizerJson(vocab: string[], merges: [string, string][]): string {
  const added = SPECIAL_TOKENS.map((content, i) => ({ id: BASE_VOCAB + i, content, single_word: false, lstrip: false, rstrip: false, normalized: false, special: true }));
  const bosId = BASE_VOCAB;
  const json = {
    version: '1.0',
    truncation: null,
    padding: null,
    added_tokens: added,
    normalizer: null,
    pre_tokenizer: { type: 'ByteLevel', add_prefix_space: false, trim_offsets: true, use_regex: true },
    post_processor: {
      type: 'TemplateProcessing',
      single: [{ SpecialToken: { id: BOS, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }],
      pair: [{ SpecialToken: { id: BOS, type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }, { SpecialToken: { id: BOS, type_id: 1 } }, { Sequence: { id: 'B', type_id: 1 } }],
      special_tokens: { [BOS]: { id: BOS, ids: [bosId], tokens: [BOS] } },
    },
    decoder: { type: 'ByteLevel', add_prefix_space: true, trim_offsets: true, use_regex: true },
    model: {
      type: 'BPE',
      dropout: null,
      unk_token: null,
      continuing_subword_prefix: null,
      end_of_word_suffix: null,
      fuse_unk: false,
      byte_fallback: false,
      ignore_merges: false,
      vocab: Object.fromEntries(vocab.map((t, i) => [t, i])),
      // "a b" strings: byte-level symbols never hold a space, and every tokenizers version reads this form
      merges: merges.map(([a, b]) => `${a} ${b}`),
    },
  };
  return JSON.stringify(json, null, 1) + '\n';
}

function tokenizerConfigJson(): string {
  const decoder = Object.fromEntries(
    SPECIAL_TOKENS.map((content, i) => [String(BASE_VOCAB + i), { content, lstrip: false, normalized: false, rstrip: false, single_word: false, special: true }]),
  );
  const json = {
    added_tokens_decoder: decoder,
    bos_token: BOS,
    eos_token: EOS,
    chat_template: CHAT_TEMPLATE,
    clean_up_tokenization_spaces: false,
    model_input_names: ['input_ids', 'attention_mask'],
    model_max_length: DIMS.maxPositions,
    tokenizer_class: 'PreTrainedTokenizerFast',
  };
  return JSON.stringify(json, null, 2) + '\n';
}

function configJson(): string {
  const json = {
    architectures: ['LlamaForCausalLM'],
    model_type: 'llama',
    hidden_size: DIMS.hidden,
    intermediate_size: DIMS.intermediate,
    num_hidden_layers: DIMS.layers,
    num_attention_heads: DIMS.heads,
    num_key_value_heads: DIMS.kvHeads,
    head_dim: DIMS.headDim,
    vocab_size: VOCAB_SIZE,
    max_position_embeddings: DIMS.maxPositions,
    rms_norm_eps: 1e-5,
    rope_theta: 10000,
    rope_scaling: null,
    hidden_act: 'silu',
    attention_bias: false,
    attention_dropout: 0,
    mlp_bias: false,
    tie_word_embeddings: false,
    initializer_range: DIMS.std,
    bos_token_id: BASE_VOCAB,
    // <|end_of_text|> and <|eot_id|>: a chat turn ends with the latter
    eos_token_id: [BASE_VOCAB + 1, BASE_VOCAB + 4],
    torch_dtype: 'float32',
    loraserve_embedded: { version: EMBEDDED_MODEL_VERSION, seed: SEED, note: 'deterministic random weights; output is gibberish' },
  };
  return JSON.stringify(json, null, 2) + '\n';
}

/**
 * Irwin–Hall: the sum of 12 uniforms minus 6 has mean 0 and variance 1, is close to normal, and
 * needs only additions (Box–Muller would need log and cos).
 */
function normals(rand: () => number, n: number, std: number): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) {
    let s = 0;
    for (let k = 0; k < 12; k++) s += rand();
    out[i] = (s - 6) * std;
  }
  return out;
}

function weights(): TensorToWrite[] {
  const rand = mulberry32(SEED);
  const { hidden: h, intermediate: f, layers, heads, kvHeads, headDim, std } = DIMS;
  const t = (name: string, shape: number[]): TensorToWrite => ({ name, dtype: 'F32', shape, data: normals(rand, shape.reduce((a, b) => a * b, 1), std) });
  const ones = (name: string, n: number): TensorToWrite => ({ name, dtype: 'F32', shape: [n], data: new Float32Array(n).fill(1) });
  const out: TensorToWrite[] = [t('model.embed_tokens.weight', [VOCAB_SIZE, h])];
  for (let i = 0; i < layers; i++) {
    const p = `model.layers.${i}`;
    out.push(
      ones(`${p}.input_layernorm.weight`, h),
      t(`${p}.self_attn.q_proj.weight`, [heads * headDim, h]),
      t(`${p}.self_attn.k_proj.weight`, [kvHeads * headDim, h]),
      t(`${p}.self_attn.v_proj.weight`, [kvHeads * headDim, h]),
      t(`${p}.self_attn.o_proj.weight`, [h, heads * headDim]),
      ones(`${p}.post_attention_layernorm.weight`, h),
      t(`${p}.mlp.gate_proj.weight`, [f, h]),
      t(`${p}.mlp.up_proj.weight`, [f, h]),
      t(`${p}.mlp.down_proj.weight`, [h, f]),
    );
  }
  out.push(ones('model.norm.weight', h), t('lm_head.weight', [VOCAB_SIZE, h]));
  return out;
}

/** Pure: file name → bytes of the embedded model. */
export function embeddedModelFiles(): Map<string, Buffer> {
  const { vocab, merges } = trainByteLevelBpe(CORPUS, BASE_VOCAB);
  return new Map<string, Buffer>([
    ['config.json', Buffer.from(configJson())],
    ['model.safetensors', encodeSafetensors(weights(), { format: 'pt', loraserve_embedded: String(EMBEDDED_MODEL_VERSION) })],
    ['tokenizer.json', Buffer.from(tokenizerJson(vocab, merges))],
    ['tokenizer_config.json', Buffer.from(tokenizerConfigJson())],
  ]);
}

/**
 * Writes (or overwrites) the embedded model's files in `dir`, each through a temp file and a
 * rename, so a reader never sees half a file. Other files in `dir` (e.g. a graph cache) are kept.
 */
export async function writeEmbeddedModel(dir: string): Promise<void> {
  await mkdir(dir, { recursive: true });
  for (const [name, bytes] of embeddedModelFiles()) {
    const tmp = join(dir, `.${name}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
    await writeFileDurably(tmp, bytes);
    await rename(tmp, join(dir, name));
  }
}

async function isFile(path: string): Promise<boolean> {
  return stat(path).then(
    (s) => s.isFile(),
    () => false,
  );
}

async function hasAllFiles(dir: string): Promise<boolean> {
  for (const f of EMBEDDED_MODEL_FILES) if (!(await isFile(join(dir, f)))) return false;
  return true;
}

/**
 * Returns `dir` (absolute) holding the embedded model, writing it only when missing. A fresh
 * folder is built beside `dir` and renamed into place, so a crash or a concurrent start leaves
 * either no model or a whole one.
 */
export async function ensureEmbeddedModel(dirIn: string): Promise<string> {
  const dir = resolve(dirIn);
  if (await hasAllFiles(dir)) return dir;
  const existing = await readdir(dir).catch(() => null);
  if (existing && existing.length > 0) {
    // a folder that holds other things (an old graph cache, a partial copy): fill it in place
    await writeEmbeddedModel(dir);
    return dir;
  }
  await mkdir(dirname(dir), { recursive: true });
  const tmp = join(dirname(dir), `.${basename(dir)}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`);
  try {
    await writeEmbeddedModel(tmp);
    // POSIX rename replaces an empty directory, so an empty `dir` needs no removal first
    await rename(tmp, dir);
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    // another process won the race: its model is as good as ours
    if (await hasAllFiles(dir)) return dir;
    throw e;
  }
  return dir;
}
