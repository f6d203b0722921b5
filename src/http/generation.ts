import type { FastifyReply, FastifyRequest } from 'fastify';
import type { Runtime } from '../runtime.js';
import { generateTextChoices, type TextDelta, type TextGeneration, type TextRequest, type TextResult } from '../engine/generation.js';
import { ContextLengthError, DrainingError, EngineClosedError, InvalidRequestError, QueueFullError, UnknownAdapterError, type TokenEvent } from '../engine/engine.js';
import { HttpProblem, badRequest, notFound, problemBody } from './problem.js';
import { DRAIN_RETRY_AFTER_S } from '../lifecycle.js';
import type { Tokenizer } from '../tokenizer/types.js';

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

/** 503 for work refused because this replica is draining: another replica can take it. */
export const drainingProblem = (detail: string) => new HttpProblem(503, 'Service Unavailable', detail, {}, { 'retry-after': String(DRAIN_RETRY_AFTER_S) });

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
  if (e instanceof DrainingError) return drainingProblem(e.message);
  if (e instanceof EngineClosedError) return new HttpProblem(503, 'Service Unavailable', e.message, {}, { 'retry-after': '1' });
  return null;
}

/**
 * `n` choices of one prompt (OpenAI's `n`), all admitted or none: the engine prefills the prompt
 * once and copies its KV cache into the n rows. Choice j samples with `seed + j` when a seed is
 * given, so choice 0 is what the same request with n = 1 answers.
 *
 * Holds the adapter (loading it on this replica first if needed, see AdapterRegistry.acquire: a
 * missing one is a 404 before the prompt is encoded), encodes the prompt (off the HTTP thread when
 * it is long) and submits to the engine; the hold ends with the last choice, so the version is not
 * evicted under it. A prompt that cannot fit the context is refused before any encoding work: its
 * length bound is linear in the text.
 */
export async function startChoices(runtime: Runtime, call: GenerationCall, n: number, signal: AbortSignal): Promise<TextGeneration[]> {
  const refuseIfDraining = () => {
    if (runtime.draining) throw drainingProblem('draining: this replica is shutting down');
  };
  refuseIfDraining();
  let lease = call.adapter === null ? null : await runtime.registry.acquire(call.adapter);
  try {
    let { promptIds } = call.text;
    if (promptIds === undefined) {
      const text = call.text.prompt ?? '';
      const opts = { addBos: call.text.addBos ?? true };
      const context = runtime.engine.contextLength;
      const atLeast = runtime.prompts.minTokens(text, opts);
      if (atLeast + 1 > context) throw engineProblem(new ContextLengthError(atLeast, context, true))!;
      // an adapter that adds tokens has its own tokenizer (encoded inline: it has no worker of its own)
      const encode = (tok: Tokenizer | null) => (tok ? Promise.resolve(tok.encode(text, opts)) : runtime.prompts.encode(text, opts));
      const used = lease?.tokenizer ?? null;
      promptIds = await encode(used);
      refuseIfDraining();
      if (lease && call.adapter !== null) {
        // the name may have been replaced while the prompt was encoded: hold its current version, submitted in this same turn
        const fresh = await runtime.registry.acquire(call.adapter);
        lease.release();
        lease = fresh;
        if (fresh.tokenizer !== used) promptIds = await encode(fresh.tokenizer);
      }
    }
    const held = lease;
    const tokenizer = held?.tokenizer ?? runtime.tokenizer;
    const gens = generateTextChoices({ engine: runtime.engine, tokenizer }, { ...call.text, promptIds, adapterVersion: held?.versionId ?? null }, n, signal);
    if (held) void Promise.allSettled(gens.map((g) => g.result)).then(held.release);
    return gens;
  } catch (e) {
    lease?.release();
    throw engineProblem(e) ?? e;
  }
}

/** One generation: `startChoices` with n = 1. */
export async function startGeneration(runtime: Runtime, call: GenerationCall, signal: AbortSignal): Promise<TextGeneration> {
  return (await startChoices(runtime, call, 1, signal))[0]!;
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
 * route writes the stream itself. The 200 and its headers go out with the first event, so a
 * request refused before it produced anything (queue full, draining while it waited for a slot)
 * still gets its real status; errors after that become a final `error` event.
 */
export class EventStream {
  private started = false;
  private closed = false;

  constructor(private readonly reply: FastifyReply) {
    reply.hijack();
  }

  /** nothing more will be written (ended, failed, cut or the client is gone) */
  get isClosed(): boolean {
    return this.closed || this.reply.raw.destroyed;
  }

  private start(): void {
    if (this.started) return;
    this.started = true;
    this.reply.raw.writeHead(200, {
      'content-type': 'text/event-stream; charset=utf-8',
      'cache-control': 'no-cache',
      connection: 'keep-alive',
      'x-accel-buffering': 'no',
      'x-request-id': String(this.reply.request.id),
    });
  }

  send(data: unknown, event?: string): void {
    if (this.isClosed) return;
    this.start();
    const payload = typeof data === 'string' ? data : JSON.stringify(data);
    this.reply.raw.write(`${event ? `event: ${event}\n` : ''}data: ${payload}\n\n`);
  }

  /**
   * Ends with a problem: the whole response when nothing was sent yet; else `midStream` writes
   * the final events (default: an `error` event with the problem+json body).
   */
  fail(p: HttpProblem, midStream: (p: HttpProblem, es: EventStream) => void = (q, es) => es.send(q.body(), 'error')): void {
    if (this.isClosed) return;
    if (!this.started) {
      this.started = true;
      this.closed = true;
      this.reply.raw.writeHead(p.status, { 'content-type': 'application/problem+json; charset=utf-8', 'x-request-id': String(this.reply.request.id), ...p.headers });
      this.reply.raw.end(JSON.stringify(p.body()));
      return;
    }
    midStream(p, this);
    this.end();
  }

  end(): void {
    if (this.isClosed) return;
    this.start();
    this.closed = true;
    this.reply.raw.end();
  }

  /** Resolves when what was written has been handed to the socket (or the socket is gone). */
  flushed(): Promise<void> {
    const raw = this.reply.raw;
    if (raw.writableFinished || raw.destroyed) return Promise.resolve();
    return new Promise((resolve) => {
      raw.once('finish', () => resolve());
      raw.once('close', () => resolve());
    });
  }
}

/** Thrown inside the delta loop of a stream that was cut, to leave it (which cancels the engine row). */
class StreamCut extends Error {}

/**
 * Streams generations side by side (a request's choices): `onDelta` turns each delta of choice
 * `i` into events as it comes, `onEnd` writes the closing ones once all have ended. An error after
 * the stream started is sent as an `error` event carrying the problem body (with OpenAI's `error`
 * member on OpenAI routes; `onError` may write it otherwise), and the other choices are cancelled;
 * before it started, as the response. While it runs, the stream is listed in `app.activeStreams`
 * so that the drain deadline can end it with an `error` event, not a bare cut.
 */
export async function streamAll(
  reply: FastifyReply,
  gens: readonly TextGeneration[],
  adapter: string | null,
  handlers: {
    onDelta(i: number, d: TextDelta, es: EventStream): void;
    onEnd(results: TextResult[], es: EventStream): void;
    /** how an error after the first event is written (OpenAI: an error chunk); default an `error` event */
    onError?(p: HttpProblem, es: EventStream): void;
  },
  observer?: GenerationObserver,
  cancel?: AbortController,
): Promise<void> {
  const es = new EventStream(reply);
  const url = reply.request.url;
  const onError = handlers.onError?.bind(handlers) ?? ((p: HttpProblem, s: EventStream) => s.send(problemBody(p, url), 'error'));
  const app = reply.server;
  const unlist = app.hasDecorator('activeStreams')
    ? app.activeStreams.add(async (p) => {
        es.fail(p, onError);
        await es.flushed();
      })
    : () => undefined;
  try {
    const onDelta = (i: number) => (d: TextDelta) => {
      if (es.isClosed) throw new StreamCut();
      handlers.onDelta(i, d, es);
    };
    const results = await settleAll(gens.map((g, i) => drive(g, adapter, onDelta(i), observer)), cancel);
    handlers.onEnd(results, es);
  } catch (e) {
    if (e instanceof StreamCut) return;
    const p = e instanceof HttpProblem ? e : new HttpProblem(500, 'Internal Server Error', 'generation failed; see the server log');
    if (p.status >= 500) reply.request.log.error({ err: e }, 'generation failed mid-stream');
    es.fail(p, onError);
  } finally {
    unlist();
    es.end();
  }
}

/** One generation streamed: `streamAll` with a single choice. */
export function stream(
  reply: FastifyReply,
  gen: TextGeneration,
  adapter: string | null,
  handlers: {
    onDelta(d: TextDelta, es: EventStream): void;
    onEnd(r: TextResult, es: EventStream): void;
    /** how an error after the first event is written (OpenAI: an error chunk); default an `error` event */
    onError?(p: HttpProblem, es: EventStream): void;
  },
  observer?: GenerationObserver,
): Promise<void> {
  return streamAll(reply, [gen], adapter, { onDelta: (_i, d, es) => handlers.onDelta(d, es), onEnd: (rs, es) => handlers.onEnd(rs[0]!, es), onError: handlers.onError }, observer);
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
