import { mkdir, mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { expect } from 'vitest';
import { buildApp } from '../../src/app.js';
import { makeConfig, type ConfigInput } from '../../src/config.js';
import { testRuntime } from './test-runtime.js';
import { testKv } from '../engine-setup.js';
import { encodeSafetensors } from '../../src/adapters/safetensors.js';
import type { Architecture } from '../../src/model/architecture.js';
import { embeddedModelFiles } from '../../src/model/embedded.js';
import { loraTargetsFor, type LoraTarget } from '../../src/model/manifest.js';
import { encodeValues, makePeftTensors, peftConfig, toBf16Bits, type PeftTensor } from './adapter-fixtures.js';
import { form } from './adapter-uploads.js';
import { maxAbsDiff, mergeAdapter, type Adapter } from './lora-feeds.js';
import { MemoryCheckpoint, type MemoryTensor } from './random-checkpoint.js';
import { referenceForward } from '../reference/forward.js';

/**
 * A model family served end to end: a Hugging Face folder in the family's real layout (config
 * keys and tensor names as transformers writes them, weights in bf16 or f32, the embedded
 * model's byte-level tokenizer), started through buildApp, a PEFT adapter uploaded over HTTP,
 * greedy generation with logprobs, and the same tokens scored by the independent reference
 * forward pass on the merged checkpoint W + scale·B·A.
 */

/** the embedded tokenizer's size: family test models use it as vocab_size */
export const FAMILY_VOCAB = 512;

export interface FamilyFolder {
  config: Record<string, unknown>;
  /** checkpoint tensors in the family's real layout and names */
  tensors: ReadonlyMap<string, MemoryTensor>;
  dtype: 'F32' | 'BF16';
}

/** what the server reads back from a bf16 file: each value rounded to nearest even */
export function roundToBf16(v: Float32Array): Float32Array {
  const bits = new Uint32Array(v.length);
  for (let i = 0; i < v.length; i++) bits[i] = toBf16Bits(v[i]!) << 16;
  return new Float32Array(bits.buffer);
}

/** the tensors with the values a reader of the written file gets */
export function storedTensors(f: FamilyFolder): Map<string, MemoryTensor> {
  return new Map([...f.tensors].map(([name, t]) => [name, { shape: t.shape, data: f.dtype === 'BF16' ? roundToBf16(t.data) : t.data }]));
}

export async function writeFamilyFolder(dir: string, f: FamilyFolder): Promise<void> {
  await mkdir(dir, { recursive: true });
  await writeFile(path.join(dir, 'config.json'), JSON.stringify(f.config, null, 2));
  const encoded = [...f.tensors].map(([name, t]) => ({ name, dtype: f.dtype, shape: t.shape, data: encodeValues(t.data, f.dtype) }));
  await writeFile(path.join(dir, 'model.safetensors'), encodeSafetensors(encoded, { format: 'pt' }));
  const embedded = embeddedModelFiles();
  for (const name of ['tokenizer.json', 'tokenizer_config.json']) await writeFile(path.join(dir, name), embedded.get(name)!);
}

export interface ServedFamily {
  app: FastifyInstance;
  dir: string;
  close(): Promise<void>;
}

export async function serveFamily(prefix: string, f: FamilyFolder, overrides: Partial<ConfigInput> = {}): Promise<ServedFamily> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), `loraserve-${prefix}-`));
  const dir = path.join(tmp, prefix);
  await writeFamilyFolder(dir, f);
  const app = await buildApp(makeConfig({ MODEL_PATH: dir, ADAPTER_DIR: path.join(tmp, 'adapters'), CACHE_DIR: path.join(tmp, 'cache'), DEVICE: 'cpu', RUNTIME: testRuntime(), KV: testKv(), LOG_LEVEL: 'silent', ...overrides }));
  return {
    app,
    dir,
    async close() {
      await app.close();
      await rm(tmp, { recursive: true, force: true });
    },
  };
}

interface Served {
  tokens: number[];
  logprobs: { id: number; logprob: number; top_logprobs: { token: number; logprob: number }[] }[];
}

export interface AdapterCheck {
  /** the PEFT module names the adapter targets (default: every LoRA target of the model) */
  targets?: readonly LoraTarget[];
  /** how a target's merged weight is found in the checkpoint (default `${target.name}.weight`, whole) */
  merge?: (base: MemoryCheckpoint, targets: readonly LoraTarget[], adapter: Adapter) => MemoryCheckpoint;
  prompt?: string;
  maxTokens?: number;
}

export interface AdapterResult {
  worst: number;
  effect: number;
  tokens: number[];
  promptLength: number;
}

/**
 * Uploads a rank-4 adapter on every target, generates greedily with 20 logprobs, and compares
 * with the reference forward of the merged checkpoint: greedy ids equal, logprobs within 1e-4.
 */
export async function checkAdapterAgainstReference(served: ServedFamily, stored: ReadonlyMap<string, MemoryTensor>, o: AdapterCheck = {}): Promise<AdapterResult> {
  const { app } = served;
  const arch: Architecture = app.runtime.manifest.architecture;
  const targets = o.targets ?? loraTargetsFor(arch);
  const r = 4;
  const alpha = 8;
  const modules = [...new Set(targets.map((t) => t.module))];
  const peft: PeftTensor[] = makePeftTensors(arch, { r, targets: modules, seed: 21, scale: 0.15 });
  const config = peftConfig({ base_model_name_or_path: served.dir, r, lora_alpha: alpha, target_modules: modules });
  const up = await app.inject({
    method: 'POST',
    url: '/v1/adapters',
    payload: form([
      ['name', 'tuned'],
      ['config', Buffer.from(JSON.stringify(config)), 'adapter_config.json'],
      ['weights', encodeSafetensors(peft.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
    ]),
  });
  // the same deterministic adapter may already be there from an earlier check on this server
  expect([201, 409], up.body).toContain(up.statusCode);

  const tokenizer = app.runtime.tokenizer;
  const prompt = o.prompt ?? 'Once upon a time there was a model that';
  const promptIds = tokenizer.encode(prompt);
  const maxTokens = o.maxTokens ?? 8;
  const res = await app.inject({
    method: 'POST',
    url: '/v1/generate',
    payload: { prompt, adapter: 'tuned', max_tokens: maxTokens, temperature: 0, logprobs: 20 },
  });
  expect(res.statusCode, res.body).toBe(200);
  const out = res.json() as Served;

  const base = new MemoryCheckpoint(arch, stored, 'reference');
  const adapter: Adapter = new Map(
    targets.map((t) => {
      const a = peft.find((p) => p.name === `base_model.model.${t.name}.lora_A.weight`)!;
      const b = peft.find((p) => p.name === `base_model.model.${t.name}.lora_B.weight`)!;
      return [t.name, { rank: r, A: a.data, B: b.data, scale: alpha / r }];
    }),
  );
  const merged = (o.merge ?? mergeAdapter)(base, targets, adapter);
  const seq = [...promptIds, ...out.tokens];
  // the prompt is one forward call in transformers' generate (LongRoPE picks its table per call)
  const logits = referenceForward(merged, seq, { prefill: promptIds.length });
  const plain = referenceForward(base, seq, { prefill: promptIds.length });
  let worst = 0;
  let effect = 0;
  out.tokens.forEach((tok, k) => {
    const row = logits[promptIds.length - 1 + k]!;
    effect = Math.max(effect, maxAbsDiff(row, plain[promptIds.length - 1 + k]!));
    const max = Math.max(...row);
    const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
    expect(row.indexOf(max), `greedy token ${k}`).toBe(tok);
    const lp = out.logprobs[k]!;
    worst = Math.max(worst, maxAbsDiff([lp.logprob, ...lp.top_logprobs.map((t) => t.logprob)], [row[tok]! - lse, ...lp.top_logprobs.map((t) => row[t.token]! - lse)]));
  });
  // a random model may end early on an EOS id; a few generated tokens are still needed
  expect(out.tokens.length).toBeGreaterThanOrEqual(Math.min(3, maxTokens));
  return { worst, effect, tokens: out.tokens, promptLength: promptIds.length };
}
