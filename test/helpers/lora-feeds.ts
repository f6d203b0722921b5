import ort from 'onnxruntime-node';
import { f16ToF32 } from '../../src/adapters/safetensors.js';
import { toFloat16Bits } from '../../src/model/graph/onnx-builder.js';
import { pastKeyName, pastValueName, presentKeyName, presentValueName, type LoraTarget, type Manifest } from '../../src/model/manifest.js';
import { emptyLoraFeeds, neutralLoraVectors, zeroPast } from '../../src/model/session.js';
import { MemoryCheckpoint, Rng, type MemoryTensor } from './random-checkpoint.js';

/**
 * Feeds for the graph under test, built from the contract (manifest.ts) alone: step inputs with
 * left padding expressed through attention_bias, per-row LoRA A/B from PEFT-shaped adapters, and
 * the merged checkpoints (W + scale·B·A) the reference forward runs instead.
 */

export function floatTensor(manifest: Manifest, data: Float32Array, dims: readonly number[]): ort.Tensor {
  return manifest.dtype === 'fp16' ? new ort.Tensor('float16', toFloat16Bits(data), dims) : new ort.Tensor('float32', data, dims);
}

export function toFloat32(t: ort.Tensor): Float32Array {
  if (t.type === 'float32') return t.data as Float32Array;
  if (t.type === 'float16') {
    const bits = t.data as Uint16Array;
    return Float32Array.from(bits, (b) => f16ToF32(b));
  }
  throw new Error(`not a float tensor: ${t.type}`);
}

export function maxAbsDiff(a: ArrayLike<number>, b: ArrayLike<number>): number {
  if (a.length !== b.length) throw new Error(`length ${a.length} vs ${b.length}`);
  let m = 0;
  for (let i = 0; i < a.length; i++) {
    const d = Math.abs(a[i] - b[i]);
    if (!(d <= m)) m = d; // NaN propagates as the maximum
  }
  return m;
}

export function maxAbs(a: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]));
  return m;
}

/** the largest difference over lists of logit vectors */
export function maxDiffAll(a: readonly ArrayLike<number>[], b: readonly ArrayLike<number>[]): number {
  if (a.length !== b.length) throw new Error(`${a.length} vs ${b.length} vectors`);
  return Math.max(0, ...a.map((x, i) => maxAbsDiff(x, b[i])));
}

// ---------------------------------------------------------------- step feeds and the KV cache

/** What the engine keeps per batch between steps: which cache slots hold real tokens, next positions, the cache. */
export class KvState {
  readonly keyValid: boolean[][];
  readonly nextPosition: number[];
  past: Record<string, ort.Tensor>;
  length = 0;
  constructor(
    readonly manifest: Manifest,
    readonly batch: number,
  ) {
    this.keyValid = Array.from({ length: batch }, () => []);
    this.nextPosition = new Array<number>(batch).fill(0);
    this.past = zeroPast(manifest, batch);
  }
}

/**
 * Runs one step. `chunk[b]` holds row b's new tokens, all rows the same length; `null` is a pad
 * slot (no token: masked as a key for every query, position 0). Query i of the step sees cache
 * slot j iff j ≤ past + i and slot j is real. Returns each row's logits per slot (null for pads;
 * with logits 'last' only the last slot is filled).
 */
export async function runStep(
  session: ort.InferenceSession,
  state: KvState,
  chunk: readonly (readonly (number | null)[])[],
  lora: Record<string, ort.Tensor>,
  /** explicit positions per row and slot instead of counting up from the row's last one */
  positions?: readonly (readonly number[])[],
): Promise<(Float32Array | null)[][]> {
  const m = state.manifest;
  const B = state.batch;
  const S = chunk[0].length;
  if (chunk.length !== B || chunk.some((r) => r.length !== S)) throw new Error('ragged chunk');
  const past = state.length;
  const total = past + S;
  const ids = new BigInt64Array(B * S);
  const pos = new BigInt64Array(B * S);
  for (let b = 0; b < B; b++) {
    for (let s = 0; s < S; s++) {
      const tok = chunk[b][s];
      ids[b * S + s] = BigInt(tok ?? 0);
      const p = tok === null ? 0 : state.nextPosition[b]++;
      pos[b * S + s] = BigInt(positions ? positions[b][s] : p);
      state.keyValid[b].push(tok !== null);
    }
  }
  const feeds: Record<string, ort.Tensor> = {
    input_ids: new ort.Tensor('int64', ids, [B, S]),
    position_ids: new ort.Tensor('int64', pos, [B, S]),
    ...state.past,
    ...lora,
  };
  if (session.inputNames.includes('attention_mask')) {
    const mask = new BigInt64Array(B * total);
    for (let b = 0; b < B; b++) for (let j = 0; j < total; j++) mask[b * total + j] = state.keyValid[b][j] ? 1n : 0n;
    feeds.attention_mask = new ort.Tensor('int64', mask, [B, total]);
  } else {
    const bias = new Float32Array(B * S * total);
    for (let b = 0; b < B; b++)
      for (let i = 0; i < S; i++)
        for (let j = 0; j < total; j++) bias[(b * S + i) * total + j] = j <= past + i && state.keyValid[b][j] ? 0 : m.maskValue;
    feeds.attention_bias = floatTensor(m, bias, [B, 1, S, total]);
  }
  const out = await session.run(feeds);
  state.length = total;
  const next: Record<string, ort.Tensor> = {};
  for (let l = 0; l < m.architecture.numLayers; l++) {
    next[pastKeyName(l)] = out[presentKeyName(l)];
    next[pastValueName(l)] = out[presentValueName(l)];
  }
  state.past = next;
  const logits = out.logits;
  const V = m.architecture.vocabSize;
  const data = logits.data as Float32Array;
  const rows = logits.dims[1];
  return chunk.map((row, b) =>
    row.map((tok, s) => {
      if (tok === null) return null;
      if (m.logits === 'last') return s === S - 1 ? data.slice(b * V, (b + 1) * V) : null;
      return data.slice((b * rows + s) * V, (b * rows + s + 1) * V);
    }),
  );
}

/** left-pads prompts to one length: the engine's prefill layout */
export function leftPad(prompts: readonly (readonly number[])[]): (number | null)[][] {
  const n = Math.max(...prompts.map((p) => p.length));
  return prompts.map((p) => [...new Array<null>(n - p.length).fill(null), ...p]);
}

/** the non-null entries of a row, in order */
export const real = <T>(row: readonly (T | null)[]): T[] => row.filter((x): x is T => x !== null);

// ---------------------------------------------------------------- LoRA adapters

/** one module of an adapter in PEFT layout: A [r, in], B [out, r]; the effective delta is scale·B·A */
export interface LoraModule {
  rank: number;
  A: Float32Array;
  B: Float32Array;
  scale: number;
}
/** target name (model.layers.0.self_attn.q_proj) → module; absent = not targeted */
export type Adapter = ReadonlyMap<string, LoraModule>;

export function randomAdapter(targets: readonly LoraTarget[], seed: number, rankOf: (t: LoraTarget) => number, scale = 2): Adapter {
  const rng = new Rng(seed);
  const out = new Map<string, LoraModule>();
  for (const t of targets) {
    const r = rankOf(t);
    if (r < 0) continue;
    out.set(t.name, { rank: r, A: rng.array(r * t.inFeatures, 1 / Math.sqrt(t.inFeatures)), B: rng.array(t.outFeatures * r, 0.3), scale });
  }
  return out;
}

/** base with W ← W + scale·B·A for every module of the adapter (what PEFT's merge_and_unload does) */
export function mergeAdapter(base: MemoryCheckpoint, targets: readonly LoraTarget[], adapter: Adapter): MemoryCheckpoint {
  const replaced = new Map<string, MemoryTensor>();
  for (const t of targets) {
    const mod = adapter.get(t.name);
    if (!mod || mod.rank === 0) continue;
    const name = `${t.name}.weight`;
    const w = base.tensors.get(name);
    if (!w) throw new Error(`base has no ${name}`);
    const merged = new Float32Array(w.data.length);
    for (let o = 0; o < t.outFeatures; o++) {
      for (let i = 0; i < t.inFeatures; i++) {
        let d = 0;
        for (let j = 0; j < mod.rank; j++) d += mod.B[o * mod.rank + j] * mod.A[j * t.inFeatures + i];
        merged[o * t.inFeatures + i] = w.data[o * t.inFeatures + i] + mod.scale * d;
      }
    }
    replaced.set(name, { shape: w.shape, data: merged });
  }
  return base.with(replaced, `${base.modelId}+lora`);
}

/**
 * onnxruntime's CPU MatMul (MLAS) multiplies by a one-column matrix on another path than by a
 * wider one, so a rank-1 module fed as rank 1 and the same module zero-padded to rank 6 differ in
 * the last float bits (measured ~1e-7 in the delta). Never feeding rank 1 (a zero column makes it
 * 2) keeps a row's result bit-identical whichever adapters share its step.
 */
export const batchInvariantRank = (maxRank: number): number => (maxRank === 1 ? 2 : maxRank);

/**
 * Per-row A [batch, in, r] = Aᵀ and B [batch, r, out] = (scale·B)ᵀ; r is the largest rank among
 * the rows for that module (mapped through `rankFor`), smaller ranks zero-padded, rows without
 * the module all zeros. `rankFor: () => 1` feeds r = 1 zeros instead of empty tensors.
 */
export function loraFeeds(manifest: Manifest, rows: readonly (Adapter | null)[], rankFor: (maxRank: number) => number = (r) => r): Record<string, ort.Tensor> {
  const feeds: Record<string, ort.Tensor> = {};
  const batch = rows.length;
  for (const t of manifest.loraTargets) {
    const mods = rows.map((a) => a?.get(t.name) ?? null);
    const r = rankFor(Math.max(0, ...mods.map((m) => m?.rank ?? 0)));
    const A = new Float32Array(batch * t.inFeatures * r);
    const B = new Float32Array(batch * r * t.outFeatures);
    mods.forEach((mod, b) => {
      if (!mod) return;
      for (let j = 0; j < mod.rank; j++) {
        for (let i = 0; i < t.inFeatures; i++) A[(b * t.inFeatures + i) * r + j] = mod.A[j * t.inFeatures + i];
        for (let o = 0; o < t.outFeatures; o++) B[(b * r + j) * t.outFeatures + o] = mod.scale * mod.B[o * mod.rank + j];
      }
    });
    feeds[t.inputA] = floatTensor(manifest, A, [batch, t.inFeatures, r]);
    feeds[t.inputB] = floatTensor(manifest, B, [batch, r, t.outFeatures]);
    Object.assign(feeds, neutralLoraVectors(manifest, t));
  }
  return feeds;
}

/** one adapter for every row, fed once with batch dimension 1 (MatMul broadcasts it) */
export const broadcastLoraFeeds = (manifest: Manifest, adapter: Adapter | null, rankFor?: (maxRank: number) => number): Record<string, ort.Tensor> =>
  loraFeeds(manifest, [adapter], rankFor);

export { emptyLoraFeeds };
