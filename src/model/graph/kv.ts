import {
  kvCacheKeyName,
  kvCacheValueName,
  kvNewKeyName,
  kvNewValueName,
  pastKeyName,
  pastValueName,
  presentKeyName,
  presentValueName,
  KV_LENS,
  KV_ROWS,
} from '../manifest.js';
import { int, ints, type GraphBuilder } from './onnx-builder.js';

/**
 * Where attention's keys and values come from and where the step's new ones go. The decoder
 * builder hands each layer's k and v ([B, S, KVH, hd], RoPE applied) to `layer` and attends to
 * what it returns ([B, KVH, past + S, hd]) with `bias` ([B, 1, S, past + S], 0 or the mask
 * value) added to the scores; everything about the cache's layout stays in this module.
 */
export interface KvLayout {
  readonly bias: string;
  layer(i: number, k: string, v: string): { keys: string; values: string };
  /** declares the graph outputs this layout adds (called after logits) */
  outputs(): void;
}

type Float = 'float32' | 'float16';
const TO_BNSH = { perm: ints([0, 2, 1, 3]) };

/**
 * The classic contract (Optimum's): past_key_values.i.* in, present.i.* = past ++ new out. Every
 * step hands the whole cache in and gets it back one longer, so it is O(context) per step across
 * the runtime boundary. Kept for the peer export (transformers.js reads it) and for the graph
 * tests, which drive the session by hand.
 */
export function concatKv(g: GraphBuilder, T: Float, numLayers: number, KVH: number, hd: number, bias: string): KvLayout {
  for (let i = 0; i < numLayers; i++) {
    g.input(pastKeyName(i), T, ['batch', KVH, 'past', hd]);
    g.input(pastValueName(i), T, ['batch', KVH, 'past', hd]);
  }
  return {
    bias,
    layer(i, k, v) {
      const [keys] = g.node('Concat', [pastKeyName(i), g.op('Transpose', [k], TO_BNSH)], { attrs: { axis: int(2) }, outputs: [presentKeyName(i)] });
      const [values] = g.node('Concat', [pastValueName(i), g.op('Transpose', [v], TO_BNSH)], { attrs: { axis: int(2) }, outputs: [presentValueName(i)] });
      return { keys, values };
    },
    outputs() {
      for (let i = 0; i < numLayers; i++) {
        g.output(presentKeyName(i), T, ['batch', KVH, 'total', hd]);
        g.output(presentValueName(i), T, ['batch', KVH, 'total', hd]);
      }
    },
  };
}

/**
 * The resident contract: the engine keeps one cache per layer, `kv_cache.i.key|value`
 * [past, slots, KVH, hd], allocated once for every slot and position-major so that the prefix
 * [0, past) that a step needs is one contiguous view, handed in without a copy. `kv_rows` [B]
 * says which slot each row of the step is, `kv_lens` [B] how many cached tokens it has (a row's
 * tokens sit at positions [0, len) of its slot; the rest of the prefix is another row's longer
 * history or stale, and masked). Only the step's own keys and values come out, `kv_new.i.*`
 * [B, S, KVH, hd] — O(rows) per decode step — and the engine writes them into the cache at
 * [len, len + S). The mask is built here from those O(rows) inputs, so nothing O(context) is fed
 * either.
 */
export function residentKv(g: GraphBuilder, T: Float, numLayers: number, KVH: number, hd: number, inputIds: string, maskValue: number): KvLayout {
  for (let i = 0; i < numLayers; i++) {
    g.input(kvCacheKeyName(i), T, ['past', 'slots', KVH, hd]);
    g.input(kvCacheValueName(i), T, ['past', 'slots', KVH, hd]);
  }
  const rows = g.input(KV_ROWS, 'int64', ['batch']);
  const lens = g.input(KV_LENS, 'int64', ['batch']);

  g.scope = '/model/kv_mask';
  const zero = g.constInt64([0], []);
  const one = g.constInt64([1], []);
  const seq = g.op('Squeeze', [g.op('Shape', [inputIds], { start: int(1), end: int(2) })]);
  const past = g.op('Squeeze', [g.op('Shape', [kvCacheKeyName(0)], { start: int(0), end: int(1) })]);
  const total = g.op('Add', [past, seq]);
  const key = g.op('Range', [zero, total, one]); // [T]: index into past ++ new
  // a cached key is the row's own while its index is below the row's length
  const cached = g.op('Less', [key, g.op('Unsqueeze', [lens, g.constInt64([1])])]); // [B, T]
  // a new key (index past + j) is seen by query s when j ≤ s
  const j = g.op('Sub', [key, past]);
  const query = g.op('Unsqueeze', [g.op('Range', [zero, seq, one]), g.constInt64([1])]); // [S, 1]
  const causal = g.op('And', [g.op('GreaterOrEqual', [j, zero]), g.op('LessOrEqual', [j, query])]); // [S, T]
  const visible = g.op('Or', [g.op('Unsqueeze', [cached, g.constInt64([1, 2])]), g.op('Unsqueeze', [causal, g.constInt64([0, 1])])]); // [B, 1, S, T]
  const bias = g.op('Where', [visible, g.constFloat(new Float32Array([0]), [], T), g.constFloat(new Float32Array([maskValue]), [], T)]);

  // [past, slots, KVH, hd] → the step's rows → [B, KVH, past, hd]
  const cachedFor = (cache: string) => g.op('Transpose', [g.op('Gather', [cache, rows], { axis: int(1) })], { perm: ints([1, 2, 0, 3]) });
  return {
    bias,
    layer(i, k, v) {
      g.node('Identity', [k], { outputs: [kvNewKeyName(i)] });
      g.node('Identity', [v], { outputs: [kvNewValueName(i)] });
      const keys = g.op('Concat', [cachedFor(kvCacheKeyName(i)), g.op('Transpose', [k], TO_BNSH)], { axis: int(2) });
      const values = g.op('Concat', [cachedFor(kvCacheValueName(i)), g.op('Transpose', [v], TO_BNSH)], { axis: int(2) });
      return { keys, values };
    },
    outputs() {
      for (let i = 0; i < numLayers; i++) {
        g.output(kvNewKeyName(i), T, ['batch', 'seq', KVH, hd]);
        g.output(kvNewValueName(i), T, ['batch', 'seq', KVH, hd]);
      }
    },
  };
}
