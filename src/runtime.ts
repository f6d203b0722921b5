import path from 'node:path';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import type { Manifest } from './model/manifest.js';
import { openCheckpoint } from './model/checkpoint/index.js';
import { ensureEmbeddedModel } from './model/embedded.js';
import { buildModel, type BuildOptions } from './model/build.js';
import { placementLine, resolvePlacement, type Placement } from './model/placement.js';
import { loadTokenizer } from './tokenizer/index.js';
import type { Tokenizer } from './tokenizer/types.js';
import { PromptEncoder } from './tokenizer/off-thread.js';
import { readChatTemplate, withChatTemplate } from './tokenizer/chat-template.js';
import { Engine } from './engine/engine.js';
import { AdapterRegistry } from './adapters/registry.js';
import { PROBE_TEXT, probeIds } from './engine/probe.js';

/**
 * Everything the routes need, started once: the model (built or taken from the cache), its
 * tokenizer, the inference worker and the adapter registry. Routes receive it through the Fastify
 * instance (`app.runtime`), so they hold HTTP concerns only.
 */
export interface Runtime {
  readonly config: Config;
  readonly manifest: Manifest;
  readonly modelDir: string;
  readonly tokenizer: Tokenizer;
  /** the tokenizer for prompts: long ones are encoded off the HTTP thread */
  readonly prompts: PromptEncoder;
  readonly engine: Engine;
  readonly registry: AdapterRegistry;
  readonly provider: 'cpu' | 'cuda';
  /** when the model was loaded (Unix seconds): the base model's `created` in /v1/models */
  readonly loadedAt: number;
  /** set on SIGTERM: readiness fails and new work is refused while running streams finish */
  draining: boolean;
  close(): Promise<void>;
}


export async function resolveModelPath(config: Config, log: Pick<Logger, 'info'>): Promise<string> {
  if (config.MODEL_PATH) return path.resolve(config.MODEL_PATH);
  const dir = path.resolve(config.DEFAULT_MODEL_DIR);
  log.info({ dir }, 'MODEL_PATH is unset: serving the embedded default model');
  return ensureEmbeddedModel(dir);
}

/**
 * The graph the server runs, from the settings and the placement: `serve` and `build-model` both
 * build with these, so a graph built ahead of time is the one the server finds in the cache.
 */
export function servedBuildOptions(config: Config, placement: Placement): Omit<BuildOptions, 'onProgress'> {
  return {
    outDir: path.resolve(config.CACHE_DIR),
    dtype: placement.dtype,
    logits: 'last',
    kv: config.KV,
    // gqa at fp32 on cuda is built resident (BuildOptions.provider says why)
    provider: placement.provider,
    ...(placement.weights ? { weights: placement.weights, accuracyLevel: config.WEIGHTS_ACCURACY_LEVEL } : {}),
  };
}

export async function startRuntime(config: Config, log: Logger): Promise<Runtime> {
  const modelPath = await resolveModelPath(config, log);
  const checkpoint = await openCheckpoint(modelPath, config.TOKENIZER_PATH);
  const placement = await resolvePlacement({ device: config.DEVICE, dtype: config.DTYPE, weights: config.WEIGHTS });
  log.info(placementLine(placement));
  // the tokenizer (and CHAT_TEMPLATE) before the graph build: a missing file is found in a second, not after minutes of building
  if (!checkpoint.tokenizer) throw new Error(`${modelPath}: no tokenizer found (tokenizer.json, or TOKENIZER_PATH for a llama2.c .bin)`);
  const loaded = await loadTokenizer(checkpoint.tokenizer, checkpoint.architecture);
  const tokenizer = config.CHAT_TEMPLATE ? withChatTemplate(loaded, readChatTemplate(config.CHAT_TEMPLATE)) : loaded;
  const built = await buildModel(checkpoint, { ...servedBuildOptions(config, placement), onProgress: (line) => log.info(line) });
  log.info({ dir: built.dir, cached: built.cached }, built.cached ? 'model graph taken from cache' : 'model graph built');
  const prompts = new PromptEncoder(tokenizer, checkpoint.tokenizer, checkpoint.architecture);
  // the worker opens the provider decided here (DEVICE=auto already probed), so the graph's dtype fits it
  const engine = await Engine.start({ modelDir: built.dir, manifest: built.manifest, config: { ...config, DEVICE: placement.provider }, log, baseWeights: { modelPath, ...(config.TOKENIZER_PATH && { tokenizerPath: config.TOKENIZER_PATH }) } });
  let registry: AdapterRegistry;
  try {
    const probe = probeIds(tokenizer.encode(PROBE_TEXT), built.manifest, engine.limits.contextLength);
    registry = await AdapterRegistry.open({ config, manifest: built.manifest, engine, log, probeIds: probe });
  } catch (e) {
    await Promise.all([engine.close(), prompts.close()]);
    throw e;
  }
  const runtime: Runtime = {
    config,
    manifest: built.manifest,
    modelDir: built.dir,
    tokenizer,
    prompts,
    engine,
    registry,
    provider: engine.provider,
    loadedAt: Math.floor(Date.now() / 1000),
    draining: false,
    async close() {
      await registry.close();
      await Promise.all([engine.close(), prompts.close()]);
    },
  };
  return runtime;
}
