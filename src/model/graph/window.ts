import { GraphBuilder, int } from './onnx-builder.js';

/**
 * Sliding-window attention as a change of the attention bias only, so it needs nothing from the
 * KV cache code: transformers lets query q see key k iff k > q - W (and causality, padding). A
 * row's real tokens hold consecutive positions, so among the keys a query may see, that is exactly
 * the last W: counting visible keys from the right (CumSum, reverse) and masking those counted
 * beyond W gives the window whatever the padding or cache layout.
 *
 * `bias` is [batch, 1, seq, total] with 0 = attend; returns the same with the window applied.
 */
export function slidingWindowBias(g: GraphBuilder, bias: string, window: number, maskValue: number, T: 'float32' | 'float16'): string {
  const scope = g.scope;
  g.scope = '/model/window';
  const visible = g.op('Cast', [g.op('Equal', [bias, g.constFloat(new Float32Array([0]), [], T)])], { to: int(1) });
  const fromRight = g.op('CumSum', [visible, g.constInt64([-1], [])], { reverse: int(1) });
  const outside = g.op('Greater', [fromRight, g.constFloat(new Float32Array([window]), [], 'float32')]);
  const out = g.op('Where', [outside, g.constFloat(new Float32Array([maskValue]), [], T), bias]);
  g.scope = scope;
  return out;
}
