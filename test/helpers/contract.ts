import { Ajv2020, type ValidateFunction } from 'ajv/dist/2020.js';
import { findOperation, toOpenApiPath, type OpenApiDoc } from '../../src/http/openapi.js';

/**
 * Real responses against openapi.yaml, with a real JSON Schema 2020-12 validator (Ajv, the one
 * @apidevtools/swagger-parser builds on; OpenAPI 3.1 schemas are JSON Schema 2020-12). The
 * document's components are registered once under the id `openapi.json`, and every schema met in
 * the paths has its local `#/…` references pointed there.
 */

export interface ObservedResponse {
  method: string;
  /** the route as Fastify knows it (`/v1/adapters/:name`) or as OpenAPI writes it */
  route: string;
  status: number;
  contentType: string | undefined;
  body: string;
}

const DOC_ID = 'openapi.json';

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** a copy of a schema (or response) whose local refs point into the registered document */
function anchored(node: unknown): unknown {
  if (Array.isArray(node)) return node.map(anchored);
  if (!isObject(node)) return node;
  return Object.fromEntries(Object.entries(node).map(([k, v]) => [k, k === '$ref' && typeof v === 'string' && v.startsWith('#/') ? `${DOC_ID}${v}` : anchored(v)]));
}

export class Contract {
  private readonly ajv: Ajv2020;
  private readonly compiled = new Map<string, ValidateFunction>();

  constructor(readonly doc: OpenApiDoc) {
    // strict off: OpenAPI adds keywords (example, discriminator, x-…) that are annotations to a JSON Schema validator
    this.ajv = new Ajv2020({ strict: false, allErrors: true, validateFormats: false });
    this.ajv.addSchema({ $id: DOC_ID, components: doc.components ?? {} });
  }

  /** a `$ref`'d response or media object, followed to its target */
  private deref(node: unknown): unknown {
    let n = node;
    for (let hops = 0; isObject(n) && typeof n.$ref === 'string'; hops++) {
      if (hops > 20) throw new Error('$ref cycle');
      n = n.$ref
        .slice(2)
        .split('/')
        .reduce<unknown>((at, key) => (isObject(at) ? at[key.replace(/~1/g, '/').replace(/~0/g, '~')] : undefined), this.doc);
    }
    return n;
  }

  /** every way `value` breaks `schema` (a schema from the document), as "path: reason" lines */
  validate(schema: unknown, value: unknown, where = '$'): string[] {
    const key = JSON.stringify(schema);
    let fn = this.compiled.get(key);
    if (!fn) this.compiled.set(key, (fn = this.ajv.compile(anchored(schema) as object)));
    if (fn(value)) return [];
    return (fn.errors ?? []).map((e) => `${where}${e.instancePath}: ${e.message ?? e.keyword} ${JSON.stringify(e.params)}`);
  }

  /**
   * The status must be documented for the operation (exactly, as 4XX/5XX, or `default`), the
   * content type must be one it lists, and a JSON body must validate against that media type's
   * schema. A text/event-stream body is checked event by event against the media type's
   * `x-event-schema` (the `[DONE]` sentinel excepted). Returns the problems; [] when it conforms.
   */
  check(r: ObservedResponse): string[] {
    const where = `${r.method.toUpperCase()} ${toOpenApiPath(r.route)} → ${r.status}`;
    const op = findOperation(this.doc, r.method, r.route);
    if (!op) return [`${where}: the operation is not in openapi.yaml`];
    const responses = op.responses ?? {};
    const key = [String(r.status), `${String(r.status)[0]}XX`, 'default'].find((k) => k in responses);
    if (!key) return [`${where}: status ${r.status} is not documented (documented: ${Object.keys(responses).join(', ')})`];
    const response = this.deref(responses[key]);
    if (!isObject(response)) return [`${where}: response ${key} is not an object`];
    const content = isObject(response.content) ? response.content : null;
    if (!content) return r.body.length === 0 ? [] : [`${where}: a body was sent but the contract documents none`];
    const mediaType = (r.contentType ?? '').split(';')[0]!.trim().toLowerCase();
    const media = this.deref(content[mediaType]);
    if (!isObject(media)) return [`${where}: content type ${JSON.stringify(mediaType)} is not documented (documented: ${Object.keys(content).join(', ')})`];
    if (mediaType === 'application/json' || mediaType.endsWith('+json')) {
      let body: unknown;
      try {
        body = JSON.parse(r.body);
      } catch {
        return [`${where}: the body is not JSON`];
      }
      return this.validate(media.schema ?? true, body, `${where}: $`);
    }
    if (mediaType === 'text/event-stream') {
      const errors: string[] = [];
      const events = r.body.split(/\n\n/).filter((e) => e.trim() !== '');
      if (events.length === 0) errors.push(`${where}: an empty event stream`);
      for (const ev of events) {
        const lines = ev.split('\n');
        const data = lines
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
        // an `error` event carries the problem body, documented by the route's error responses
        const isError = lines.some((l) => l.trim() === 'event: error');
        const schema = isError ? { $ref: '#/components/schemas/Problem' } : media['x-event-schema'];
        errors.push(...this.validate(schema, parsed, `${where}: $event`));
      }
      return errors;
    }
    return [];
  }
}
