import { Tensor } from 'onnxruntime-node';
import type { EngineEmbedding } from '../adapters/convert.js';
import { EMBED_KEEP, EMBED_ROWS, type ModelDtype } from '../model/manifest.js';
import { allocModel, tensorType, toModelArray } from './dtype.js';

/**
 * The per-row embedding inputs of one step (manifest.ts EMBED_KEEP / EMBED_ROWS): for each token
 * of each row, what its adapter makes of the embedding, as PEFT computes it —
 * - embedding LoRA (lora/layer.py `Embedding.forward`): base row + scale·B·A[:, token], so keep 1
 *   and the delta in rows;
 * - trainable tokens (trainable_tokens/layer.py, `index_copy`): a listed token's row *is* the saved
 *   value, so keep 0 and the value; other tokens keep the base row;
 * - a saved embed_tokens (ModulesToSaveWrapper): every token's row from the copy.
 * Rows without such an adapter get keep 1, rows 0: the base embedding, exactly.
 * Only the step's tokens are looked up: O(tokens × hidden) per step, never the table.
 */
export interface EmbedRowsSource {
  readonly embedding?: EngineEmbedding | null;
}

export type EmbedFeeds = Record<typeof EMBED_KEEP | typeof EMBED_ROWS, Tensor>;

/** keep 1 and rows 0 broadcast over every row and token: the graph without row embeddings */
export function neutralEmbedFeeds(dtype: ModelDtype, hidden: number): EmbedFeeds {
  return {
    [EMBED_KEEP]: new Tensor(tensorType(dtype), toModelArray(dtype, Float32Array.of(1)), [1, 1, 1]),
    [EMBED_ROWS]: new Tensor(tensorType(dtype), allocModel(dtype, hidden), [1, 1, hidden]),
  };
}

/** token → position in a replaced-rows list, built once per list */
const rowIndex = new WeakMap<Int32Array, Map<number, number>>();
function indexOf(indices: Int32Array, token: number): number | undefined {
  let m = rowIndex.get(indices);
  if (!m) {
    m = new Map();
    indices.forEach((t, j) => m!.set(t, j));
    rowIndex.set(indices, m);
  }
  return m.get(token);
}

/** Writes one token's keep and row for `e`; false when it is the base row (keep 1, rows 0). */
function writeToken(e: EngineEmbedding, token: number, hidden: number, keep: Float32Array, rows: Float32Array, at: number): boolean {
  const out = rows.subarray(at * hidden, (at + 1) * hidden);
  if (e.table) {
    out.set(e.table.subarray(token * hidden, (token + 1) * hidden));
    keep[at] = 0;
    return true;
  }
  const j = e.tokens ? indexOf(e.tokens.indices, token) : undefined;
  if (j !== undefined) {
    out.set(e.tokens!.values.subarray(j * hidden, (j + 1) * hidden));
    keep[at] = 0;
    return true;
  }
  if (e.lora) {
    const { rank, A, B } = e.lora;
    for (let k = 0; k < rank; k++) {
      const a = A[token * rank + k]!;
      if (a === 0) continue;
      const bRow = B.subarray(k * hidden, (k + 1) * hidden);
      for (let i = 0; i < hidden; i++) out[i] += a * bRow[i]!;
    }
    return true;
  }
  return false;
}

/**
 * Feeds for `tokens[b]` of each row b (a prefill: one row, its chunk; a decode step: one token per
 * row), or null when no row's adapter changes the embedding (the caller feeds the neutral ones).
 */
export function embedFeedsFor(tokens: readonly (readonly number[])[], adapters: readonly (EmbedRowsSource | null)[], dtype: ModelDtype, hidden: number): EmbedFeeds | null {
  if (!adapters.some((a) => a?.embedding)) return null;
  const batch = tokens.length;
  const seq = tokens[0]?.length ?? 0;
  const keep = new Float32Array(batch * seq).fill(1);
  const rows = new Float32Array(batch * seq * hidden);
  for (let b = 0; b < batch; b++) {
    const e = adapters[b]?.embedding;
    if (!e) continue;
    for (let s = 0; s < seq; s++) writeToken(e, tokens[b]![s]!, hidden, keep, rows, b * seq + s);
  }
  const type = tensorType(dtype);
  return {
    [EMBED_KEEP]: new Tensor(type, toModelArray(dtype, keep), [batch, seq, 1]),
    [EMBED_ROWS]: new Tensor(type, toModelArray(dtype, rows), [batch, seq, hidden]),
  };
}
