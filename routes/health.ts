import type { FastifyInstance } from 'fastify';

export default async function healthRoutes(app: FastifyInstance): Promise<void> {
  app.get('/healthz', async () => ({ status: 'ok' }));

  app.get('/readyz', async (_request, reply) => {
    const { runtime } = app;
    if (runtime.draining) return reply.code(503).type('application/problem+json').send({ type: 'about:blank', title: 'Service Unavailable', status: 503, detail: 'draining: this replica is shutting down' });
    return { status: 'ready', model: runtime.manifest.modelId, provider: runtime.provider };
  });
}
