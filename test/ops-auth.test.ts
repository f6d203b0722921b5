import { Writable } from 'node:stream';
import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import authPlugin, { KeySet, bearerToken, decide, scopeOf } from '../src/http/auth.js';
import { installErrorHandler } from '../src/http/problem.js';
import { startServer, type ServerProcess } from './helpers/serve-process.js';

/**
 * Bearer-key auth: the pure pieces (scope of a path, token parsing, constant-time key sets, the
 * 401/403 decision), the plugin on an app with the real route paths, and the real server: keys
 * from API_KEYS / ADMIN_API_KEYS guard the right routes and never reach the log.
 */

describe('scopeOf', () => {
  it.each([
    ['/v1/generate', 'inference'],
    ['/v1/completions', 'inference'],
    ['/v1/chat/completions', 'inference'],
    ['/v1/models', 'inference'],
    ['/v1/anything-new', 'inference'],
    ['/v1/adapters', 'admin'],
    ['/v1/adapters/validate', 'admin'],
    ['/v1/adapters/:name', 'admin'],
    ['/v1/adapters/my-adapter', 'admin'],
    // a prefix of the name is not the admin resource
    ['/v1/adaptersfoo', 'inference'],
    ['/healthz', 'open'],
    ['/readyz', 'open'],
    ['/metrics', 'open'],
    ['/openapi.yaml', 'open'],
    ['/docs', 'open'],
  ])('%s → %s', (p, scope) => expect(scopeOf(p)).toBe(scope));
});

describe('bearerToken', () => {
  it.each([
    ['Bearer abc123', 'abc123'],
    ['bearer abc123', 'abc123'],
    ['Bearer   abc123  ', 'abc123'],
    ['Basic dXNlcjpwYXNz', null],
    ['Bearer', null],
    ['Bearer ', null],
    ['Bearer a b', null],
    ['abc123', null],
    [undefined, null],
  ])('%j → %j', (h, token) => expect(bearerToken(h)).toBe(token));
});

describe('KeySet', () => {
  const set = new KeySet(['alpha-key', 'beta-key', '']);
  it('holds exactly the configured non-empty keys', () => {
    expect(set.size).toBe(2);
    expect(set.has('alpha-key')).toBe(true);
    expect(set.has('beta-key')).toBe(true);
  });
  it('refuses prefixes, extensions, case changes and the empty key', () => {
    for (const k of ['alpha', 'alpha-key2', 'ALPHA-KEY', '', ' alpha-key']) expect(set.has(k)).toBe(false);
  });
});

describe('decide', () => {
  const keys = { api: new KeySet(['inf']), admin: new KeySet(['adm']) };
  it('lets open routes through without a key', () => expect(decide('open', null, keys)).toEqual({ ok: true }));
  it('401 without a key, not an invalid_token', () => expect(decide('inference', null, keys)).toMatchObject({ ok: false, status: 401, invalidToken: false }));
  it('401 invalid_token for an unknown key', () => expect(decide('admin', 'nope', keys)).toMatchObject({ ok: false, status: 401, invalidToken: true }));
  it('grants each scope its own keys', () => {
    expect(decide('inference', 'inf', keys)).toEqual({ ok: true });
    expect(decide('admin', 'adm', keys)).toEqual({ ok: true });
  });
  it('403 for a key of the other scope, both ways', () => {
    expect(decide('inference', 'adm', keys)).toMatchObject({ ok: false, status: 403 });
    expect(decide('admin', 'inf', keys)).toMatchObject({ ok: false, status: 403 });
  });
  it('a key in both lists grants both', () => {
    const both = { api: new KeySet(['k']), admin: new KeySet(['k']) };
    expect(decide('inference', 'k', both)).toEqual({ ok: true });
    expect(decide('admin', 'k', both)).toEqual({ ok: true });
  });
  it('an empty list opens its scope only', () => {
    const onlyApi = { api: new KeySet(['inf']), admin: new KeySet([]) };
    expect(decide('admin', null, onlyApi)).toEqual({ ok: true });
    expect(decide('inference', null, onlyApi)).toMatchObject({ ok: false, status: 401 });
  });
});

/** An app with the real paths and trivial handlers, its log captured line by line. */
async function guardedApp(apiKeys: string[], adminKeys: string[]): Promise<{ app: FastifyInstance; lines: Record<string, unknown>[] }> {
  const lines: Record<string, unknown>[] = [];
  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      for (const l of chunk.toString().split('\n')) if (l.trim()) lines.push(JSON.parse(l) as Record<string, unknown>);
      cb();
    },
  });
  const app = Fastify({ loggerInstance: pino({ level: 'trace' }, sink) as FastifyBaseLogger });
  installErrorHandler(app);
  await app.register(authPlugin, { apiKeys, adminKeys });
  const ok = async () => ({ ok: true });
  app.post('/v1/generate', ok);
  app.post('/v1/completions', ok);
  app.post('/v1/chat/completions', ok);
  app.get('/v1/models', ok);
  app.get('/v1/adapters', ok);
  app.post('/v1/adapters', ok);
  app.get('/v1/adapters/:name', ok);
  app.delete('/v1/adapters/:name', ok);
  app.post('/v1/adapters/validate', ok);
  app.get('/healthz', ok);
  app.get('/metrics', ok);
  app.get('/docs', ok);
  await app.ready();
  return { app, lines };
}

const bearer = (k: string) => ({ authorization: `Bearer ${k}` });

describe('auth plugin', () => {
  let app: FastifyInstance;
  beforeAll(async () => {
    ({ app } = await guardedApp(['inference-key-1', 'inference-key-2'], ['admin-key-1']));
  });
  afterAll(async () => app?.close());

  const inference = [
    ['POST', '/v1/generate'],
    ['POST', '/v1/completions'],
    ['POST', '/v1/chat/completions'],
    ['GET', '/v1/models'],
  ] as const;
  const admin = [
    ['GET', '/v1/adapters'],
    ['POST', '/v1/adapters'],
    ['GET', '/v1/adapters/some-name'],
    ['DELETE', '/v1/adapters/some-name'],
    ['POST', '/v1/adapters/validate'],
  ] as const;

  it('inference routes: 401 without a key, 200 with either API key, 403 with the admin key', async () => {
    for (const [method, url] of inference) {
      const none = await app.inject({ method, url });
      expect(none.statusCode, `${method} ${url}`).toBe(401);
      expect(none.headers['content-type']).toMatch(/^application\/problem\+json/);
      expect(none.headers['www-authenticate']).toBe('Bearer realm="loraserve"');
      expect(none.json()).toMatchObject({ status: 401, title: 'Unauthorized' });
      for (const k of ['inference-key-1', 'inference-key-2']) expect((await app.inject({ method, url, headers: bearer(k) })).statusCode).toBe(200);
      const wrong = await app.inject({ method, url, headers: bearer('admin-key-1') });
      expect(wrong.statusCode).toBe(403);
      expect(wrong.json()).toMatchObject({ status: 403, title: 'Forbidden' });
      expect(wrong.headers['www-authenticate']).toBeUndefined();
    }
  });

  it('admin routes: 401 without a key, 200 with the admin key, 403 with an API key', async () => {
    for (const [method, url] of admin) {
      expect((await app.inject({ method, url })).statusCode, `${method} ${url}`).toBe(401);
      expect((await app.inject({ method, url, headers: bearer('admin-key-1') })).statusCode).toBe(200);
      expect((await app.inject({ method, url, headers: bearer('inference-key-1') })).statusCode).toBe(403);
    }
  });

  it('an unknown key is 401 with error="invalid_token"; other schemes count as no key', async () => {
    const res = await app.inject({ method: 'POST', url: '/v1/generate', headers: bearer('inference-key-3') });
    expect(res.statusCode).toBe(401);
    expect(res.headers['www-authenticate']).toBe('Bearer realm="loraserve", error="invalid_token"');
    const basic = await app.inject({ method: 'POST', url: '/v1/generate', headers: { authorization: `Basic ${Buffer.from('inference-key-1:').toString('base64')}` } });
    expect(basic.statusCode).toBe(401);
  });

  it('judges a percent-encoded path by the route it reaches', async () => {
    // the router decodes %61 → a, so this is GET /v1/adapters: an inference key must not pass
    const res = await app.inject({ method: 'GET', url: '/v1/%61dapters', headers: bearer('inference-key-1') });
    expect(res.statusCode).toBe(403);
    expect((await app.inject({ method: 'GET', url: '/v1/%61dapters', headers: bearer('admin-key-1') })).statusCode).toBe(200);
  });

  it('health, metrics and docs are open', async () => {
    for (const url of ['/healthz', '/metrics', '/docs']) expect((await app.inject({ method: 'GET', url })).statusCode).toBe(200);
  });

  it('unknown /v1 paths need a key before they reveal a 404', async () => {
    expect((await app.inject({ method: 'GET', url: '/v1/nothing' })).statusCode).toBe(401);
    expect((await app.inject({ method: 'GET', url: '/v1/nothing', headers: bearer('inference-key-1') })).statusCode).toBe(404);
  });
});

describe('auth plugin with unset lists', () => {
  it('leaves both scopes open and warns once per list at start', async () => {
    const { app, lines } = await guardedApp([], []);
    try {
      expect((await app.inject({ method: 'POST', url: '/v1/generate' })).statusCode).toBe(200);
      expect((await app.inject({ method: 'DELETE', url: '/v1/adapters/x' })).statusCode).toBe(200);
      const warnings = lines.filter((l) => l.level === 40).map((l) => String(l.msg));
      expect(warnings.filter((m) => m.startsWith('API_KEYS is unset'))).toHaveLength(1);
      expect(warnings.filter((m) => m.startsWith('ADMIN_API_KEYS is unset'))).toHaveLength(1);
    } finally {
      await app.close();
    }
  });

  it('warns only for the unset list', async () => {
    const { app, lines } = await guardedApp(['k'], []);
    try {
      const warnings = lines.filter((l) => l.level === 40).map((l) => String(l.msg));
      expect(warnings.some((m) => m.startsWith('API_KEYS is unset'))).toBe(false);
      expect(warnings.some((m) => m.startsWith('ADMIN_API_KEYS is unset'))).toBe(true);
      expect((await app.inject({ method: 'POST', url: '/v1/generate' })).statusCode).toBe(401);
    } finally {
      await app.close();
    }
  });
});

describe('the real server', () => {
  // long, distinctive keys: any occurrence in the log is a leak, not a coincidence
  const API = ['api-4b1f0e9c7d2a48f1b6e3', 'api-93c2d7e1a5f04b8e9c61'];
  const ADMIN = 'admin-e7a94c21f3b04d6a8e52';
  const UNKNOWN = 'unknown-5d8e2b7c1a9f43e6b0d4';
  let tmp: string;
  let server: ServerProcess;

  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-auth-'));
    server = await startServer({
      MODEL_PATH: '',
      DEFAULT_MODEL_DIR: path.join(tmp, 'model'),
      ADAPTER_DIR: path.join(tmp, 'adapters'),
      DEVICE: 'cpu',
      API_KEYS: API.join(','),
      ADMIN_API_KEYS: ADMIN,
      // every line the server can write
      LOG_LEVEL: 'trace',
    });
  });
  afterAll(async () => {
    await server?.stop('SIGKILL');
    await rm(tmp, { recursive: true, force: true });
  });

  const call = (method: string, p: string, key?: string, body?: unknown) =>
    fetch(server.url + p, {
      method,
      headers: { ...(key ? bearer(key) : {}), ...(body ? { 'content-type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });

  it('guards the real routes and never logs a key', async () => {
    const gen = { prompt: 'Once upon a time', max_tokens: 3, seed: 1 };
    expect((await call('POST', '/v1/generate', undefined, gen)).status).toBe(401);
    const ok = await call('POST', '/v1/generate', API[0], gen);
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as { usage: { completion_tokens: number } }).usage.completion_tokens).toBeGreaterThan(0);
    expect((await call('POST', '/v1/generate', ADMIN, gen)).status).toBe(403);
    expect((await call('POST', '/v1/generate', UNKNOWN, gen)).status).toBe(401);
    expect((await call('GET', '/v1/models', API[1])).status).toBe(200);
    expect((await call('GET', '/v1/adapters', ADMIN)).status).toBe(200);
    expect((await call('GET', '/v1/adapters', API[0])).status).toBe(403);
    expect((await call('GET', '/v1/adapters')).status).toBe(401);
    expect((await call('GET', '/healthz')).status).toBe(200);
    expect((await call('GET', '/metrics')).status).toBe(200);

    expect(await server.stop('SIGTERM')).toBe(0);
    const log = server.output();
    expect(log).toContain('"msg":"generate"');
    for (const k of [...API, ADMIN, UNKNOWN]) expect(log.includes(k), `key ${k} in the log`).toBe(false);
    // the keys are set: no "open" warning
    expect(log).not.toContain('API_KEYS is unset');
  });
});
