import { describe, expect, it } from 'vitest';
import { placementLine, probeCuda, resolvePlacement, type CudaProbe } from '../src/model/placement.js';

/**
 * DEVICE and DTYPE are resolved together before the graph is built. The CUDA probe is simulated
 * here (this machine has no CUDA provider); the real probe is run too, and must say why it failed.
 */

const loads: CudaProbe = async () => ({ ok: true });
const missing: CudaProbe = async () => ({ ok: false, reason: 'libonnxruntime_providers_cuda.so: cannot open shared object file' });
const never: CudaProbe = async () => {
  throw new Error('DEVICE=cpu must not probe CUDA');
};

describe('device and dtype', () => {
  it('DEVICE=auto with CUDA loading → cuda, fp16 by default; the log line says device, provider, dtype and why', async () => {
    const p = await resolvePlacement({ device: 'auto', dtype: 'auto' }, loads);
    expect(p).toMatchObject({ provider: 'cuda', dtype: 'fp16' });
    const line = placementLine(p);
    expect(line).toContain('device cuda');
    expect(line).toContain('CUDAExecutionProvider');
    expect(line).toContain('dtype fp16');
    expect(line).toMatch(/DEVICE=auto and the CUDA execution provider loaded; DTYPE=auto: fp16 on cuda/);
  });

  it('DEVICE=auto without CUDA → cpu, fp32, and the reason names what failed', async () => {
    const p = await resolvePlacement({ device: 'auto', dtype: 'auto' }, missing);
    expect(p).toMatchObject({ provider: 'cpu', dtype: 'fp32' });
    expect(placementLine(p)).toMatch(/device cpu, provider CPUExecutionProvider, dtype fp32: DEVICE=auto and CUDA is unavailable \(libonnxruntime_providers_cuda\.so/);
  });

  it('an explicit DTYPE wins on either device', async () => {
    expect(await resolvePlacement({ device: 'auto', dtype: 'fp32' }, loads)).toMatchObject({ provider: 'cuda', dtype: 'fp32' });
    expect(await resolvePlacement({ device: 'auto', dtype: 'fp16' }, missing)).toMatchObject({ provider: 'cpu', dtype: 'fp16' });
    expect((await resolvePlacement({ device: 'cuda', dtype: 'fp32' }, loads)).reason).toMatch(/DEVICE=cuda .*; DTYPE=fp32/);
  });

  it('DEVICE=cpu never probes; DEVICE=cuda without CUDA fails loudly instead of falling back', async () => {
    expect(await resolvePlacement({ device: 'cpu', dtype: 'auto' }, never)).toMatchObject({ provider: 'cpu', dtype: 'fp32' });
    await expect(resolvePlacement({ device: 'cuda', dtype: 'auto' }, missing)).rejects.toThrow(/DEVICE=cuda but the CUDA execution provider does not load: libonnxruntime_providers_cuda/);
  });

  it('the real probe on this machine reports whether the CUDA provider loads, with a reason when it does not', async () => {
    const r = await probeCuda();
    if (r.ok) console.info('[placement] the CUDA execution provider loads here');
    else {
      console.info(`[placement] no CUDA here: ${r.reason}`);
      expect(r.reason.length).toBeGreaterThan(0);
      expect(await resolvePlacement({ device: 'auto', dtype: 'auto' })).toMatchObject({ provider: 'cpu', dtype: 'fp32' });
    }
  });
});
