import * as ort from 'onnxruntime-node';
import type { InferenceSession, Tensor } from 'onnxruntime-node';
import { GraphBuilder, int } from '../model/graph/onnx-builder.js';
import { cpuSessionOptions } from '../model/session.js';
import type { EngineEmbedding } from '../adapters/convert.js';
import { HIDDEN_OUTPUT, kvNewKeyName, kvNewValueName, type Manifest } from '../model/manifest.js';

/**
 * A row's logits when its adapter has its own lm_head (DESIGN.md: "a saved lm_head: group rows by
 * adapter after the last norm; never a per-row copy of the whole head"): the graph returns the
 * normed hidden state (manifest.ts HIDDEN_OUTPUT) and the row's logits are recomputed here from it —
 * every logit from a saved lm_head copy (ModulesToSaveWrapper), or only the replaced tokens' logits
 * (trainable tokens' index_copy into lm_head, or into a tied one through the embedding's adapter).
 * Gemma 2's final soft-cap is applied as the graph applies it to the base logits.
 */
export function hasOwnHead(e: EngineEmbedding | null | undefined): boolean {
  return !!e && (e.headTable !== null || e.headTokens !== null);
}

const dot = (w: Float32Array, row: number, h: Float32Array): number => {
  const H = h.length;
  let s = 0;
  const o = row * H;
  for (let i = 0; i < H; i++) s += w[o + i]! * h[i]!;
  return Math.fround(s);
};

/**
 * logits = hidden · Wᵀ (then the soft-cap) for a whole saved head: vocab × hidden per row is too
 * much for a JS loop at real sizes, so it runs as one Gemm in a tiny CPU session of its own (the
 * base graph's head is the same Gemm with transB), with the head fed as an input.
 */
const headSessions = new Map<string, Promise<InferenceSession>>();
function headSession(softcap: number | undefined): Promise<InferenceSession> {
  const key = String(softcap ?? 0);
  let s = headSessions.get(key);
  if (!s) {
    const g = new GraphBuilder(null);
    const hidden = g.input('hidden', 'float32', ['rows', 'hidden']);
    const weight = g.input('weight', 'float32', ['vocab', 'hidden']);
    let y = g.op('Gemm', [hidden, weight], { transB: int(1) });
    if (softcap) {
      const c = (v: number) => g.constFloat(new Float32Array([v]), [], 'float32');
      y = g.op('Mul', [g.op('Tanh', [g.op('Mul', [y, c(1 / softcap)])]), c(softcap)]);
    }
    g.node('Identity', [y], { outputs: ['logits'] });
    g.output('logits', 'float32', ['rows', 'vocab']);
    const bytes = g.encode('loraserve-head', { '': 17 }, 'head');
    s = ort.InferenceSession.create(bytes, cpuSessionOptions());
    headSessions.set(key, s);
  }
  return s;
}

/** logits [rows, vocab] of `hidden` [rows, H] through a saved head [vocab, H], one row per result */
async function fullHead(table: Float32Array, hidden: readonly Float32Array[], softcap: number | undefined): Promise<Float32Array[]> {
  const H = hidden[0]!.length;
  const rows = new Float32Array(hidden.length * H);
  hidden.forEach((h, i) => rows.set(h, i * H));
  const session = await headSession(softcap);
  const out = await session.run({ hidden: new ort.Tensor('float32', rows, [hidden.length, H]), weight: new ort.Tensor('float32', table, [table.length / H, H]) });
  const logits = out.logits;
  if (!logits || !(logits.data instanceof Float32Array)) throw new Error('the head session returned no float32 logits');
  const vocab = table.length / H;
  return hidden.map((_, i) => logits.data.slice(i * vocab, (i + 1) * vocab) as Float32Array);
}

/** New logits for one position: `base` (the graph's, with the base head) changed by the adapter's head. */
export async function headLogits(e: EngineEmbedding, hidden: Float32Array, base: Float32Array, softcap: number | undefined): Promise<Float32Array> {
  const cap = (v: number) => (softcap ? Math.fround(Math.tanh(v / softcap) * softcap) : v);
  if (e.headTable) return (await fullHead(e.headTable, [hidden], softcap))[0]!;
  const out = base.slice();
  const t = e.headTokens!;
  t.indices.forEach((token, j) => (out[token] = cap(dot(t.values, j, hidden))));
  return out;
}

/**
 * The outputs a step fetches from a row-embedding graph: the hidden state only when a row's adapter
 * has its own head, so other steps take back what they did before it existed (logits and KV rows).
 */
export function fetchesOf(m: Manifest, hidden: boolean): string[] {
  const kv = Array.from({ length: m.architecture.numLayers }, (_, l) => [kvNewKeyName(l), kvNewValueName(l)]).flat();
  return hidden ? ['logits', ...kv, HIDDEN_OUTPUT] : ['logits', ...kv];
}

/**
 * Each row's logits at its last position ([rows, 1 | seq, vocab]), with its adapter's own lm_head
 * applied when it has one: rows that share a saved head go through it together, in one Gemm.
 * Views of the output for the rows whose head is the base's.
 */
export async function rowsLogits(out: InferenceSession.ReturnType, adapters: readonly ({ readonly embedding?: EngineEmbedding | null } | null)[], manifest: Manifest): Promise<Float32Array[]> {
  const logits = output(out, 'logits');
  if (!(logits.data instanceof Float32Array)) throw new Error('output logits is not float32');
  const data = logits.data;
  const n = adapters.length;
  const vocab = logits.dims[logits.dims.length - 1]!;
  const result = adapters.map((_, b) => {
    const end = ((b + 1) * data.length) / n;
    return data.subarray(end - vocab, end);
  });
  if (!adapters.some((a) => hasOwnHead(a?.embedding))) return result;
  const h = output(out, HIDDEN_OUTPUT);
  if (!(h.data instanceof Float32Array)) throw new Error(`output ${HIDDEN_OUTPUT} is not float32`);
  const hData = h.data;
  const H = h.dims[h.dims.length - 1]!;
  const hiddenOf = (b: number) => {
    const end = ((b + 1) * hData.length) / n;
    return hData.subarray(end - H, end);
  };
  const softcap = manifest.architecture.finalSoftcap;
  const groups = new Map<Float32Array, number[]>();
  for (let b = 0; b < n; b++) {
    const e = adapters[b]?.embedding;
    if (!e || !hasOwnHead(e)) continue;
    if (e.headTable) groups.set(e.headTable, [...(groups.get(e.headTable) ?? []), b]);
    else result[b] = await headLogits(e, hiddenOf(b), result[b]!, softcap);
  }
  for (const [table, rows] of groups) {
    const got = await fullHead(table, rows.map(hiddenOf), softcap);
    rows.forEach((b, i) => (result[b] = got[i]!));
  }
  return result;
}

function output(out: InferenceSession.ReturnType, name: string): Tensor {
  const t = out[name];
  if (!t) throw new Error(`the graph returned no output ${name}`);
  return t;
}
