import ort from 'onnxruntime-node';
import { describe, expect, it } from 'vitest';
import { allocModel } from '../src/engine/dtype.js';

/**
 * The fp16 engine keeps float16 data as Uint16Array bits. On Node 24, which has Float16Array,
 * onnxruntime-common would otherwise store float16 tensors as Float16Array values, which
 * onnxruntime-node 1.30's binding cannot read (every fp16 run failed on Node 24 before
 * src/model/ort-float16.ts). On Node 20 this holds trivially; the suite is run on both (README).
 */
describe('float16 tensors on this Node', () => {
  it(`hold Uint16Array bits (Node ${process.versions.node}, Float16Array ${typeof (globalThis as { Float16Array?: unknown }).Float16Array})`, () => {
    const bits = allocModel('fp16', 2);
    bits.set([0x3c00, 0xc000]); // 1.0 and -2.0 as IEEE half bits
    const t = new ort.Tensor('float16', bits, [2]);
    expect(t.data).toBeInstanceOf(Uint16Array);
    expect([...(t.data as Uint16Array)]).toEqual([0x3c00, 0xc000]);
    // what the runtime offers is left as it was
    if (Number(process.versions.node.split('.')[0]) >= 24) expect(typeof (globalThis as { Float16Array?: unknown }).Float16Array).toBe('function');
  });
});
