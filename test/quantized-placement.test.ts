import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { ConfigError, loadConfig } from '../src/config.js';
import { buildModel, sourceHash } from '../src/model/build.js';
import { placementLine, resolvePlacement, resolveWeights, type CudaProbe } from '../src/model/placement.js';
import { randomCheckpoint, tinyArchitecture } from './helpers/random-checkpoint.js';

const loads: CudaProbe = async () => ({ ok: true });
const missing: CudaProbe = async () => ({ ok: false, reason: 'no cuda' });

describe('WEIGHTS setting', () => {
  it('parses fp32|fp16|int8|int4|auto (default auto, accuracy level 4) and refuses anything else', () => {
    expect(loadConfig({})).toMatchObject({ WEIGHTS: 'auto', WEIGHTS_ACCURACY_LEVEL: 4 });
    expect(loadConfig({ WEIGHTS: 'int4', WEIGHTS_ACCURACY_LEVEL: '0' })).toMatchObject({ WEIGHTS: 'int4', WEIGHTS_ACCURACY_LEVEL: 0 });
    expect(loadConfig({}, { WEIGHTS: 'int8' }).WEIGHTS).toBe('int8');
    expect(() => loadConfig({ WEIGHTS: 'q4_0' })).toThrow(ConfigError);
    expect(() => loadConfig({ WEIGHTS_ACCURACY_LEVEL: '2' })).toThrow(ConfigError);
  });

  it('auto stays unquantized on both devices; int8/int4 keep the DTYPE rule for the compute dtype', async () => {
    expect((await resolvePlacement({ device: 'auto', dtype: 'auto', weights: 'auto' }, missing)).weights).toBeUndefined();
    expect((await resolvePlacement({ device: 'auto', dtype: 'auto', weights: 'auto' }, loads)).weights).toBeUndefined();
    const cpu = await resolvePlacement({ device: 'auto', dtype: 'auto', weights: 'int4' }, missing);
    expect(cpu).toMatchObject({ provider: 'cpu', dtype: 'fp32', weights: 'int4' });
    expect(placementLine(cpu)).toMatch(/dtype fp32, weights int4: .*WEIGHTS=int4/);
    expect(await resolvePlacement({ device: 'auto', dtype: 'auto', weights: 'int8' }, loads)).toMatchObject({ provider: 'cuda', dtype: 'fp16', weights: 'int8' });
  });

  it('WEIGHTS=fp16/fp32 pick the graph dtype, and contradicting an explicit DTYPE is an error', async () => {
    expect(await resolvePlacement({ device: 'cpu', dtype: 'auto', weights: 'fp16' }, missing)).toMatchObject({ dtype: 'fp16' });
    expect(await resolvePlacement({ device: 'auto', dtype: 'auto', weights: 'fp32' }, loads)).toMatchObject({ provider: 'cuda', dtype: 'fp32' });
    expect(resolveWeights('fp16', 'fp16')).toMatchObject({ dtype: 'fp16' });
    expect(() => resolveWeights('fp16', 'fp32')).toThrow(/WEIGHTS=fp16 contradicts DTYPE=fp32/);
  });
});

describe('the build cache keys on the weights', () => {
  it('plain, int8, int4 and each accuracy level are distinct builds; a plain key is unchanged by the new option', async () => {
    const ck = randomCheckpoint(tinyArchitecture(), 3);
    const base = { dtype: 'fp32' as const, logits: 'last' as const, lora: true, peer: false };
    const keys = await Promise.all([
      sourceHash(ck, base),
      sourceHash(ck, { ...base, weights: 'int8' }),
      sourceHash(ck, { ...base, weights: 'int4' }),
      sourceHash(ck, { ...base, weights: 'int4', accuracyLevel: 0 }),
    ]);
    expect(new Set(keys).size).toBe(4);
    const root = await mkdtemp(join(tmpdir(), 'loraserve-quant-key-'));
    try {
      const plain = await buildModel(ck, { outDir: root, dtype: 'fp32', logits: 'last' });
      const q = await buildModel(ck, { outDir: root, dtype: 'fp32', logits: 'last', weights: 'int4' });
      expect(q.dir).not.toBe(plain.dir);
      expect(plain.manifest.weights).toBeUndefined();
      expect(q.manifest.weights).toBe('int4');
      expect((await buildModel(ck, { outDir: root, dtype: 'fp32', logits: 'last', weights: 'int4' })).cached).toBe(true);
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });
});
