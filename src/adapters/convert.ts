import type { LoraTarget } from '../model/manifest.js';
import type { EmbeddingParts, ValidationReport } from './report.js';

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
  /** [outFeatures]: DoRA's lora_magnitude_vector m as saved (use_dora); the engine turns it into m / ‖W + s·B·A‖ */
  magnitude?: Float32Array;
  /** [outFeatures]: lora_B.bias already multiplied by the module's scale (lora_bias) */
  bias?: Float32Array;
}

/**
 * What an adapter changes outside the projections, float32, in the layout the engine reads per
 * token (embedding-parts.ts says what each is in PEFT's terms).
 */
export interface EngineEmbedding {
  /** embedding LoRA: A [vocab, rank] (one row per token), B [rank, hidden] with the scale folded in */
  lora: { rank: number; A: Float32Array; B: Float32Array } | null;
  /** rows that replace the embedding's: token ids and their values [k, hidden] */
  tokens: { indices: Int32Array; values: Float32Array } | null;
  /** a full embedding [vocab, hidden] replacing the base's */
  table: Float32Array | null;
  /** a full lm_head [vocab, hidden] */
  headTable: Float32Array | null;
  /** rows that replace lm_head's (trainable tokens; on a tied model, the embedding's own) */
  headTokens: { indices: Int32Array; values: Float32Array } | null;
}

/** ids a row of this adapter may hold: the base's vocabulary, or its saved copies' when it adds tokens */
export function vocabOf(e: EngineEmbedding | null | undefined, m: { architecture: { vocabSize: number; hiddenSize: number } }): number {
  const H = m.architecture.hiddenSize;
  return Math.max(m.architecture.vocabSize, e?.table ? e.table.length / H : 0, e?.headTable ? e.headTable.length / H : 0);
}

export interface AdapterWeights {
  /** module name (model.layers.0.self_attn.q_proj) → weights */
  modules: Map<string, EngineModuleWeights>;
  /** absent: only projections */
  embedding?: EngineEmbedding;
  /** bytes held by all A and B arrays and the embedding parts */
  bytes: number;
}

/** The report's embedding parts from the file's float32 tensors; throws where the validator would have refused. */
export function toEngineEmbedding(parts: EmbeddingParts, tensors: Map<string, Float32Array>, dims: { vocabSize: number; hiddenSize: number }): { embedding: EngineEmbedding; bytes: number } {
  const V = dims.vocabSize;
  const H = dims.hiddenSize;
  const get = (key: string, n: number) => {
    const v = tensors.get(key);
    if (!v || v.length !== n) throw new Error(`toEngineEmbedding: ${key} is missing or does not hold ${n} values`);
    return v;
  };
  let lora: EngineEmbedding['lora'] = null;
  if (parts.lora) {
    const r = parts.lora.rank;
    // PEFT: A [r, vocab], B [hidden, r] → per token a row of Aᵀ, and Bᵀ·scale
    lora = { rank: r, A: transpose(get(parts.lora.tensorA, r * V), r, V), B: transpose(get(parts.lora.tensorB, H * r), H, r, parts.lora.scale) };
  }
  const rows = (p: { tensor: string; indices: number[] } | null) => (p ? { indices: Int32Array.from(p.indices), values: get(p.tensor, p.indices.length * H) } : null);
  const tokens = rows(parts.tokens);
  // copies of an adapter that adds tokens hold its own vocabulary's rows
  const copyRows = parts.vocabSize ?? V;
  const table = parts.embedCopy ? get(parts.embedCopy, copyRows * H) : null;
  const headTable = parts.headCopy === null ? null : parts.headCopy === parts.embedCopy ? table : get(parts.headCopy, copyRows * H);
  const headTokens = parts.tokens?.tiedHead ? tokens : rows(parts.headTokens);
  const embedding: EngineEmbedding = { lora, tokens, table, headTable, headTokens };
  const arrays = new Set<Float32Array>([lora?.A, lora?.B, tokens?.values, table, headTable, headTokens?.values].filter((x): x is Float32Array => x != null));
  return { embedding, bytes: [...arrays].reduce((n, a) => n + a.byteLength, 0) };
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
export function toEngineWeights(report: ValidationReport, tensors: Map<string, Float32Array>, manifest: { loraTargets: readonly LoraTarget[]; architecture: { vocabSize: number; hiddenSize: number } }): AdapterWeights {
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
    const vectors = moduleVectors(m, tensors, t.outFeatures);
    modules.set(m.module, { rank: r, A, B, ...vectors });
    bytes += A.byteLength + B.byteLength + (vectors.magnitude?.byteLength ?? 0) + (vectors.bias?.byteLength ?? 0);
  }
  if (!report.embedding) return { modules, bytes };
  const e = toEngineEmbedding(report.embedding, tensors, manifest.architecture);
  return { modules, embedding: e.embedding, bytes: bytes + e.bytes };
}

/** A module's DoRA magnitude (as saved) and lora_B bias (times the scale, as PEFT's forward applies it). */
function moduleVectors(m: ValidationReport['modules'][number], tensors: ReadonlyMap<string, Float32Array>, out: number): Pick<EngineModuleWeights, 'magnitude' | 'bias'> {
  const read = (key: string | null | undefined, what: string) => {
    if (key === null || key === undefined) return undefined;
    const v = tensors.get(key);
    if (!v || v.length !== out) throw new Error(`toEngineWeights: ${what} of ${m.module} is missing or not [${out}]`);
    return v;
  };
  const magnitude = read(m.tensorMagnitude, 'lora_magnitude_vector');
  const bias = read(m.tensorBias, 'lora_B.bias');
  return {
    ...(magnitude && { magnitude: Float32Array.from(magnitude) }),
    ...(bias && { bias: bias.map((v) => v * m.scale) }),
  };
}

/**
 * The same result as toEngineWeights, from tensors that were transposed while the upload streamed
 * in (ingest.ts): at most the scale is left to fold into B, in place. Returns null when a tensor the
 * report uses was not kept in the engine's layout, or was scaled by another factor than the
 * report's; the caller then reads the file instead. The arrays become the adapter's: the ingest
 * result must not be used again.
 */
export function fromIngested(report: ValidationReport, ingested: { engineLayout: ReadonlyMap<string, Float32Array>; scaled: ReadonlyMap<string, number> }, manifest: { loraTargets: readonly LoraTarget[] }): AdapterWeights | null {
  const { engineLayout, scaled } = ingested;
  if (!report.ok) throw new Error('fromIngested: the adapter did not pass validation');
  // the stream keeps LoRA matrices only: embedding parts are read from the file
  if (report.embedding) return null;
  const targets = new Map(manifest.loraTargets.map((t) => [t.name, t]));
  const picked: [string, number, number, Float32Array, Float32Array][] = [];
  for (const m of report.modules) {
    // the stream keeps lora_A / lora_B only: DoRA and lora_bias vectors are read from the file
    if (m.tensorMagnitude || m.tensorBias) return null;
    const t = targets.get(m.module);
    const A = m.tensorA === null ? undefined : engineLayout.get(m.tensorA);
    const B = m.tensorB === null ? undefined : engineLayout.get(m.tensorB);
    if (!t || !A || !B || A.length !== m.rank * t.inFeatures || B.length !== m.rank * t.outFeatures) return null;
    // B was scaled in the stream when the config came first; a different scale cannot be undone exactly
    const applied = scaled.get(m.tensorB!) ?? 1;
    if (applied !== 1 && applied !== m.scale) return null;
    picked.push([m.module, m.rank, applied === 1 ? m.scale : 1, A, B]);
  }
  const modules = new Map<string, EngineModuleWeights>();
  let bytes = 0;
  for (const [module, rank, scale, A, B] of picked) {
    // the same float32 rounding of value × scale as transpose() applies
    if (scale !== 1) for (let i = 0; i < B.length; i++) B[i] = B[i]! * scale;
    modules.set(module, { rank, A, B });
    bytes += A.byteLength + B.byteLength;
  }
  return { modules, bytes };
}
