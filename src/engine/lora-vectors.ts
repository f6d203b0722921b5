import { Tensor } from 'onnxruntime-node';
import { loraBiasInput, loraMagnitudeInput, type Manifest } from '../model/manifest.js';
import { allocModel, modelScalar, tensorType, type ModelArray } from './dtype.js';

/**
 * The per-row vector inputs of each LoRA target ([rows | 1, 1, out | 1]): DoRA's factor
 * g = m / ‖W + s·B·A‖ and lora_B's bias times the scale. A row whose adapter has neither gets
 * g = 1 and bias 0, which the graph applies exactly, so plain LoRA and base rows are unchanged by
 * sharing a step with DoRA or lora_bias rows.
 */
export interface LoraVectors {
  /** [out]: DoRA's factor, already divided by the norm; absent = 1 */
  readonly factor?: ModelArray;
  /** [out]: lora_B.bias × scale; absent = 0 */
  readonly bias?: ModelArray;
}

type Feeds = Record<string, Tensor>;

export class LoraVectorFeeds {
  private readonly type: 'float32' | 'float16';
  private readonly neutral: { magnitude: Tensor; bias: Tensor }[];
  private readonly one: number;

  constructor(
    private readonly manifest: Pick<Manifest, 'dtype'>,
    private readonly targets: Manifest['loraTargets'],
  ) {
    this.type = tensorType(manifest.dtype);
    this.one = modelScalar(manifest.dtype, 1);
    // [1, 1, 1], broadcast over rows and outputs: what crosses to the runtime per step stays tiny
    const magnitude = new Tensor(this.type, allocModel(manifest.dtype, 1).fill(this.one), [1, 1, 1]);
    const bias = new Tensor(this.type, allocModel(manifest.dtype, 1), [1, 1, 1]);
    this.neutral = targets.map(() => ({ magnitude, bias }));
  }

  /** one row (or every row the same adapter): [1, 1, out] each, broadcast by the graph */
  single(modules: readonly (LoraVectors | null)[] | null, f: Feeds): void {
    this.targets.forEach((t, i) => {
      const m = modules?.[i];
      const n = this.neutral[i]!;
      f[loraMagnitudeInput(t)] = m?.factor ? new Tensor(this.type, m.factor, [1, 1, t.outFeatures]) : n.magnitude;
      f[loraBiasInput(t)] = m?.bias ? new Tensor(this.type, m.bias, [1, 1, t.outFeatures]) : n.bias;
    });
  }

  /** mixed rows: [rows, 1, out] where some row needs it, else the neutral broadcast */
  rows(rows: readonly ({ readonly modules: readonly (LoraVectors | null)[] } | null)[], f: Feeds): void {
    this.targets.forEach((t, i) => {
      const n = this.neutral[i]!;
      f[loraMagnitudeInput(t)] = this.stack(rows, i, t.outFeatures, 'factor') ?? n.magnitude;
      f[loraBiasInput(t)] = this.stack(rows, i, t.outFeatures, 'bias') ?? n.bias;
    });
  }

  private stack(rows: readonly ({ readonly modules: readonly (LoraVectors | null)[] } | null)[], i: number, out: number, which: 'factor' | 'bias'): Tensor | null {
    if (!rows.some((r) => r?.modules[i]?.[which])) return null;
    const data = allocModel(this.manifest.dtype, rows.length * out);
    if (which === 'factor') data.fill(this.one);
    rows.forEach((r, b) => {
      const v = r?.modules[i]?.[which];
      if (v) data.set(v, b * out);
    });
    return new Tensor(this.type, data, [rows.length, 1, out]);
  }
}
