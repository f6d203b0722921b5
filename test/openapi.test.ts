import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import SwaggerParser from '@apidevtools/swagger-parser';
import type { FastifyInstance, InjectOptions } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import { DOCS_ASSETS, HTTP_METHODS, findOperation, loadOpenApi, openApiPath } from '../src/http/openapi.js';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';
import { Contract } from './helpers/contract.js';

/**
 * openapi.yaml is the contract: a real OpenAPI validator (@apidevtools/swagger-parser) accepts
 * it, every component it declares is used, every route the app registers is in it and every
 * operation in it exists, and real responses of every operation — success and error — validate
 * against the documented status, content type and schema (Ajv, JSON Schema 2020-12).
 */

const { text: yamlText, doc } = loadOpenApi();
const contract = new Contract(doc);

describe('openapi.yaml', () => {
  it('passes @apidevtools/swagger-parser (OpenAPI 3.1 schema, $refs resolved)', async () => {
    // validate() mutates what it is given: hand it its own copy
    const api = await SwaggerParser.validate(structuredClone(doc) as never);
    expect((api as { openapi: string }).openapi).toBe('3.1.0');
    // and from the file itself, as a user of the spec would load it
    await expect(SwaggerParser.validate(openApiPath())).resolves.toBeTruthy();
  });

  it('the validator is not a no-op: a broken copy fails it', async () => {
    const broken = structuredClone(doc) as { info: Record<string, unknown>; paths: Record<string, Record<string, { responses?: unknown }>> };
    delete broken.info.title;
    await expect(SwaggerParser.validate(broken as never)).rejects.toThrow(/title/);
    const badRef = structuredClone(doc) as { paths: Record<string, Record<string, { responses: Record<string, unknown> }>> };
    badRef.paths['/healthz']!.get!.responses['200'] = { $ref: '#/components/responses/NoSuchThing' };
    await expect(SwaggerParser.validate(badRef as never)).rejects.toThrow(/NoSuchThing/);
  });

  it('declares no component that nothing uses', () => {
    const refs = new Set<string>();
    const walk = (n: unknown) => {
      if (Array.isArray(n)) n.forEach(walk);
      else if (n && typeof n === 'object') for (const [k, v] of Object.entries(n)) k === '$ref' && typeof v === 'string' ? refs.add(v) : walk(v);
    };
    walk(doc);
    const used = new Set(refs);
    // security schemes are used by name in `security`, not by $ref
    for (const item of Object.values(doc.paths)) {
      for (const m of HTTP_METHODS) {
        const op = item[m] as { security?: Record<string, unknown>[] } | undefined;
        for (const req of op?.security ?? []) for (const name of Object.keys(req)) used.add(`#/components/securitySchemes/${name}`);
      }
    }
    const unused: string[] = [];
    for (const [kind, entries] of Object.entries(doc.components ?? {})) {
      for (const name of Object.keys(entries)) if (!used.has(`#/components/${kind}/${name}`)) unused.push(`${kind}/${name}`);
    }
    expect(unused).toEqual([]);
  });

  it('the reader saw every path the text declares', () => {
    expect(doc.info.title).toBe('loraserve');
    const pathKeys = [...yamlText.matchAll(/^ {2}(\/\S*):$/gm)].map((m) => m[1]);
    expect(Object.keys(doc.paths)).toEqual(pathKeys);
  });

  it('the response checker catches a wrong body (it can fail)', () => {
    const bad = contract.check({ method: 'GET', route: '/v1/models', status: 200, contentType: 'application/json', body: JSON.stringify({ object: 'list', data: [{ id: 3 }] }) });
    expect(bad.length).toBeGreaterThan(0);
    expect(bad.join('\n')).toMatch(/data\/0/);
    const noError = contract.check({ method: 'POST', route: '/v1/completions', status: 404, contentType: 'application/problem+json', body: JSON.stringify({ type: 'x', title: 'Not Found', status: 404, detail: 'd' }) });
    expect(noError.join('\n')).toMatch(/error/);
    expect(contract.check({ method: 'GET', route: '/healthz', status: 418, contentType: 'application/json', body: '{}' })[0]).toMatch(/not documented/);
  });

  it('gives every operation an id, a tag, auth and the error responses its guards produce', () => {
    const ids = new Set<string>();
    for (const [p, item] of Object.entries(doc.paths)) {
      for (const m of HTTP_METHODS) {
        const op = findOperation(doc, m, p);
        if (!op) continue;
        const where = `${m.toUpperCase()} ${p}`;
        expect(op.operationId, where).toBeTruthy();
        expect(ids.has(op.operationId!), `${where}: duplicate operationId`).toBe(false);
        ids.add(op.operationId!);
        expect(op.tags?.length, where).toBeGreaterThan(0);
        expect(Array.isArray(op.security), `${where}: security`).toBe(true);
        const codes = Object.keys(op.responses);
        if (op.security!.length > 0) expect(codes, where).toEqual(expect.arrayContaining(['401', '403', '503']));
        if (p.startsWith('/v1/')) expect(op.security!.length, `${where}: /v1 routes need a key`).toBeGreaterThan(0);
        if (!['/healthz', '/metrics'].includes(p)) expect(codes, `${where}: answers 503 while draining`).toContain('503');
        for (const param of p.match(/\{(\w+)\}/g) ?? []) {
          const params = [...((item.parameters as unknown[]) ?? []), ...(op.parameters ?? [])].map((x) => {
            const ref = (x as { $ref?: string }).$ref;
            return (ref ? ref.slice(2).split('/').reduce<unknown>((at, k) => (at as Record<string, unknown>)[k], doc) : x) as { name: string; in: string };
          });
          expect(params.some((x) => x.in === 'path' && `{${x.name}}` === param), `${where}: path parameter ${param}`).toBe(true);
        }
      }
    }
    expect(ids.size).toBeGreaterThanOrEqual(15);
  });
});

describe('the app against its contract', () => {
  let tmp: string;
  let app: FastifyInstance;
  let keyed: FastifyInstance;
  let url: string;
  const exercised = new Map<string, Set<number>>();
  const problems: string[] = [];

  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-openapi-'));
    const model = await ensureEmbeddedModel(path.join(tmp, 'model'));
    const config = { MODEL_PATH: model, ADAPTER_DIR: path.join(tmp, 'adapters'), DEVICE: 'cpu' as const, LOG_LEVEL: 'silent' as const };
    app = await buildApp(makeConfig(config));
    url = await app.listen({ port: 0, host: '127.0.0.1' });
    // the same runtime behind keys, for 401 and 403
    keyed = await buildApp(makeConfig({ ...config, API_KEYS: 'inf-key', ADMIN_API_KEYS: 'adm-key' }), { runtime: app.runtime });
    await keyed.ready();
  });
  afterAll(async () => {
    await keyed?.close();
    await app?.close();
    await rm(tmp, { recursive: true, force: true });
  });

  /** One request through inject; its response is checked against the contract and recorded. */
  async function call(route: string, opts: InjectOptions & { method: string }, on: FastifyInstance = app) {
    const res = await on.inject({ url: route.replace(/:(\w+)/g, 'x'), ...opts });
    const method = opts.method.toUpperCase();
    const key = `${method} ${route}`;
    problems.push(...contract.check({ method, route, status: res.statusCode, contentType: res.headers['content-type'] as string | undefined, body: res.body }));
    if (!exercised.has(key)) exercised.set(key, new Set());
    exercised.get(key)!.add(res.statusCode);
    return res;
  }
  const json = (route: string, method: string, payload: unknown, on?: FastifyInstance, headers: Record<string, string> = {}) => call(route, { method, url: route, payload: payload as InjectOptions['payload'], headers }, on);

  it('documents every registered route, and registers every documented one', async () => {
    await app.ready();
    expect(app.openapi.routes.length).toBeGreaterThanOrEqual(14);
    expect(app.openapi.undocumented()).toEqual([]);
    for (const [p] of Object.entries(doc.paths)) {
      for (const m of HTTP_METHODS) {
        if (!findOperation(doc, m, p)) continue;
        expect(app.hasRoute({ method: m.toUpperCase() as 'GET', url: p.replace(/\{(\w+)\}/g, ':$1') }), `${m.toUpperCase()} ${p} is documented but not registered`).toBe(true);
      }
    }
  });

  it('operations and health answer as documented', async () => {
    expect((await call('/healthz', { method: 'GET' })).statusCode).toBe(200);
    expect((await call('/readyz', { method: 'GET' })).statusCode).toBe(200);
    expect((await call('/metrics', { method: 'GET' })).statusCode).toBe(200);
    const y = await call('/openapi.yaml', { method: 'GET' });
    expect(y.body).toBe(yamlText);
    const page = await call('/docs', { method: 'GET' });
    expect(page.statusCode).toBe(200);
    expect(page.headers['content-security-policy']).toMatch(/script-src 'self'/);
    for (const name of [...Object.keys(DOCS_ASSETS), 'init.js']) {
      const asset = await call('/docs/:asset', { method: 'GET', url: `/docs/${name}` });
      expect(asset.statusCode, name).toBe(200);
      expect(asset.rawPayload.length, name).toBeGreaterThan(name === 'init.js' ? 50 : 500);
    }
    expect((await call('/docs/:asset', { method: 'GET', url: '/docs/package.json' })).statusCode).toBe(404);
  });

  it('generation answers as documented, plain and streamed', async () => {
    const gen = { prompt: 'Once upon a time', max_tokens: 5, seed: 3 };
    expect((await json('/v1/generate', 'POST', gen)).statusCode).toBe(200);
    expect((await json('/v1/generate', 'POST', { ...gen, logprobs: 2 })).statusCode).toBe(200);
    const streamed = await json('/v1/generate', 'POST', { ...gen, stream: true });
    expect(streamed.headers['content-type']).toMatch(/^text\/event-stream/);
    expect(streamed.body).toContain('event: done');
    expect((await json('/v1/generate', 'POST', { prompt: 7 })).statusCode).toBe(400);
    expect((await json('/v1/generate', 'POST', { ...gen, adapter: 'no-such-adapter' })).statusCode).toBe(404);

    const model = app.runtime.manifest.modelId;
    expect((await json('/v1/completions', 'POST', { model, prompt: 'Once', max_tokens: 4, seed: 1 })).statusCode).toBe(200);
    expect((await json('/v1/completions', 'POST', { model, prompt: 'Once', max_tokens: 4, seed: 1, logprobs: 2 })).statusCode).toBe(200);
    expect((await json('/v1/completions', 'POST', { model, prompt: 'Once', max_tokens: 4, stream: true, stream_options: { include_usage: true } })).statusCode).toBe(200);
    expect((await json('/v1/completions', 'POST', { model: 'no-such-adapter', prompt: 'Once' })).statusCode).toBe(404);
    expect((await json('/v1/completions', 'POST', { model })).statusCode).toBe(400);

    const messages = [{ role: 'user', content: 'Tell me a story' }];
    expect((await json('/v1/chat/completions', 'POST', { model, messages, max_tokens: 4, seed: 1 })).statusCode).toBe(200);
    expect((await json('/v1/chat/completions', 'POST', { model, messages, max_tokens: 4, seed: 1, logprobs: true, top_logprobs: 2 })).statusCode).toBe(200);
    expect((await json('/v1/chat/completions', 'POST', { model, messages, max_tokens: 4, stream: true, logprobs: true })).statusCode).toBe(200);
    expect((await json('/v1/chat/completions', 'POST', { model, messages: [] })).statusCode).toBe(400);
    expect((await call('/v1/models', { method: 'GET' })).statusCode).toBe(200);
    expect((await call('/v1/models/:id', { method: 'GET', url: `/v1/models/${encodeURIComponent(model)}` })).statusCode).toBe(200);
    expect((await call('/v1/models/:id', { method: 'GET', url: '/v1/models/nope' })).statusCode).toBe(404);
    expect((await json('/v1/completions', 'POST', { model, prompt: ['Once', 'The'], n: 2, max_tokens: 3, seed: 1, echo: true })).statusCode).toBe(200);
    expect((await json('/v1/completions', 'POST', { model, prompt: 'Once', suffix: 'x' })).statusCode).toBe(400);
    expect((await json('/v1/chat/completions', 'POST', { model, messages, tools: [{ type: 'function', function: { name: 'f' } }] })).statusCode).toBe(400);
  });

  it('adapter management answers as documented', async () => {
    const { architecture, modelId } = app.runtime.manifest;
    const good = adapterBytes(architecture, { modelId, r: 4, targets: ['q_proj', 'v_proj'] });
    const wrongShape = adapterBytes(architecture, {
      modelId,
      r: 4,
      tensors: (ts) => ts.map((t, i) => (i === 0 ? { ...t, shape: [t.shape[0]!, t.shape[1]! + 1], data: new Float32Array(t.shape[0]! * (t.shape[1]! + 1)) } : t)),
    });
    // multipart needs a real body: send over the socket, check the same way
    const send = async (route: string, method: string, target: string, body: FormData | string, headers: Record<string, string> = {}) => {
      const res = await fetch(url + target, { method, body, headers });
      const text = await res.text();
      problems.push(...contract.check({ method, route, status: res.status, contentType: res.headers.get('content-type') ?? undefined, body: text }));
      const key = `${method} ${route}`;
      if (!exercised.has(key)) exercised.set(key, new Set());
      exercised.get(key)!.add(res.status);
      return res.status;
    };
    expect(await send('/v1/adapters', 'POST', '/v1/adapters', filesForm('contract-a', good))).toBe(201);
    expect(await send('/v1/adapters', 'POST', '/v1/adapters', filesForm('contract-a', good))).toBe(409);
    expect(await send('/v1/adapters', 'POST', '/v1/adapters', filesForm('contract-bad', wrongShape))).toBe(422);
    expect(await send('/v1/adapters', 'POST', '/v1/adapters', '{"name":"x"}', { 'content-type': 'application/json' })).toBe(415);
    expect(await send('/v1/adapters', 'POST', '/v1/adapters', filesForm(null, good))).toBe(400);
    expect(await send('/v1/adapters/validate', 'POST', '/v1/adapters/validate', filesForm(null, good))).toBe(200);
    expect(await send('/v1/adapters/validate', 'POST', '/v1/adapters/validate', filesForm(null, wrongShape))).toBe(422);
    expect(await send('/v1/adapters/:name', 'PUT', '/v1/adapters/contract-a', filesForm(null, good))).toBe(200);
    expect(await send('/v1/adapters/:name', 'PUT', '/v1/adapters/contract-b', filesForm(null, good))).toBe(201);
    expect(await send('/v1/adapters/:name', 'PUT', '/v1/adapters/contract-c', filesForm(null, wrongShape))).toBe(422);

    expect((await call('/v1/adapters', { method: 'GET' })).statusCode).toBe(200);
    expect((await call('/v1/adapters/:name', { method: 'GET', url: '/v1/adapters/contract-a' })).statusCode).toBe(200);
    expect((await call('/v1/adapters/:name', { method: 'GET', url: '/v1/adapters/missing' })).statusCode).toBe(404);
    expect((await call('/v1/models', { method: 'GET' })).statusCode).toBe(200);
    // generation through the adapter, by name and as an OpenAI model
    expect((await json('/v1/generate', 'POST', { prompt: 'Once', adapter: 'contract-a', max_tokens: 3, seed: 1 })).statusCode).toBe(200);
    expect((await json('/v1/chat/completions', 'POST', { model: 'contract-b', messages: [{ role: 'user', content: 'hi' }], max_tokens: 3 })).statusCode).toBe(200);
    expect((await call('/v1/adapters/:name', { method: 'DELETE', url: '/v1/adapters/contract-b' })).statusCode).toBe(204);
    expect((await call('/v1/adapters/:name', { method: 'DELETE', url: '/v1/adapters/contract-b' })).statusCode).toBe(404);
  });

  it('401 and 403 answer as documented', async () => {
    const model = app.runtime.manifest.modelId;
    expect((await json('/v1/generate', 'POST', { prompt: 'x' }, keyed)).statusCode).toBe(401);
    expect((await json('/v1/generate', 'POST', { prompt: 'x' }, keyed, { authorization: 'Bearer adm-key' })).statusCode).toBe(403);
    expect((await json('/v1/completions', 'POST', { model, prompt: 'x' }, keyed)).statusCode).toBe(401);
    expect((await json('/v1/chat/completions', 'POST', { model, messages: [] }, keyed, { authorization: 'Bearer adm-key' })).statusCode).toBe(403);
    expect((await call('/v1/models', { method: 'GET' }, keyed)).statusCode).toBe(401);
    expect((await call('/v1/models/:id', { method: 'GET', headers: { authorization: 'Bearer adm-key' } }, keyed)).statusCode).toBe(403);
    expect((await call('/v1/adapters', { method: 'GET', headers: { authorization: 'Bearer inf-key' } }, keyed)).statusCode).toBe(403);
    expect((await call('/v1/adapters', { method: 'POST' }, keyed)).statusCode).toBe(401);
    expect((await call('/v1/adapters/validate', { method: 'POST' }, keyed)).statusCode).toBe(401);
    expect((await call('/v1/adapters/:name', { method: 'GET', headers: { authorization: 'Bearer wrong' } }, keyed)).statusCode).toBe(401);
    expect((await call('/v1/adapters/:name', { method: 'PUT', headers: { authorization: 'Bearer inf-key' } }, keyed)).statusCode).toBe(403);
    expect((await call('/v1/adapters/:name', { method: 'DELETE' }, keyed)).statusCode).toBe(401);
    expect((await call('/healthz', { method: 'GET' }, keyed)).statusCode).toBe(200);
  });

  it('503 while draining answers as documented', async () => {
    app.runtime.draining = true;
    try {
      const model = app.runtime.manifest.modelId;
      for (const r of [
        await call('/readyz', { method: 'GET' }),
        await json('/v1/generate', 'POST', { prompt: 'x' }),
        await json('/v1/completions', 'POST', { model, prompt: 'x' }),
        await json('/v1/chat/completions', 'POST', { model, messages: [{ role: 'user', content: 'x' }] }),
        await call('/v1/models', { method: 'GET' }),
        await call('/v1/models/:id', { method: 'GET' }),
        await call('/v1/adapters', { method: 'GET' }),
        await call('/v1/adapters', { method: 'POST' }),
        await call('/v1/adapters/validate', { method: 'POST' }),
        await call('/v1/adapters/:name', { method: 'GET' }),
        await call('/v1/adapters/:name', { method: 'PUT' }),
        await call('/v1/adapters/:name', { method: 'DELETE' }),
        await call('/openapi.yaml', { method: 'GET' }),
        await call('/docs', { method: 'GET' }),
        await call('/docs/:asset', { method: 'GET' }),
      ]) {
        expect(r.statusCode).toBe(503);
      }
      // the drain guard runs before auth: a replica going away says so even to a client without a key
      expect((await json('/v1/generate', 'POST', { prompt: 'x' }, keyed)).statusCode).toBe(503);
      expect((await call('/healthz', { method: 'GET' })).statusCode).toBe(200);
      expect((await call('/metrics', { method: 'GET' })).statusCode).toBe(200);
    } finally {
      app.runtime.draining = false;
    }
  });

  it('every response above matched the contract, and every operation was exercised', () => {
    expect(problems).toEqual([]);
    for (const [p] of Object.entries(doc.paths)) {
      for (const m of HTTP_METHODS) {
        if (!findOperation(doc, m, p)) continue;
        const key = `${m.toUpperCase()} ${p.replace(/\{(\w+)\}/g, ':$1')}`;
        const seen = exercised.get(key);
        expect(seen, `${key} was never called`).toBeDefined();
        expect([...seen!].some((s) => s < 300), `${key}: no success response checked`).toBe(true);
      }
    }
  });
});
