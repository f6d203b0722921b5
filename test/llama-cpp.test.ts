import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Architecture } from '../src/model/architecture.js';
import { embeddedModelFiles } from '../src/model/embedded.js';
import { writeCheckpointGguf } from '../bench/gguf/convert.js';
import { dequantizeQ4_0, dequantizeQ8_0, quantizeQ4_0, quantizeQ8_0 } from '../bench/gguf/quants.js';
import { llamaCppLogits, loadGguf, loadLlamaCpp, runLlamaCpp, type LlamaCppLoad } from '../bench/llama-cpp.js';
import { randomCheckpoint, randomTokens, Rng, tinyArchitecture, type MemoryCheckpoint, type MemoryTensor } from './helpers/random-checkpoint.js';
import { referenceForward } from './reference/forward.js';

/**
 * The bench's llama.cpp line compares the same model: a random llama (Hugging Face rotate_half
 * RoPE, which the writer permutes into llama.cpp's pair layout; GQA; untied head) and a random
 * qwen2 (q/k/v biases, tied embeddings, NeoX RoPE), a llama with Llama 3 RoPE scaling and one in
 * llama2.c's interleaved layout, written to F32 GGUF and run by node-llama-cpp, must give the
 * logits of the independent reference forward (test/reference/forward.ts) for the same token ids;
 * the Q8_0 / Q4_0 files must follow the reference of their dequantized weights. If the binary
 * cannot load here, the tests say so and why, and are skipped.
 */

const tokenizerJson = (() => {
  const t = embeddedModelFiles().get('tokenizer.json');
  if (!t) throw new Error('the embedded model has no tokenizer.json');
  return t.toString('utf8');
})();

const families: [string, Architecture][] = [
  ['llama', tinyArchitecture({ family: 'llama', vocabSize: 576, intermediateSize: 96, tieWordEmbeddings: false, maxPositions: 128, bosTokenId: 507, eosTokenIds: [508] })],
  // Llama 3 RoPE scaling (the writer's rope_freqs tensor) over an original context short enough that every branch of the factor formula is used
  ['llama3-rope', tinyArchitecture({ family: 'llama', vocabSize: 576, intermediateSize: 96, tieWordEmbeddings: true, maxPositions: 128, bosTokenId: 507, eosTokenIds: [508], rope: { type: 'llama3', factor: 8, lowFreqFactor: 1, highFreqFactor: 4, originalMaxPositions: 64 } })],
  // llama2.c's interleaved layout is llama.cpp's own: written without the permutation
  ['llama-interleaved', tinyArchitecture({ family: 'llama', vocabSize: 576, intermediateSize: 96, ropeLayout: 'interleaved', tieWordEmbeddings: false, maxPositions: 128, bosTokenId: 507, eosTokenIds: [508] })],
  ['qwen2', tinyArchitecture({ family: 'qwen2', vocabSize: 576, intermediateSize: 128, tieWordEmbeddings: true, attentionBias: true, ropeTheta: 1_000_000, rmsNormEps: 1e-6, maxPositions: 128, bosTokenId: 507, eosTokenIds: [508] })],
];

let load: LlamaCppLoad;
let dir: string;

beforeAll(async () => {
  load = await loadLlamaCpp();
  if (!load.ok) console.warn(`SKIPPING test/llama-cpp.test.ts: ${load.missing}`);
  dir = await mkdtemp(join(tmpdir(), 'loraserve-llamacpp-'));
}, 60_000);

afterAll(async () => {
  if (dir) await rm(dir, { recursive: true, force: true });
});

describe('node-llama-cpp on GGUF files the bench writes', () => {
  for (const [name, arch] of families) {
    it(`${name}: F32 GGUF logits equal the reference forward for the same tokens (≤ 1e-4)`, async (ctx) => {
      if (!load.ok) return ctx.skip(load.missing);
      const ck = randomCheckpoint(arch, 301 + families.findIndex(([n]) => n === name));
      const path = join(dir, `${name}.gguf`);
      await writeCheckpointGguf(ck, tokenizerJson, path, 'F32');
      const tokens = randomTokens(new Rng(7), 12, 512);
      const expected = referenceForward(ck, tokens);
      const m = await loadGguf(load.llama, path);
      try {
        expect(m.model.vocabularyType).toBe('bpe');
        const got = await llamaCppLogits(m.model, tokens, arch.vocabSize, 2);
        let worst = 0;
        let spread = 0;
        for (let p = 0; p < tokens.length; p++) {
          for (let v = 0; v < arch.vocabSize; v++) worst = Math.max(worst, Math.abs(got[p][v] - expected[p][v]));
          spread = Math.max(spread, Math.max(...expected[p]) - Math.min(...expected[p]));
        }
        console.log(`${name}: node-llama-cpp vs reference, worst |Δlogit| ${worst.toExponential(2)} over ${tokens.length} positions × ${arch.vocabSize} (logit spread ${spread.toFixed(2)})`);
        // the logits vary by units: a wrong permutation, bias or norm moves them by far more than this
        expect(spread).toBeGreaterThan(1);
        expect(worst).toBeLessThanOrEqual(1e-4);
      } finally {
        await m.close();
      }
    }, 60_000);
  }

  for (const [name, arch] of families.filter(([n]) => n === 'llama' || n === 'qwen2')) {
    for (const type of ['Q8_0', 'Q4_0'] as const) {
      it(`${name} ${type}: logits follow the reference forward of the dequantized weights (blocks read as written)`, async (ctx) => {
        if (!load.ok) return ctx.skip(load.missing);
        const ck = randomCheckpoint(arch, 311);
        const path = join(dir, `${name}-${type}.gguf`);
        await writeCheckpointGguf(ck, tokenizerJson, path, type);
        const tokens = randomTokens(new Rng(8), 12, 512);
        const quantized = reference(dequantizedCopy(ck, type), tokens);
        const plain = reference(ck, tokens);
        const m = await loadGguf(load.llama, path);
        try {
          const got = await llamaCppLogits(m.model, tokens, arch.vocabSize, 2);
          const worst = (want: Float32Array[]) => Math.max(...want.map((row, p) => Math.max(...row.map((x, v) => Math.abs(got[p][v] - x)))));
          const toDequantized = worst(quantized);
          const toPlain = worst(plain);
          const spread = Math.max(...quantized.map((row) => Math.max(...row) - Math.min(...row)));
          console.log(`${name} ${type}: worst |Δlogit| vs dequantized reference ${toDequantized.toExponential(2)}, vs unquantized ${toPlain.toExponential(2)} (logit spread ${spread.toFixed(1)})`);
          // llama.cpp also rounds the activations to 8 bits in these matmuls (measured: 0.5–0.7 % of
          // the spread); a block read with the wrong scale or nibble order would be off by the spread
          expect(toDequantized).toBeLessThan(0.015 * spread);
          // and the quantization is really there: the dequantized model is the closer one
          expect(toDequantized).toBeLessThan(toPlain);
        } finally {
          await m.close();
        }
      }, 60_000);
    }
  }

  it('runs 1 and 8 sequences for the asked number of tokens, greedy and deterministic', async (ctx) => {
    if (!load.ok) return ctx.skip(load.missing);
    const arch = families.find(([n]) => n === 'qwen2')![1];
    const ck = randomCheckpoint(arch, 303);
    const path = join(dir, 'q4.gguf');
    await writeCheckpointGguf(ck, tokenizerJson, path, 'Q4_0');
    const m = await loadGguf(load.llama, path);
    try {
      const spec = { promptIds: randomTokens(new Rng(9), 10, 512), maxTokens: 12, threads: 2 };
      const one = await runLlamaCpp(m.model, spec, 1);
      const eight = await runLlamaCpp(m.model, spec, 8);
      expect(one.throughput).toMatchObject({ streams: 1, tokens: 12 });
      expect(eight.throughput).toMatchObject({ streams: 8, tokens: 96 });
      // the same prompt decodes to the same greedy tokens alone and beside 7 others
      expect(eight.tokens).toEqual(one.tokens);
    } finally {
      await m.close();
    }
  }, 60_000);
});

const reference = (ck: MemoryCheckpoint, tokens: readonly number[]) => referenceForward(ck, tokens);

/** every 2-D weight replaced by what its Q8_0 / Q4_0 blocks decode to (rows here are whole blocks) */
function dequantizedCopy(ck: MemoryCheckpoint, type: 'Q8_0' | 'Q4_0'): MemoryCheckpoint {
  const replaced = new Map<string, MemoryTensor>();
  for (const [name, t] of ck.tensors) {
    if (t.shape.length !== 2) continue;
    if (t.shape[1] % 32 !== 0) throw new Error(`${name}: rows of ${t.shape[1]} are not whole blocks`);
    const data = type === 'Q8_0' ? dequantizeQ8_0(quantizeQ8_0(t.data), t.data.length) : dequantizeQ4_0(quantizeQ4_0(t.data), t.data.length);
    replaced.set(name, { shape: t.shape, data });
  }
  return ck.with(replaced);
}
