import { PROJECTIONS, projectionBlock, projectionDims, type Architecture } from '../src/model/architecture.js';
import { encodeSafetensors, type TensorToWrite } from '../src/adapters/safetensors.js';

/**
 * PEFT adapter files as `save_pretrained` writes them (adapter_config.json +
 * adapter_model.safetensors, keys `base_model.model.model.layers.{i}.{block}.{proj}.lora_{A|B}.weight`,
 * A [r, in], B [out, r]), for every projection of every layer, deterministic per seed.
 */

export interface AdapterFiles {
  config: Buffer;
  weights: Buffer;
  /** bytes of all tensor values (what the engine must hold, at f32) */
  tensorBytes: number;
}

export function peftAdapter(arch: Architecture, opts: { modelId: string; rank: number; seed: number }): AdapterFiles {
  const { rank, seed } = opts;
  let s = seed >>> 0;
  const rand = () => {
    s = (Math.imul(s, 1664525) + 1013904223) >>> 0;
    return s / 4294967296 - 0.5;
  };
  const tensors: TensorToWrite[] = [];
  let tensorBytes = 0;
  for (let layer = 0; layer < arch.numLayers; layer++) {
    for (const p of PROJECTIONS) {
      const { inFeatures, outFeatures } = projectionDims(arch, p);
      const base = `base_model.model.model.layers.${layer}.${projectionBlock(p)}.${p}`;
      const A = new Float32Array(rank * inFeatures);
      const B = new Float32Array(outFeatures * rank);
      const sa = 2 / Math.sqrt(inFeatures);
      for (let i = 0; i < A.length; i++) A[i] = rand() * sa;
      for (let i = 0; i < B.length; i++) B[i] = rand() * 0.02;
      tensors.push({ name: `${base}.lora_A.weight`, dtype: 'F32', shape: [rank, inFeatures], data: A });
      tensors.push({ name: `${base}.lora_B.weight`, dtype: 'F32', shape: [outFeatures, rank], data: B });
      tensorBytes += A.byteLength + B.byteLength;
    }
  }
  const config = {
    alpha_pattern: {},
    auto_mapping: null,
    base_model_name_or_path: opts.modelId,
    bias: 'none',
    fan_in_fan_out: false,
    inference_mode: true,
    init_lora_weights: true,
    layers_pattern: null,
    layers_to_transform: null,
    lora_alpha: 2 * rank,
    lora_dropout: 0,
    modules_to_save: null,
    peft_type: 'LORA',
    r: rank,
    rank_pattern: {},
    revision: null,
    target_modules: [...PROJECTIONS],
    task_type: 'CAUSAL_LM',
    use_dora: false,
    use_rslora: false,
  };
  return {
    config: Buffer.from(JSON.stringify(config, null, 2)),
    weights: encodeSafetensors(tensors, { format: 'pt' }),
    tensorBytes,
  };
}
