import type { Architecture, Projection } from '../architecture.js';
import { projectionBlock, projectionDims, projectionHasBias } from '../architecture.js';
import type { Checkpoint } from '../checkpoint/types.js';
import { ModelInputError } from '../checkpoint/types.js';
import { EMBED_KEEP, EMBED_ROWS, HIDDEN_OUTPUT, hasRowEmbeddings, loraBiasInput, loraMagnitudeInput, loraTargetsFor, type KvContract, type LoraTarget, type ModelDtype } from '../manifest.js';
import { concatKv, residentKv, type KvLayout } from './kv.js';
import { gqaAttention, gqaRotaryCaches, gqaSupport, type GqaAttention } from './gqa.js';
import { frobeniusNorm } from '../../adapters/effect.js';
import { ropeFrequencies } from './rope.js';
import { slidingWindowBias } from './window.js';
import { GraphBuilder, float, float32ToFloat16Bits, int, ints, type ExternalDataWriter } from './onnx-builder.js';
import { quantizeBlockwise, type QuantBits } from './quantize.js';
import { matMulNBits } from './matmulnbits.js';
import { f16ToF32 } from '../../adapters/safetensors.js';

/** Bump whenever the emitted graph changes: it is part of the build cache key. */
export const BUILDER_VERSION = '13';

export interface GraphOptions {
  dtype: ModelDtype;
  logits: 'all' | 'last';
  /** emit the per-row LoRA inputs of every projection */
  lora: boolean;
  /**
   * with `lora: false`: emit the plain Optimum-style export (attention_mask int64 [batch, total]
   * instead of attention_bias), for comparison with @huggingface/transformers
   */
  peer: boolean;
  /** the KV cache contract (graph/kv.ts); absent = concat, so existing cache keys stay the same */
  kv?: KvContract;
  /**
   * projections as MatMulNBits with block-quantized weights (graph/quantize.ts); absent = plain
   * MatMul at `dtype`, so existing cache keys stay the same. LoRA branches stay at `dtype`.
   */
  weights?: QuantizedWeights;
  /**
   * MatMulNBits' accuracy_level with `weights`; absent = 4 (int8 activations, the fast CPU path,
   * about 0.4% relative error per product). 0 computes in float with the dequantized weight: the
   * op's exact semantics, which the tests compare against the reference forward.
   */
  accuracyLevel?: 0 | 4;
}

export type QuantizedWeights = 'int8' | 'int4';

/**
 * Added to a score to mask it. Finite on purpose: a query row with every key masked (a left-pad
 * position) must give a harmless uniform softmax, not NaN. -1e4 still fits float16.
 */
export const maskValueFor = (dtype: ModelDtype): number => (dtype === 'fp16' ? -1e4 : -1e9);

export interface BuiltGraph {
  model: Uint8Array;
  maskValue: number;
  loraTargets: LoraTarget[];
}

/** symbolic dims of a target's LoRA inputs: a rank per target, and a batch that may be 1 (broadcast) */
export const loraRankDim = (t: LoraTarget) => `lora_rank.${t.layer}.${t.module}`;
export const loraBatchDim = (t: LoraTarget) => `lora_batch.${t.layer}.${t.module}`;
export const loraVectorBatchDim = (t: LoraTarget) => `lora_vector_batch.${t.layer}.${t.module}`;
/** out, or 1 for the neutral broadcast (ones / zeros) fed when no row of the step needs the vector */
export const loraVectorWidthDim = (t: LoraTarget) => `lora_vector_width.${t.layer}.${t.module}`;

/** SimplifiedLayerNormalization is onnxruntime's, registered in the default domain (as onnxruntime-genai emits it) */
const OPSETS = { '': 17 };

/**
 * RoPE for either layout as rot(x) = x·cos + (x·R)·sin, where R is the constant [hd, hd] matrix that
 * maps x to its signed pair partner (rotate_half: pairs i, i + hd/2; interleaved: pairs 2i, 2i + 1)
 * and the cos/sin tables repeat each frequency over its pair. So checkpoint rows are never permuted.
 * Angles are rounded to float32 at each step as HF (`inv_freq` float32 @ positions) and llama2.c
 * (`powf`, `pos * freq`) do, so long positions agree with them rather than with exact math.
 * Scaled RoPE (rope.ts) changes only the frequencies and a factor on both tables.
 */
export function ropeTables(a: Architecture): { cos: Float32Array; sin: Float32Array; rotation: Float32Array; long?: { cos: Float32Array; sin: Float32Array } } {
  const hd = a.headDim;
  const half = hd / 2;
  const { invFreq, attentionFactor, longInvFreq } = ropeFrequencies(a);
  const freqIndex = (j: number) => (a.ropeLayout === 'rotate_half' ? j % half : j >> 1);
  const table = (inv: Float32Array) => {
    const cos = new Float32Array(a.maxPositions * hd);
    const sin = new Float32Array(a.maxPositions * hd);
    for (let p = 0; p < a.maxPositions; p++) {
      for (let j = 0; j < hd; j++) {
        const angle = Math.fround(p * inv[freqIndex(j)]);
        cos[p * hd + j] = Math.cos(angle) * attentionFactor;
        sin[p * hd + j] = Math.sin(angle) * attentionFactor;
      }
    }
    return { cos, sin };
  };
  const { cos, sin } = table(invFreq);
  const long = longInvFreq ? table(longInvFreq) : undefined;
  const rotation = new Float32Array(hd * hd);
  const set = (from: number, to: number, v: number) => (rotation[from * hd + to] = v);
  for (let i = 0; i < half; i++) {
    if (a.ropeLayout === 'rotate_half') {
      set(i + half, i, -1); // out[i] = -x[i + hd/2]
      set(i, i + half, 1); // out[i + hd/2] = x[i]
    } else {
      set(2 * i + 1, 2 * i, -1); // out[2i] = -x[2i+1]
      set(2 * i, 2 * i + 1, 1); // out[2i+1] = x[2i]
    }
  }
  return { cos, sin, rotation, long };
}

function checkArchitecture(a: Architecture, modelId: string): void {
  const bad = (d: string) => new ModelInputError(modelId, d);
  if (a.headDim % 2 !== 0) throw bad(`headDim ${a.headDim} is odd; RoPE needs pairs`);
  if (a.numHeads % a.numKvHeads !== 0) throw bad(`numHeads ${a.numHeads} is not a multiple of numKvHeads ${a.numKvHeads}`);
}

/**
 * Reads checkpoint tensors, checking each shape (so a wrong file fails here with its name, not
 * inside onnxruntime) and remembering what was read: after the build, a checkpoint tensor that no
 * part of the graph read is an error naming it, whatever the reader let through.
 */
class TensorReader {
  private readonly consumed = new Set<string>();
  constructor(private readonly ck: Checkpoint) {}

  read(name: string, shape: readonly number[]): Float32Array {
    this.consumed.add(name);
    return readTensor(this.ck, name, shape);
  }

  assertAllConsumed(): void {
    const left = this.ck.names().filter((n) => !this.consumed.has(n));
    if (left.length) {
      const shown = left.slice(0, 8).join(', ') + (left.length > 8 ? ` (and ${left.length - 8} more)` : '');
      throw new ModelInputError(this.ck.modelId, `checkpoint tensors not used by the ${this.ck.architecture.family} graph: ${shown}; refusing to serve a model without them.`);
    }
  }
}

function readTensor(ck: Checkpoint, name: string, shape: readonly number[]): Float32Array {
  const t = ck.tensor(name);
  if (!t) throw new ModelInputError(ck.modelId, `tensor ${name} is missing`);
  if (t.shape.length !== shape.length || t.shape.some((d, i) => d !== shape[i])) {
    throw new ModelInputError(ck.modelId, `tensor ${name} has shape [${t.shape.join(', ')}], expected [${shape.join(', ')}]`);
  }
  const v = t.read();
  if (v.length !== shape.reduce((x, y) => x * y, 1)) throw new ModelInputError(ck.modelId, `tensor ${name} holds ${v.length} values`);
  return v;
}

/** [rows, cols] row-major → [cols, rows]: PyTorch Linear [out, in] to MatMul [in, out] */
function transpose(src: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(src.length);
  for (let r = 0; r < rows; r++) {
    const base = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = src[base + c];
  }
  return out;
}

/**
 * Emits the decoder graph (DESIGN.md "The model graph contract"), writing weights to `data` one
 * tensor at a time. Attention is plain ops: scores + attention_bias → Softmax, so the caller
 * expresses causality and padding in one tensor; GQA reshapes the query heads of a KV group into
 * the sequence axis ([B, H, S, hd] → [B, KVH, G·S, hd]) so K/V are never repeated.
 */
export async function buildLlamaGraph(
  ck: Checkpoint,
  opts: GraphOptions,
  data: ExternalDataWriter,
  onProgress: (line: string) => void = () => {},
): Promise<BuiltGraph> {
  const a = ck.architecture;
  checkArchitecture(a, ck.modelId);
  if (opts.peer && opts.lora) throw new Error('the peer (Optimum-style) export has no LoRA inputs: use lora: false with peer: true');
  const T = opts.dtype === 'fp16' ? 'float16' : 'float32';
  const maskValue = maskValueFor(opts.dtype);
  const H = a.numHeads;
  const KVH = a.numKvHeads;
  const hd = a.headDim;
  const g = new GraphBuilder(data);
  const tensors = new TensorReader(ck);
  const targets = opts.lora ? loraTargetsFor(a) : [];
  const targetOf = new Map(targets.map((t) => [`${t.layer}.${t.module}`, t]));
  const scalar = (v: number) => g.constFloat(new Float32Array([v]), [], T);

  // ---- inputs
  const inputIds = g.input('input_ids', 'int64', ['batch', 'seq']);
  const kvMode = opts.kv ?? 'concat';
  if (kvMode !== 'concat' && opts.peer) throw new Error('the peer (Optimum-style) export keeps the concat KV contract: use kv: concat with peer: true');
  const support = kvMode === 'gqa' ? gqaSupport(a) : null;
  if (support && !support.ok) throw new ModelInputError(ck.modelId, `kv: gqa is not possible: ${support.reason}; build with kv: resident`);
  const attnMask = opts.peer ? g.input('attention_mask', 'int64', ['batch', 'total']) : null;
  const positionIds = g.input('position_ids', 'int64', ['batch', 'seq']);
  // gqa: attention, mask and cache in one fused op per layer (graph/gqa.ts); the others: plain ops over a KvLayout
  let kv: KvLayout | null = null;
  let fused: GqaAttention | null = null;
  if (kvMode === 'gqa') fused = gqaAttention(g, T, a.numLayers, H, KVH, hd);
  else if (kvMode === 'resident') kv = residentKv(g, T, a.numLayers, KVH, hd, inputIds, maskValue);
  else {
    const bias = attnMask === null ? g.input('attention_bias', T, ['batch', 1, 'seq', 'total']) : biasFromMask(g, inputIds, attnMask, maskValue, T);
    kv = concatKv(g, T, a.numLayers, KVH, hd, bias);
  }
  const rotaryInside = support?.ok === true && support.rotary === 'inside';
  for (const t of targets) {
    g.input(t.inputA, T, [loraBatchDim(t), t.inFeatures, loraRankDim(t)]);
    g.input(t.inputB, T, [loraBatchDim(t), loraRankDim(t), t.outFeatures]);
    // DoRA's factor and lora_B's bias (DESIGN "The model graph contract"): [batch | 1, 1, out | 1];
    // steps without such rows feed [1, 1, 1], so the neutral values cost 4 bytes, not `out`
    g.input(loraMagnitudeInput(t), T, [loraVectorBatchDim(t), 1, loraVectorWidthDim(t)]);
    g.input(loraBiasInput(t), T, [loraVectorBatchDim(t), 1, loraVectorWidthDim(t)]);
  }

  // sliding window (Mistral, Phi-3, windowed Qwen layers): only the bias of those layers changes
  const windowed = new Set(a.slidingWindow ? (a.slidingWindowLayers ?? []) : []);
  const attnBias = kv?.bias ?? '';
  const windowBias = kv && a.slidingWindow && windowed.size ? slidingWindowBias(g, attnBias, a.slidingWindow, maskValue, T) : attnBias;

  // ---- shared pieces
  onProgress('writing embeddings');
  const embedName = 'model.embed_tokens.weight';
  const embed = await g.weight(embedName, T, [a.vocabSize, a.hiddenSize], tensors.read(embedName, [a.vocabSize, a.hiddenSize]));
  // constants made on first use, so a graph that never uses one (gqa's fused attention) holds none
  const once = <V>(make: () => V): (() => V) => {
    let v: V | undefined;
    return () => (v ??= make());
  };
  const axis2 = once(() => g.constInt64([2]));
  /** rot(x) = x·cos + (x·R)·sin with the tables of `ra` (`a`, or Gemma 3's local layers' variant) */
  const ropeFor = async (ra: Architecture, suffix: string): Promise<(x: string) => string> => {
    g.scope = '/model/rope';
    const rope = ropeTables(ra);
    const cosTable = await g.weight(`rope.cos${suffix}`, T, [a.maxPositions, hd], rope.cos);
    const sinTable = await g.weight(`rope.sin${suffix}`, T, [a.maxPositions, hd], rope.sin);
    const rotation = g.constFloat(rope.rotation, [hd, hd], T);
    // [B, S, 1, hd]: broadcast over heads of q [B, S, H, hd] and k [B, S, KVH, hd]
    let cos = g.op('Unsqueeze', [g.op('Gather', [cosTable, positionIds], { axis: int(0) }), axis2()]);
    let sin = g.op('Unsqueeze', [g.op('Gather', [sinTable, positionIds], { axis: int(0) }), axis2()]);
    if (rope.long && ra.rope?.type === 'longrope') {
      // LongRoPE (transformers' dynamic update): a step whose max(position_ids) + 1 exceeds the
      // original context uses the long factors, per row here
      const longCos = await g.weight(`rope.cos_long${suffix}`, T, [a.maxPositions, hd], rope.long.cos);
      const longSin = await g.weight(`rope.sin_long${suffix}`, T, [a.maxPositions, hd], rope.long.sin);
      const lastPos = g.op('ReduceMax', [positionIds], { axes: ints([1]), keepdims: int(1) }); // [B, 1] (opset 17: axes is an attribute)
      const isLong = g.op('Unsqueeze', [g.op('Greater', [lastPos, g.constInt64([ra.rope.originalMaxPositions - 1], [])]), g.constInt64([2, 3])]); // [B, 1, 1, 1]
      cos = g.op('Where', [isLong, g.op('Unsqueeze', [g.op('Gather', [longCos, positionIds], { axis: int(0) }), axis2()]), cos]);
      sin = g.op('Where', [isLong, g.op('Unsqueeze', [g.op('Gather', [longSin, positionIds], { axis: int(0) }), axis2()]), sin]);
    }
    const [c, s] = [cos, sin];
    return (x: string) => g.op('Add', [g.op('Mul', [x, c]), g.op('Mul', [g.op('MatMul', [x, rotation]), s])]);
  };
  /** GroupQueryAttention's own rotation: cos/sin caches [maxPositions, hd/2] of `ra` */
  const rotaryFor = async (ra: Architecture, suffix: string) => {
    g.scope = '/model/rope';
    const c = gqaRotaryCaches(ra);
    const half = hd / 2;
    return {
      cos: await g.weight(`rope.gqa_cos${suffix}`, T, [a.maxPositions, half], c.cos),
      sin: await g.weight(`rope.gqa_sin${suffix}`, T, [a.maxPositions, half], c.sin),
      interleaved: a.ropeLayout === 'interleaved',
    };
  };
  // Gemma 3: sliding-window layers rotate with plain RoPE at rope_local_base_freq
  const localArch: Architecture | null = a.localRopeTheta !== undefined ? { ...a, ropeTheta: a.localRopeTheta, rope: undefined } : null;
  const noRope = (x: string) => x;
  const globalRope = rotaryInside ? noRope : await ropeFor(a, '');
  const localRope = rotaryInside || !localArch ? globalRope : await ropeFor(localArch, '.local');
  const globalRotary = rotaryInside ? await rotaryFor(a, '') : undefined;
  const localRotary = rotaryInside && localArch ? await rotaryFor(localArch, '.local') : globalRotary;

  const qScale = once(() => scalar(1 / Math.sqrt(a.queryPreAttnScalar ?? hd)));
  const shape = (dims: number[]) => g.constInt64(dims);
  const toHeads = once(() => shape([0, 0, H, hd]));
  const toKvHeads = once(() => shape([0, 0, KVH, hd]));
  const toGroups = once(() => shape([0, KVH, -1, hd])); // [B, H, S, hd] → [B, KVH, G·S, hd]
  const scoresToHeads = once(() => shape([0, H, -1, 0])); // [B, KVH, G·S, T] → [B, H, S, T]
  const probsToGroups = once(() => shape([0, KVH, -1, 0])); // [B, H, S, T] → [B, KVH, G·S, T]
  const ctxToHeads = once(() => shape([0, H, -1, hd]));
  const mergeHeads = once(() => shape([0, 0, H * hd]));

  const rmsNorm = (x: string, weight: string) =>
    g.op('SimplifiedLayerNormalization', [x, weight], { axis: int(-1), epsilon: float(a.rmsNormEps), stash_type: int(1) });
  /**
   * The residual stream: `sum` plus a `pending` delta not yet added, so that with fused ops the add
   * and the next RMSNorm are one SkipSimplifiedLayerNormalization (onnxruntime-genai's pairing:
   * output 0 the normed sum, output 3 the sum itself), across layer boundaries too.
   */
  const residual = { sum: '', pending: null as string | null };
  const addThenNorm = (weight: string): string => {
    const { sum, pending } = residual;
    residual.pending = null;
    if (pending === null) return rmsNorm(sum, weight);
    if (!fused) {
      residual.sum = g.op('Add', [sum, pending]);
      return rmsNorm(residual.sum, weight);
    }
    const [normed, , , added] = g.node('SkipSimplifiedLayerNormalization', [sum, pending, weight], { attrs: { epsilon: float(a.rmsNormEps) }, domain: 'com.microsoft', outputs: [null, '', '', null] });
    residual.sum = added;
    return normed;
  };
  /** a norm's weight as the graph multiplies by it: Gemma's RMSNorm scales by (1 + w) */
  const normWeight = async (name: string, n: number) => {
    const w = tensors.read(name, [n]);
    return g.weight(name, T, [n], a.normPlusOne ? w.map((v) => 1 + v) : w);
  };
  /** Gemma 2 soft-capping: tanh(x / cap) · cap */
  const softcap = (x: string, cap: number) => g.op('Mul', [g.op('Tanh', [g.op('Mul', [x, scalar(1 / cap)])]), scalar(cap)]);
  /** the gated MLP's activation: silu, or GELU with the tanh approximation (gelu_pytorch_tanh) */
  const activation = (x: string) => {
    if (a.activation !== 'gelu_tanh') return g.op('Mul', [x, g.op('Sigmoid', [x])]);
    const inner = g.op('Mul', [g.op('Add', [x, g.op('Mul', [g.op('Mul', [g.op('Mul', [x, x]), x]), scalar(0.044715)])]), scalar(Math.sqrt(2 / Math.PI))]);
    return g.op('Mul', [g.op('Mul', [x, scalar(0.5)]), g.op('Add', [g.op('Tanh', [inner]), scalar(1)])]);
  };

  /** x · Wᵀ with W [n, k] block-quantized; MatMulNBits reads the [out, in] layout, so no transpose */
  const quantizedMatMul = async (name: string, w: Float32Array, n: number, k: number, x: string): Promise<string> => {
    const bits: QuantBits = opts.weights === 'int4' ? 4 : 8;
    // scales are stored in T: codes are chosen against the scale as the runtime will read it
    const roundScale = T === 'float16' ? (v: number) => f16ToF32(float32ToFloat16Bits(v)) : Math.fround;
    return matMulNBits(g, name, x, quantizeBlockwise(w, n, k, bits, roundScale), T, opts.accuracyLevel ?? 4);
  };

  const projection = async (layer: number, p: Projection, x: string): Promise<string> => {
    const { inFeatures, outFeatures } = projectionDims(a, p);
    const base = `model.layers.${layer}.${projectionBlock(p)}.${p}`;
    const raw = tensors.read(`${base}.weight`, [outFeatures, inFeatures]);
    const t = targetOf.get(`${layer}.${p}`);
    // the divisor of each adapter module's relativeNorm, taken while the weight is in hand anyway
    if (t) t.weightNorm = frobeniusNorm(raw);
    let y = opts.weights ? await quantizedMatMul(`${base}.weight`, raw, outFeatures, inFeatures, x) : g.op('MatMul', [x, await g.weight(`${base}.weight.T`, T, [inFeatures, outFeatures], transpose(raw, outFeatures, inFeatures))]);
    // PEFT's DoRA (tuners/lora/dora.py): g ⊙ (W·x + s·B·A·x) + bias, so the factor multiplies before
    // the base bias is added; plain rows are fed g = 1 and lora_B bias = 0, both exact
    if (t) y = g.op('Mul', [g.op('Add', [y, g.op('MatMul', [g.op('MatMul', [x, t.inputA]), t.inputB])]), loraMagnitudeInput(t)]);
    if (projectionHasBias(a, p)) {
      y = g.op('Add', [y, await g.weight(`${base}.bias`, T, [outFeatures], tensors.read(`${base}.bias`, [outFeatures]))]);
    }
    if (t) y = g.op('Add', [y, loraBiasInput(t)]);
    return y;
  };

  // ---- layers
  let h = g.op('Gather', [embed, inputIds], { axis: int(0) });
  const rowEmbeddings = hasRowEmbeddings({ lora: opts.lora, kv: opts.kv });
  if (rowEmbeddings) {
    // each row's own embedding values (embedding LoRA, trainable tokens, a saved embed_tokens), fed per
    // step for its few tokens; before the Gemma normalizer, which scales the embedding module's output
    const keep = g.input(EMBED_KEEP, T, ['embed_batch', 'embed_seq', 1]);
    const rows = g.input(EMBED_ROWS, T, ['embed_batch', 'embed_seq', a.hiddenSize]);
    h = g.op('Add', [g.op('Mul', [h, keep]), rows]);
  }
  // Gemma: embeddings × sqrt(hidden_size), rounded to the compute dtype as transformers' normalizer is
  if (a.embedScale) h = g.op('Mul', [h, scalar(Math.fround(Math.sqrt(a.hiddenSize)))]);
  residual.sum = h;
  for (let i = 0; i < a.numLayers; i++) {
    onProgress(`building layer ${i + 1}/${a.numLayers}…`);
    g.scope = `/model/layers.${i}`;
    const pre = `model.layers.${i}`;
    const inNorm = await normWeight(`${pre}.input_layernorm.weight`, a.hiddenSize);
    const x = addThenNorm(inNorm);
    // Qwen3: RMSNorm over head_dim of every query and key head, before RoPE
    const headNorm = async (heads: string, which: 'q_norm' | 'k_norm') =>
      a.qkNorm ? rmsNorm(heads, await normWeight(`${pre}.self_attn.${which}.weight`, hd)) : heads;
    // Phi-3: one qkv_proj (rows [q; k; v]) split after its LoRA delta, as Phi3Attention slices it
    const [qp, kp, vp] = a.fusedProjections
      ? g.node('Split', [await projection(i, 'qkv_proj', x), g.constInt64([H * hd, KVH * hd, KVH * hd])], { attrs: { axis: int(-1) }, count: 3 })
      : [await projection(i, 'q_proj', x), await projection(i, 'k_proj', x), await projection(i, 'v_proj', x)];
    const local = windowed.has(i);
    const applyRope = local ? localRope : globalRope;
    let merged: string;
    if (fused) {
      // q/k stay [B, S, heads·hd] unless Qwen3's per-head norms need the heads apart
      const flat = (x4: string) => g.op('Reshape', [x4, shape([0, 0, -1])]);
      const qIn = a.qkNorm || !rotaryInside ? flat(applyRope(await headNorm(g.op('Reshape', [qp, toHeads()]), 'q_norm'))) : qp;
      const kIn = a.qkNorm || !rotaryInside ? flat(applyRope(await headNorm(g.op('Reshape', [kp, toKvHeads()]), 'k_norm'))) : kp;
      merged = fused.attend(i, {
        q: qIn,
        k: kIn,
        v: vp,
        scale: 1 / Math.sqrt(a.queryPreAttnScalar ?? hd),
        ...(a.attnSoftcap !== undefined && { softcap: a.attnSoftcap }),
        ...(local && a.slidingWindow !== undefined && { window: a.slidingWindow }),
        ...(rotaryInside && { rotary: local ? localRotary! : globalRotary! }),
      });
    } else {
      const q = applyRope(await headNorm(g.op('Reshape', [qp, toHeads()]), 'q_norm'));
      const k = applyRope(await headNorm(g.op('Reshape', [kp, toKvHeads()]), 'k_norm'));
      const v = g.op('Reshape', [vp, toKvHeads()]);
      const perm = { perm: ints([0, 2, 1, 3]) };
      const qt = g.op('Mul', [g.op('Transpose', [q], perm), qScale()]);
      const { keys: presentK, values: presentV } = kv!.layer(i, k, v);
      const scores = g.op('MatMul', [g.op('Reshape', [qt, toGroups()]), g.op('Transpose', [presentK], { perm: ints([0, 1, 3, 2]) })]);
      const capped = a.attnSoftcap ? softcap(scores, a.attnSoftcap) : scores;
      const biased = g.op('Add', [g.op('Reshape', [capped, scoresToHeads()]), local ? windowBias : attnBias]);
      const probs = g.op('Softmax', [biased], { axis: int(-1) });
      const ctx = g.op('MatMul', [g.op('Reshape', [probs, probsToGroups()]), presentV]);
      merged = g.op('Reshape', [g.op('Transpose', [g.op('Reshape', [ctx, ctxToHeads()])], perm), mergeHeads()]);
    }
    const attnOut = await projection(i, 'o_proj', merged);
    const postNorm = await normWeight(`${pre}.post_attention_layernorm.weight`, a.hiddenSize);
    // Gemma: post_attention_layernorm normalises the attention output, pre_feedforward_layernorm the MLP input
    residual.pending = a.sandwichNorms ? rmsNorm(attnOut, postNorm) : attnOut;
    const y = addThenNorm(a.sandwichNorms ? await normWeight(`${pre}.pre_feedforward_layernorm.weight`, a.hiddenSize) : postNorm);
    // Phi-3: gate_up_proj rows are [gate; up] (Phi3MLP's chunk(2, dim=-1))
    const [gate, up] = a.fusedProjections
      ? g.node('Split', [await projection(i, 'gate_up_proj', y), g.constInt64([a.intermediateSize, a.intermediateSize])], { attrs: { axis: int(-1) }, count: 2 })
      : [await projection(i, 'gate_proj', y), await projection(i, 'up_proj', y)];
    const act = g.op('Mul', [activation(gate), up]);
    const mlpOut = await projection(i, 'down_proj', act);
    residual.pending = a.sandwichNorms ? rmsNorm(mlpOut, await normWeight(`${pre}.post_feedforward_layernorm.weight`, a.hiddenSize)) : mlpOut;
  }

  // ---- head
  onProgress('writing lm_head');
  g.scope = '/model/head';
  const finalNorm = await normWeight('model.norm.weight', a.hiddenSize);
  let hn = addThenNorm(finalNorm);
  if (opts.logits === 'last') hn = g.op('Gather', [hn, g.constInt64([-1])], { axis: int(1) });
  if (rowEmbeddings) g.node(T === 'float16' ? 'Cast' : 'Identity', [hn], { attrs: T === 'float16' ? { to: int(1) } : {}, outputs: [HIDDEN_OUTPUT] });
  const flat = g.op('Reshape', [hn, shape([-1, a.hiddenSize])]);
  let rows: string;
  if (opts.weights) {
    // the LM head is one more [vocab, hidden] product at the projections' width (a quantized copy of
    // the table when tied). At 4 bits rather than 8 it is the largest single saving of the int4 step:
    // on Qwen2.5-0.5B's [151936, 896] head, 10.8 vs 14.4 ms for one row and 45 vs 88 ms for eight
    // (2 cores, accuracy_level 4; bench/RESULTS.md). A Q4_0 GGUF with tied embeddings (what the
    // bench's llama.cpp peer runs) multiplies by its Q4_0 token_embd the same way.
    const head = tensors.read(a.tieWordEmbeddings ? embedName : 'lm_head.weight', [a.vocabSize, a.hiddenSize]);
    rows = await quantizedMatMul('lm_head.weight', head, a.vocabSize, a.hiddenSize, flat);
  } else {
    // Gemm with transB reads the [vocab, hidden] matrix as stored, so tied embeddings are not copied
    const lmHead = a.tieWordEmbeddings ? embed : await g.weight('lm_head.weight', T, [a.vocabSize, a.hiddenSize], tensors.read('lm_head.weight', [a.vocabSize, a.hiddenSize]));
    rows = g.op('Gemm', [flat, lmHead], { transB: int(1) });
  }
  const outShape = g.op('Concat', [g.op('Shape', [hn], { start: int(0), end: int(2) }), shape([a.vocabSize])], { axis: int(0) });
  const logits3 = g.op('Reshape', [a.finalSoftcap ? softcap(rows, a.finalSoftcap) : rows, outShape]);
  g.node(T === 'float16' ? 'Cast' : 'Identity', [logits3], { attrs: T === 'float16' ? { to: int(1) } : {}, outputs: ['logits'] });

  g.output('logits', 'float32', ['batch', opts.logits === 'last' ? 1 : 'seq', a.vocabSize]);
  if (rowEmbeddings) g.output(HIDDEN_OUTPUT, 'float32', ['batch', opts.logits === 'last' ? 1 : 'seq', a.hiddenSize]);
  (kv ?? fused)!.outputs();
  tensors.assertAllConsumed();
  onProgress('encoding graph');
  const opsets = opts.weights || fused ? { ...OPSETS, 'com.microsoft': 1 } : OPSETS;
  return { model: g.encode(`loraserve-${a.family}`, opsets, BUILDER_VERSION), maskValue, loraTargets: targets };
}

/**
 * Optimum-style export: the bias is derived in the graph from attention_mask [B, total] and
 * causality (query s sits at absolute position past + s; it may see keys 0..past + s).
 */
function biasFromMask(g: GraphBuilder, inputIds: string, mask: string, maskValue: number, T: 'float32' | 'float16'): string {
  g.scope = '/model/mask';
  const zero = g.constInt64([0], []);
  const one = g.constInt64([1], []);
  const seq = g.op('Squeeze', [g.op('Shape', [inputIds], { start: int(1), end: int(2) })]);
  const total = g.op('Squeeze', [g.op('Shape', [mask], { start: int(1), end: int(2) })]);
  const past = g.op('Sub', [total, seq]);
  const keyPos = g.op('Range', [zero, total, one]); // [T]
  const queryPos = g.op('Unsqueeze', [g.op('Range', [past, total, one]), g.constInt64([1])]); // [S, 1]
  const future = g.op('Greater', [keyPos, queryPos]); // [S, T]
  const padded = g.op('Unsqueeze', [g.op('Equal', [mask, g.constInt64([0], [])]), g.constInt64([1, 2])]); // [B, 1, 1, T]
  const masked = g.op('Or', [future, padded]); // [B, 1, S, T]
  return g.op('Where', [masked, g.constFloat(new Float32Array([maskValue]), [], T), g.constFloat(new Float32Array([0]), [], T)]);
}
