/**
 * Shared by the engine tests: a random model built into a temp dir, random adapters in the
 * engine's layout, and a collector for generations. Not a test file itself.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { transpose, type AdapterWeights, type EngineModuleWeights } from '../src/adapters/convert.js';
import { makeConfig, type ConfigInput } from '../src/config.js';
import type { Architecture } from '../src/model/architecture.js';
import { buildModel } from '../src/model/build.js';
import type { LoraTarget, Manifest } from '../src/model/manifest.js';
import { Engine, type GenerateResult, type Generation, type TokenEvent } from '../src/engine/engine.js';
import type { Adapter } from './helpers/lora-feeds.js';
import { randomCheckpoint, type MemoryCheckpoint } from './helpers/random-checkpoint.js';
import { testRuntime } from './helpers/test-runtime.js';

export const quietLog = { debug: () => {}, info: () => {}, warn: () => {}, error: () => {} };

export async function tempRoot(prefix: string): Promise<{ dir: string; remove: () => Promise<void> }> {
  const dir = await mkdtemp(join(tmpdir(), `loraserve-${prefix}-`));
  return { dir, remove: () => rm(dir, { recursive: true, force: true }) };
}

export interface TestModel {
  ck: MemoryCheckpoint;
  dir: string;
  manifest: Manifest;
}

export async function buildRandomModel(root: string, arch: Architecture, seed: number): Promise<TestModel> {
  const ck = randomCheckpoint(arch, seed);
  const built = await buildModel(ck, { outDir: join(root, 'models'), dtype: 'fp32', logits: 'last', kv: testKv() });
  return { ck, dir: built.dir, manifest: built.manifest };
}

/**
 * LORASERVE_TEST_KV=gqa|resident: the KV contract the engine tests build (default gqa, the
 * server's default); the engine and its HTTP tests are meant to pass both ways
 */
export function testKv(): 'gqa' | 'resident' {
  const k = process.env.LORASERVE_TEST_KV ?? 'gqa';
  if (k !== 'gqa' && k !== 'resident') throw new Error(`LORASERVE_TEST_KV must be gqa or resident, got ${k}`);
  return k;
}

/** LORASERVE_TEST_DEVICE=cuda runs the engine tests on the CUDA provider (scripts/gpu-check.sh); default cpu */
export function testDevice(): 'cpu' | 'cuda' {
  const d = process.env.LORASERVE_TEST_DEVICE ?? 'cpu';
  if (d !== 'cpu' && d !== 'cuda') throw new Error(`LORASERVE_TEST_DEVICE must be cpu or cuda, got ${d}`);
  return d;
}

export function startEngine(model: TestModel, config: Partial<ConfigInput> = {}): Promise<Engine> {
  return Engine.start({ modelDir: model.dir, manifest: model.manifest, config: makeConfig({ DEVICE: testDevice(), RUNTIME: testRuntime(), ...config }), log: quietLog });
}

/** PEFT layout (A [r, in], B [out, r], scale) → the engine's (A [in, r], B [r, out] · scale), fresh arrays */
export function engineWeights(targets: readonly LoraTarget[], adapter: Adapter): AdapterWeights {
  const modules = new Map<string, EngineModuleWeights>();
  let bytes = 0;
  for (const t of targets) {
    const m = adapter.get(t.name);
    if (!m) continue;
    const A = transpose(m.A, m.rank, t.inFeatures);
    const B = transpose(m.B, t.outFeatures, m.rank, m.scale);
    modules.set(t.name, { rank: m.rank, A, B });
    bytes += A.byteLength + B.byteLength;
  }
  return { modules, bytes };
}

export interface Collected {
  tokens: number[];
  events: TokenEvent[];
  result: GenerateResult;
}

export async function collect(gen: Generation, onToken?: (e: TokenEvent, i: number) => void): Promise<Collected> {
  const events: TokenEvent[] = [];
  for await (const e of gen) {
    events.push(e);
    onToken?.(e, events.length - 1);
  }
  return { tokens: events.map((e) => e.token), events, result: await gen.result };
}

/** PEFT adapters for random tests: rank per target, -1 = module not targeted */
export const mixedRanks = (t: LoraTarget): number => [3, 1, 0, 4, -1, 2, 5][(t.layer * 2 + ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'].indexOf(t.module)) % 7];
export const attentionOnly = (t: LoraTarget): number => (['q_proj', 'k_proj', 'v_proj', 'o_proj'].includes(t.module) ? 6 : -1);
export const mlpOnly = (t: LoraTarget): number => (['gate_proj', 'up_proj', 'down_proj'].includes(t.module) ? 2 + t.layer : -1);
