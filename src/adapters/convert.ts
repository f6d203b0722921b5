import type { LoraTarget } from '../model/manifest.js';
import type { ValidationReport } from './report.js';

/**
 * Accepted PEFT weights → the engine's layout (DESIGN.md "The model graph contract"):
 *   y += (x · A) · B   with A [in, r] and B [r, out], row-major, the scale folded into B.
 * PEFT stores A as [r, in] and B as [out, r] (nn.Linear layout), so both are transposed here.
 * Rows are never reordered: the graph implements the checkpoint's own RoPE layout.
 */

export interface EngineModuleWeights {
  rank: number;
  /** [inFeatures, rank] row-major */
  A: Float32Array;
  /** [rank, outFeatures] row-major, already multiplied by the module's scale */
  B: Float32Array;
}

export interface AdapterWeights {
  /** module name (model.layers.0.self_attn.q_proj) → weights */
  modules: Map<string, EngineModuleWeights>;
  /** bytes held by all A and B arrays */
  bytes: number;
}

/** [rows, cols] row-major → [cols, rows] row-major, each element times `scale`. */
export function transpose(src: Float32Array, rows: number, cols: number, scale = 1): Float32Array {
  const out = new Float32Array(rows * cols);
  for (let i = 0; i < rows; i++) {
    const base = i * cols;
    for (let j = 0; j < cols; j++) out[j * rows + i] = src[base + j]! * scale;
  }
  return out;
}

/**
 * Converts the tensors of an adapter whose report is ok. `tensors` maps the file's tensor keys to
 * float32 values. Throws on inputs the validator would have rejected: calling this without a
 * passing report is a programming error, not a user error.
 */
export function toEngineWeights(report: ValidationReport, tensors: Map<string, Float32Array>, manifest: { loraTargets: readonly LoraTarget[] }): AdapterWeights {
  if (!report.ok) throw new Error('toEngineWeights: the adapter did not pass validation');
  const targets = new Map(manifest.loraTargets.map((t) => [t.name, t]));
  const modules = new Map<string, EngineModuleWeights>();
  let bytes = 0;
  for (const m of report.modules) {
    const t = targets.get(m.module);
    if (!t) throw new Error(`toEngineWeights: ${m.module} is not a LoRA target of this model`);
    const a = m.tensorA === null ? undefined : tensors.get(m.tensorA);
    const b = m.tensorB === null ? undefined : tensors.get(m.tensorB);
    const r = m.rank;
    if (!a || a.length !== r * t.inFeatures) throw new Error(`toEngineWeights: lora_A of ${m.module} is missing or not [${r}, ${t.inFeatures}]`);
    if (!b || b.length !== t.outFeatures * r) throw new Error(`toEngineWeights: lora_B of ${m.module} is missing or not [${t.outFeatures}, ${r}]`);
    const A = transpose(a, r, t.inFeatures);
    const B = transpose(b, t.outFeatures, r, m.scale);
    modules.set(m.module, { rank: r, A, B });
    bytes += A.byteLength + B.byteLength;
  }
  return { modules, bytes };
}
