import { describe, expect, it } from 'vitest';
import type { EngineEmbedding } from '../src/adapters/convert.js';
import { f16ToF32 } from '../src/adapters/safetensors.js';
import { embedFeedsFor, neutralEmbedFeeds } from '../src/engine/embed-rows.js';
import { headLogits } from '../src/engine/head.js';

/**
 * The engine's per-row embedding inputs (engine/embed-rows.ts) and an adapter's own lm_head
 * (engine/head.ts), value by value on a tiny table: each kind of row gets what PEFT's module gives
 * it, rows without an adapter stay exactly the base, and fp16 graphs get the same values in fp16.
 */

const H = 3;
const none: EngineEmbedding = { lora: null, tokens: null, table: null, headTable: null, headTokens: null };
// vocab 4: table row t = [t, t + 0.5, -t]
const table = Float32Array.from({ length: 4 * H }, (_, i) => [Math.floor(i / H), Math.floor(i / H) + 0.5, -Math.floor(i / H)][i % H]!);
const lora: EngineEmbedding = { ...none, lora: { rank: 2, A: Float32Array.from([1, 0, 0, 1, 2, 0, 0, 0]), B: Float32Array.from([1, 2, 3, 10, 20, 30]) } };
const tokens: EngineEmbedding = { ...none, tokens: { indices: Int32Array.from([2]), values: Float32Array.from([7, 8, 9]) } };
const saved: EngineEmbedding = { ...none, table };

describe('embedFeedsFor', () => {
  it('nothing to feed when no row has embedding parts; the neutral feeds are keep 1, rows 0', () => {
    expect(embedFeedsFor([[1], [2]], [null, { embedding: null }], 'fp32', H)).toBeNull();
    const n = neutralEmbedFeeds('fp32', H);
    expect([...(n.embed_keep.data as Float32Array)]).toEqual([1]);
    expect([...(n.embed_rows.data as Float32Array)]).toEqual([0, 0, 0]);
    expect(n.embed_rows.dims).toEqual([1, 1, H]);
  });

  it('a decode step mixing base, LoRA, trainable-token and saved-table rows', () => {
    const f = embedFeedsFor([[1], [1], [2], [3], [1]], [null, { embedding: lora }, { embedding: tokens }, { embedding: saved }, { embedding: tokens }], 'fp32', H)!;
    expect(f.embed_keep.dims).toEqual([5, 1, 1]);
    expect(f.embed_rows.dims).toEqual([5, 1, H]);
    // LoRA: keep the base row, add Σ_k A[token, k]·B[k, :] (token 1: A row [0, 1] → B row 1)
    // tokens: token 2 is replaced by its saved value; token 1 (not listed) keeps the base row
    // saved table: every token's row from the copy
    expect([...(f.embed_keep.data as Float32Array)]).toEqual([1, 1, 0, 0, 1]);
    expect([...(f.embed_rows.data as Float32Array)]).toEqual([0, 0, 0, 10, 20, 30, 7, 8, 9, 3, 3.5, -3, 0, 0, 0]);
  });

  it('a prefill chunk: one row, several tokens, and the same values in fp16 bits', () => {
    const f = embedFeedsFor([[0, 2, 1]], [{ embedding: lora }], 'fp16', H)!;
    expect(f.embed_rows.type).toBe('float16');
    expect(f.embed_rows.dims).toEqual([1, 3, H]);
    // token 0: A row [1, 0] → B row 0; token 2: A row [2, 0] → 2·B row 0; token 1 → B row 1
    expect([...(f.embed_rows.data as Uint16Array)].map(f16ToF32)).toEqual([1, 2, 3, 2, 4, 6, 10, 20, 30]);
    expect([...(f.embed_keep.data as Uint16Array)].map(f16ToF32)).toEqual([1, 1, 1]);
  });
});

describe('headLogits', () => {
  const hidden = Float32Array.from([1, 2, 3]);
  const base = Float32Array.from([0.5, 0.25, -1, 4]);

  it('a saved head recomputes every logit (h · W[v]); replaced token rows change only theirs', async () => {
    const full = await headLogits({ ...none, headTable: table }, hidden, base, undefined);
    // row v = [v, v + 0.5, -v]: h·row = v + 2v + 1 − 3v = 1
    expect([...full]).toEqual([1, 1, 1, 1]);
    const sparse = await headLogits({ ...none, headTokens: { indices: Int32Array.from([3]), values: Float32Array.from([1, 1, 1]) } }, hidden, base, undefined);
    expect([...sparse]).toEqual([0.5, 0.25, -1, 6]);
    expect([...base]).toEqual([0.5, 0.25, -1, 4]);
  });

  it('the final soft-cap (Gemma 2) is applied to recomputed logits as the graph applies it', async () => {
    const capped = await headLogits({ ...none, headTokens: { indices: Int32Array.from([0]), values: Float32Array.from([1, 1, 1]) } }, hidden, base, 4);
    expect(capped[0]).toBeCloseTo(Math.tanh(6 / 4) * 4, 6);
    const full = await headLogits({ ...none, headTable: table }, hidden, base, 4);
    expect(full[2]).toBeCloseTo(Math.tanh(1 / 4) * 4, 6);
  });
});
