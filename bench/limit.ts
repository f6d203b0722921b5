import { randomUUID } from 'node:crypto';
import { mkdir, open, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import ort from 'onnxruntime-node';
import { ExternalDataWriter, GraphBuilder } from '../src/model/graph/onnx-builder.js';
import { medianRunMs } from './graph-timing.js';

/**
 * The memory-bandwidth ceiling, measured in the same run: a graph that does nothing but stream
 * weights, x [1, d] · W1 · W2 · … · Wn with fp32 [d, d] initializers totalling (about) the model's
 * streamed weight bytes, on a session opened with the same options as the engine's. Decode at
 * batch 1 cannot beat one pass over its weights, so bandwidth / weight bytes is the ceiling.
 */

const LIMIT_VERSION = 1;
const GRAPH = 'model.onnx';
const DATA = 'model.onnx.data';

export interface LimitResult {
  /** matrix side and count */
  d: number;
  matrices: number;
  /** bytes streamed per run (n · d² · 4) */
  bytes: number;
  runMs: number;
  bandwidthGBs: number;
  /** the model's streamed weight bytes, and the decode rate a pass over them at this bandwidth allows */
  modelBytes: number;
  limitTokPerS: number;
}

/** d = 2048 (as DESIGN's calibration) unless the model is too small for 8 such matrices. */
export function chainShape(modelBytes: number): { d: number; matrices: number } {
  let d = 2048;
  while (d > 64 && modelBytes / (4 * d * d) < 8) d /= 2;
  return { d, matrices: Math.max(1, Math.round(modelBytes / (4 * d * d))) };
}

async function buildChain(dir: string, d: number, n: number): Promise<void> {
  await mkdir(dir, { recursive: true });
  const fh = await open(join(dir, DATA), 'w');
  const g = new GraphBuilder(new ExternalDataWriter(fh, DATA));
  try {
    let x = g.input('x', 'float32', [1, d]);
    // variance 1/d keeps the activations O(1) along the chain (no denormals, no overflow)
    let seed = 0x1157;
    const w = new Float32Array(d * d);
    const scale = Math.sqrt(3 / d) * 2;
    for (let i = 0; i < n; i++) {
      for (let k = 0; k < w.length; k++) {
        seed = (Math.imul(seed, 1664525) + 1013904223) >>> 0;
        w[k] = (seed / 4294967296 - 0.5) * scale;
      }
      x = g.op('MatMul', [x, await g.weight(`w${i}`, 'float32', [d, d], w)]);
    }
    g.node('Identity', [x], { outputs: ['y'] });
    g.output('y', 'float32', [1, d]);
    await fh.sync();
    await writeFile(join(dir, GRAPH), g.encode('bandwidth-chain', { '': 17 }, String(LIMIT_VERSION)));
  } finally {
    await fh.close();
  }
}

async function ensureChain(cacheRoot: string, d: number, n: number): Promise<string> {
  const dir = join(cacheRoot, `limit-v${LIMIT_VERSION}-d${d}-n${n}`);
  try {
    if ((await readFile(join(dir, '.complete'), 'utf8')).trim() === 'ok') return dir;
  } catch {
    // not built yet
  }
  const tmp = `${dir}.tmp-${process.pid}-${randomUUID().slice(0, 8)}`;
  try {
    await buildChain(tmp, d, n);
    await writeFile(join(tmp, '.complete'), 'ok\n');
    await rm(dir, { recursive: true, force: true });
    await rename(tmp, dir);
  } catch (e) {
    await rm(tmp, { recursive: true, force: true });
    throw e;
  }
  return dir;
}

export async function measureLimit(cacheRoot: string, modelBytes: number, opts: { runs: number; progress: (l: string) => void }): Promise<LimitResult> {
  const { d, matrices } = chainShape(modelBytes);
  const bytes = matrices * d * d * 4;
  opts.progress(`limit: chain of ${matrices} MatMuls [1,${d}]·[${d},${d}] fp32 (${(bytes / 1e9).toFixed(3)} GB)`);
  const dir = await ensureChain(cacheRoot, d, matrices);
  const x = new ort.Tensor('float32', new Float32Array(d).fill(0.5), [1, d]);
  const runMs = await medianRunMs(join(dir, GRAPH), { x }, { runs: opts.runs, warmups: 3, output: 'y', what: 'the bandwidth chain' });
  const bandwidth = bytes / (runMs / 1000);
  return { d, matrices, bytes, runMs, bandwidthGBs: bandwidth / 1e9, modelBytes, limitTokPerS: bandwidth / modelBytes };
}
