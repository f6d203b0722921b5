import { existsSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import type { FastifyInstance } from 'fastify';
import { parse as parseYaml } from 'yaml';

/**
 * The API contract, openapi.yaml at the repository root: served verbatim at /openapi.yaml,
 * rendered at /docs as a self-contained HTML page (no scripts, no CDN: the service runs on
 * offline machines), and used by the tests to check that every route is documented and that real
 * responses match their documented schemas (`checkResponse`).
 */

export type JsonSchema = { [keyword: string]: unknown };

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

/** Resolves a local `#/a/b` reference. */
export function resolveRef(doc: OpenApiDoc, ref: string): unknown {
  if (!ref.startsWith('#/')) throw new Error(`only local $refs are supported: ${ref}`);
  let node: unknown = doc;
  for (const raw of ref.slice(2).split('/')) {
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (!isObject(node) || !(key in node)) throw new Error(`unresolvable $ref ${ref}`);
    node = node[key];
  }
  return node;
}

function deref(doc: OpenApiDoc, node: unknown): unknown {
  let n = node;
  for (let hops = 0; isObject(n) && typeof n.$ref === 'string'; hops++) {
    if (hops > 20) throw new Error('$ref cycle');
    n = resolveRef(doc, n.$ref);
  }
  return n;
}

// ---------------------------------------------------------------------------------------------
// A JSON Schema (2020-12, as OpenAPI 3.1 uses it) validator for the keywords openapi.yaml uses.
// Any other keyword throws, so the contract cannot say something these checks silently skip.

export const ANNOTATIONS: ReadonlySet<string> = new Set(['description', 'title', 'example', 'examples', 'default', 'format', 'deprecated', 'readOnly', 'writeOnly', 'discriminator', '$comment', 'contentMediaType', 'externalDocs']);
export const VALIDATION: ReadonlySet<string> = new Set(['$ref', 'type', 'enum', 'const', 'properties', 'required', 'additionalProperties', 'items', 'minItems', 'maxItems', 'minimum', 'maximum', 'exclusiveMinimum', 'exclusiveMaximum', 'minLength', 'maxLength', 'pattern', 'oneOf', 'anyOf', 'allOf', 'minProperties']);

function typeOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'integer' : 'number';
  return typeof v;
}

function deepEqual(a: unknown, b: unknown): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

/** Every way `value` breaks `schema`, as "path: reason" lines; [] when it conforms. */
export function validateSchema(doc: OpenApiDoc, schema: unknown, value: unknown, path = '$'): string[] {
  if (schema === true || schema === undefined) return [];
  if (schema === false) return [`${path}: no value is allowed here`];
  if (!isObject(schema)) throw new Error(`${path}: a schema must be an object`);
  for (const k of Object.keys(schema)) {
    if (!VALIDATION.has(k) && !ANNOTATIONS.has(k) && !k.startsWith('x-')) throw new Error(`schema keyword "${k}" at ${path} is not supported by validateSchema`);
  }
  const errors: string[] = [];
  if (typeof schema.$ref === 'string') errors.push(...validateSchema(doc, resolveRef(doc, schema.$ref), value, path));

  const actual = typeOf(value);
  if (schema.type !== undefined) {
    const types = Array.isArray(schema.type) ? (schema.type as string[]) : [schema.type as string];
    const ok = types.some((t) => t === actual || (t === 'number' && actual === 'integer'));
    if (!ok) return [...errors, `${path}: expected ${types.join(' | ')}, got ${actual}`];
  }
  if (Array.isArray(schema.enum) && !schema.enum.some((e) => deepEqual(e, value))) errors.push(`${path}: ${JSON.stringify(value)} is not one of ${JSON.stringify(schema.enum)}`);
  if ('const' in schema && !deepEqual(schema.const, value)) errors.push(`${path}: expected ${JSON.stringify(schema.const)}`);

  if (actual === 'object') {
    const obj = value as Record<string, unknown>;
    const props = isObject(schema.properties) ? schema.properties : {};
    for (const r of (schema.required as string[] | undefined) ?? []) if (!(r in obj)) errors.push(`${path}: required property "${r}" is missing`);
    if (typeof schema.minProperties === 'number' && Object.keys(obj).length < schema.minProperties) errors.push(`${path}: fewer than ${schema.minProperties} properties`);
    for (const [k, v] of Object.entries(obj)) {
      if (k in props) errors.push(...validateSchema(doc, props[k], v, `${path}.${k}`));
      else if (schema.additionalProperties !== undefined) errors.push(...validateSchema(doc, schema.additionalProperties, v, `${path}.${k}`));
    }
  }
  if (actual === 'array') {
    const arr = value as unknown[];
    if (typeof schema.minItems === 'number' && arr.length < schema.minItems) errors.push(`${path}: fewer than ${schema.minItems} items`);
    if (typeof schema.maxItems === 'number' && arr.length > schema.maxItems) errors.push(`${path}: more than ${schema.maxItems} items`);
    if (schema.items !== undefined) arr.forEach((v, i) => errors.push(...validateSchema(doc, schema.items, v, `${path}[${i}]`)));
  }
  if (actual === 'integer' || actual === 'number') {
    const n = value as number;
    if (typeof schema.minimum === 'number' && n < schema.minimum) errors.push(`${path}: ${n} < minimum ${schema.minimum}`);
    if (typeof schema.maximum === 'number' && n > schema.maximum) errors.push(`${path}: ${n} > maximum ${schema.maximum}`);
    if (typeof schema.exclusiveMinimum === 'number' && n <= schema.exclusiveMinimum) errors.push(`${path}: ${n} <= exclusiveMinimum ${schema.exclusiveMinimum}`);
    if (typeof schema.exclusiveMaximum === 'number' && n >= schema.exclusiveMaximum) errors.push(`${path}: ${n} >= exclusiveMaximum ${schema.exclusiveMaximum}`);
  }
  if (actual === 'string') {
    const s = value as string;
    if (typeof schema.minLength === 'number' && s.length < schema.minLength) errors.push(`${path}: shorter than ${schema.minLength}`);
    if (typeof schema.maxLength === 'number' && s.length > schema.maxLength) errors.push(`${path}: longer than ${schema.maxLength}`);
    if (typeof schema.pattern === 'string' && !new RegExp(schema.pattern, 'u').test(s)) errors.push(`${path}: does not match /${schema.pattern}/`);
  }
  if (Array.isArray(schema.allOf)) for (const s of schema.allOf) errors.push(...validateSchema(doc, s, value, path));
  if (Array.isArray(schema.anyOf) && !schema.anyOf.some((s) => validateSchema(doc, s, value, path).length === 0)) {
    errors.push(`${path}: matches none of anyOf (${schema.anyOf.map((s) => validateSchema(doc, s, value, path)[0]).join('; ')})`);
  }
  if (Array.isArray(schema.oneOf)) {
    const results = schema.oneOf.map((s) => validateSchema(doc, s, value, path));
    const passing = results.filter((r) => r.length === 0).length;
    if (passing !== 1) errors.push(`${path}: matches ${passing} of oneOf, exactly 1 expected${passing === 0 ? ` (${results.map((r) => r[0]).join('; ')})` : ''}`);
  }
  return errors;
}

// ---------------------------------------------------------------------------------------------

export interface ObservedResponse {
  method: string;
  /** the route as Fastify knows it (`/v1/adapters/:name`) or as OpenAPI writes it */
  route: string;
  status: number;
  contentType: string | undefined;
  body: string;
}

/** The operation object of a method + route; null when the contract lacks it. */
export function findOperation(doc: OpenApiDoc, method: string, route: string): OpenApiOperation | null {
  const item = doc.paths[toOpenApiPath(route)];
  if (!item) return null;
  const op = item[method.toLowerCase()];
  return isObject(op) ? (op as unknown as OpenApiOperation) : null;
}

/**
 * Checks a real response against the contract: the status must be documented for the operation
 * (exactly, or as 4XX/5XX, or `default`), the content type must be one it lists, and a JSON body
 * must validate against that media type's schema. A text/event-stream body is checked event by
 * event against the media type's `x-event-schema` (the `[DONE]` sentinel excepted).
 * Returns the problems found; [] when the response conforms.
 */
export function checkResponse(doc: OpenApiDoc, r: ObservedResponse): string[] {
  const where = `${r.method.toUpperCase()} ${toOpenApiPath(r.route)} → ${r.status}`;
  const op = findOperation(doc, r.method, r.route);
  if (!op) return [`${where}: the operation is not in openapi.yaml`];
  const responses = op.responses ?? {};
  const key = [String(r.status), `${String(r.status)[0]}XX`, 'default'].find((k) => k in responses);
  if (!key) return [`${where}: status ${r.status} is not documented (documented: ${Object.keys(responses).join(', ')})`];
  const response = deref(doc, responses[key]);
  if (!isObject(response)) return [`${where}: response ${key} is not an object`];
  const content = isObject(response.content) ? response.content : null;
  if (!content) return r.body.length === 0 ? [] : [`${where}: a body was sent but the contract documents none`];
  const mediaType = (r.contentType ?? '').split(';')[0]!.trim().toLowerCase();
  const media = deref(doc, content[mediaType]);
  if (!isObject(media)) return [`${where}: content type ${JSON.stringify(mediaType)} is not documented (documented: ${Object.keys(content).join(', ')})`];
  if (mediaType === 'application/json' || mediaType.endsWith('+json')) {
    let body: unknown;
    try {
      body = JSON.parse(r.body);
    } catch {
      return [`${where}: the body is not JSON`];
    }
    return validateSchema(doc, media.schema, body).map((e) => `${where}: ${e}`);
  }
  if (mediaType === 'text/event-stream') {
    const errors: string[] = [];
    const events = r.body.split(/\n\n/).filter((e) => e.trim() !== '');
    if (events.length === 0) errors.push(`${where}: an empty event stream`);
    for (const ev of events) {
      const data = ev
        .split('\n')
        .filter((l) => l.startsWith('data:'))
        .map((l) => l.slice(5).trimStart())
        .join('\n');
      if (data === '' || data === '[DONE]' || media['x-event-schema'] === undefined) continue;
      let parsed: unknown;
      try {
        parsed = JSON.parse(data);
      } catch {
        errors.push(`${where}: event data is not JSON: ${data.slice(0, 80)}`);
        continue;
      }
      errors.push(...validateSchema(doc, media['x-event-schema'], parsed, '$event').map((e) => `${where}: ${e}`));
    }
    return errors;
  }
  return [];
}

// ---------------------------------------------------------------------------------------------
// /docs: the contract as one readable, linked HTML page, rendered once at start.

const esc = (s: unknown): string =>
  String(s ?? '')
    .replace(/&/g, '&amp;')
    .replace(/</g, '&lt;')
    .replace(/>/g, '&gt;')
    .replace(/"/g, '&quot;');

const anchor = (s: string) => s.replace(/[^A-Za-z0-9_-]+/g, '-');

/** Paragraphs from a description (blank-line separated), `code` spans kept readable. */
function prose(text: unknown): string {
  if (typeof text !== 'string' || text.trim() === '') return '';
  return text
    .trim()
    .split(/\n\s*\n/)
    .map((p) => `<p>${esc(p).replace(/`([^`]+)`/g, '<code>$1</code>')}</p>`)
    .join('');
}

function schemaSummary(doc: OpenApiDoc, s: unknown): string {
  if (s === undefined || s === true) return 'any';
  if (!isObject(s)) return esc(JSON.stringify(s));
  if (typeof s.$ref === 'string') {
    const name = s.$ref.split('/').pop()!;
    return `<a href="#schema-${anchor(name)}">${esc(name)}</a>`;
  }
  if (Array.isArray(s.oneOf)) return `one of: ${s.oneOf.map((x) => schemaSummary(doc, x)).join(' | ')}`;
  if (Array.isArray(s.anyOf)) return `any of: ${s.anyOf.map((x) => schemaSummary(doc, x)).join(' | ')}`;
  if (Array.isArray(s.allOf)) return `all of: ${s.allOf.map((x) => schemaSummary(doc, x)).join(' & ')}`;
  if (Array.isArray(s.enum)) return s.enum.map((e) => `<code>${esc(JSON.stringify(e))}</code>`).join(' | ');
  if ('const' in s) return `<code>${esc(JSON.stringify(s.const))}</code>`;
  const type = Array.isArray(s.type) ? s.type.join(' | ') : String(s.type ?? 'any');
  if (s.type === 'array' || (Array.isArray(s.type) && s.type.includes('array'))) return `${esc(type.replace('array', 'array of'))} ${schemaSummary(doc, s.items)}`;
  if (isObject(s.properties)) return `${esc(type)} {${Object.keys(s.properties).map(esc).join(', ')}}`;
  return esc(type);
}

function propertiesTable(doc: OpenApiDoc, s: Record<string, unknown>): string {
  const props = isObject(s.properties) ? s.properties : null;
  if (!props) return '';
  const required = new Set((s.required as string[] | undefined) ?? []);
  const rows = Object.entries(props)
    .map(([name, p]) => {
      const desc = isObject(p) ? p.description : undefined;
      return `<tr><td><code>${esc(name)}</code>${required.has(name) ? ' <span class="req">required</span>' : ''}</td><td>${schemaSummary(doc, p)}</td><td>${esc(desc ?? '')}</td></tr>`;
    })
    .join('');
  return `<table><thead><tr><th>field</th><th>type</th><th>meaning</th></tr></thead><tbody>${rows}</tbody></table>`;
}

function contentList(doc: OpenApiDoc, content: unknown): string {
  if (!isObject(content)) return '';
  return Object.entries(content)
    .map(([type, m]) => {
      const media = deref(doc, m);
      const schema = isObject(media) ? media.schema : undefined;
      const events = isObject(media) && media['x-event-schema'] !== undefined ? `; events: ${schemaSummary(doc, media['x-event-schema'])}` : '';
      return `<div class="media"><code>${esc(type)}</code>: ${schemaSummary(doc, schema)}${events}</div>`;
    })
    .join('');
}

export function renderDocsHtml(doc: OpenApiDoc): string {
  const ops: { method: string; path: string; op: OpenApiOperation }[] = [];
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const m of HTTP_METHODS) if (isObject(item[m])) ops.push({ method: m, path, op: item[m] as unknown as OpenApiOperation });
  }
  const opId = (o: (typeof ops)[number]) => `op-${anchor(o.op.operationId ?? `${o.method}-${o.path}`)}`;
  const tags = [...new Set(ops.map((o) => o.op.tags?.[0] ?? 'other'))];

  const toc = tags
    .map((t) => `<li>${esc(t)}<ul>${ops.filter((o) => (o.op.tags?.[0] ?? 'other') === t).map((o) => `<li><a href="#${opId(o)}"><span class="m m-${o.method}">${o.method.toUpperCase()}</span> ${esc(o.path)}</a> ${esc(o.op.summary ?? '')}</li>`).join('')}</ul></li>`)
    .join('');

  const body = ops
    .map((o) => {
      const params = (o.op.parameters ?? []).map((p) => deref(doc, p)).filter(isObject);
      const paramTable = params.length
        ? `<h4>parameters</h4><table><thead><tr><th>name</th><th>in</th><th>type</th><th>meaning</th></tr></thead><tbody>${params
            .map((p) => `<tr><td><code>${esc(p.name)}</code>${p.required ? ' <span class="req">required</span>' : ''}</td><td>${esc(p.in)}</td><td>${schemaSummary(doc, p.schema)}</td><td>${esc(p.description ?? '')}</td></tr>`)
            .join('')}</tbody></table>`
        : '';
      const rb = deref(doc, o.op.requestBody);
      const reqBody = isObject(rb) ? `<h4>request body${rb.required ? ' (required)' : ''}</h4>${prose(rb.description)}${contentList(doc, rb.content)}` : '';
      const responses = Object.entries(o.op.responses ?? {})
        .map(([status, r]) => {
          const res = deref(doc, r);
          const desc = isObject(res) ? res.description : '';
          return `<tr><td><code>${esc(status)}</code></td><td>${esc(desc)}${isObject(res) ? contentList(doc, res.content) : ''}</td></tr>`;
        })
        .join('');
      const scheme = (name: string) => {
        const d = deref(doc, doc.components?.securitySchemes?.[name]);
        return isObject(d) && typeof d.description === 'string' ? `${esc(name)} (${esc(d.description)})` : esc(name);
      };
      const auth = o.op.security === undefined ? '' : o.op.security.length === 0 ? '<p class="auth">no key needed</p>' : `<p class="auth">Authorization: Bearer — ${o.op.security.map((s) => Object.keys(s).map(scheme).join(' + ')).join(' or ')}</p>`;
      return `<section id="${opId(o)}"><h3><span class="m m-${o.method}">${o.method.toUpperCase()}</span> <code>${esc(o.path)}</code></h3><p><strong>${esc(o.op.summary ?? '')}</strong></p>${auth}${prose(o.op.description)}${paramTable}${reqBody}<h4>responses</h4><table><tbody>${responses}</tbody></table></section>`;
    })
    .join('');

  const schemas = isObject(doc.components?.schemas) ? (doc.components.schemas as Record<string, unknown>) : {};
  const schemaHtml = Object.entries(schemas)
    .map(([name, s]) => {
      const sch = isObject(s) ? s : {};
      return `<section id="schema-${anchor(name)}"><h3>${esc(name)}</h3>${prose(sch.description)}<p>${schemaSummary(doc, { ...sch, description: undefined, properties: undefined, ...(isObject(sch.properties) ? { type: sch.type ?? 'object' } : {}) })}</p>${propertiesTable(doc, sch)}</section>`;
    })
    .join('');

  return `<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>${esc(doc.info.title)} ${esc(doc.info.version)} — API</title>
<style>
body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#1b1b1b}
code{font:13px ui-monospace,monospace;background:#f2f2f2;padding:0 .2em;border-radius:3px}
table{border-collapse:collapse;width:100%;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.3rem .5rem;text-align:left;vertical-align:top}
section{border-top:1px solid #ccc;padding-top:.5rem;margin-top:1.5rem}.m{font:bold 12px ui-monospace,monospace;padding:.1em .4em;border-radius:3px;color:#fff;background:#555}
.m-get{background:#1f6feb}.m-post{background:#2da44e}.m-put{background:#bf8700}.m-delete{background:#cf222e}.req{color:#cf222e;font-size:12px}.auth{color:#555;font-size:13px}.media{margin:.2rem 0}
</style></head><body>
<h1>${esc(doc.info.title)} <small>${esc(doc.info.version)}</small></h1>
${prose(doc.info.description)}
<p>Machine-readable contract: <a href="/openapi.yaml">/openapi.yaml</a> (OpenAPI ${esc(doc.openapi)}).</p>
<h2>Routes</h2><ul>${toc}</ul>
${body}
<h2>Schemas</h2>
${schemaHtml}
</body></html>
`;
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
 * Fastify plugin: GET /openapi.yaml and GET /docs. Not encapsulated (skip-override): it records
 * every route registered after it, and at start logs a warning for each one openapi.yaml lacks.
 */
async function openApiPlugin(app: FastifyInstance, opts: { file?: string } = {}): Promise<void> {
  const { text, doc } = loadOpenApi(opts.file);
  const html = renderDocsHtml(doc);
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
  app.get('/docs', async (_request, reply) => reply.type('text/html; charset=utf-8').header('content-security-policy', "default-src 'none'; style-src 'unsafe-inline'").send(html));
}
(openApiPlugin as unknown as Record<symbol, boolean>)[Symbol.for('skip-override')] = true;

export default openApiPlugin;
