import type { ModelDtype } from '../model/manifest.js';
import { CONFIG_FILE } from './peft-config.js';
import { error, type Problem } from './report.js';
import type { ResolvedModule } from './resolve.js';

/**
 * The values the engine really uses are not the file's: the converter folds each module's scale
 * into lora_B (convert.ts), and the graph holds the result in its own dtype (fp32 on CPU, fp16 on
 * CUDA). A finite B times a huge scale (lora_alpha 1e308) overflows there to ±Inf, and every token
 * through that module becomes NaN. A smaller one (lora_alpha 1e30: scale·B ≈ 1e27) is finite as a
 * weight, but what it adds to the residual stream is squared by the next RMSNorm, and past
 * √(float32 max) ≈ 1.8e19 that square is Inf in float32, the precision norms accumulate in on
 * both providers. So max|B| · |scale| must stay within the dtype's largest value and within
 * √(float32 max): a bound no trained adapter comes near (theirs are below 100), checked per module
 * and reported once per config key that set the scale.
 */

export const DTYPE_MAX: Readonly<Record<ModelDtype, number>> = {
  fp32: 3.4028234663852886e38,
  fp16: 65504,
};

/** The largest max|B|·|scale| accepted for an engine running in `dtype`. */
export const scaledLimit = (dtype: ModelDtype): number => Math.min(DTYPE_MAX[dtype], Math.sqrt(DTYPE_MAX.fp32));

const DTYPE_NAME: Readonly<Record<ModelDtype, string>> = { fp32: 'float32', fp16: 'float16' };

/** Largest |x| over the finite values (NaN/±Inf are reported on their own). */
export function maxAbsFinite(v: Float32Array): number {
  let max = 0;
  for (let i = 0; i < v.length; i++) {
    const a = Math.abs(v[i]!);
    if (a > max && a !== Infinity) max = a;
  }
  return max;
}

export interface ScaledModule {
  module: ResolvedModule;
  /** the lora_B key as it is in the file */
  tensorB: string;
  /** largest |value| of that lora_B in the file */
  maxAbsB: number;
}

const num = (x: number) => (Math.abs(x) >= 1e6 || (x !== 0 && Math.abs(x) < 1e-3) ? x.toExponential(3) : String(+x.toPrecision(6)));

/** Pure: one `non_finite` problem per key (lora_alpha, an alpha_pattern key, r, …) whose scale overflows. */
export function scaleOverflowProblems(mods: readonly ScaledModule[], dtype: ModelDtype, useRslora: boolean): Problem[] {
  const limit = scaledLimit(dtype);
  const byKey = new Map<string, { m: ScaledModule; effective: number; count: number }>();
  for (const m of mods) {
    const effective = m.maxAbsB * Math.abs(m.module.scale);
    // !(x <= limit) also catches a NaN scale (Infinity × 0)
    if (effective <= limit && Number.isFinite(m.module.scale)) continue;
    const key = m.module.alphaKey;
    const prev = byKey.get(key);
    if (!prev) byKey.set(key, { m, effective, count: 1 });
    else {
      prev.count++;
      if (!(prev.effective >= effective)) Object.assign(prev, { m, effective });
    }
  }
  return [...byKey].map(([key, { m, effective, count }]) => {
    const r = m.module;
    const how = `${r.alphaKey === 'lora_alpha' ? `lora_alpha = ${num(r.alpha)}` : `alpha_pattern key "${r.alphaKey.slice(0, 80)}" = ${num(r.alpha)}`} / ${useRslora ? `√${r.rank}` : r.rank}`;
    return error({
      code: 'non_finite',
      file: CONFIG_FILE,
      tensor: m.tensorB,
      module: r.target.name,
      key,
      expected: `<= ${limit}`,
      actual: effective,
      message: `${r.target.name}: its scale ${num(r.scale)} (${how}${useRslora ? ' with rslora: alpha / √rank' : ''}) times max |lora_B| ${num(m.maxAbsB)} is ${num(effective)}, past ${limit === DTYPE_MAX[dtype] ? `the largest ${DTYPE_NAME[dtype]} value the engine runs in` : 'the largest value whose square is finite in float32'} (${num(limit)}): every output through ${count === 1 ? 'this module' : `these ${count} modules`} would be ±Inf or NaN.`,
      hint: `${key === 'lora_alpha' ? 'lora_alpha' : `alpha_pattern["${key.slice(0, 80)}"]`} is almost certainly wrong (PEFT's usual values are r to 2·r); set the value the adapter was trained with.`,
    });
  });
}
