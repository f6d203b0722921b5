import type { FastifyInstance } from 'fastify';
import { notFound } from '../src/http/problem.js';
import type { Runtime } from '../src/runtime.js';

/**
 * GET /v1/models and GET /v1/models/{id} (the OpenAI SDK's `models.list` / `models.retrieve`):
 * the base model and every ready adapter, each usable as `model`. Adapters carry `parent` = the
 * base model, as vLLM reports LoRA models; `created` is stable (the model's load time, an
 * adapter's upload time). The base entry also says what an adapter for it must look like, so an
 * adapter's author need not learn the shapes from 422s.
 */

/** What the base entry tells an adapter's author: the architecture and every target's shape. */
function adapterContract(runtime: Runtime) {
  const { architecture: a, loraTargets } = runtime.manifest;
  // Llama-family layers share their shapes, but group by shape anyway so a family that differs per layer is still described exactly
  const groups = new Map<string, { module: string; in_features: number; out_features: number; layers: number[] }>();
  for (const t of loraTargets) {
    const key = `${t.module}:${t.inFeatures}:${t.outFeatures}`;
    let g = groups.get(key);
    if (!g) groups.set(key, (g = { module: t.module, in_features: t.inFeatures, out_features: t.outFeatures, layers: [] }));
    g.layers.push(t.layer);
  }
  return {
    architecture: {
      family: a.family,
      num_layers: a.numLayers,
      hidden_size: a.hiddenSize,
      intermediate_size: a.intermediateSize,
      num_attention_heads: a.numHeads,
      num_key_value_heads: a.numKvHeads,
      head_dim: a.headDim,
      vocab_size: a.vocabSize,
    },
    lora: {
      max_rank: runtime.config.MAX_LORA_RANK,
      /** PEFT module names are `model.layers.{layer}.{self_attn|mlp}.{module}`; lora_A is [r, in_features], lora_B [out_features, r] */
      targets: [...groups.values()],
    },
  };
}

function models(runtime: Runtime) {
  const base = runtime.manifest.modelId;
  const baseEntry = {
    id: base,
    object: 'model' as const,
    created: runtime.loadedAt,
    owned_by: 'loraserve',
    root: base,
    parent: null,
    max_model_len: runtime.engine.contextLength,
    ...adapterContract(runtime),
  };
  const adapters = runtime.registry
    .list()
    .filter((s) => s.state === 'ready')
    .map((s) => ({
      id: s.name,
      object: 'model' as const,
      created: s.created ? Math.floor(Date.parse(s.created) / 1000) : runtime.loadedAt,
      owned_by: 'loraserve',
      root: s.name,
      parent: base,
      max_model_len: runtime.engine.contextLength,
    }));
  return [baseEntry, ...adapters];
}

export default async function modelRoutes(app: FastifyInstance): Promise<void> {
  app.get('/v1/models', async () => ({ object: 'list', data: models(app.runtime) }));

  app.get<{ Params: { id: string } }>('/v1/models/:id', async (request) => {
    const found = models(app.runtime).find((m) => m.id === request.params.id);
    if (!found) throw notFound(`no model ${JSON.stringify(request.params.id)}: GET /v1/models lists the base model and every ready adapter`).about('model', 'model_not_found');
    return found;
  });
}
