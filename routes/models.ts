import type { FastifyInstance } from 'fastify';

/** GET /v1/models: the base model and every ready adapter, each usable as `model`. */
export default async function modelRoutes(app: FastifyInstance): Promise<void> {
  app.get('/v1/models', async () => {
    const { runtime } = app;
    const base = runtime.manifest.modelId;
    const created = Math.floor(Date.now() / 1000);
    return {
      object: 'list',
      data: [
        { id: base, object: 'model', created, owned_by: 'loraserve', root: base, parent: null },
        ...runtime.registry.readyNames().map((name) => ({ id: name, object: 'model', created, owned_by: 'loraserve', root: name, parent: base })),
      ],
    };
  });
}
