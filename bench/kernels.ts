import { randomFillSync } from 'node:crypto';
import { tmpdir } from 'node:os';
import { mkdtemp, open, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import ort from 'onnxruntime-node';
import { projectionBlock, projectionDims, projectionsOf, type Architecture } from '../src/model/architecture.js';
import { ExternalDataWriter, GraphBuilder } from '../src/model/graph/onnx-builder.js';
import { matMulNBits } from '../src/model/graph/matmulnbits.js';
import { blockLayout, QUANT_BLOCK, type QuantBits, type QuantizedWeight } from '../src/model/graph/quantize.js';
import { llamaCppLine, type LlamaCppSection } from './llama-cpp.js';
import { medianRunMs } from './graph-timing.js';

/**
 * The quantized kernels' ceiling, measured in the same run: a graph holding only the
 * `MatMulNBits` products of one decode step of this architecture (every projection of every layer
 * and the LM head, at the shapes, width, block size, zero points and accuracy level WEIGHTS=int4 /
 * int8 build), with random codes, and nothing else: no attention, norms, LoRA, KV or sampling.
 * A served step does all of that on top, so its tok/s cannot exceed this one's; and a target set
 * against llama.cpp that this ceiling misses cannot be met by anything above the runtime's kernels.
 */

export interface KernelMatMul {
  name: string;
  /** output and input features, as MatMulNBits' N and K */
  n: number;
  k: number;
}

/** the products of one decode step, in graph order: each layer's projections, then the head */
export function stepMatMuls(a: Architecture): KernelMatMul[] {
  const out: KernelMatMul[] = [];
  for (let l = 0; l < a.numLayers; l++) {
    for (const p of projectionsOf(a)) {
      const { inFeatures, outFeatures } = projectionDims(a, p);
      out.push({ name: `model.layers.${l}.${projectionBlock(p)}.${p}.weight`, n: outFeatures, k: inFeatures });
    }
  }
  out.push({ name: 'lm_head.weight', n: a.vocabSize, k: a.hiddenSize });
  return out;
}

export interface KernelLine {
  bits: QuantBits;
  rows: number;
  /** median of one run of every product */
  runMs: number;
  /** rows tokens per run */
  tokPerS: number;
  /** the head's product alone (its share of runMs) */
  headMs: number;
}

export interface KernelCeiling {
  what: string;
  products: number;
  accuracyLevel: number;
  lines: KernelLine[];
}

/** random codes in the served layout; small scales and mid-range zero points keep the outputs finite (the values do not change the kernel's work) */
function randomQuantized(m: KernelMatMul, bits: QuantBits): QuantizedWeight {
  const { nBlocks, blob, zpRow } = blockLayout(m.k, bits);
  return {
    bits,
    blockSize: QUANT_BLOCK,
    n: m.n,
    k: m.k,
    nBlocks,
    packed: randomFillSync(new Uint8Array(m.n * nBlocks * blob)),
    scales: new Float32Array(m.n * nBlocks).fill(1 / 1024),
    zeroPoints: new Uint8Array(m.n * zpRow).fill(bits === 4 ? 0x88 : 0x80),
  };
}

/**
 * `dir/stem.onnx` (and `stem.data`): one graph input per distinct K, one graph output per product: nothing orders or joins the
 * products, so the graph is the kernels and the copies of their outputs (the logits' copy is in
 * every served step too).
 */
export async function writeKernelGraph(dir: string, stem: string, products: readonly KernelMatMul[], bits: QuantBits, accuracyLevel: number, rows: number): Promise<string> {
  const dataName = `${stem}.data`;
  const fh = await open(join(dir, dataName), 'w');
  const g = new GraphBuilder(new ExternalDataWriter(fh, dataName));
  try {
    const inputs = new Map<number, string>();
    for (const [i, m] of products.entries()) {
      if (!inputs.has(m.k)) inputs.set(m.k, g.input(`x${m.k}`, 'float32', [rows, m.k]));
      const y = await matMulNBits(g, m.name, inputs.get(m.k)!, randomQuantized(m, bits), 'float32', accuracyLevel);
      g.node('Identity', [y], { outputs: [`y${i}`] });
      g.output(`y${i}`, 'float32', [rows, m.n]);
    }
    await fh.sync();
  } finally {
    await fh.close();
  }
  const graph = join(dir, `${stem}.onnx`);
  await writeFile(graph, g.encode('kernel-ceiling', { '': 17, 'com.microsoft': 1 }, '1'));
  return graph;
}

function timeGraph(path: string, products: readonly KernelMatMul[], rows: number, runs: number): Promise<number> {
  const feeds: Record<string, ort.Tensor> = {};
  for (const m of products) feeds[`x${m.k}`] ??= new ort.Tensor('float32', new Float32Array(rows * m.k).fill(0.25), [rows, m.k]);
  return medianRunMs(path, feeds, { runs, warmups: 2, output: `y${products.length - 1}`, what: 'the kernel-ceiling graph' });
}

export async function measureKernelCeiling(
  a: Architecture,
  o: { bits: readonly QuantBits[]; rows: readonly number[]; runs: number; accuracyLevel?: number; progress: (l: string) => void },
): Promise<KernelCeiling> {
  const products = stepMatMuls(a);
  const head = products.slice(-1);
  const accuracyLevel = o.accuracyLevel ?? 4;
  const dir = await mkdtemp(join(tmpdir(), 'loraserve-kernels-'));
  const lines: KernelLine[] = [];
  try {
    for (const bits of o.bits) {
      for (const rows of o.rows) {
        o.progress(`kernels: ${products.length} MatMulNBits (${bits}-bit, block ${QUANT_BLOCK}, accuracy_level ${accuracyLevel}) at ${rows} row${rows === 1 ? '' : 's'}`);
        const time = async (stem: string, set: readonly KernelMatMul[]) => {
          const ms = await timeGraph(await writeKernelGraph(dir, stem, set, bits, accuracyLevel, rows), set, rows, o.runs);
          // up to a quantized model's size per graph: gone before the next is written
          await Promise.all([rm(join(dir, `${stem}.onnx`)), rm(join(dir, `${stem}.data`))]);
          return ms;
        };
        const runMs = await time(`step-${bits}-${rows}`, products);
        lines.push({ bits, rows, runMs, tokPerS: (rows * 1000) / runMs, headMs: await time(`head-${bits}-${rows}`, head) });
      }
    }
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
  return { what: 'only the MatMulNBits products of one decode step (projections and LM head), random codes, the served session options', products: products.length, accuracyLevel, lines };
}

/**
 * Ours over the kernels' ceiling (how much of it the served step keeps), and the ceiling over
 * llama.cpp (the most any served step could reach against it on this machine).
 */
export function kernelCeilingRatios(
  k: KernelCeiling,
  ours: { int8B1: { decodeTokPerS: number } | null; int4B1: { decodeTokPerS: number } | null; int4Mixed8: { decodeTokPerS: number } | null },
  llamaCpp: LlamaCppSection,
): Record<string, number> {
  const at = (bits: QuantBits, rows: number) => k.lines.find((l) => l.bits === bits && l.rows === rows)?.tokPerS ?? Number.NaN;
  const d = (t: { decodeTokPerS: number } | null) => t?.decodeTokPerS ?? Number.NaN;
  const out: Record<string, number> = {
    int4B1OverKernelCeiling: d(ours.int4B1) / at(4, 1),
    int8B1OverKernelCeiling: d(ours.int8B1) / at(8, 1),
    int4Mixed8OverKernelCeiling: d(ours.int4Mixed8) / at(4, 8),
  };
  const [q8, q4] = [llamaCppLine(llamaCpp, 'Q8_0'), llamaCppLine(llamaCpp, 'Q4_0')];
  if (q8 && q4) {
    out.kernelCeilingInt4B1OverLlamaCppQ4_0 = at(4, 1) / d(q4.b1);
    out.kernelCeilingInt8B1OverLlamaCppQ8_0 = at(8, 1) / d(q8.b1);
    out.kernelCeilingInt4Rows8OverLlamaCppQ4_0Seq8 = at(4, 8) / d(q4.seq8);
  }
  return out;
}
