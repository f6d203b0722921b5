import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildModel } from '../src/model/build.js';
import { measureKernelCeiling, stepMatMuls, writeKernelGraph } from '../bench/kernels.js';
import { matMulNBitsNodes, type MatMulNBitsNode } from './helpers/quantized-graph.js';
import { randomCheckpoint, tinyArchitecture } from './helpers/random-checkpoint.js';

/**
 * The bench's kernel ceiling is only a ceiling of the served int4/int8 step if it runs exactly the
 * served graph's MatMulNBits products: same weights' shapes, width, block size and accuracy level.
 */
const CASES = [
  { label: 'llama, tied embeddings', arch: tinyArchitecture({ numHeads: 4, numKvHeads: 2, headDim: 16 }) },
  { label: 'qwen2, untied head', arch: tinyArchitecture({ family: 'qwen2', hiddenSize: 48, intermediateSize: 80, numHeads: 6, numKvHeads: 2, headDim: 8, vocabSize: 100, attentionBias: true, tieWordEmbeddings: false, ropeTheta: 1e6 }) },
  { label: 'phi3, fused projections', arch: tinyArchitecture({ family: 'phi3', fusedProjections: true, numHeads: 4, numKvHeads: 2, headDim: 16, tieWordEmbeddings: false }) },
];

const byName = (nodes: MatMulNBitsNode[]) => [...nodes].sort((x, y) => x.name.localeCompare(y.name));

describe('bench kernel ceiling', () => {
  let root: string;
  beforeAll(async () => {
    root = await mkdtemp(join(tmpdir(), 'loraserve-kernels-test-'));
  });
  afterAll(async () => {
    await rm(root, { recursive: true, force: true });
  });

  describe.each(CASES)('$label', ({ arch }) => {
    it.each(['int4', 'int8'] as const)('%s: the ceiling graph holds exactly the served graph\'s MatMulNBits products', async (weights) => {
      const built = await buildModel(randomCheckpoint(arch, 7), { outDir: join(root, 'built'), dtype: 'fp32', logits: 'last', kv: 'gqa', weights, accuracyLevel: 4 });
      const served = await matMulNBitsNodes(join(built.dir, built.manifest.files.graph));
      const bits = weights === 'int4' ? 4 : 8;
      const stem = `${arch.family}-${weights}`;
      await writeKernelGraph(root, stem, stepMatMuls(arch), bits, 4, 1);
      const ceiling = await matMulNBitsNodes(join(root, `${stem}.onnx`));
      expect(served.length).toBeGreaterThan(arch.numLayers);
      expect(byName(ceiling)).toEqual(byName(served));
    });
  });

  it('measures every width and row count it is asked for', async () => {
    const k = await measureKernelCeiling(CASES[0]!.arch, { bits: [4, 8], rows: [1, 3], runs: 2, progress: () => {} });
    expect(k.products).toBe(stepMatMuls(CASES[0]!.arch).length);
    expect(k.lines.map((l) => [l.bits, l.rows])).toEqual([[4, 1], [4, 3], [8, 1], [8, 3]]);
    for (const l of k.lines) {
      expect(l.runMs).toBeGreaterThan(0);
      expect(l.headMs).toBeGreaterThan(0);
      expect(l.tokPerS).toBeCloseTo((l.rows * 1000) / l.runMs, 6);
    }
  });
});
