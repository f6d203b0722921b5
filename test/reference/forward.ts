import type { Architecture } from '../../src/model/architecture.js';
import type { Checkpoint } from '../../src/model/checkpoint/types.js';

/**
 * An independent Llama-family forward pass in plain TypeScript, token by token with a KV cache,
 * written after llama2.c `run.c` (`forward()`) and Hugging Face `modeling_llama.py` /
 * `modeling_qwen2.py`. It deliberately shares nothing with the graph builder: weights are read in
 * checkpoint layout ([out, in]) and used as `W·x`, GQA maps head h to KV head h / (H / KVH),
 * and each RoPE layout is written out as its original program writes it. Sums run in float64.
 */

interface Weights {
  get(name: string): Float32Array;
}

function loadWeights(ck: Checkpoint): Weights {
  const cache = new Map<string, Float32Array>();
  return {
    get(name) {
      let v = cache.get(name);
      if (!v) {
        const t = ck.tensor(name);
        if (!t) throw new Error(`reference: missing tensor ${name}`);
        v = t.read();
        cache.set(name, v);
      }
      return v;
    },
  };
}

/** out[o] = Σ_i w[o, i] · x[i] (+ bias[o]); w is [out, in] row-major as PyTorch stores it */
function linear(w: Float32Array, x: Float64Array, outDim: number, bias?: Float32Array): Float64Array {
  const inDim = x.length;
  const out = new Float64Array(outDim);
  for (let o = 0; o < outDim; o++) {
    let s = 0;
    const row = o * inDim;
    for (let i = 0; i < inDim; i++) s += w[row + i] * x[i];
    out[o] = s + (bias ? bias[o] : 0);
  }
  return out;
}

/** RMSNorm: x / sqrt(mean(x²) + eps) · weight */
function rmsnorm(x: Float64Array, weight: Float32Array, eps: number): Float64Array {
  let ss = 0;
  for (let i = 0; i < x.length; i++) ss += x[i] * x[i];
  const inv = 1 / Math.sqrt(ss / x.length + eps);
  const out = new Float64Array(x.length);
  for (let i = 0; i < x.length; i++) out[i] = x[i] * inv * weight[i];
  return out;
}

/**
 * Frequency of pair i, as transformers' modeling_rope_utils.py computes `inv_freq` for each
 * rope_type (written out per pair here, float32 where torch holds float32).
 */
function ropeFrequency(a: Architecture, i: number, longStep: boolean): number {
  const d = a.headDim;
  const base = Math.fround(Math.pow(a.ropeTheta, Math.fround((2 * i) / d)));
  const freq = Math.fround(1 / base);
  const s = a.rope;
  if (!s) return freq;
  if (s.type === 'linear') return Math.fround(freq / s.factor);
  // longrope (Phi3): inv_freq = 1 / (ext_factors * base ** (2i / d)), long factors once the
  // forward's max(position_ids) + 1 exceeds original_max_position_embeddings
  if (s.type === 'longrope') return Math.fround(1 / Math.fround(Math.fround((longStep ? s.longFactor : s.shortFactor)[i]!) * base));
  if (s.type === 'llama3') {
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < s.originalMaxPositions / s.highFreqFactor) return freq;
    if (wavelen > s.originalMaxPositions / s.lowFreqFactor) return Math.fround(freq / s.factor);
    const smooth = (s.originalMaxPositions / wavelen - s.lowFreqFactor) / (s.highFreqFactor - s.lowFreqFactor);
    return Math.fround(((1 - smooth) * freq) / s.factor + smooth * freq);
  }
  // yarn: find_correction_range(beta_fast, beta_slow) over the original context, linear_ramp_factor between
  const rotationsToDim = (rot: number) => (d * Math.log(s.originalMaxPositions / (rot * 2 * Math.PI))) / (2 * Math.log(a.ropeTheta));
  const lo = Math.max(s.truncate ? Math.floor(rotationsToDim(s.betaFast)) : rotationsToDim(s.betaFast), 0);
  let hi = Math.min(s.truncate ? Math.ceil(rotationsToDim(s.betaSlow)) : rotationsToDim(s.betaSlow), d - 1);
  if (hi === lo) hi += 0.001;
  const ramp = Math.min(Math.max((i - lo) / (hi - lo), 0), 1);
  const keep = 1 - ramp;
  return Math.fround((1 / (s.factor * base)) * ramp + (1 / base) * keep);
}

/** cos/sin multiplier: YaRN's attention_factor (`attention_scaling` in LlamaRotaryEmbedding), else 1 */
const ropeScale = (a: Architecture) => (a.rope?.type === 'yarn' || a.rope?.type === 'longrope' ? a.rope.attentionFactor : 1);

/** the angle of frequency pair i at position pos, rounded to float32 as run.c (powf, pos * freq) and HF (float32 inv_freq) do */
function ropeAngle(a: Architecture, pairIndex: number, pos: number, longStep = false): number {
  return Math.fround(pos * ropeFrequency(a, pairIndex, longStep));
}

/** run.c: rotate adjacent pairs (2i, 2i+1) of each head in place */
function ropeInterleaved(a: Architecture, v: Float64Array, heads: number, pos: number, _longStep = false): void {
  const hd = a.headDim;
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < hd; i += 2) {
      const val = ropeAngle(a, i / 2, pos);
      const fcr = Math.fround(Math.cos(val));
      const fci = Math.fround(Math.sin(val));
      const v0 = v[h * hd + i];
      const v1 = v[h * hd + i + 1];
      v[h * hd + i] = v0 * fcr - v1 * fci;
      v[h * hd + i + 1] = v0 * fci + v1 * fcr;
    }
  }
}

/** HF apply_rotary_pos_emb: q·cos + rotate_half(q)·sin, rotate_half(x) = cat(-x[hd/2:], x[:hd/2]) */
function ropeRotateHalf(a: Architecture, v: Float64Array, heads: number, pos: number, longStep = false): void {
  const hd = a.headDim;
  const half = hd / 2;
  const cos = new Float64Array(hd);
  const sin = new Float64Array(hd);
  for (let j = 0; j < hd; j++) {
    // HF: emb = cat(freqs, freqs), so entry j uses frequency j mod hd/2
    const ang = ropeAngle(a, j % half, pos, longStep);
    cos[j] = Math.fround(Math.cos(ang)) * ropeScale(a);
    sin[j] = Math.fround(Math.sin(ang)) * ropeScale(a);
  }
  for (let h = 0; h < heads; h++) {
    const x = v.slice(h * hd, (h + 1) * hd);
    for (let j = 0; j < hd; j++) {
      const rotated = j < half ? -x[j + half] : x[j - half];
      v[h * hd + j] = x[j] * cos[j] + rotated * sin[j];
    }
  }
}

/**
 * What a PEFT adapter changes outside the projections, in PEFT's own tensor layouts, applied here
 * the way PEFT's modules compute them (not the way the served graph does):
 * - `lora` (peft/tuners/lora/layer.py `Embedding.forward`): result = embedding(x) +
 *   (embedding(x, A.T) @ B.T) · scaling, times the model's embed scale like the base row (Gemma);
 *   only the embedding's forward is wrapped, so a tied lm_head keeps the base weight.
 * - `tokens` (trainable_tokens/layer.py `get_merged_weights`): W.index_copy(0, indices, values)
 *   for the embedding and, when `tiedHead`, for the lm_head that shares its weight.
 * - `embedWeight` / `lmHeadWeight` (ModulesToSaveWrapper): the module's own trained copy.
 */
export interface ReferenceEmbedding {
  lora?: { A: Float32Array; B: Float32Array; rank: number; scale: number };
  tokens?: { indices: readonly number[]; values: Float32Array; tiedHead: boolean };
  /** trainable tokens of an untied lm_head (trainable_token_indices as a dict naming lm_head) */
  headTokens?: { indices: readonly number[]; values: Float32Array };
  embedWeight?: Float32Array;
  lmHeadWeight?: Float32Array;
}

/** torch's index_copy along dim 0 of a [rows, dim] matrix: a new matrix, the listed rows replaced */
function indexCopy(w: Float32Array, dim: number, indices: readonly number[], values: Float32Array): Float32Array {
  const out = Float32Array.from(w);
  indices.forEach((row, j) => out.set(values.subarray(j * dim, (j + 1) * dim), row * dim));
  return out;
}

export interface ReferenceOptions {
  /** an adapter's embedding LoRA, trainable tokens or saved embed_tokens / lm_head */
  embedding?: ReferenceEmbedding;
  /** position of each token (default 0, 1, 2, …) */
  positions?: number[];
  /**
   * the first `prefill` tokens form one forward call, as transformers' generate() runs a prompt
   * (only LongRoPE looks at it: its table is chosen by the call's max position); default 1
   */
  prefill?: number;
}

/** logits [vocab] for every position of `tokens`, each seeing tokens 0..itself */
export function referenceForward(ck: Checkpoint, tokens: readonly number[], options: ReferenceOptions = {}): Float32Array[] {
  const a = ck.architecture;
  const w = loadWeights(ck);
  const hd = a.headDim;
  const dim = a.hiddenSize;
  const qDim = a.numHeads * hd;
  const kvDim = a.numKvHeads * hd;
  const kvMul = a.numHeads / a.numKvHeads;
  const keyCache: Float64Array[][] = Array.from({ length: a.numLayers }, () => []);
  const valueCache: Float64Array[][] = Array.from({ length: a.numLayers }, () => []);
  const positionCache: number[][] = Array.from({ length: a.numLayers }, () => []);
  const baseEmbed = w.get('model.embed_tokens.weight');
  const e = options.embedding ?? {};
  let embed = e.embedWeight ?? baseEmbed;
  if (e.tokens) embed = indexCopy(embed, dim, e.tokens.indices, e.tokens.values);
  let head = e.lmHeadWeight ?? (a.tieWordEmbeddings ? baseEmbed : w.get('lm_head.weight'));
  if (e.tokens?.tiedHead) head = indexCopy(head, dim, e.tokens.indices, e.tokens.values);
  if (e.headTokens) head = indexCopy(head, dim, e.headTokens.indices, e.headTokens.values);
  // GemmaRMSNorm: x / rms(x) · (1 + weight); every other family: · weight
  const norm = (x: Float64Array, weight: Float32Array) => rmsnorm(x, a.normPlusOne ? weight.map((v) => 1 + v) : weight, a.rmsNormEps);
  // Gemma2/3 attention: scores · query_pre_attn_scalar^-0.5, then tanh soft-capping
  const scoreScale = 1 / Math.sqrt(a.queryPreAttnScalar ?? a.headDim);
  const cap = (v: number, c: number | undefined) => (c ? Math.tanh(v / c) * c : v);
  // gelu_pytorch_tanh: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))); silu: x·σ(x)
  const act = (v: number) => (a.activation === 'gelu_tanh' ? 0.5 * v * (1 + Math.tanh(Math.sqrt(2 / Math.PI) * (v + 0.044715 * v * v * v))) : v / (1 + Math.exp(-v)));
  const out: Float32Array[] = [];

  for (let t = 0; t < tokens.length; t++) {
    const posOf = (i: number) => (options.positions ? options.positions[i]! : i);
    const pos = posOf(t);
    const prefill = options.prefill ?? 1;
    const callMax = t < prefill ? Math.max(...Array.from({ length: Math.min(prefill, tokens.length) }, (_, i) => posOf(i))) : pos;
    const longStep = a.rope?.type === 'longrope' && callMax + 1 > a.rope.originalMaxPositions;
    const x = Float64Array.from(embed.subarray(tokens[t] * dim, (tokens[t] + 1) * dim));
    if (e.lora) {
      // after_A = A.T[token] ([r]); delta = after_A @ B.T · scaling ([hidden])
      const { A, B, rank, scale } = e.lora;
      for (let i = 0; i < dim; i++) {
        let d = 0;
        for (let k = 0; k < rank; k++) d += A[k * a.vocabSize + tokens[t]] * B[i * rank + k];
        x[i] += d * scale;
      }
    }
    // Gemma: the embedding normalizer sqrt(hidden_size), a float32 tensor in a float32 model
    if (a.embedScale) for (let i = 0; i < dim; i++) x[i] *= Math.fround(Math.sqrt(dim));
    for (let l = 0; l < a.numLayers; l++) {
      const p = `model.layers.${l}`;
      // transformers: LlamaAttention's q/k/v have bias=attention_bias and o_proj too (Qwen2: q/k/v
      // only); LlamaMLP's three projections have bias=mlp_bias
      const bias = (name: string) => (a.attentionBias ? w.get(`${p}.self_attn.${name}.bias`) : undefined);
      const oBias = a.outputBias ? w.get(`${p}.self_attn.o_proj.bias`) : undefined;
      const mlpBias = (name: string) => (a.mlpBias ? w.get(`${p}.mlp.${name}.bias`) : undefined);
      const xb = norm(x, w.get(`${p}.input_layernorm.weight`));
      let q: Float64Array, k: Float64Array, v: Float64Array;
      if (a.fusedProjections) {
        // Phi3Attention: qkv = qkv_proj(x); q = qkv[..., :q], k = next kv, v = the rest
        const qkv = linear(w.get(`${p}.self_attn.qkv_proj.weight`), xb, qDim + 2 * kvDim);
        [q, k, v] = [qkv.slice(0, qDim), qkv.slice(qDim, qDim + kvDim), qkv.slice(qDim + kvDim)];
      } else {
        q = linear(w.get(`${p}.self_attn.q_proj.weight`), xb, qDim, bias('q_proj'));
        k = linear(w.get(`${p}.self_attn.k_proj.weight`), xb, kvDim, bias('k_proj'));
        v = linear(w.get(`${p}.self_attn.v_proj.weight`), xb, kvDim, bias('v_proj'));
      }
      if (a.qkNorm) {
        // Qwen3Attention: q_norm / k_norm (RMSNorm over head_dim) on each head, then RoPE
        const perHead = (v: Float64Array, heads: number, weight: Float32Array) => {
          for (let h = 0; h < heads; h++) v.set(norm(v.slice(h * hd, (h + 1) * hd), weight), h * hd);
        };
        perHead(q, a.numHeads, w.get(`${p}.self_attn.q_norm.weight`));
        perHead(k, a.numKvHeads, w.get(`${p}.self_attn.k_norm.weight`));
      }
      const rope = a.ropeLayout === 'interleaved' ? ropeInterleaved : ropeRotateHalf;
      // Gemma 3: sliding layers rotate by plain RoPE at rope_local_base_freq
      const local = a.localRopeTheta !== undefined && a.slidingWindowLayers?.includes(l);
      const ra: Architecture = local ? { ...a, ropeTheta: a.localRopeTheta!, rope: undefined } : a;
      rope(ra, q, a.numHeads, pos, longStep);
      rope(ra, k, a.numKvHeads, pos, longStep);
      keyCache[l].push(k);
      valueCache[l].push(v);
      positionCache[l].push(pos);
      // sliding_window_overlay: key k is visible to query q iff pos_k > pos_q - W
      const window = a.slidingWindow && a.slidingWindowLayers?.includes(l) ? a.slidingWindow : Infinity;

      const att = new Float64Array(qDim);
      const steps = keyCache[l].length;
      for (let h = 0; h < a.numHeads; h++) {
        const kvh = Math.floor(h / kvMul);
        const scores = new Float64Array(steps);
        let max = -Infinity;
        for (let s = 0; s < steps; s++) {
          if (!(positionCache[l][s]! > pos - window)) {
            scores[s] = -Infinity;
            continue;
          }
          let dot = 0;
          const key = keyCache[l][s];
          for (let i = 0; i < hd; i++) dot += q[h * hd + i] * key[kvh * hd + i];
          scores[s] = cap(dot * scoreScale, a.attnSoftcap);
          max = Math.max(max, scores[s]);
        }
        let sum = 0;
        for (let s = 0; s < steps; s++) sum += scores[s] = Math.exp(scores[s] - max);
        for (let s = 0; s < steps; s++) {
          const weight = scores[s] / sum;
          const value = valueCache[l][s];
          for (let i = 0; i < hd; i++) att[h * hd + i] += weight * value[kvh * hd + i];
        }
      }
      let o = linear(w.get(`${p}.self_attn.o_proj.weight`), att, dim, oBias);
      // Gemma2DecoderLayer: post_attention_layernorm on the attention output, pre_feedforward_layernorm before the MLP
      if (a.sandwichNorms) o = norm(o, w.get(`${p}.post_attention_layernorm.weight`));
      for (let i = 0; i < dim; i++) x[i] += o[i];

      const xb2 = norm(x, w.get(`${p}.${a.sandwichNorms ? 'pre_feedforward_layernorm' : 'post_attention_layernorm'}.weight`));
      let gate: Float64Array, up: Float64Array;
      if (a.fusedProjections) {
        // Phi3MLP: gate, up = gate_up_proj(x).chunk(2, dim=-1)
        const gu = linear(w.get(`${p}.mlp.gate_up_proj.weight`), xb2, 2 * a.intermediateSize);
        [gate, up] = [gu.slice(0, a.intermediateSize), gu.slice(a.intermediateSize)];
      } else {
        gate = linear(w.get(`${p}.mlp.gate_proj.weight`), xb2, a.intermediateSize, mlpBias('gate_proj'));
        up = linear(w.get(`${p}.mlp.up_proj.weight`), xb2, a.intermediateSize, mlpBias('up_proj'));
      }
      for (let i = 0; i < gate.length; i++) gate[i] = act(gate[i]) * up[i];
      let down = linear(w.get(`${p}.mlp.down_proj.weight`), gate, dim, mlpBias('down_proj'));
      if (a.sandwichNorms) down = norm(down, w.get(`${p}.post_feedforward_layernorm.weight`));
      for (let i = 0; i < dim; i++) x[i] += down[i];
    }
    const xf = norm(x, w.get('model.norm.weight'));
    out.push(Float32Array.from(linear(head, xf, a.vocabSize), (v) => cap(v, a.finalSoftcap)));
  }
  return out;
}
