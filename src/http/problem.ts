import type { FastifyError, FastifyInstance, FastifyReply } from 'fastify';

/**
 * RFC 9457 problem details. Every error the service returns is one of these, with
 * content-type application/problem+json; extra members (e.g. a validation report's errors[] and
 * warnings[]) sit beside the standard ones.
 */
export interface ProblemBody {
  type: string;
  title: string;
  status: number;
  detail: string;
  [extra: string]: unknown;
}

/**
 * OpenAI's error object. The OpenAI SDKs read `body.error.message` (else they report "400 status
 * code (no body)"), and `param`/`code` become the exception's fields, so errors of the OpenAI
 * routes carry this member beside the problem+json ones.
 */
export interface OpenAiError {
  message: string;
  type: string;
  param: string | null;
  code: string | null;
}

export class HttpProblem extends Error {
  /** the request field at fault (OpenAI's `param`), e.g. `model`, `messages.0.role` */
  param: string | null = null;
  /** a stable machine-readable code (OpenAI's `code`), e.g. `model_not_found` */
  code: string | null = null;

  constructor(
    readonly status: number,
    readonly title: string,
    detail: string,
    readonly extra: Record<string, unknown> = {},
    readonly headers: Record<string, string> = {},
  ) {
    super(detail);
    this.name = 'HttpProblem';
  }

  /** Names the field at fault and a stable code; returns this, for `throw badRequest(…).about(…)`. */
  about(param: string | null, code: string | null): this {
    this.param = param;
    this.code = code;
    return this;
  }

  body(): ProblemBody {
    return { type: `https://loraserve.dev/problems/${slug(this.title)}`, title: this.title, status: this.status, detail: this.message, ...this.extra };
  }

  openAiError(): OpenAiError {
    return { message: this.message, type: openAiType(this.status), param: this.param, code: this.code };
  }
}

/** OpenAI's error `type` for a status, as its API reports them. */
function openAiType(status: number): string {
  if (status === 401) return 'authentication_error';
  if (status === 403) return 'permission_error';
  if (status === 429) return 'rate_limit_error';
  if (status >= 500) return 'server_error';
  return 'invalid_request_error';
}

/** The routes an OpenAI client calls; their errors carry OpenAI's `error` member too. */
export function isOpenAiRoute(url: string): boolean {
  return /^\/v1\/(completions|chat\/completions|models)(\/|\?|$)/.test(url);
}

/** The problem's JSON body; on an OpenAI route it also carries OpenAI's `error` object. */
export function problemBody(p: HttpProblem, url: string): ProblemBody {
  return isOpenAiRoute(url) ? { ...p.body(), error: p.openAiError() } : p.body();
}

const slug = (s: string) => s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');

export const badRequest = (detail: string, extra?: Record<string, unknown>) => new HttpProblem(400, 'Bad Request', detail, extra);
export const notFound = (detail: string) => new HttpProblem(404, 'Not Found', detail);
export const conflict = (detail: string, extra?: Record<string, unknown>) => new HttpProblem(409, 'Conflict', detail, extra);

export function sendProblem(reply: FastifyReply, p: HttpProblem): FastifyReply {
  for (const [k, v] of Object.entries(p.headers)) reply.header(k, v);
  return reply.code(p.status).type('application/problem+json').send(problemBody(p, reply.request.url));
}

/** Zod issues → one readable 400; the first issue's field is the OpenAI `param`. */
export function zodProblem(issues: readonly { path: readonly PropertyKey[]; message: string; code?: string }[]): HttpProblem {
  const lines = issues.map((i) => `${i.path.map(String).join('.') || '(body)'}: ${i.message}`);
  const first = issues[0];
  const param = first && first.path.length ? first.path.map(String).join('.') : null;
  return badRequest(`invalid request: ${lines.join('; ')}`, { issues: lines }).about(param, first?.code ?? null);
}

/** One central error handler: known problems pass through, framework 4xx keep their status, 5xx never leak internals. */
export function installErrorHandler(app: FastifyInstance): void {
  app.setErrorHandler((err: FastifyError | HttpProblem | Error, request, reply) => {
    if (err instanceof HttpProblem) return sendProblem(reply, err);
    const status = 'statusCode' in err && typeof err.statusCode === 'number' ? err.statusCode : 500;
    if (status >= 400 && status < 500) {
      const title = status === 413 ? 'Payload Too Large' : status === 415 ? 'Unsupported Media Type' : status === 404 ? 'Not Found' : 'Bad Request';
      return sendProblem(reply, new HttpProblem(status, title, err.message));
    }
    request.log.error({ err }, 'unhandled error');
    return sendProblem(reply, new HttpProblem(500, 'Internal Server Error', 'the server failed to handle this request; see its log'));
  });
  app.setNotFoundHandler((request, reply) => sendProblem(reply, notFound(`no route ${request.method} ${request.url}`)));
}
