import { existsSync } from 'node:fs';
import { mkdir, readFile, writeFile } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Architecture, Projection } from '../../src/model/architecture.js';
import { projectionDims, projectionsOf } from '../../src/model/architecture.js';
import { moduleName } from '../../src/model/manifest.js';
import { encodeSafetensors, type TensorToWrite } from '../../src/adapters/safetensors.js';
import { mulberry32 } from '../../src/prng.js';

/**
 * Builders of PEFT adapter folders for tests: real adapter_config.json + adapter_model.safetensors
 * files with the key names and [r, in] / [out, r] shapes PEFT's save_pretrained writes.
 */

export const FIXTURES_DIR = resolve(process.cwd(), '../shared/fixtures');
export const PEFT_CONFIGS_DIR = join(FIXTURES_DIR, 'peft-configs');
export const peftFixturesExist = existsSync(PEFT_CONFIGS_DIR);
if (!peftFixturesExist) console.warn(`adapter-fixtures: ${PEFT_CONFIGS_DIR} is absent; tests that need the real PEFT configs are SKIPPED.`);

export const FIXTURE_CONFIGS = [
  'tinyllama-1.1b-chat.adapter_config.json',
  'llama-3.2-1b.adapter_config.json',
  'qwen2.5-vl-regex-targets.adapter_config.json',
  'mistral-7b-old-nulls.adapter_config.json',
] as const;

export async function readFixtureConfig(name: string): Promise<{ text: string; json: Record<string, unknown> }> {
  const text = await readFile(join(PEFT_CONFIGS_DIR, name), 'utf8');
  return { text, json: JSON.parse(text) as Record<string, unknown> };
}

/** A small Llama; the shapes of every projection differ so that a swapped dimension is caught. */
export function smallArch(overrides: Partial<Architecture> = {}): Architecture {
  return {
    family: 'llama',
    hiddenSize: 24,
    intermediateSize: 40,
    numLayers: 3,
    numHeads: 4,
    numKvHeads: 2,
    headDim: 6,
    vocabSize: 64,
    maxPositions: 128,
    rmsNormEps: 1e-5,
    ropeTheta: 10000,
    ropeLayout: 'rotate_half',
    tieWordEmbeddings: false,
    attentionBias: false,
    bosTokenId: 1,
    eosTokenIds: [2],
    ...overrides,
  };
}

/** Llama-2-13B's dimensions (the seed's base model). */
export const LLAMA2_13B: Architecture = smallArch({ hiddenSize: 5120, intermediateSize: 13824, numLayers: 40, numHeads: 40, numKvHeads: 40, headDim: 128, vocabSize: 32000, maxPositions: 4096 });

/** The Hugging Face config.json for an architecture (what readArchitecture parses back). */
export function hfConfigJson(a: Architecture): Record<string, unknown> {
  const modelType = a.family;
  const cls = { llama: 'LlamaForCausalLM', mistral: 'MistralForCausalLM', qwen2: 'Qwen2ForCausalLM', qwen3: 'Qwen3ForCausalLM', phi3: 'Phi3ForCausalLM', gemma2: 'Gemma2ForCausalLM', gemma3_text: 'Gemma3ForCausalLM' }[a.family];
  return {
    architectures: [cls],
    model_type: modelType,
    hidden_size: a.hiddenSize,
    intermediate_size: a.intermediateSize,
    num_hidden_layers: a.numLayers,
    num_attention_heads: a.numHeads,
    num_key_value_heads: a.numKvHeads,
    head_dim: a.headDim,
    vocab_size: a.vocabSize,
    max_position_embeddings: a.maxPositions,
    rms_norm_eps: a.rmsNormEps,
    rope_theta: a.ropeTheta,
    rope_scaling: null,
    tie_word_embeddings: a.tieWordEmbeddings,
    hidden_act: 'silu',
    bos_token_id: a.bosTokenId,
    eos_token_id: a.eosTokenIds.length === 1 ? a.eosTokenIds[0] : a.eosTokenIds,
  };
}

/**
 * config.json of a Llama checkpoint as transformers' LlamaConfig.to_json_string writes it:
 * hfConfigJson plus Llama's bias, dropout, tensor-parallel and dtype keys; `extra` overrides any key.
 */
export function llamaConfigJson(a: Architecture, extra: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    ...hfConfigJson(a),
    attention_bias: a.attentionBias,
    attention_dropout: 0.0,
    mlp_bias: a.mlpBias ?? false,
    pretraining_tp: 1,
    torch_dtype: 'bfloat16',
    ...extra,
  };
}

/** Writes `<dir>/config.json` for a base model of this architecture; returns its path. */
export async function writeBaseConfig(dir: string, a: Architecture): Promise<string> {
  await mkdir(dir, { recursive: true });
  const path = join(dir, 'config.json');
  await writeFile(path, JSON.stringify(hfConfigJson(a), null, 2));
  return path;
}

/** A PEFT LoRA adapter_config.json as current PEFT writes it, with overrides. */
export function peftConfig(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: 'test/small-llama',
    bias: 'none',
    exclude_modules: null,
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: null,
    layers_to_transform: null,
    lora_alpha: 16,
    lora_bias: false,
    lora_dropout: 0.05,
    modules_to_save: null,
    peft_type: 'LORA',
    r: 8,
    rank_pattern: {},
    revision: null,
    target_modules: ['q_proj', 'v_proj'],
    target_parameters: null,
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: false,
    ...overrides,
  };
}

/** so every generated adapter is the same on every run */
export const seededRandom = mulberry32;

export interface PeftTensor {
  name: string;
  shape: number[];
  data: Float32Array;
}

export interface MakePeftTensorsOptions {
  /** the config's r: the rank of every module unless rankFor says otherwise */
  r: number;
  targets: readonly Projection[];
  /** module name → rank (e.g. to follow a rank_pattern) */
  rankFor?: (module: string) => number;
  /** layer indices to include (default: all) */
  layers?: readonly number[];
  /** returns a different shape for a tensor (the data length follows the shape) */
  shapeOverride?: (info: { module: string; part: 'A' | 'B'; layer: number; projection: Projection; shape: number[] }) => number[] | undefined;
  seed: number;
  /** prefix before the module name; default "base_model.model." */
  prefix?: string;
  /** module name prefix before "layers"; default "model." (e.g. "model.language_model." for a VLM layout) */
  modulePrefix?: string;
  /** an adapter-name segment (lora_A.<name>.weight); default none, as save_pretrained writes */
  adapterName?: string;
  /** values are uniform in [-scale, scale) */
  scale?: number;
}

/** lora_A [r, in] and lora_B [out, r] for every targeted projection of every chosen layer. */
export function makePeftTensors(arch: Architecture, o: MakePeftTensorsOptions): PeftTensor[] {
  const rand = seededRandom(o.seed);
  const scale = o.scale ?? 0.5;
  const prefix = o.prefix ?? 'base_model.model.';
  const layers = o.layers ?? Array.from({ length: arch.numLayers }, (_, i) => i);
  const out: PeftTensor[] = [];
  for (const layer of layers) {
    for (const projection of projectionsOf(arch)) {
      if (!o.targets.includes(projection)) continue;
      const canonical = moduleName(layer, projection);
      const module = o.modulePrefix ? canonical.replace(/^model\./, o.modulePrefix) : canonical;
      const rank = o.rankFor ? o.rankFor(canonical) : o.r;
      const { inFeatures, outFeatures } = projectionDims(arch, projection);
      for (const part of ['A', 'B'] as const) {
        const natural = part === 'A' ? [rank, inFeatures] : [outFeatures, rank];
        const shape = o.shapeOverride?.({ module: canonical, part, layer, projection, shape: natural }) ?? natural;
        const n = shape.reduce((a, b) => a * b, 1);
        const data = new Float32Array(n);
        for (let i = 0; i < n; i++) data[i] = (rand() * 2 - 1) * scale;
        const name = `${prefix}${module}.lora_${part}${o.adapterName ? `.${o.adapterName}` : ''}.weight`;
        out.push({ name, shape, data });
      }
    }
  }
  return out;
}

const f32 = new Float32Array(1);
const u32 = new Uint32Array(f32.buffer);

/** float32 → bfloat16 bits, round to nearest even */
export function toBf16Bits(x: number): number {
  f32[0] = x;
  const u = u32[0]!;
  if ((u & 0x7fffffff) > 0x7f800000) return (u >>> 16) | 0x40;
  return ((u + 0x7fff + ((u >>> 16) & 1)) >>> 16) & 0xffff;
}

/** float32 → float16 bits, round to nearest even (subnormals included) */
export function toF16Bits(x: number): number {
  f32[0] = x;
  const u = u32[0]!;
  const sign = (u >>> 16) & 0x8000;
  const exp = (u >>> 23) & 0xff;
  let mant = u & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    if (e < -10) return sign;
    mant |= 0x800000;
    const shift = 14 - e;
    let h = mant >>> shift;
    const rem = mant & ((1 << shift) - 1);
    const half = 1 << (shift - 1);
    if (rem > half || (rem === half && (h & 1))) h++;
    return sign | h;
  }
  let h = (e << 10) | (mant >>> 13);
  const rem = mant & 0x1fff;
  if (rem > 0x1000 || (rem === 0x1000 && (h & 1))) h++;
  return sign | h;
}

export function encodeValues(data: Float32Array, dtype: 'F32' | 'F16' | 'BF16'): Uint8Array | Float32Array {
  if (dtype === 'F32') return data;
  const out = new Uint8Array(data.length * 2);
  const dv = new DataView(out.buffer);
  for (let i = 0; i < data.length; i++) dv.setUint16(i * 2, dtype === 'F16' ? toF16Bits(data[i]!) : toBf16Bits(data[i]!), true);
  return out;
}

export interface AdapterFolderSpec {
  /** an object is written as JSON; a string is written verbatim (e.g. broken JSON); null: no adapter_config.json */
  config: Record<string, unknown> | string | null;
  /** null: no adapter_model.safetensors */
  tensors: PeftTensor[] | null;
  dtype?: 'F32' | 'F16' | 'BF16';
  metadata?: Record<string, string>;
}

/** Writes a PEFT adapter folder; returns the paths written. */
export async function writeAdapterFolder(dir: string, spec: AdapterFolderSpec): Promise<{ dir: string; configPath: string; weightsPath: string }> {
  await mkdir(dir, { recursive: true });
  const configPath = join(dir, 'adapter_config.json');
  const weightsPath = join(dir, 'adapter_model.safetensors');
  if (spec.config !== null) await writeFile(configPath, typeof spec.config === 'string' ? spec.config : JSON.stringify(spec.config, null, 2));
  if (spec.tensors !== null) {
    const dtype = spec.dtype ?? 'F32';
    const tensors: TensorToWrite[] = spec.tensors.map((t) => ({ name: t.name, dtype, shape: t.shape, data: encodeValues(t.data, dtype) }));
    await writeFile(weightsPath, encodeSafetensors(tensors, spec.metadata ?? { format: 'pt' }));
  }
  return { dir, configPath, weightsPath };
}
