import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { Config } from './config.js';
import { HttpProblem, sendProblem } from './http/problem.js';

/**
 * Graceful shutdown.
 *
 * SIGTERM/SIGINT: readiness goes 503 at once (the load balancer stops sending), every route except
 * /healthz, /readyz and /metrics answers 503 with Retry-After, requests still queued for a batch
 * slot (not started) get a 503 with Retry-After, and the requests already running — streams
 * included — get up to DRAIN_TIMEOUT_MS to finish. Then streams still open end with an `error`
 * event, the server closes (connections still open are cut), the engine stops, and the process
 * exits 0.
 */

/** Routes that keep answering while draining: probes and the scrape that watches the drain. */
export const DRAIN_EXEMPT: ReadonlySet<string> = new Set(['/healthz', '/readyz', '/metrics']);

/** Seconds a refused client should wait: by then this replica is gone and another one answers. */
export const DRAIN_RETRY_AFTER_S = 5;

export interface InFlight {
  /** requests accepted and not yet finished (exempt routes not counted) */
  readonly count: number;
}

/**
 * The event streams being written: at the drain deadline each is ended with a final `error`
 * event (a 503 problem) before the connections are closed, so a client can tell a cut stream
 * from a finished one.
 */
export class ActiveStreams {
  private readonly cuts = new Set<(p: HttpProblem) => Promise<void>>();

  get size(): number {
    return this.cuts.size;
  }

  /** Lists a stream; `cut` ends it with the problem. Returns the function that unlists it. */
  add(cut: (p: HttpProblem) => Promise<void>): () => void {
    this.cuts.add(cut);
    return () => this.cuts.delete(cut);
  }

  /** Cuts every listed stream; resolves when their last bytes were handed to the sockets, or after `waitMs`. */
  async cutAll(p: HttpProblem, waitMs = 2000): Promise<void> {
    const all = Promise.all([...this.cuts].map((cut) => cut(p).catch(() => undefined)));
    this.cuts.clear();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([all, new Promise<void>((r) => (timer = setTimeout(r, waitMs)))]);
    clearTimeout(timer);
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    inFlight: InFlight;
    activeStreams: ActiveStreams;
  }
}

function pathOf(request: FastifyRequest): string {
  return request.routeOptions.url ?? request.url.split('?', 1)[0]!;
}

/**
 * Fastify plugin (not encapsulated): refuses new work while `app.runtime.draining`, and counts
 * the requests in flight so the drain can wait for them — a request between acceptance and its
 * engine submission (tokenizing, uploading) is not visible in the engine's stats yet.
 */
export async function drainGuard(app: FastifyInstance): Promise<void> {
  const state = { count: 0 };
  app.decorate('activeStreams', new ActiveStreams());
  app.decorate('inFlight', {
    get count() {
      return state.count;
    },
  });
  app.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    if (DRAIN_EXEMPT.has(pathOf(request))) return;
    if (app.runtime.draining) {
      reply.header('connection', 'close');
      return sendProblem(
        reply,
        new HttpProblem(503, 'Service Unavailable', 'draining: this replica is shutting down; retry on another one', {}, { 'retry-after': String(DRAIN_RETRY_AFTER_S) }),
      );
    }
    state.count++;
    // 'close' fires once for every response, finished, streamed or broken off
    reply.raw.once('close', () => state.count--);
  });
}
(drainGuard as unknown as Record<symbol, boolean>)[Symbol.for('skip-override')] = true;

export interface DrainOptions {
  timeoutMs: number;
  log: Pick<Logger, 'info' | 'warn' | 'error'>;
  /** how often to look; default 50 ms */
  pollMs?: number;
}

/**
 * Sets draining, waits until the engine is idle and no request is in flight (or the deadline),
 * cuts what is still open, and closes the app (its onClose hooks stop the engine). Returns
 * whether everything finished before the deadline. Separate from the signal handling so it can
 * be tested without killing the test process.
 */
export async function drain(app: FastifyInstance, opts: DrainOptions): Promise<boolean> {
  const { timeoutMs, log, pollMs = 50 } = opts;
  app.runtime.draining = true;
  // requests still waiting for a batch slot have not started: a 503 now lets them retry elsewhere
  app.runtime.engine.shedWaiting();
  const deadline = Date.now() + timeoutMs;
  const busy = () => {
    const s = app.runtime.engine.stats();
    const inFlight = app.hasDecorator('inFlight') ? app.inFlight.count : 0;
    return { running: s.running, waiting: s.waiting, inFlight, idle: s.running + s.waiting === 0 && inFlight === 0 };
  };
  let b = busy();
  while (!b.idle && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, pollMs));
    b = busy();
  }
  if (!b.idle) {
    log.warn({ running: b.running, waiting: b.waiting, inFlight: b.inFlight, drainTimeoutMs: timeoutMs }, 'drain deadline passed: cutting the remaining requests');
    if (app.hasDecorator('activeStreams')) {
      await app.activeStreams.cutAll(
        new HttpProblem(503, 'Service Unavailable', `the drain deadline (DRAIN_TIMEOUT_MS ${timeoutMs} ms) passed: this replica is stopping and cut the stream`, {}, { 'retry-after': String(DRAIN_RETRY_AFTER_S) }),
      );
    }
    app.server.closeAllConnections?.();
  } else {
    // keep-alive connections with nothing in flight would hold server.close() open
    app.server.closeIdleConnections?.();
  }
  try {
    await app.close();
  } catch (err) {
    log.error({ err }, 'error while closing');
  }
  return b.idle;
}

/** SIGTERM/SIGINT → drain → exit 0. A second signal while draining is ignored (the deadline bounds the wait). */
export function installShutdown(app: FastifyInstance, config: Config, log: Logger): void {
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info({ signal, drainTimeoutMs: config.DRAIN_TIMEOUT_MS }, 'draining');
    try {
      const clean = await drain(app, { timeoutMs: config.DRAIN_TIMEOUT_MS, log });
      log.info({ clean }, 'stopped');
      process.exit(0);
    } catch (err) {
      // the drain itself failed (e.g. the engine died): say so, and let the supervisor see it
      log.error({ err }, 'shutdown failed');
      process.exit(1);
    }
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}
