import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { llamaConfigJson } from './helpers/adapter-fixtures.js';
import { checkAdapterAgainstReference, FAMILY_VOCAB, serveFamily, storedTensors, type FamilyFolder, type ServedFamily } from './helpers/family-serve.js';
import { randomCheckpoint, tinyArchitecture, type MemoryTensor } from './helpers/random-checkpoint.js';
import { dequantizedProjections } from './helpers/quantized-graph.js';

/**
 * WEIGHTS=int4/int8 served end to end: the adapter's output must equal the independent reference
 * forward of the DEQUANTIZED base with the adapter merged (the quantization is then the only
 * difference from fp32). The dequantized weights are read back from the built graph's own
 * initializers and decoded by test/reference/matmulnbits.ts (from the op's documented layout),
 * so nothing of the builder's quantizer is trusted. WEIGHTS_ACCURACY_LEVEL=0 makes MatMulNBits
 * compute in float; the default (4, int8 activations) is measured separately below.
 */

describe('quantized base weights (WEIGHTS=int4|int8) with an fp32 adapter on top', () => {
  // intermediate 80: down_proj's K is not a multiple of the block size 32 (padding)
  const arch = tinyArchitecture({ vocabSize: FAMILY_VOCAB, maxPositions: 256, bosTokenId: 506, eosTokenIds: [507], intermediateSize: 80, tieWordEmbeddings: false });
  const folder: FamilyFolder = { config: llamaConfigJson(arch, { torch_dtype: 'float32' }), tensors: randomCheckpoint(arch, 71).tensors, dtype: 'F32' };

  for (const bits of ['int4', 'int8'] as const) {
    describe(bits, () => {
      let served: ServedFamily;
      beforeAll(async () => {
        served = await serveFamily(`quant-${bits}`, folder, { WEIGHTS: bits, WEIGHTS_ACCURACY_LEVEL: '0' });
      });
      afterAll(async () => {
        await served?.close();
      });

      it('serves MatMulNBits projections; output equals the reference of the dequantized base + merged adapter (≤ 1e-4)', async () => {
        expect(served.app.runtime.manifest.weights).toBe(bits);
        const deq = await dequantizedProjections(served.app.runtime.modelDir);

        expect(deq.size).toBe(arch.numLayers * 7 + 1); // 7 projections per layer, and the LM head
        const stored = storedTensors(folder);
        const dequantized = new Map<string, MemoryTensor>(stored);
        let quantError = 0;
        for (const [name, w] of deq) {
          const orig = stored.get(name)!;
          expect(orig.data.length).toBe(w.length);
          for (let i = 0; i < w.length; i++) quantError = Math.max(quantError, Math.abs(w[i]! - orig.data[i]!));
          dequantized.set(name, { shape: orig.shape, data: w });
        }
        // the base really is quantized (else this test compares fp32 with fp32)
        expect(quantError).toBeGreaterThan(bits === 'int4' ? 1e-3 : 1e-5);
        const r = await checkAdapterAgainstReference(served, dequantized, { maxTokens: 10 });
        console.log(`${bits}: served vs dequantized reference, worst logprob diff ${r.worst.toExponential(2)}, adapter effect ${r.effect.toFixed(3)}, max |w − dequant(w)| ${quantError.toExponential(2)}`);
        expect(r.worst).toBeLessThanOrEqual(1e-4);
        expect(r.effect).toBeGreaterThan(1e-2);
      });
    });
  }
});
