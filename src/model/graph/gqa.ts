import type { Architecture } from '../architecture.js';
import { kvCacheKeyName, kvCacheValueName, kvPresentKeyName, kvPresentValueName, KV_SEQLENS, KV_TOTAL } from '../manifest.js';
import { ropeFrequencies } from './rope.js';
import { float, int, type GraphBuilder } from './onnx-builder.js';

/**
 * The `gqa` KV contract: attention is one com.microsoft.GroupQueryAttention per layer (the fused
 * operator onnxruntime-genai's builder emits for this family on CPU and CUDA), reading and writing
 * the engine's cache in place.
 *
 * - `kv_cache.i.key|value` [batch, kvHeads, maxCtx, headDim] are the op's past_key/past_value and
 *   `kv_present.i.key|value` (same shape) its present outputs. The engine binds each pair to ONE
 *   buffer: onnxruntime then runs in past-present share-buffer mode and writes only the step's new
 *   positions, at [seqlens_k + 1 − S, seqlens_k + 1) of each row. Row b of the step is slot b of the
 *   buffer view it is given, which is why the engine keeps running rows in contiguous slots.
 * - `seqlens_k` int32 [batch] = cached + new tokens − 1 per row; `total_sequence_length` int32 [] =
 *   the largest cached + new. A row attends to its own [0, seqlens_k + 1) only, so a step costs its
 *   rows' real lengths, not maxCtx. No mask is built or fed.
 * - RoPE is done by the op (do_rotary with baked cos/sin caches [maxPositions, headDim/2]; the op
 *   derives each row's positions from seqlens_k, which equal position_ids in the engine) when
 *   `gqaSupport` says `inside`; otherwise the builder rotates q and k with its own ops first.
 *
 * Constraints of onnxruntime 1.30's CPU kernel (group_query_attention_helper.h, and measured by
 * test/gqa-graph.test.ts): head_size % 8 == 0; with cos/sin caches head_size % 16 == 0; a step with
 * S > 1 and a non-empty past (a later prefill chunk) must have batch 1 (the engine's prefill chunks
 * are batch 1); cos/sin rows ≥ total_sequence_length.
 */

export type GqaSupport = { ok: true; rotary: 'inside' | 'outside' } | { ok: false; reason: string };

/** Whether a model can be built with kv: gqa, and where its RoPE goes; pure, for the build's fallback line. */
export function gqaSupport(a: Architecture): GqaSupport {
  if (a.headDim % 8 !== 0) return { ok: false, reason: `head_dim ${a.headDim} is not a multiple of 8 (onnxruntime's GroupQueryAttention needs it)` };
  // LongRoPE picks its table per row from the step's positions; the op takes one table per run
  if (a.rope?.type === 'longrope') return { ok: true, rotary: 'outside' };
  return { ok: true, rotary: a.headDim % 16 === 0 ? 'inside' : 'outside' };
}

/**
 * The op's cos/sin caches: one column per rotated pair (not repeated per pair as ropeTables'), with
 * the same float32-rounded angles and the attention factor on both, so the rotation equals the
 * plain-ops one.
 */
export function gqaRotaryCaches(a: Architecture): { cos: Float32Array; sin: Float32Array } {
  const half = a.headDim / 2;
  const { invFreq, attentionFactor } = ropeFrequencies(a);
  const cos = new Float32Array(a.maxPositions * half);
  const sin = new Float32Array(a.maxPositions * half);
  for (let p = 0; p < a.maxPositions; p++) {
    for (let i = 0; i < half; i++) {
      const angle = Math.fround(p * invFreq[i]!);
      cos[p * half + i] = Math.cos(angle) * attentionFactor;
      sin[p * half + i] = Math.sin(angle) * attentionFactor;
    }
  }
  return { cos, sin };
}

export interface GqaLayer {
  /** q [B, S, H·hd], k and v [B, S, KVH·hd]; q and k not yet rotated when `rotary` is given */
  q: string;
  k: string;
  v: string;
  scale: number;
  softcap?: number;
  /** keys a query sees, itself included (transformers' sliding_window) */
  window?: number;
  rotary?: { cos: string; sin: string; interleaved: boolean };
}

export interface GqaAttention {
  /** the layer's attention output [B, S, H·hd] */
  attend(i: number, layer: GqaLayer): string;
  /** declares the present outputs (called after logits) */
  outputs(): void;
}

type Float = 'float32' | 'float16';

export function gqaAttention(g: GraphBuilder, T: Float, numLayers: number, H: number, KVH: number, hd: number): GqaAttention {
  for (let i = 0; i < numLayers; i++) {
    g.input(kvCacheKeyName(i), T, ['batch', KVH, 'max_ctx', hd]);
    g.input(kvCacheValueName(i), T, ['batch', KVH, 'max_ctx', hd]);
  }
  const seqlens = g.input(KV_SEQLENS, 'int32', ['batch']);
  const total = g.input(KV_TOTAL, 'int32', []);
  return {
    attend(i, l) {
      const attrs = {
        num_heads: int(H),
        kv_num_heads: int(KVH),
        scale: float(l.scale),
        // measured on 1.30 (test/gqa-graph.test.ts): the op's window counts the query's own key, as
        // transformers' sliding_window does (W − 1 differs from the plain-ops graph by ~50 in the logits)
        ...(l.window !== undefined && { local_window_size: int(l.window) }),
        ...(l.softcap !== undefined && { softcap: float(l.softcap) }),
        ...(l.rotary && { do_rotary: int(1), rotary_interleaved: int(l.rotary.interleaved ? 1 : 0) }),
      };
      const inputs = [l.q, l.k, l.v, kvCacheKeyName(i), kvCacheValueName(i), seqlens, total, ...(l.rotary ? [l.rotary.cos, l.rotary.sin] : [])];
      const [out] = g.node('GroupQueryAttention', inputs, {
        attrs,
        domain: 'com.microsoft',
        outputs: [null, kvPresentKeyName(i), kvPresentValueName(i)],
      });
      return out;
    },
    outputs() {
      for (let i = 0; i < numLayers; i++) {
        g.output(kvPresentKeyName(i), T, ['batch', KVH, 'max_ctx', hd]);
        g.output(kvPresentValueName(i), T, ['batch', KVH, 'max_ctx', hd]);
      }
    },
  };
}
