import { parseTensorKey } from './keys.js';
import type { ModuleReport, Problem } from './report.js';
import { error, warning } from './report.js';

/**
 * How much each module of an adapter changes its projection, from the tensors alone.
 *
 * The engine adds ΔW = scale·B·A to a projection (B [out, r], A [r, in] in PEFT's layout). Its
 * Frobenius norm comes exactly from the two r×r Gram matrices, without forming the out×in product:
 *   ‖B·A‖²_F = tr(Aᵀ·Bᵀ·B·A) = tr((Bᵀ·B)·(A·Aᵀ)) = Σᵢⱼ (BᵀB)ᵢⱼ·(AAᵀ)ᵢⱼ   (both symmetric)
 * at O((in + out)·r²) instead of O(in·out·r). Sums run in float64, so a tensor is all zeros exactly
 * when the trace of its Gram matrix (its sum of squares) is 0: the square of the smallest float32
 * subnormal still fits in a float64.
 */

/** r×r Gram matrix of one LoRA tensor: A·Aᵀ for lora_A, Bᵀ·B for lora_B. */
export interface TensorGram {
  rank: number;
  /** r×r, row-major, symmetric */
  gram: Float64Array;
  /**
   * What the values had been multiplied by before the Gram matrix was taken: a lora_B decoded in
   * the upload stream may already carry its module's scale (ingest.ts). 1 = the file's own values.
   */
  scaledBy: number;
}

/** M·Mᵀ of a [rows, cols] row-major matrix: rows×rows. */
export function gramOfRows(m: Float32Array, rows: number, cols: number): Float64Array {
  const g = new Float64Array(rows * rows);
  for (let i = 0; i < rows; i++) {
    const ri = i * cols;
    for (let j = i; j < rows; j++) {
      const rj = j * cols;
      let s = 0;
      for (let k = 0; k < cols; k++) s += m[ri + k]! * m[rj + k]!;
      g[i * rows + j] = s;
      g[j * rows + i] = s;
    }
  }
  return g;
}

/** Mᵀ·M of a [rows, cols] row-major matrix: cols×cols. */
export function gramOfCols(m: Float32Array, rows: number, cols: number): Float64Array {
  const g = new Float64Array(cols * cols);
  const row = new Float64Array(cols);
  for (let k = 0; k < rows; k++) {
    const base = k * cols;
    for (let i = 0; i < cols; i++) row[i] = m[base + i]!;
    for (let i = 0; i < cols; i++) {
      const x = row[i]!;
      if (x === 0) continue;
      const gi = i * cols;
      for (let j = i; j < cols; j++) g[gi + j] += x * row[j]!;
    }
  }
  for (let i = 0; i < cols; i++) for (let j = i + 1; j < cols; j++) g[j * cols + i] = g[i * cols + j]!;
  return g;
}

/** The Gram matrix of a tensor in PEFT's layout: lora_A [r, in], lora_B [out, r]. */
export function peftGram(part: 'A' | 'B', values: Float32Array, shape: readonly number[]): TensorGram | null {
  if (shape.length !== 2 || values.length !== shape[0]! * shape[1]!) return null;
  const [d0, d1] = shape as [number, number];
  return part === 'A' ? { rank: d0, gram: gramOfRows(values, d0, d1), scaledBy: 1 } : { rank: d1, gram: gramOfCols(values, d0, d1), scaledBy: 1 };
}

/** The Gram matrix of a tensor in the engine's layout (convert.ts): A [in, r], B [r, out] (maybe already scaled). */
export function engineGram(part: 'A' | 'B', values: Float32Array, rank: number, scaledBy = 1): TensorGram | null {
  if (rank < 1 || values.length % rank !== 0) return null;
  const other = values.length / rank;
  return part === 'A' ? { rank, gram: gramOfCols(values, other, rank), scaledBy: 1 } : { rank, gram: gramOfRows(values, rank, other), scaledBy };
}

const trace = (g: TensorGram) => {
  let s = 0;
  for (let i = 0; i < g.rank; i++) s += g.gram[i * g.rank + i]!;
  return s;
};

/** ‖scale·B·A‖_F from the Gram matrices; null when their ranks differ (the validator reports that). */
export function deltaNorm(a: TensorGram, b: TensorGram, scale: number): number | null {
  if (a.rank !== b.rank) return null;
  let s = 0;
  for (let k = 0; k < a.gram.length; k++) s += a.gram[k]! * b.gram[k]!;
  // B·A is a product of real matrices: a tiny negative sum is rounding, not a norm
  const norm = Math.sqrt(Math.max(0, s));
  if (b.scaledBy === 0) return 0;
  return Math.abs(scale / b.scaledBy) * norm;
}

/** ‖W‖_F in float64 (base projection weights, computed once when the graph is built). */
export function frobeniusNorm(values: Float32Array): number {
  let s = 0;
  for (let i = 0; i < values.length; i++) s += values[i]! * values[i]!;
  return Math.sqrt(s);
}

export type NoEffectCause = 'alpha' | 'lora_B' | 'lora_A' | 'product';

/** Why a module's delta is zero: the scale first (it hides whatever B and A hold), then B (PEFT's default init), then A. */
export function noEffectCause(scale: number, a: TensorGram, b: TensorGram): NoEffectCause {
  if (scale === 0 || b.scaledBy === 0) return 'alpha';
  if (trace(b) === 0) return 'lora_B';
  if (trace(a) === 0) return 'lora_A';
  return 'product';
}

export interface EffectInput {
  /** the validator's modules (shapes already checked) */
  modules: readonly ModuleReport[];
  /** tensor key → Gram matrix; modules whose tensors have none get no deltaNorm */
  grams: ReadonlyMap<string, TensorGram>;
  /** module name → ‖W‖_F of its base projection; absent (offline check): no relativeNorm */
  weightNorms?: ReadonlyMap<string, number>;
  /** a deliberate no-op adapter: no_effect is a warning instead of an error */
  allowNoEffect: boolean;
  /** the weights file name, for problems */
  file: string;
  /** the config's use_rslora, named in large_delta's hint */
  useRslora: boolean | null;
  /** lora_B bias keys whose values are known to be all zero (a bias not listed may add something) */
  zeroVectors?: ReadonlySet<string>;
}

export interface EffectResult {
  modules: ModuleReport[];
  problems: Problem[];
}

/** At most this many module names are listed in a message or an `actual`. */
const LIST = 8;

/** "0–11, 14, 20–23" */
export function layerRanges(layers: readonly number[]): string {
  const sorted = [...new Set(layers)].sort((a, b) => a - b);
  const parts: string[] = [];
  for (let i = 0; i < sorted.length; ) {
    let j = i;
    while (j + 1 < sorted.length && sorted[j + 1] === sorted[j]! + 1) j++;
    parts.push(i === j ? `${sorted[i]}` : `${sorted[i]}–${sorted[j]}`);
    i = j + 1;
  }
  return parts.join(', ');
}

const plural = (n: number, one: string, many = `${one}s`) => `${n} ${n === 1 ? one : many}`;

const B_ZERO_WHY = 'saved before training updated it — PEFT initialises lora_B to zero; check that the LoRA parameters were trainable (requires_grad) and that the save ran after training (with DeepSpeed ZeRO-3, after gathering the parameters)';
const A_ZERO_WHY = 'lora_A is never zero after PEFT initialises it, so the saved values were overwritten or never gathered (e.g. a DeepSpeed ZeRO-3 shard)';

/**
 * One clause per cause, e.g. `24 of 56 modules have lora_B = 0 (layers 12–23): …why`. When only
 * some modules are affected (`partial`), the likely story is narrower: those layers were not trained.
 */
function causeClauses(zero: readonly { m: ModuleReport; cause: NoEffectCause }[], total: number, partial: boolean): string[] {
  const out: string[] = [];
  const of = (n: number) => (n === total ? `all ${total}` : `${n} of ${total}`);
  const layers = (ms: ModuleReport[]) => `layer${new Set(ms.map((m) => m.layer)).size === 1 ? '' : 's'} ${layerRanges(ms.map((m) => m.layer))}`;
  const byCause = (c: NoEffectCause) => zero.filter((z) => z.cause === c).map((z) => z.m);
  const alpha = byCause('alpha');
  if (alpha.length > 0) {
    const keys = [...new Set(alpha.map((m) => m.alphaKey))];
    const named = keys.map((k) => (k === 'lora_alpha' ? 'lora_alpha = 0' : `alpha_pattern["${k}"] = 0`)).join(', ');
    out.push(`${of(alpha.length)} modules have scale 0 from ${named} (${layers(alpha)})`);
  }
  const b = byCause('lora_B');
  if (b.length > 0) out.push(partial ? `${of(b.length)} modules have lora_B = 0: ${layers(b)} were not trained` : `${of(b.length)} modules have lora_B = 0 (${layers(b)}): ${B_ZERO_WHY}`);
  const a = byCause('lora_A');
  if (a.length > 0) out.push(partial ? `${of(a.length)} modules have lora_A = 0 (${layers(a)}): their saved values were overwritten or never gathered` : `${of(a.length)} modules have lora_A = 0 (${layers(a)}): ${A_ZERO_WHY}`);
  const p = byCause('product');
  if (p.length > 0) out.push(`${of(p.length)} modules have lora_B·lora_A = 0 although neither is zero (${layers(p)})`);
  return out;
}

/**
 * Per module: deltaNorm and relativeNorm; for the adapter: `no_effect` (every module's delta is
 * zero), `no_effect_modules` (some are) and `large_delta` (a delta larger than its base weight).
 */
export function assessEffect(input: EffectInput): EffectResult {
  const { grams, weightNorms, file } = input;
  const zero: { m: ModuleReport; cause: NoEffectCause }[] = [];
  let measured = 0;
  const modules = input.modules.map((m): ModuleReport => {
    const a = m.tensorA === null ? undefined : grams.get(m.tensorA);
    const b = m.tensorB === null ? undefined : grams.get(m.tensorB);
    const norm = a && b && a.rank === m.rank && b.rank === m.rank ? deltaNorm(a, b, m.scale) : null;
    // NaN / ±Inf in the values: non_finite reports them, and no norm describes them
    if (norm === null || !Number.isFinite(norm)) return { ...m, deltaNorm: null, relativeNorm: null };
    measured++;
    // DoRA rescales rows by m / ‖W + ΔW‖, which needs W (the served probe measures it), and a
    // lora_B bias adds scale·b: with either, a zero ΔW alone does not make the module a no-op
    const beyondDelta = Boolean(m.tensorMagnitude) || (Boolean(m.tensorBias) && !input.zeroVectors?.has(m.tensorBias!));
    if (norm === 0 && !beyondDelta) zero.push({ m, cause: noEffectCause(m.scale, a!, b!) });
    const w = weightNorms?.get(m.module);
    return { ...m, deltaNorm: norm, relativeNorm: w === undefined ? null : w > 0 ? norm / w : null };
  });

  const problems: Problem[] = [];
  const total = input.modules.length;
  if (total > 0 && measured === total && zero.length === total) {
    const clauses = causeClauses(zero, total, false);
    const first = zero[0]!;
    const p = {
      code: 'no_effect' as const,
      file,
      key: first.cause === 'alpha' ? first.m.alphaKey : undefined,
      expected: 'a non-zero scale·lora_B·lora_A in at least one module',
      actual: { modules: total, ...Object.fromEntries((['alpha', 'lora_B', 'lora_A', 'product'] as const).map((c) => [c, zero.filter((z) => z.cause === c).length]).filter(([, n]) => n !== 0)) },
      message: `The adapter changes nothing: ${clauses.join('; ')}. Every generation through it would be the base model's, token for token.`,
      hint: input.allowNoEffect
        ? 'Accepted because allow_no_effect=true was given.'
        : 'Retrain or re-save the adapter (see above). A deliberate no-op adapter (e.g. a pipeline test) is accepted with the form field allow_no_effect=true (loraserve check --allow-no-effect).',
    };
    problems.push(input.allowNoEffect ? warning(p) : error(p));
  } else if (zero.length > 0) {
    const names = zero.map((z) => z.m.module);
    problems.push(
      warning({
        code: 'no_effect_modules',
        file,
        module: names[0],
        expected: 0,
        actual: names.slice(0, LIST),
        message: `${zero.length} of ${total} modules change nothing: ${causeClauses(zero, total, true).join('; ')}. ${names.length > LIST ? `The first ${LIST}: ${names.slice(0, LIST).join(', ')}, …` : `They are ${names.join(', ')}`}.`,
        hint: 'If those layers were meant to be trained, retrain; otherwise drop them from target_modules / layers_to_transform.',
      }),
    );
  }

  const large = modules.filter((m) => m.relativeNorm !== null && m.relativeNorm !== undefined && m.relativeNorm > 1);
  if (large.length > 0) {
    const worst = large.reduce((x, y) => ((y.relativeNorm ?? 0) > (x.relativeNorm ?? 0) ? y : x));
    const keys = [...new Set(large.map((m) => m.alphaKey))];
    const keyText = keys.map((k) => (k === 'lora_alpha' ? 'lora_alpha' : `alpha_pattern["${k}"]`)).join(', ');
    const how = (m: ModuleReport) => `${m.alphaKey === 'lora_alpha' ? 'lora_alpha' : `alpha_pattern["${m.alphaKey}"]`} = ${m.alpha} / ${input.useRslora ? `√r (use_rslora), r = ${m.rank}` : `r = ${m.rank}`} → scale ${m.scale}`;
    problems.push(
      warning({
        code: 'large_delta',
        file,
        module: worst.module,
        key: worst.alphaKey,
        expected: '‖scale·B·A‖_F ≤ ‖W‖_F',
        actual: large.slice(0, LIST).map((m) => ({ module: m.module, relativeNorm: m.relativeNorm })),
        message: `${plural(large.length, 'module')} would outweigh the base weight they add to (‖scale·B·A‖_F / ‖W‖_F up to ${(worst.relativeNorm ?? 0).toPrecision(3)} at ${worst.module}, where ${how(worst)}): ${large.slice(0, LIST).map((m) => m.module).join(', ')}${large.length > LIST ? ', …' : ''}. Their scale is set by ${keyText}.`,
        hint: `Such a delta usually means a wrong ${keyText}${input.useRslora ? ' or use_rslora (it scales by alpha/√r instead of alpha/r)' : ' or use_rslora'}, or weights saved in the wrong dtype; check them against the training run.`,
      }),
    );
  }
  return { modules, problems };
}

/** Gram matrices of the modules' tensors from values in PEFT's layout (a folder read back, or a test's values). */
export function peftGrams(modules: readonly ModuleReport[], values: ReadonlyMap<string, Float32Array>, shapeOf: (key: string) => readonly number[] | undefined): Map<string, TensorGram> {
  const out = new Map<string, TensorGram>();
  for (const m of modules) {
    for (const [part, key] of [['A', m.tensorA], ['B', m.tensorB]] as const) {
      if (key === null || out.has(key)) continue;
      const v = values.get(key);
      const shape = shapeOf(key);
      const g = v && shape ? peftGram(part, v, shape) : null;
      if (g) out.set(key, g);
    }
  }
  return out;
}

/**
 * Gram matrices from the tensors decoded into the engine's layout while the upload streamed in
 * (ingest.ts): every kept lora_A [r, in] / lora_B [out, r] of the header, keyed like the file.
 */
export function engineGrams(tensors: readonly { name: string; shape: readonly number[] }[], engineLayout: ReadonlyMap<string, Float32Array>, scaled: ReadonlyMap<string, number>): Map<string, TensorGram> {
  const out = new Map<string, TensorGram>();
  for (const t of tensors) {
    const v = engineLayout.get(t.name);
    const key = parseTensorKey(t.name);
    const part = key.kind === 'lora' ? key.part : null;
    if (!v || !part || t.shape.length !== 2) continue;
    const g = engineGram(part, v, part === 'A' ? t.shape[0]! : t.shape[1]!, part === 'B' ? (scaled.get(t.name) ?? 1) : 1);
    if (g) out.set(t.name, g);
  }
  return out;
}
