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

export class HttpProblem extends Error {
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

  body(): ProblemBody {
    return { type: `https://loraserve.dev/problems/${slug(this.title)}`, title: this.title, status: this.status, detail: this.message, ...this.extra };
  }
}

const slug = (s: string) => s.toLowerCase().replace(/[^a-z0-9]+/g, '-').replace(/^-|-$/g, '');

export const badRequest = (detail: string, extra?: Record<string, unknown>) => new HttpProblem(400, 'Bad Request', detail, extra);
export const notFound = (detail: string) => new HttpProblem(404, 'Not Found', detail);
export const conflict = (detail: string, extra?: Record<string, unknown>) => new HttpProblem(409, 'Conflict', detail, extra);

export function sendProblem(reply: FastifyReply, p: HttpProblem): FastifyReply {
  for (const [k, v] of Object.entries(p.headers)) reply.header(k, v);
  return reply.code(p.status).type('application/problem+json').send(p.body());
}

/** Zod issues → one readable 400. */
export function zodProblem(issues: readonly { path: readonly PropertyKey[]; message: string }[]): HttpProblem {
  const lines = issues.map((i) => `${i.path.map(String).join('.') || '(body)'}: ${i.message}`);
  return badRequest(`invalid request: ${lines.join('; ')}`, { issues: lines });
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
