import { createHash, randomUUID } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { mkdir, open, readFile, rename, rm, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Checkpoint } from './checkpoint/types.js';
import { BUILDER_VERSION, buildLlamaGraph, type BuiltGraph, type GraphOptions, type QuantizedWeights } from './graph/llama.js';
import { ExternalDataWriter } from './graph/onnx-builder.js';
import { gqaSupport } from './graph/gqa.js';
import { ManifestSchema, type KvContract, type Manifest, type ModelDtype } from './manifest.js';
import { fsyncPath, writeFileDurably } from '../durable-fs.js';

export { BUILDER_VERSION } from './graph/llama.js';

export interface BuildOptions {
  /** the cache folder; each build lives in a subfolder named by its hash */
  outDir: string;
  dtype: ModelDtype;
  logits: 'all' | 'last';
  /** default true */
  lora?: boolean;
  /** default false; only with lora: false */
  peer?: boolean;
  /**
   * default concat; the engine serves `resident` (graph/kv.ts) and `gqa` (graph/gqa.ts) graphs. A
   * model that GroupQueryAttention cannot run (gqaSupport) is built `resident` instead, with one
   * progress line saying why; the manifest says which was built.
   */
  kv?: KvContract;
  /**
   * the provider the graph will run on, when known. onnxruntime's CUDA GroupQueryAttention has
   * fp16 and bf16 kernels only: a gqa graph at fp32 on cuda would run the op on the CPU provider
   * and copy every layer's cache across per step, so it is built `resident` instead (one line says so)
   */
  provider?: 'cpu' | 'cuda';
  /** block-quantized projections (graph/quantize.ts); absent = plain weights at `dtype` */
  weights?: QuantizedWeights;
  /** MatMulNBits accuracy_level (GraphOptions); absent = 4 */
  accuracyLevel?: 0 | 4;
  onProgress?: (line: string) => void;
}

export interface BuildResult {
  dir: string;
  manifest: Manifest;
  cached: boolean;
}

export const MANIFEST_FILE = 'manifest.json';
const GRAPH_FILE = 'model.onnx';
const WEIGHTS_FILE = 'model.onnx.data';

function graphOptions(opts: BuildOptions, kv: KvContract | undefined): GraphOptions {
  const base: GraphOptions = { dtype: opts.dtype, logits: opts.logits, lora: opts.lora ?? true, peer: opts.peer ?? false };
  // only named when set, so the cache key of every other build stays what it was
  const withKv: GraphOptions = kv === 'resident' || kv === 'gqa' ? { ...base, kv } : base;
  if (!opts.weights) return withKv;
  return opts.accuracyLevel === undefined ? { ...withKv, weights: opts.weights } : { ...withKv, weights: opts.weights, accuracyLevel: opts.accuracyLevel };
}

async function hashFile(hash: ReturnType<typeof createHash>, path: string): Promise<void> {
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
}

/**
 * The cache key: sha256 over the builder version, the options, the checkpoint's id and
 * architecture, and the bytes of its source files — or, for a checkpoint with no files (built
 * in memory), the bytes of every tensor.
 */
export async function sourceHash(ck: Checkpoint, options: GraphOptions): Promise<string> {
  const hash = createHash('sha256');
  const field = (s: string) => hash.update(`${s.length}:${s}`);
  field(`loraserve-builder ${BUILDER_VERSION}`);
  field(JSON.stringify(options));
  field(ck.modelId);
  field(JSON.stringify(ck.architecture));
  if (ck.sourceFiles.length > 0) {
    for (const file of ck.sourceFiles) {
      field(`file ${(await stat(file)).size}`);
      await hashFile(hash, file);
    }
  } else {
    for (const name of [...ck.names()].sort()) {
      const t = ck.tensor(name);
      if (!t) continue;
      field(`tensor ${name} ${t.dtype} [${t.shape.join(',')}]`);
      const v = t.read();
      hash.update(new Uint8Array(v.buffer, v.byteOffset, v.byteLength));
    }
  }
  return hash.digest('hex');
}

export async function loadManifest(dir: string): Promise<Manifest> {
  const path = join(dir, MANIFEST_FILE);
  const text = await readFile(path, 'utf8');
  const parsed = ManifestSchema.safeParse(JSON.parse(text));
  if (!parsed.success) throw new Error(`${path} is not a valid manifest: ${parsed.error.message}`);
  return parsed.data;
}

/** a finished build: manifest for this exact hash, and both files it names present */
async function reusable(dir: string, hash: string): Promise<Manifest | null> {
  try {
    const m = await loadManifest(dir);
    if (m.sourceHash !== hash || m.builderVersion !== BUILDER_VERSION) return null;
    await stat(join(dir, m.files.graph));
    await stat(join(dir, m.files.weights));
    return m;
  } catch {
    return null;
  }
}

/** streams the weights into `weightsPath` while the graph is built; returns the encoded graph */
async function writeWeightsAndGraph(ck: Checkpoint, options: GraphOptions, weightsPath: string, progress: (line: string) => void): Promise<BuiltGraph> {
  const fh = await open(weightsPath, 'w');
  try {
    const built = await buildLlamaGraph(ck, options, new ExternalDataWriter(fh, WEIGHTS_FILE), progress);
    await fh.sync();
    return built;
  } finally {
    await fh.close();
  }
}

/** makes the rename itself durable; best effort, as not every filesystem lets a directory be fsynced */
async function syncDir(path: string): Promise<void> {
  // a build that is not yet durable is still correct: at worst it is rebuilt after a crash
  await fsyncPath(path).catch(() => undefined);
}

/**
 * Builds the ONNX graph of `ck` into `outDir/<hash prefix>/` (model.onnx, model.onnx.data,
 * manifest.json), or returns the folder as it is when a build with the same hash is there.
 * Files are written into a temporary sibling folder and renamed into place, so a crash or a
 * concurrent build never leaves a half-written folder under the final name.
 */
export async function buildModel(ck: Checkpoint, opts: BuildOptions): Promise<BuildResult> {
  const progress = opts.onProgress ?? (() => {});
  let kv = opts.kv;
  const support = kv === 'gqa' ? gqaSupport(ck.architecture) : null;
  if (support && !support.ok) {
    progress(`KV=gqa is not possible for ${ck.modelId}: ${support.reason}; using the resident KV cache (plain-ops attention) instead`);
    kv = 'resident';
  } else if (kv === 'gqa' && opts.provider === 'cuda' && opts.dtype !== 'fp16') {
    progress(`KV=gqa with DTYPE=${opts.dtype} on cuda: onnxruntime's CUDA GroupQueryAttention runs fp16/bf16 only (fp32 would fall back to the CPU provider per layer); using the resident KV cache (plain-ops attention) instead — set DTYPE=fp16 (the default on cuda) for gqa`);
    kv = 'resident';
  }
  const options = graphOptions(opts, kv);
  const hash = await sourceHash(ck, options);
  const dir = join(opts.outDir, hash.slice(0, 24));
  const existing = await reusable(dir, hash);
  if (existing) return { dir, manifest: existing, cached: true };

  await mkdir(opts.outDir, { recursive: true });
  const tmp = join(opts.outDir, `.building-${hash.slice(0, 12)}-${process.pid}-${randomUUID()}`);
  await mkdir(tmp);
  try {
    progress(`building ${ck.modelId} (${opts.dtype}, logits ${options.logits}${options.lora ? ', LoRA inputs' : ''}${options.peer ? ', peer export' : ''}${options.kv === 'resident' || options.kv === 'gqa' ? `, ${options.kv} KV` : ''}${options.weights ? `, ${options.weights} weights` : ''}) into ${dir}`);
    const built = await writeWeightsAndGraph(ck, options, join(tmp, WEIGHTS_FILE), progress);
    await writeFileDurably(join(tmp, GRAPH_FILE), built.model);
    const manifest: Manifest = {
      manifestVersion: 1,
      builderVersion: BUILDER_VERSION,
      sourceHash: hash,
      modelId: ck.modelId,
      architecture: ck.architecture,
      dtype: opts.dtype,
      logits: options.logits,
      lora: options.lora,
      peer: options.peer,
      kv: options.kv ?? 'concat',
      ...(options.weights ? { weights: options.weights } : {}),
      maskValue: built.maskValue,
      files: { graph: GRAPH_FILE, weights: WEIGHTS_FILE },
      loraTargets: built.loraTargets,
    };
    await writeFileDurably(join(tmp, MANIFEST_FILE), JSON.stringify(ManifestSchema.parse(manifest), null, 2));
    // a stale or broken folder under the final name would make rename fail: it is ours to replace
    await rm(dir, { recursive: true, force: true });
    try {
      await rename(tmp, dir);
    } catch (err) {
      // another process finished the same build between our rm and rename: use theirs
      const theirs = await reusable(dir, hash);
      if (!theirs) throw err;
      await rm(tmp, { recursive: true, force: true });
      return { dir, manifest: theirs, cached: true };
    }
    await syncDir(opts.outDir);
    progress(`built ${dir}`);
    return { dir, manifest, cached: false };
  } catch (err) {
    await rm(tmp, { recursive: true, force: true });
    throw err;
  }
}
