import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Runtime } from '../runtime.js';
import { generateTextChoices, type TextDelta, type TextGeneration, type TextRequest, type TextResult } from '../engine/generation.js';
import { ContextLengthError, EngineClosedError, InvalidRequestError, QueueFullError, UnknownAdapterError, type TokenEvent } from '../engine/engine.js';
import { HttpProblem, badRequest, notFound, problemBody } from './problem.js';

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
 * `n` choices of one prompt (OpenAI's `n`), all admitted or none: the engine prefills the prompt
 * once and copies its KV cache into the n rows. Choice j samples with `seed + j` when a seed is
 * given, so choice 0 is what the same request with n = 1 answers.
 */
export function startChoices(runtime: Runtime, call: GenerationCall, n: number, signal: AbortSignal): TextGeneration[] {
  if (runtime.draining) throw new HttpProblem(503, 'Service Unavailable', 'draining: this replica is shutting down', {}, { 'retry-after': '1' });
  const adapterVersion = call.adapter === null ? null : runtime.registry.resolveForGeneration(call.adapter);
  try {
    return generateTextChoices({ engine: runtime.engine, tokenizer: runtime.tokenizer }, { ...call.text, adapterVersion }, n, signal);
  } catch (e) {
    throw engineProblem(e) ?? e;
  }
}

/**
 * One generation. The adapter is resolved and the request submitted in one synchronous turn, so a
 * concurrent replace/delete cannot unload the version in between (see
 * AdapterRegistry.resolveForGeneration).
 */
export function startGeneration(runtime: Runtime, call: GenerationCall, signal: AbortSignal): TextGeneration {
  return startChoices(runtime, call, 1, signal)[0]!;
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
 * Streams generations side by side (a request's choices): `onDelta` turns each delta of choice
 * `i` into events as it comes, `onEnd` writes the closing ones once all have ended. An error after
 * the stream started is sent as an `error` event carrying the problem body (with OpenAI's
 * `error` member on OpenAI routes), and the other choices are cancelled.
 */
export async function streamAll(
  reply: FastifyReply,
  gens: readonly TextGeneration[],
  adapter: string | null,
  handlers: { onDelta(i: number, d: TextDelta, es: EventStream): void; onEnd(results: TextResult[], es: EventStream): void },
  observer?: GenerationObserver,
  cancel?: AbortController,
): Promise<void> {
  const es = new EventStream(reply);
  try {
    const results = await settleAll(gens.map((g, i) => drive(g, adapter, (d) => handlers.onDelta(i, d, es), observer)), cancel);
    handlers.onEnd(results, es);
  } catch (e) {
    const p = e instanceof HttpProblem ? e : new HttpProblem(500, 'Internal Server Error', 'generation failed; see the server log');
    if (p.status >= 500) reply.request.log.error({ err: e }, 'generation failed mid-stream');
    es.send(problemBody(p, reply.request.url), 'error');
  } finally {
    es.end();
  }
}

/** One generation streamed: `streamAll` with a single choice. */
export function stream(
  reply: FastifyReply,
  gen: TextGeneration,
  adapter: string | null,
  handlers: { onDelta(d: TextDelta, es: EventStream): void; onEnd(r: TextResult, es: EventStream): void },
  observer?: GenerationObserver,
): Promise<void> {
  return streamAll(reply, [gen], adapter, { onDelta: (_i, d, es) => handlers.onDelta(d, es), onEnd: (rs, es) => handlers.onEnd(rs[0]!, es) }, observer);
}

/** Runs every generation to its end (non-streamed choices); the first failure cancels the rest. */
export function collectAll(gens: readonly TextGeneration[], adapter: string | null, observer?: GenerationObserver, cancel?: AbortController): Promise<Collected[]> {
  return settleAll(gens.map((g) => collect(g, adapter, observer)), cancel);
}

/** Promise.all that aborts `cancel` on the first rejection, so sibling choices stop at the next step. */
async function settleAll<T>(runs: Promise<T>[], cancel?: AbortController): Promise<T[]> {
  try {
    return await Promise.all(runs);
  } catch (e) {
    cancel?.abort();
    await Promise.allSettled(runs);
    throw e;
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    /** set by the metrics plugin when registered */
    generationObserver: GenerationObserver;
  }
}
