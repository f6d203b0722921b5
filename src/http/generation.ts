import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Runtime } from '../runtime.js';
import { generateText, type TextDelta, type TextGeneration, type TextRequest, type TextResult } from '../engine/generation.js';
import { ContextLengthError, EngineClosedError, InvalidRequestError, QueueFullError, UnknownAdapterError, type TokenEvent } from '../engine/engine.js';
import { HttpProblem, badRequest, notFound } from './problem.js';

/** What the three generation routes (native, OpenAI completions, OpenAI chat) have in common. */
export interface GenerationCall {
  /** adapter name, or null for the base model */
  adapter: string | null;
  text: Omit<TextRequest, 'adapterVersion'>;
}

/** Optional observers (metrics); the routes work without them. */
export interface GenerationObserver {
  firstToken?(adapter: string | null, seconds: number): void;
  /** `firstTokenSeconds` is on the same clock as `seconds` (absent when no token came) */
  finished?(adapter: string | null, tokens: number, seconds: number, result: TextResult, firstTokenSeconds?: number): void;
}

export function engineProblem(e: unknown): HttpProblem | null {
  if (e instanceof HttpProblem) return e;
  if (e instanceof QueueFullError) {
    return new HttpProblem(429, 'Too Many Requests', e.message, { retry_after: e.retryAfterSeconds }, { 'retry-after': String(e.retryAfterSeconds) });
  }
  if (e instanceof ContextLengthError) {
    return badRequest(e.message, { prompt_tokens: e.promptTokens, context_length: e.contextLength });
  }
  if (e instanceof UnknownAdapterError) return notFound('the adapter was deleted or replaced while this request was submitted; retry');
  if (e instanceof InvalidRequestError) return badRequest(e.message);
  if (e instanceof EngineClosedError) return new HttpProblem(503, 'Service Unavailable', e.message, {}, { 'retry-after': '1' });
  return null;
}

/**
 * Holds the adapter (loading it on this replica first if needed, see AdapterRegistry.acquire) and
 * submits to the engine; the hold ends with the request, so the version is not evicted under it.
 */
export async function startGeneration(runtime: Runtime, call: GenerationCall, signal: AbortSignal): Promise<TextGeneration> {
  const draining = () => new HttpProblem(503, 'Service Unavailable', 'draining: this replica is shutting down', {}, { 'retry-after': '1' });
  if (runtime.draining) throw draining();
  const lease = call.adapter === null ? null : await runtime.registry.acquire(call.adapter);
  try {
    if (runtime.draining) throw draining();
    const gen = generateText({ engine: runtime.engine, tokenizer: runtime.tokenizer }, { ...call.text, adapterVersion: lease?.versionId ?? null }, signal);
    if (lease) void gen.result.then(lease.release, lease.release);
    return gen;
  } catch (e) {
    lease?.release();
    throw engineProblem(e) ?? e;
  }
}

/** OpenAI's usage object, which the native API shares. */
export const usage = (u: { promptTokens: number; completionTokens: number }) => ({
  prompt_tokens: u.promptTokens,
  completion_tokens: u.completionTokens,
  total_tokens: u.promptTokens + u.completionTokens,
});

/** An AbortController that fires when the client goes away before the response is complete. */
export function disconnectSignal(request: FastifyRequest, reply: FastifyReply): AbortController {
  const ac = new AbortController();
  const onClose = () => {
    if (!reply.raw.writableFinished) ac.abort();
  };
  reply.raw.on('close', onClose);
  request.raw.on('aborted', () => ac.abort());
  return ac;
}

export interface Collected {
  text: string;
  tokens: TokenEvent[];
  result: TextResult;
}

/**
 * Runs a generation to its end, handing each delta to `onDelta` and telling the observer when the
 * first token came and how it ended. Engine errors come out as HttpProblems.
 */
async function drive(gen: TextGeneration, adapter: string | null, onDelta: (d: TextDelta) => void, observer?: GenerationObserver): Promise<TextResult> {
  const started = performance.now();
  const elapsed = () => (performance.now() - started) / 1000;
  let firstToken: number | undefined;
  try {
    for await (const d of gen) {
      if (firstToken === undefined && d.tokens.length) {
        firstToken = elapsed();
        observer?.firstToken?.(adapter, firstToken);
      }
      onDelta(d);
    }
    const result = await gen.result;
    observer?.finished?.(adapter, result.usage.completionTokens, elapsed(), result, firstToken);
    return result;
  } catch (e) {
    throw engineProblem(e) ?? e;
  }
}

/** Runs a generation to its end, keeping every token (for non-streamed responses). */
export async function collect(gen: TextGeneration, adapter: string | null, observer?: GenerationObserver): Promise<Collected> {
  const tokens: TokenEvent[] = [];
  const result = await drive(gen, adapter, (d) => tokens.push(...d.tokens), observer);
  return { text: result.text, tokens, result };
}

/**
 * Server-sent events over the raw response. Fastify's reply is hijacked: from here on the
 * route writes the stream itself, and errors after the headers become a final `error` event.
 */
export class EventStream {
  constructor(private readonly reply: FastifyReply) {
    reply.hijack();
    reply.raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
      'x-request-id': String(reply.request.id),
    });
  }

  send(data: unknown, event?: string): void {
    if (this.reply.raw.destroyed) return;
    const payload = typeof data === 'string' ? data : JSON.stringify(data);
    this.reply.raw.write(`${event ? `event: ${event}\n` : ''}data: ${payload}\n\n`);
  }

  end(): void {
    if (!this.reply.raw.destroyed) this.reply.raw.end();
  }
}

/**
 * Streams a generation: `onDelta` turns each delta into events, `onEnd` writes the closing ones.
 * Errors that happen after the stream started are sent as an `error` event carrying the
 * problem+json body.
 */
export async function stream(
  reply: FastifyReply,
  gen: TextGeneration,
  adapter: string | null,
  handlers: { onDelta(d: TextDelta, es: EventStream): void; onEnd(r: TextResult, es: EventStream): void },
  observer?: GenerationObserver,
): Promise<void> {
  const es = new EventStream(reply);
  try {
    const result = await drive(gen, adapter, (d) => handlers.onDelta(d, es), observer);
    handlers.onEnd(result, es);
  } catch (e) {
    const p = e instanceof HttpProblem ? e : new HttpProblem(500, 'Internal Server Error', 'generation failed; see the server log');
    if (p.status >= 500) reply.request.log.error({ err: e }, 'generation failed mid-stream');
    es.send(p.body(), 'error');
  } finally {
    es.end();
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    /** set by the metrics plugin when registered */
    generationObserver: GenerationObserver;
  }
}
