import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance, InjectOptions } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { ensureEmbeddedModel } from '../src/model/embedded.js';
import {
  ANNOTATIONS,
  HTTP_METHODS,
  VALIDATION,
  checkResponse,
  findOperation,
  loadOpenApi,
  renderDocsHtml,
  resolveRef,
  validateSchema,
  type OpenApiDoc,
} from '../src/http/openapi.js';
import { adapterBytes, filesForm } from './helpers/adapter-uploads.js';

/**
 * openapi.yaml is the contract: it parses, its refs
 * resolve, its schemas use only keywords the checker enforces, every route the app registers is
 * in it and every operation in it exists, and real responses of every operation — success and
 * error — validate against the documented status, content type and schema.
 */

describe('validateSchema', () => {
  const doc = {
    openapi: '3.1.0',
    info: { title: 't', version: '1' },
    paths: {},
    components: {
      schemas: {
        Thing: { type: 'object', required: ['id', 'kind'], properties: { id: { type: 'integer', minimum: 1 }, kind: { enum: ['a', 'b'] }, note: { type: ['string', 'null'] } } },
      },
    },
  } as OpenApiDoc;
  const ref = { $ref: '#/components/schemas/Thing' };

  it('accepts a conforming value', () => expect(validateSchema(doc, ref, { id: 3, kind: 'a', note: null, extra: 1 })).toEqual([]));
  it('names every violation with its path', () => {
    const errors = validateSchema(doc, ref, { id: 0, note: 5 });
    expect(errors).toEqual(expect.arrayContaining([expect.stringContaining('required property "kind"'), expect.stringMatching(/^\$\.id: 0 < minimum 1/), expect.stringMatching(/^\$\.note: expected string \| null, got integer/)]));
    expect(errors).toHaveLength(3);
  });
  it('integers are numbers, not the reverse', () => {
    expect(validateSchema(doc, { type: 'number' }, 3)).toEqual([]);
    expect(validateSchema(doc, { type: 'integer' }, 3.5)).toHaveLength(1);
  });
  it('oneOf needs exactly one match; anyOf at least one', () => {
    const s = { oneOf: [{ type: 'number' }, { type: 'integer' }] };
    expect(validateSchema(doc, s, 2.5)).toEqual([]);
    expect(validateSchema(doc, s, 2)).toHaveLength(1);
    expect(validateSchema(doc, { anyOf: [{ type: 'string' }, { type: 'null' }] }, 1)).toHaveLength(1);
  });
  it('arrays, const, additionalProperties: false, string bounds', () => {
    expect(validateSchema(doc, { type: 'array', items: ref, minItems: 1 }, [])).toHaveLength(1);
    expect(validateSchema(doc, { type: 'array', items: ref }, [{ id: 1, kind: 'c' }])[0]).toMatch(/^\$\[0\]\.kind/);
    expect(validateSchema(doc, { const: 'x' }, 'y')).toHaveLength(1);
    expect(validateSchema(doc, { type: 'object', additionalProperties: false }, { a: 1 })).toHaveLength(1);
    expect(validateSchema(doc, { type: 'string', minLength: 2, pattern: '^a' }, 'b')).toHaveLength(2);
  });
  it('throws on keywords it does not check', () => {
    expect(() => validateSchema(doc, { type: 'string', uniqueItems: true }, 'x')).toThrow(/uniqueItems/);
  });
});

const { text: yamlText, doc } = loadOpenApi();

/** Every schema object in the document, with where it sits. */
function* schemas(node: unknown, where: string, isSchema: boolean): Generator<[string, Record<string, unknown>]> {
  if (Array.isArray(node)) {
    for (let i = 0; i < node.length; i++) yield* schemas(node[i], `${where}[${i}]`, isSchema);
    return;
  }
  if (typeof node !== 'object' || node === null) return;
  const obj = node as Record<string, unknown>;
  if (isSchema) {
    yield [where, obj];
    for (const k of ['items', 'additionalProperties']) if (k in obj) yield* schemas(obj[k], `${where}.${k}`, true);
    for (const k of ['oneOf', 'anyOf', 'allOf']) if (k in obj) yield* schemas(obj[k], `${where}.${k}`, true);
    if (obj.properties && typeof obj.properties === 'object') for (const [p, s] of Object.entries(obj.properties)) yield* schemas(s, `${where}.properties.${p}`, true);
    return;
  }
  for (const [k, v] of Object.entries(obj)) {
    if (k === 'schema' || k === 'x-event-schema') yield* schemas(v, `${where}.${k}`, true);
    else if (k === 'schemas' && where === '$.components') for (const [n, s] of Object.entries(v as object)) yield* schemas(s, `${where}.schemas.${n}`, true);
    else yield* schemas(v, `${where}.${k}`, false);
  }
}

describe('openapi.yaml', () => {
  it('is OpenAPI 3.1, and the reader saw every path and schema the text declares', () => {
    expect(doc.openapi).toBe('3.1.0');
    expect(doc.info.title).toBe('loraserve');
    // counted on the text itself, independently of the reader: the keys at their indentation
    const pathKeys = [...yamlText.matchAll(/^ {2}(\/\S*):$/gm)].map((m) => m[1]);
    expect(Object.keys(doc.paths)).toEqual(pathKeys);
    const schemaBlock = yamlText.slice(yamlText.indexOf('\n  schemas:\n'));
    const schemaKeys = [...schemaBlock.matchAll(/^ {4}([A-Za-z]\w*):$/gm)].map((m) => m[1]);
    expect(Object.keys(doc.components!.schemas!)).toEqual(schemaKeys);
  });

  it('resolves every $ref', () => {
    const refs: string[] = [];
    const walk = (n: unknown) => {
      if (Array.isArray(n)) n.forEach(walk);
      else if (n && typeof n === 'object') for (const [k, v] of Object.entries(n)) k === '$ref' && typeof v === 'string' ? refs.push(v) : walk(v);
    };
    walk(doc);
    expect(refs.length).toBeGreaterThan(50);
    for (const r of refs) expect(() => resolveRef(doc, r), r).not.toThrow();
  });

  it('uses only schema keywords the checker enforces or ignores on purpose', () => {
    const bad: string[] = [];
    let n = 0;
    for (const [where, s] of schemas(doc, '$', false)) {
      n++;
      for (const k of Object.keys(s)) if (!VALIDATION.has(k) && !ANNOTATIONS.has(k) && !k.startsWith('x-')) bad.push(`${where}: ${k}`);
    }
    expect(n).toBeGreaterThan(100);
    expect(bad).toEqual([]);
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
          const params = [...((item.parameters as unknown[]) ?? []), ...(op.parameters ?? [])].map((x) => (x as { $ref?: string }).$ref ? resolveRef(doc, (x as { $ref: string }).$ref) : x) as { name: string; in: string }[];
          expect(params.some((x) => x.in === 'path' && `{${x.name}}` === param), `${where}: path parameter ${param}`).toBe(true);
        }
      }
    }
    expect(ids.size).toBeGreaterThanOrEqual(15);
  });

  it('renders /docs as one self-contained page listing every operation and schema', () => {
    const html = renderDocsHtml(doc);
    expect(html).not.toMatch(/<script/i);
    expect(html).not.toMatch(/(src|href)="https?:/i);
    for (const p of Object.keys(doc.paths)) expect(html).toContain(`<code>${p.replace(/&/g, '&amp;')}</code>`);
    for (const name of Object.keys(doc.components!.schemas!)) expect(html).toContain(`id="schema-${name}"`);
    // every internal link has its target
    const targets = new Set([...html.matchAll(/id="([^"]+)"/g)].map((m) => m[1]));
    for (const m of html.matchAll(/href="#([^"]+)"/g)) expect(targets.has(m[1]), m[1]).toBe(true);
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
    problems.push(...checkResponse(doc, { method, route, status: res.statusCode, contentType: res.headers['content-type'] as string | undefined, body: res.body }));
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
    expect((await call('/docs', { method: 'GET' })).statusCode).toBe(200);
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
      problems.push(...checkResponse(doc, { method, route, status: res.status, contentType: res.headers.get('content-type') ?? undefined, body: text }));
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
        await call('/v1/adapters', { method: 'GET' }),
        await call('/v1/adapters', { method: 'POST' }),
        await call('/v1/adapters/validate', { method: 'POST' }),
        await call('/v1/adapters/:name', { method: 'GET' }),
        await call('/v1/adapters/:name', { method: 'PUT' }),
        await call('/v1/adapters/:name', { method: 'DELETE' }),
        await call('/openapi.yaml', { method: 'GET' }),
        await call('/docs', { method: 'GET' }),
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
