import { randomUUID } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { PROJECTIONS, projectionBlock, projectionDims, type Architecture } from '../src/model/architecture.js';
import { embeddedModelFiles } from '../src/model/embedded.js';
import { mulberry32 } from '../src/prng.js';

/**
 * Benchmark models: real dimensions, deterministic random weights, written once as Hugging Face
 * folders (config.json, model.safetensors, tokenizer.json, tokenizer_config.json) into a cache
 * folder and reused by later runs.
 *
 * The tokenizer is the embedded default model's (512 tokens). Its tokenizer_config.json is copied
 * without `eos_token`, and config.json's eos_token_id is the model's last id, which lies past the
 * tokenizer (the engine samples only ids the tokenizer can decode): random weights then never end
 * a stream early, so every stream runs its full length and runs stay comparable.
 */

export const PRESET_NAMES = ['tiny', 'llama-60m', 'qwen2.5-0.5b', 'llama-3.2-1b'] as const;
export type PresetName = (typeof PRESET_NAMES)[number];

/** Bump when the bytes a preset writes change: the cached folder is then rewritten. */
const PRESET_VERSION = 1;
const COMPLETE_MARK = '.complete';
/** the embedded tokenizer's ids: byte tokens + merges + 5 special tokens; <|begin_of_text|> is 507 */
const TOKENIZER_BOS = 507;

interface PresetSpec {
  modelType: 'llama' | 'qwen2';
  hidden: number;
  intermediate: number;
  layers: number;
  heads: number;
  kvHeads: number;
  vocab: number;
  maxPositions: number;
  ropeTheta: number;
  rmsEps: number;
  tied: boolean;
  seed: number;
  /** config.json's rope_scaling, as the real model writes it (null when absent) */
  ropeScaling?: Record<string, unknown>;
}

const PRESETS: Record<PresetName, PresetSpec> = {
  // the embedded default's dimensions, its vocabulary padded by 64 ids for the unreachable EOS
  tiny: { modelType: 'llama', hidden: 64, intermediate: 172, layers: 4, heads: 8, kvHeads: 4, vocab: 576, maxPositions: 512, ropeTheta: 10000, rmsEps: 1e-5, tied: false, seed: 0x7e11 },
  'llama-60m': { modelType: 'llama', hidden: 512, intermediate: 1376, layers: 8, heads: 8, kvHeads: 8, vocab: 32000, maxPositions: 2048, ropeTheta: 10000, rmsEps: 1e-5, tied: false, seed: 0x6060 },
  // Qwen2.5-0.5B's config.json dimensions (q/k/v biases are implied by model_type qwen2)
  'qwen2.5-0.5b': { modelType: 'qwen2', hidden: 896, intermediate: 4864, layers: 24, heads: 14, kvHeads: 2, vocab: 151936, maxPositions: 32768, ropeTheta: 1_000_000, rmsEps: 1e-6, tied: true, seed: 0x0505 },
  // meta-llama/Llama-3.2-1B's config.json: GQA 32/8, head_dim 64, tied embeddings, llama3 RoPE scaling over 128k
  'llama-3.2-1b': {
    modelType: 'llama',
    hidden: 2048,
    intermediate: 8192,
    layers: 16,
    heads: 32,
    kvHeads: 8,
    vocab: 128256,
    maxPositions: 131072,
    ropeTheta: 500000,
    rmsEps: 1e-5,
    tied: true,
    seed: 0x3201,
    ropeScaling: { factor: 32.0, high_freq_factor: 4.0, low_freq_factor: 1.0, original_max_position_embeddings: 8192, rope_type: 'llama3' },
  },
};

/** the config.json a preset writes (for `loraserve check --base` and tests) */
export function presetConfig(name: PresetName): Record<string, unknown> {
  return configJson(name, PRESETS[name]);
}

export function isPresetName(s: string): s is PresetName {
  return (PRESET_NAMES as readonly string[]).includes(s);
}

function configJson(name: PresetName, p: PresetSpec): Record<string, unknown> {
  return {
    architectures: [p.modelType === 'qwen2' ? 'Qwen2ForCausalLM' : 'LlamaForCausalLM'],
    model_type: p.modelType,
    hidden_size: p.hidden,
    intermediate_size: p.intermediate,
    num_hidden_layers: p.layers,
    num_attention_heads: p.heads,
    num_key_value_heads: p.kvHeads,
    head_dim: p.hidden / p.heads,
    vocab_size: p.vocab,
    max_position_embeddings: p.maxPositions,
    rms_norm_eps: p.rmsEps,
    rope_theta: p.ropeTheta,
    rope_scaling: p.ropeScaling ?? null,
    hidden_act: 'silu',
    attention_bias: p.modelType === 'qwen2',
    tie_word_embeddings: p.tied,
    ...(p.modelType === 'qwen2' ? { use_sliding_window: false, sliding_window: p.maxPositions } : {}),
    bos_token_id: TOKENIZER_BOS,
    eos_token_id: p.vocab - 1,
    torch_dtype: 'float32',
    loraserve_bench: { preset: name, version: PRESET_VERSION, seed: p.seed, note: 'deterministic random weights for benchmarks' },
  };
}

/** One tensor of the checkpoint: name, shape, and how its values are drawn. */
interface TensorPlan {
  name: string;
  shape: number[];
  /** uniform with this standard deviation around `mean`; std 0 → all `mean` */
  std: number;
  mean: number;
}

function tensorPlans(p: PresetSpec): TensorPlan[] {
  const plans: TensorPlan[] = [];
  const add = (name: string, shape: number[], std: number, mean = 0) => plans.push({ name, shape, std, mean });
  const hd = p.hidden / p.heads;
  const arch = { hiddenSize: p.hidden, intermediateSize: p.intermediate, numHeads: p.heads, numKvHeads: p.kvHeads, headDim: hd } as Architecture;
  add('model.embed_tokens.weight', [p.vocab, p.hidden], 1);
  for (let i = 0; i < p.layers; i++) {
    const pre = `model.layers.${i}`;
    add(`${pre}.input_layernorm.weight`, [p.hidden], 0, 1);
    add(`${pre}.post_attention_layernorm.weight`, [p.hidden], 0, 1);
    for (const proj of PROJECTIONS) {
      const { inFeatures, outFeatures } = projectionDims(arch, proj);
      const block = projectionBlock(proj);
      add(`${pre}.${block}.${proj}.weight`, [outFeatures, inFeatures], 1 / Math.sqrt(inFeatures));
      if (p.modelType === 'qwen2' && (proj === 'q_proj' || proj === 'k_proj' || proj === 'v_proj')) add(`${pre}.${block}.${proj}.bias`, [outFeatures], 0.1);
    }
  }
  add('model.norm.weight', [p.hidden], 0, 1);
  if (!p.tied) add('lm_head.weight', [p.vocab, p.hidden], 1 / Math.sqrt(p.hidden));
  return plans;
}

/** values written per piece: the 0.5B preset's 2 GB never sits in memory at once */
const PIECE = 1 << 22;

/**
 * Streams model.safetensors: the header first (offsets follow from the shapes), then each tensor
 * in pieces. Same layout as encodeSafetensors (8-byte LE header length, space-padded JSON).
 */
async function writeSafetensors(path: string, plans: TensorPlan[], seed: number): Promise<number> {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const t of plans) {
    const bytes = 4 * t.shape.reduce((a, b) => a * b, 1);
    header[t.name] = { dtype: 'F32', shape: t.shape, data_offsets: [offset, offset + bytes] };
    offset += bytes;
  }
  let json = JSON.stringify(header);
  while ((8 + Buffer.byteLength(json)) % 8 !== 0) json += ' ';
  const jsonBytes = Buffer.from(json, 'utf8');
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(jsonBytes.byteLength));
  const rand = mulberry32(seed);
  const piece = new Float32Array(PIECE);
  const fh = await open(path, 'w');
  try {
    await fh.write(prefix);
    await fh.write(jsonBytes);
    for (const t of plans) {
      let left = t.shape.reduce((a, b) => a * b, 1);
      const scale = t.std * Math.sqrt(3) * 2;
      while (left > 0) {
        const n = Math.min(left, PIECE);
        if (t.std === 0) piece.fill(t.mean, 0, n);
        else for (let i = 0; i < n; i++) piece[i] = t.mean + (rand() - 0.5) * scale;
        await fh.write(new Uint8Array(piece.buffer, 0, n * 4));
        left -= n;
      }
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  return 8 + jsonBytes.byteLength + offset;
}

function tokenizerFiles(): { tokenizerJson: Buffer; tokenizerConfigJson: Buffer } {
  const files = embeddedModelFiles();
  const tokenizerJson = files.get('tokenizer.json');
  const cfgBytes = files.get('tokenizer_config.json');
  if (!tokenizerJson || !cfgBytes) throw new Error('the embedded model has no tokenizer files');
  const cfg = JSON.parse(cfgBytes.toString('utf8')) as Record<string, unknown>;
  delete cfg.eos_token;
  return { tokenizerJson, tokenizerConfigJson: Buffer.from(JSON.stringify(cfg, null, 2) + '\n') };
}

async function isComplete(dir: string): Promise<boolean> {
  try {
    const mark = await readFile(join(dir, COMPLETE_MARK), 'utf8');
    return mark.trim() === String(PRESET_VERSION);
  } catch {
    return false;
  }
}

/**
 * The preset's Hugging Face folder under `cacheRoot`, written on first use (into a temp sibling,
 * renamed into place) and reused while its version mark matches.
 */
export async function ensurePreset(name: PresetName, cacheRoot: string, progress: (line: string) => void): Promise<string> {
  const dir = join(cacheRoot, name);
  if (await isComplete(dir)) return dir;
  const spec = PRESETS[name];
  await mkdir(cacheRoot, { recursive: true });
  const tmp = join(cacheRoot, `.writing-${name}-${process.pid}-${randomUUID().slice(0, 8)}`);
  await mkdir(tmp);
  try {
    const plans = tensorPlans(spec);
    const params = plans.reduce((n, t) => n + t.shape.reduce((a, b) => a * b, 1), 0);
    progress(`writing preset ${name} (${(params / 1e6).toFixed(1)}M parameters, ${((params * 4) / 1e9).toFixed(2)} GB f32) into ${dir}`);
    await writeSafetensors(join(tmp, 'model.safetensors'), plans, spec.seed);
    await writeFile(join(tmp, 'config.json'), JSON.stringify(configJson(name, spec), null, 2) + '\n');
    const tok = tokenizerFiles();
    await writeFile(join(tmp, 'tokenizer.json'), tok.tokenizerJson);
    await writeFile(join(tmp, 'tokenizer_config.json'), tok.tokenizerConfigJson);
    await writeFile(join(tmp, COMPLETE_MARK), `${PRESET_VERSION}\n`);
    await rm(dir, { recursive: true, force: true });
    await rename(tmp, dir);
    return dir;
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
}

/**
 * Bytes a decode step must read from memory: every projection (and bias), the norms, and the LM
 * head (the embedding lookup reads one row; a tied head is the embedding read in full).
 */
export function streamedWeightBytes(a: Architecture, bytesPerValue = 4): number {
  let n = 0;
  for (const p of PROJECTIONS) {
    const { inFeatures, outFeatures } = projectionDims(a, p);
    n += inFeatures * outFeatures;
    if (a.attentionBias && (p === 'q_proj' || p === 'k_proj' || p === 'v_proj')) n += outFeatures;
  }
  n = n * a.numLayers + 2 * a.hiddenSize * a.numLayers + a.hiddenSize + a.vocabSize * a.hiddenSize;
  return n * bytesPerValue;
}

/** Every parameter of the model (the embedding counted once when tied). */
export function parameterCount(a: Architecture): number {
  const head = a.tieWordEmbeddings ? 0 : a.vocabSize * a.hiddenSize;
  return streamedWeightBytes(a, 1) + head;
}

export async function fileBytes(path: string): Promise<number> {
  return (await stat(path)).size;
}
