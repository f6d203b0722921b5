import { projectionsOf, projectionBlock, projectionDims, projectionHasBias, type Architecture } from './architecture.js';

/**
 * The exact set of checkpoint tensors (Hugging Face names, [out, in] or [n] shapes) that the
 * graph of an architecture consumes: every one must be present, and a checkpoint tensor outside
 * this set is refused at start-up, so no family can drop weights silently.
 */
export function checkpointTensorShapes(a: Architecture): Map<string, number[]> {
  const m = new Map<string, number[]>();
  m.set('model.embed_tokens.weight', [a.vocabSize, a.hiddenSize]);
  for (let i = 0; i < a.numLayers; i++) {
    const p = `model.layers.${i}`;
    m.set(`${p}.input_layernorm.weight`, [a.hiddenSize]);
    m.set(`${p}.post_attention_layernorm.weight`, [a.hiddenSize]);
    if (a.sandwichNorms) {
      m.set(`${p}.pre_feedforward_layernorm.weight`, [a.hiddenSize]);
      m.set(`${p}.post_feedforward_layernorm.weight`, [a.hiddenSize]);
    }
    if (a.qkNorm) {
      m.set(`${p}.self_attn.q_norm.weight`, [a.headDim]);
      m.set(`${p}.self_attn.k_norm.weight`, [a.headDim]);
    }
    for (const proj of projectionsOf(a)) {
      const { inFeatures, outFeatures } = projectionDims(a, proj);
      m.set(`${p}.${projectionBlock(proj)}.${proj}.weight`, [outFeatures, inFeatures]);
      if (projectionHasBias(a, proj)) m.set(`${p}.${projectionBlock(proj)}.${proj}.bias`, [outFeatures]);
    }
  }
  m.set('model.norm.weight', [a.hiddenSize]);
  if (!a.tieWordEmbeddings) m.set('lm_head.weight', [a.vocabSize, a.hiddenSize]);
  return m;
}
