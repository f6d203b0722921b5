import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { availableParallelism } from 'node:os';
import { dirname, join } from 'node:path';
import ort from 'onnxruntime-node';
import './ort-float16.js';
import { loraBiasInput, loraMagnitudeInput, pastKeyName, pastValueName, type LoraTarget, type Manifest } from './manifest.js';

export type Device = 'auto' | 'cpu' | 'cuda';
export type Provider = 'cuda' | 'cpu';
/** `node`: onnxruntime-node's InferenceSession; `capi`: the C API runner (src/runtime/capi-session.ts) */
export type SessionRuntime = 'node' | 'capi';

/** the RUNTIME setting: a runtime, or `auto` (see resolveRuntime) */
export type RuntimeSetting = SessionRuntime | 'auto';

/**
 * `auto` picks the C API runner for a gqa graph: GroupQueryAttention's present is bound to the
 * very buffer fed as its past, and onnxruntime-node copies every bound output back into a new
 * array per run (O(capacity) per step, docs/resident-kv.md); the C API returns it in place. A
 * resident graph outputs only the new keys and values, so either runtime serves it and the
 * long-tested onnxruntime-node one is kept.
 */
export function resolveRuntime(setting: RuntimeSetting, kv: Manifest['kv']): { runtime: SessionRuntime; why: string } {
  if (setting !== 'auto') return { runtime: setting, why: `RUNTIME=${setting}` };
  return kv === 'gqa'
    ? { runtime: 'capi', why: 'RUNTIME=auto: a gqa graph binds its cache as an output, which the C API leaves in place' }
    : { runtime: 'node', why: `RUNTIME=auto: the ${kv ?? 'concat'} graph returns no cache, onnxruntime-node serves it` };
}

/** what the engine uses of a session; both runtimes provide it */
export type EngineSession = Pick<ort.InferenceSession, 'run' | 'release' | 'inputNames' | 'outputNames'>;

export interface SessionLog {
  info(msg: string): void;
  warn(msg: string): void;
}

export interface CreatedSession<S extends EngineSession = ort.InferenceSession> {
  session: S;
  provider: Provider;
  /** one sentence saying why this provider is the one in use */
  reason: string;
}

/**
 * onnxruntime-node's options for a CPU session as the engine opens it: every core to one run's
 * operators. Also for the engine's small side sessions and the bench's kernel-only graphs, which
 * must run under the same conditions as the served step.
 */
export function cpuSessionOptions(): ort.InferenceSession.SessionOptions {
  return { executionProviders: ['cpu'], graphOptimizationLevel: 'all', intraOpNumThreads: availableParallelism() };
}

/**
 * One session on one provider, through the chosen runtime. CPU stays behind CUDA in both, so
 * nodes that CUDA lacks still run.
 */
async function open(path: string, provider: Provider, runtime: SessionRuntime): Promise<EngineSession> {
  if (runtime === 'capi') {
    const { CapiSession } = await import('../runtime/capi-session.js');
    return CapiSession.create(path, provider === 'cpu' ? { provider, intraOpThreads: availableParallelism() } : { provider });
  }
  const options: ort.InferenceSession.SessionOptions =
    provider === 'cpu' ? cpuSessionOptions() : { executionProviders: ['cuda', 'cpu'], graphOptimizationLevel: 'all' };
  return ort.InferenceSession.create(path, options);
}

const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

/** the provider libraries onnxruntime-node loads for `cuda` (the container build installs them) */
export const CUDA_PROVIDER_FILES = ['libonnxruntime_providers_shared.so', 'libonnxruntime_providers_cuda.so'] as const;

/** where onnxruntime-node keeps its native binding and provider libraries on this platform */
export function ortBinaryDir(): string {
  const require = createRequire(import.meta.url);
  return join(dirname(require.resolve('onnxruntime-node/package.json')), 'bin', 'napi-v6', process.platform, process.arch);
}

/**
 * Why CUDA cannot be asked for, or null when its provider libraries are installed. Asking
 * onnxruntime for `cuda` without them makes it print a red "Failed to load library
 * libonnxruntime_providers_shared.so" on stderr before failing; on a CPU host that is noise, so
 * `auto` looks for the files first and only tries CUDA when they are there.
 */
export function cudaUnavailableReason(dir = ortBinaryDir()): string | null {
  if (process.platform !== 'linux' && process.platform !== 'win32') return `onnxruntime-node has no CUDA provider on ${process.platform}`;
  const names = process.platform === 'win32' ? CUDA_PROVIDER_FILES.map((f) => f.replace(/^lib/, '').replace(/\.so$/, '.dll')) : CUDA_PROVIDER_FILES;
  const missing = names.filter((f) => !existsSync(join(dir, f)));
  return missing.length === 0 ? null : `the CUDA execution provider is not installed (${missing.join(', ')} not in ${dir}; the container image installs it)`;
}

/**
 * Opens the built graph. onnxruntime-node treats a CUDA provider it cannot load as a hard error
 * at creation (not a silent fallback), so `auto` tries CUDA, logs why it failed, and opens a CPU
 * session; `cuda` lets the original error through.
 */
export function createSession(modelDir: string, manifest: Manifest, device: Device, log: SessionLog): Promise<CreatedSession>;
export function createSession(modelDir: string, manifest: Manifest, device: Device, log: SessionLog, runtime: SessionRuntime): Promise<CreatedSession<EngineSession>>;
export async function createSession(modelDir: string, manifest: Manifest, device: Device, log: SessionLog, runtime: SessionRuntime = 'node'): Promise<CreatedSession<EngineSession>> {
  const path = join(modelDir, manifest.files.graph);
  const via = runtime === 'capi' ? ', RUNTIME=capi' : '';
  if (device === 'cpu') {
    const session = await open(path, 'cpu', runtime);
    const reason = 'DEVICE=cpu';
    log.info(`onnxruntime session on cpu (${reason}, ${availableParallelism()} threads, ${manifest.dtype}${via})`);
    return { session, provider: 'cpu', reason };
  }
  if (device === 'cuda') {
    const session = await open(path, 'cuda', runtime);
    const reason = 'DEVICE=cuda';
    log.info(`onnxruntime session on cuda (${reason}, ${manifest.dtype}${via})`);
    return { session, provider: 'cuda', reason };
  }
  const missing = cudaUnavailableReason();
  if (missing) {
    const reason = `DEVICE=auto and ${missing}`;
    log.warn(`${reason}; using cpu`);
    const session = await open(path, 'cpu', runtime);
    log.info(`onnxruntime session on cpu (${availableParallelism()} threads, ${manifest.dtype}${via})`);
    return { session, provider: 'cpu', reason };
  }
  try {
    const session = await open(path, 'cuda', runtime);
    const reason = 'DEVICE=auto and the CUDA execution provider loaded';
    log.info(`onnxruntime session on cuda (${reason}, ${manifest.dtype}${via})`);
    return { session, provider: 'cuda', reason };
  } catch (err) {
    const reason = `DEVICE=auto and CUDA is unavailable: ${message(err)}`;
    log.warn(`${reason}; using cpu`);
    const session = await open(path, 'cpu', runtime);
    log.info(`onnxruntime session on cpu (${availableParallelism()} threads, ${manifest.dtype}${via})`);
    return { session, provider: 'cpu', reason };
  }
}

/** the graph's float element type */
export const floatType = (manifest: Manifest): 'float32' | 'float16' => (manifest.dtype === 'fp16' ? 'float16' : 'float32');

function emptyFloat(manifest: Manifest, dims: readonly number[]): ort.Tensor {
  return manifest.dtype === 'fp16' ? new ort.Tensor('float16', new Uint16Array(0), dims) : new ort.Tensor('float32', new Float32Array(0), dims);
}

/**
 * rank-0 LoRA inputs (A [batch, in, 0], B [batch, 0, out]), a DoRA factor of 1 and a lora_B bias of
 * 0 (broadcast [1, 1, out]): the graph then adds exactly zero
 */
export function emptyLoraFeeds(manifest: Manifest, batch: number): Record<string, ort.Tensor> {
  const feeds: Record<string, ort.Tensor> = {};
  for (const t of manifest.loraTargets) {
    feeds[t.inputA] = emptyFloat(manifest, [batch, t.inFeatures, 0]);
    feeds[t.inputB] = emptyFloat(manifest, [batch, 0, t.outFeatures]);
    Object.assign(feeds, neutralLoraVectors(manifest, t));
  }
  return feeds;
}

/** the magnitude (1) and lora_B bias (0) of rows without DoRA or lora_bias: [1, 1, 1], broadcast */
export function neutralLoraVectors(manifest: Manifest, t: LoraTarget): Record<string, ort.Tensor> {
  const dims = [1, 1, 1];
  const ones = manifest.dtype === 'fp16' ? new ort.Tensor('float16', Uint16Array.of(FP16_ONE), dims) : new ort.Tensor('float32', Float32Array.of(1), dims);
  const zeros = manifest.dtype === 'fp16' ? new ort.Tensor('float16', new Uint16Array(1), dims) : new ort.Tensor('float32', new Float32Array(1), dims);
  return { [loraMagnitudeInput(t)]: ones, [loraBiasInput(t)]: zeros };
}

/** 1.0 as IEEE half bits */
const FP16_ONE = 0x3c00;

/** an empty KV cache (past = 0) for the first step */
export function zeroPast(manifest: Manifest, batch: number): Record<string, ort.Tensor> {
  const a = manifest.architecture;
  const feeds: Record<string, ort.Tensor> = {};
  for (let i = 0; i < a.numLayers; i++) {
    feeds[pastKeyName(i)] = emptyFloat(manifest, [batch, a.numKvHeads, 0, a.headDim]);
    feeds[pastValueName(i)] = emptyFloat(manifest, [batch, a.numKvHeads, 0, a.headDim]);
  }
  return feeds;
}
