import type { FastifyInstance, FastifyRequest } from 'fastify';
import multipart from '@fastify/multipart';
import { z } from 'zod';
import { HttpProblem, badRequest, zodProblem } from '../src/http/problem.js';
import { UploadSlots, discardBody, receiveAdapterUpload, type ReceivedUpload } from '../src/adapters/upload.js';
import { rejectedProblem } from '../src/adapters/registry.js';
import { adapterNameProblem } from '../src/adapters/store.js';

/** The opt-in form field for a deliberate no-op adapter (issue 17): `true`/`1` or `false`/`0`. */
function allowNoEffect(value: string | undefined): boolean {
  if (value === undefined || value === 'false' || value === '0') return false;
  if (value === 'true' || value === '1') return true;
  throw badRequest(`field \`allow_no_effect\` is ${JSON.stringify(value)}; send true or false`);
}

/**
 * Adapter management: parse → registry → status. Status codes:
 *   POST   /v1/adapters            201 stored | 400 bad request | 409 name taken or MAX_ADAPTERS reached | 413 | 415 | 422 report
 *                                   | 429 MAX_CONCURRENT_UPLOADS reached (Retry-After)
 *   PUT    /v1/adapters/:name      create-or-replace, atomic: 201 created | 200 replaced | same errors as POST
 *   GET    /v1/adapters            200 {adapters: [...], next}: by name, ?limit= (default 100, at most 1000) and ?after=<next>
 *   GET    /v1/adapters/:name      200 detail with report | 404
 *   DELETE /v1/adapters/:name      204 | 404
 *   POST   /v1/adapters/validate   200 report when it fits | 422 problem with the report; stores nothing
 * Every error is application/problem+json; a 422 carries errors[], warnings[] and report.
 */
const ListQuery = z.object({
  limit: z.coerce.number().int().min(1).max(1000).default(100),
  /** the `next` of the previous page: names after it */
  after: z.string().min(1).optional(),
});

export default async function adapterRoutes(app: FastifyInstance): Promise<void> {
  const { registry, config } = app.runtime;
  const maxBytes = config.MAX_UPLOAD_BYTES;
  // scoped to these routes: nowhere else accepts multipart
  await app.register(multipart, { limits: { fileSize: maxBytes }, throwFileSizeLimit: true });

  const slots = new UploadSlots(config.MAX_CONCURRENT_UPLOADS);

  async function withUpload<T>(request: FastifyRequest, fn: (u: ReceivedUpload & { allowNoEffect: boolean }) => Promise<T>, onField?: (name: string, value: string) => void): Promise<T> {
    const release = slots.acquire();
    if (release instanceof HttpProblem) {
      await discardBody(request.raw);
      throw release;
    }
    try {
      const u = await receiveAdapterUpload(request, {
        workDir: () => registry.uploadDir(),
        maxBytes,
        idleTimeoutMs: config.UPLOAD_IDLE_TIMEOUT_MS,
        fields: ['name', 'allow_no_effect'],
        onField,
        ingest: (configText) => registry.ingest(maxBytes, configText),
      }).catch((e: unknown) => {
        countRejection(e);
        throw e;
      });
      try {
        return await fn({ ...u, allowNoEffect: allowNoEffect(u.fields.allow_no_effect) });
      } catch (e) {
        countRejection(e);
        throw e;
      } finally {
        await u.cleanup();
      }
    } finally {
      release();
    }
  }

  /** A 422 with a report: counted by its error codes (loraserve_adapter_rejections_total). */
  function countRejection(e: unknown): void {
    if (!(e instanceof HttpProblem) || e.status !== 422 || !Array.isArray(e.extra.errors)) return;
    app.metrics?.adapterRejected((e.extra.errors as { code?: unknown }[]).map((p) => String(p.code)));
  }

  app.get('/v1/adapters', async (request) => {
    const parsed = ListQuery.safeParse(request.query);
    if (!parsed.success) throw zodProblem(parsed.error.issues);
    return registry.page(parsed.data.after ?? null, parsed.data.limit);
  });

  app.get<{ Params: { name: string } }>('/v1/adapters/:name', async (request) => registry.describe(request.params.name));

  app.post('/v1/adapters', async (request, reply) => {
    const adapter = await withUpload(request, async (u) => {
      const name = u.fields.name;
      if (name === undefined) throw badRequest('missing field `name`: the name requests will use to select this adapter', { missing: ['name'] });
      return registry.create(name, u.dir, u);
    }, (field, value) => field === 'name' && registry.assertCreatable(value));
    return reply.code(201).header('location', `/v1/adapters/${encodeURIComponent(adapter.name)}`).send(adapter);
  });

  app.put<{ Params: { name: string } }>('/v1/adapters/:name', async (request, reply) => {
    const { name } = request.params;
    const { created, adapter } = await withUpload(request, async (u) => {
      if (u.fields.name !== undefined && u.fields.name !== name) {
        throw badRequest(`the \`name\` field (${JSON.stringify(u.fields.name)}) differs from the name in the URL (${JSON.stringify(name)})`);
      }
      return registry.replace(name, u.dir, u);
    });
    if (created) reply.code(201).header('location', `/v1/adapters/${encodeURIComponent(adapter.name)}`);
    return reply.send(adapter);
  });

  app.delete<{ Params: { name: string } }>('/v1/adapters/:name', async (request, reply) => {
    await registry.delete(request.params.name);
    return reply.code(204).send();
  });

  app.post('/v1/adapters/validate', async (request) => {
    const report = await withUpload(request, (u) => {
      const why = u.fields.name === undefined ? null : adapterNameProblem(u.fields.name);
      if (why) throw badRequest(why);
      return registry.validate(u.dir, u);
    });
    if (!report.ok) {
      const problem = rejectedProblem(report, 'the adapter');
      countRejection(problem);
      throw problem;
    }
    return report;
  });
}
