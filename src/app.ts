import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { installErrorHandler } from './http/problem.js';
import { startRuntime, type Runtime } from './runtime.js';
import { createLogger } from './logger.js';
import healthRoutes from '../routes/health.js';
import generateRoutes from '../routes/generate.js';
import adapterRoutes from '../routes/adapters.js';
import openaiRoutes from '../routes/openai.js';
import modelRoutes from '../routes/models.js';
import metricsPlugin from './http/metrics.js';
import authPlugin from './http/auth.js';
import openApiPlugin from './http/openapi.js';
import { drainGuard } from './lifecycle.js';

declare module 'fastify' {
  interface FastifyInstance {
    runtime: Runtime;
  }
}

export interface BuildOptions {
  /** reuse a started runtime (tests share one model across several apps) */
  runtime?: Runtime;
  logger?: Logger;
}

/**
 * The whole service as a Fastify instance, without `listen` (tests use `inject` or listen on
 * port 0). Order as in fastify's demo app: external plugins, then our services, then routes.
 */
export async function buildApp(config: Config, opts: BuildOptions = {}): Promise<FastifyInstance> {
  const logger = opts.logger ?? createLogger(config);
  const ownsRuntime = !opts.runtime;
  const runtime = opts.runtime ?? (await startRuntime(config, logger));

  const app = Fastify({
    // pino's Logger is wider than Fastify's logger type; typing it as the base keeps plugins' types plain
    loggerInstance: logger as FastifyBaseLogger,
    bodyLimit: 4 * 1024 * 1024,
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && /^[\w.:-]{1,128}$/.test(given) ? given : crypto.randomUUID();
    },
  });
  installErrorHandler(app);
  app.addHook('onRequest', async (request, reply) => {
    reply.header('x-request-id', request.id);
  });

  // our services
  app.decorate('runtime', runtime);
  if (ownsRuntime) app.addHook('onClose', async () => runtime.close());
  // onRequest hooks run in this order and stop at the first that answers: metrics first so that
  // refused requests are counted, then the drain guard (503 while draining, before any 401), then
  // auth; all three are unencapsulated, so they guard every route registered below
  await app.register(metricsPlugin);
  await app.register(drainGuard);
  await app.register(authPlugin, { apiKeys: config.API_KEYS, adminKeys: config.ADMIN_API_KEYS });
  // /openapi.yaml and /docs; records the routes below and warns at start about undocumented ones
  await app.register(openApiPlugin);

  // routes
  await app.register(healthRoutes);
  await app.register(generateRoutes);
  await app.register(adapterRoutes);
  await app.register(openaiRoutes);
  await app.register(modelRoutes);
  return app;
}
