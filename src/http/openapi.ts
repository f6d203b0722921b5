import { existsSync, readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { createRequire } from 'node:module';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance } from 'fastify';
import { parse as parseYaml } from 'yaml';
import { notFound } from './problem.js';

/**
 * The API contract, openapi.yaml at the repository root: served verbatim at /openapi.yaml,
 * browsable at /docs through Swagger UI (the swagger-ui-dist package, its assets served from
 * node_modules by this server: no CDN, the service runs on offline machines), with try-it-out
 * against this server. The tests validate the document with a real OpenAPI validator and every
 * response they see against it (test/helpers/contract.ts).
 */

export interface OpenApiOperation {
  operationId?: string;
  summary?: string;
  description?: string;
  tags?: string[];
  security?: Record<string, string[]>[];
  parameters?: unknown[];
  requestBody?: unknown;
  responses: Record<string, unknown>;
}

export interface OpenApiDoc {
  openapi: string;
  info: { title: string; version: string; description?: string };
  paths: Record<string, Record<string, unknown>>;
  components?: Record<string, Record<string, unknown>>;
  [extra: string]: unknown;
}

export const HTTP_METHODS = ['get', 'put', 'post', 'delete', 'patch', 'head', 'options'] as const;

/** openapi.yaml: beside src/ (sources run through tsx) or one level further up (compiled dist/src/http). */
export function openApiPath(): string {
  const candidates = ['../../openapi.yaml', '../../../openapi.yaml'].map((rel) => fileURLToPath(new URL(rel, import.meta.url)));
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`openapi.yaml not found (looked at ${candidates.join(', ')})`);
  return found;
}

export function parseOpenApi(text: string): OpenApiDoc {
  const doc = parseYaml(text);
  if (!isObject(doc) || typeof doc.openapi !== 'string' || !isObject(doc.info) || !isObject(doc.paths)) {
    throw new Error('openapi.yaml: not an OpenAPI document (openapi, info and paths are required)');
  }
  return doc as OpenApiDoc;
}

export function loadOpenApi(file = openApiPath()): { text: string; doc: OpenApiDoc } {
  const text = readFileSync(file, 'utf8');
  return { text, doc: parseOpenApi(text) };
}

/** Fastify's `/v1/adapters/:name` → OpenAPI's `/v1/adapters/{name}`. */
export function toOpenApiPath(url: string): string {
  return url.replace(/:([A-Za-z0-9_]+)/g, '{$1}');
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** The operation object of a method + route; null when the contract lacks it. */
export function findOperation(doc: OpenApiDoc, method: string, route: string): OpenApiOperation | null {
  const item = doc.paths[toOpenApiPath(route)];
  if (!item) return null;
  const op = item[method.toLowerCase()];
  return isObject(op) ? (op as unknown as OpenApiOperation) : null;
}

// ---------------------------------------------------------------------------------------------
// /docs: Swagger UI from swagger-ui-dist. Only the files the page loads are served, read once.

/** the swagger-ui-dist files /docs loads; nothing else of the package is reachable */
export const DOCS_ASSETS: Readonly<Record<string, string>> = {
  'swagger-ui.css': 'text/css; charset=utf-8',
  'swagger-ui-bundle.js': 'text/javascript; charset=utf-8',
  'favicon-32x32.png': 'image/png',
};

const DOCS_HTML = `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>loraserve API</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"><link rel="icon" type="image/png" href="/docs/favicon-32x32.png">
</head><body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script><script src="/docs/init.js"></script>
</body></html>
`;

// a file, not an inline script, so the page's CSP can forbid inline scripts
const DOCS_INIT = `window.ui = SwaggerUIBundle({ url: '/openapi.yaml', dom_id: '#swagger-ui', deepLinking: true, tryItOutEnabled: true, persistAuthorization: true, validatorUrl: null });\n`;

// Swagger UI sets inline styles and data: images; everything else comes from this server
const DOCS_CSP = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; connect-src 'self'; font-src 'self' data:";

function swaggerUiDir(): string {
  const require = createRequire(import.meta.url);
  return path.dirname(require.resolve('swagger-ui-dist/package.json'));
}

export interface RegisteredRoute {
  method: string;
  url: string;
}

export interface OpenApiState {
  doc: OpenApiDoc;
  /** every route registered after this plugin (HEAD twins of GET routes left out) */
  routes: RegisteredRoute[];
  /** registered routes the contract lacks */
  undocumented(): RegisteredRoute[];
}

declare module 'fastify' {
  interface FastifyInstance {
    openapi: OpenApiState;
  }
}

/**
 * Fastify plugin: GET /openapi.yaml, GET /docs and its assets. Not encapsulated (skip-override): it records
 * every route registered after it, and at start logs a warning for each one openapi.yaml lacks.
 */
async function openApiPlugin(app: FastifyInstance, opts: { file?: string } = {}): Promise<void> {
  const { text, doc } = loadOpenApi(opts.file);
  const uiDir = swaggerUiDir();
  const assets = new Map<string, Promise<Buffer>>();
  const routes: RegisteredRoute[] = [];
  app.addHook('onRoute', (r) => {
    for (const m of Array.isArray(r.method) ? r.method : [r.method]) routes.push({ method: m.toUpperCase(), url: r.url });
  });
  const state: OpenApiState = {
    doc,
    routes,
    undocumented: () => {
      const gets = new Set(routes.filter((r) => r.method === 'GET').map((r) => r.url));
      return routes.filter((r) => !(r.method === 'HEAD' && gets.has(r.url)) && !findOperation(doc, r.method, r.url));
    },
  };
  app.decorate('openapi', state);
  app.addHook('onReady', async () => {
    for (const r of state.undocumented()) app.log.warn({ method: r.method, url: r.url }, 'route missing from openapi.yaml');
  });
  app.get('/openapi.yaml', async (_request, reply) => reply.type('application/yaml; charset=utf-8').send(text));
  app.get('/docs', async (_request, reply) => reply.type('text/html; charset=utf-8').header('content-security-policy', DOCS_CSP).send(DOCS_HTML));
  app.get<{ Params: { asset: string } }>('/docs/:asset', async (request, reply) => {
    const name = request.params.asset;
    if (name === 'init.js') return reply.type('text/javascript; charset=utf-8').send(DOCS_INIT);
    const type = Object.hasOwn(DOCS_ASSETS, name) ? DOCS_ASSETS[name] : undefined;
    if (!type) throw notFound(`no docs asset ${JSON.stringify(name)}`);
    let bytes = assets.get(name);
    if (!bytes) assets.set(name, (bytes = readFile(path.join(uiDir, name))));
    return reply.type(type).header('cache-control', 'public, max-age=86400').send(await bytes);
  });
}
(openApiPlugin as unknown as Record<symbol, boolean>)[Symbol.for('skip-override')] = true;

export default openApiPlugin;
