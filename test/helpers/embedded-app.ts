import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { buildApp } from '../../src/app.js';
import { makeConfig, type ConfigInput } from '../../src/config.js';
import { testRuntime } from './test-runtime.js';
import { testKv } from '../engine-setup.js';
import { ensureEmbeddedModel } from '../../src/model/embedded.js';

export interface EmbeddedApp {
  app: FastifyInstance;
  /** base URL of the listening server on 127.0.0.1 */
  url: string;
  /** the temp folder holding model/, adapters/ and cache/ */
  tmp: string;
  model: string;
  adapterDir: string;
  cacheDir: string;
  /** closes the app and removes the temp folder */
  close(): Promise<void>;
}

/**
 * The whole service on the embedded default model, in a fresh temp folder, listening on a free
 * port: what most HTTP test files start with. `overrides` are settings (MAX_BATCH, …).
 */
export async function startEmbeddedApp(prefix: string, overrides: Partial<ConfigInput> = {}): Promise<EmbeddedApp> {
  const tmp = await mkdtemp(path.join(os.tmpdir(), `loraserve-${prefix}-`));
  const model = await ensureEmbeddedModel(path.join(tmp, 'model'));
  const adapterDir = path.join(tmp, 'adapters');
  const cacheDir = path.join(tmp, 'cache');
  const app = await buildApp(makeConfig({ MODEL_PATH: model, ADAPTER_DIR: adapterDir, CACHE_DIR: cacheDir, DEVICE: 'cpu', RUNTIME: testRuntime(), KV: testKv(), LOG_LEVEL: 'silent', ...overrides }));
  const url = await app.listen({ port: 0, host: '127.0.0.1' });
  return {
    app,
    url,
    tmp,
    model,
    adapterDir,
    cacheDir,
    async close() {
      await app.close();
      await rm(tmp, { recursive: true, force: true });
    },
  };
}
