import { createHash, timingSafeEqual } from 'node:crypto';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { HttpProblem, sendProblem } from './problem.js';

/**
 * Bearer-key authorisation, two scopes:
 * - `inference`: /v1/generate, /v1/completions, /v1/chat/completions, /v1/models and any other
 *   /v1/ path that is not an adapter route — keys from API_KEYS;
 * - `admin`: /v1/adapters and everything under it — keys from ADMIN_API_KEYS;
 * - everything else (/healthz, /readyz, /metrics, /openapi.yaml, /docs) is open.
 *
 * A key of the other scope is recognised but refused with 403: an admin key does not grant
 * inference (DESIGN: "admin keys never grant more than admin routes need"), and an inference key
 * never manages adapters. A key listed in both lists grants both. An empty list leaves its scope
 * open, with a warning at start.
 *
 * Keys are compared as sha256 digests with timingSafeEqual, against every configured key, so
 * neither the key's length nor which key matched shows in the response time. Nothing here logs a
 * key or anything derived from it.
 */
export type Scope = 'inference' | 'admin' | 'open';

export interface AuthOptions {
  apiKeys: readonly string[];
  adminKeys: readonly string[];
}

const ADMIN_PREFIX = '/v1/adapters';

/** The scope a request path (without query string) belongs to. */
export function scopeOf(path: string): Scope {
  if (path === ADMIN_PREFIX || path.startsWith(`${ADMIN_PREFIX}/`)) return 'admin';
  if (path.startsWith('/v1/') || path === '/v1') return 'inference';
  return 'open';
}

const digest = (s: string): Buffer => createHash('sha256').update(s, 'utf8').digest();

/** A set of keys that answers membership in time independent of the candidate and of which key matches. */
export class KeySet {
  private readonly digests: Buffer[];

  constructor(keys: readonly string[]) {
    this.digests = keys.filter((k) => k.length > 0).map(digest);
  }

  get size(): number {
    return this.digests.length;
  }

  has(candidate: string): boolean {
    const d = digest(candidate);
    let found = false;
    // no early exit: every key is compared
    for (const k of this.digests) found = timingSafeEqual(k, d) || found;
    return found;
  }
}

/** `Authorization: Bearer <token>` → the token; null when absent or of another scheme. */
export function bearerToken(header: string | undefined): string | null {
  if (!header) return null;
  const m = /^Bearer[ \t]+([^\s]+)[ \t]*$/i.exec(header);
  return m ? m[1]! : null;
}

export type Decision = { ok: true } | { ok: false; status: 401 | 403; detail: string; invalidToken: boolean };

/** The pure decision: scope + presented token + key sets → allowed, 401 or 403. */
export function decide(scope: Scope, token: string | null, keys: { api: KeySet; admin: KeySet }): Decision {
  if (scope === 'open') return { ok: true };
  const own = scope === 'admin' ? keys.admin : keys.api;
  const other = scope === 'admin' ? keys.api : keys.admin;
  if (own.size === 0) return { ok: true };
  const what = scope === 'admin' ? 'adapter management' : 'inference';
  if (token === null) return { ok: false, status: 401, detail: `${what} needs an API key: send "Authorization: Bearer <key>"`, invalidToken: false };
  const isOwn = own.has(token);
  const isOther = other.has(token);
  if (isOwn) return { ok: true };
  if (isOther) {
    const detail =
      scope === 'admin'
        ? 'this key is an inference key (API_KEYS); adapter management needs a key from ADMIN_API_KEYS'
        : 'this key is an admin key (ADMIN_API_KEYS), which grants adapter management only; inference needs a key from API_KEYS';
    return { ok: false, status: 403, detail, invalidToken: false };
  }
  return { ok: false, status: 401, detail: 'unknown API key', invalidToken: true };
}

function refuse(reply: FastifyReply, d: Exclude<Decision, { ok: true }>): FastifyReply {
  const title = d.status === 401 ? 'Unauthorized' : 'Forbidden';
  const headers: Record<string, string> = {};
  if (d.status === 401) headers['www-authenticate'] = d.invalidToken ? 'Bearer realm="loraserve", error="invalid_token"' : 'Bearer realm="loraserve"';
  const code = d.status === 401 ? 'invalid_api_key' : 'insufficient_scope';
  return sendProblem(reply, new HttpProblem(d.status, title, d.detail, {}, headers).about(null, code));
}

/**
 * The path that decides the scope: the matched route's pattern (the router decodes
 * percent-escapes, so `/v1/%61dapters` reaches the adapter routes and must be judged as one), else
 * the decoded request path.
 */
function routePath(request: FastifyRequest): string {
  const pattern = request.routeOptions.url;
  if (pattern) return pattern;
  const raw = request.url.split('?', 1)[0]!;
  try {
    return decodeURIComponent(raw);
  } catch {
    return raw;
  }
}

/**
 * Fastify plugin; registered before the routes. It is not encapsulated (skip-override), so its
 * hook guards every route of the app.
 */
async function authPlugin(app: FastifyInstance, opts: AuthOptions): Promise<void> {
  const keys = { api: new KeySet(opts.apiKeys), admin: new KeySet(opts.adminKeys) };
  if (keys.api.size === 0) app.log.warn('API_KEYS is unset: inference routes (/v1/generate, /v1/completions, /v1/chat/completions, /v1/models) are open to anyone who can reach this port');
  if (keys.admin.size === 0) app.log.warn('ADMIN_API_KEYS is unset: adapter management (/v1/adapters…) is open to anyone who can reach this port');

  app.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    // CORS preflights carry no credentials by design
    if (request.method === 'OPTIONS') return;
    const d = decide(scopeOf(routePath(request)), bearerToken(request.headers.authorization), keys);
    if (!d.ok) return refuse(reply, d);
  });
}
(authPlugin as unknown as Record<symbol, boolean>)[Symbol.for('skip-override')] = true;

export default authPlugin;
