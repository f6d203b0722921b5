import type { FastifyInstance } from 'fastify';
import { randomUUID } from 'node:crypto';
import { collectAll, disconnectSignal, startChoices, streamAll, usage, type EventStream, type GenerationCall } from '../src/http/generation.js';
import { HttpProblem, badRequest } from '../src/http/problem.js';
import { parseChat, parseCompletion, promptsOf, type Prompt } from '../src/http/openai-request.js';
import { textOptions } from '../src/http/sampling.js';
import { NoChatTemplateError, renderChat } from '../src/tokenizer/chat-template.js';
import type { Tokenizer } from '../src/tokenizer/types.js';
import type { Runtime } from '../src/runtime.js';
import type { TokenEvent } from '../src/engine/engine.js';
import type { TextGeneration, TextResult } from '../src/engine/generation.js';

/** prompts × n: each choice is a row of the batch, so a request may not ask for more than this */
const MAX_CHOICES = 64;

/**
 * OpenAI-compatible completions and chat completions. As with vLLM, `model` is either the base
 * model's id or the name of a ready adapter: that is how an unmodified OpenAI client picks one.
 */
function adapterFor(runtime: Runtime, model: string): string | null {
  return model === runtime.manifest.modelId ? null : model;
}

/** OpenAI's stream ending: each choice with its finish_reason, the usage chunk when asked for, then [DONE] */
function endStream(es: EventStream, head: object, finalChoices: object[], withUsage: ReturnType<typeof usage> | null): void {
  for (const c of finalChoices) es.send({ ...head, choices: [c] });
  if (withUsage) es.send({ ...head, choices: [], usage: withUsage });
  es.send('[DONE]');
}

/** An error after the stream started, as OpenAI's clients read it: a chunk holding `error`, then [DONE]. */
function streamError(p: HttpProblem, es: EventStream): void {
  es.send({ error: p.openAiError() });
  es.send('[DONE]');
}

/** Usage of a request's choices: each prompt counted once, however many choices share it. */
function totalUsage(results: readonly TextResult[], n: number) {
  let promptTokens = 0;
  let completionTokens = 0;
  results.forEach((r, i) => {
    if (i % n === 0) promptTokens += r.usage.promptTokens;
    completionTokens += r.usage.completionTokens;
  });
  return usage({ promptTokens, completionTokens });
}

/**
 * Starts the choices of one prompt; the registry's and engine's refusals get OpenAI's `param`
 * and `code`, so an SDK user sees which field was at fault.
 */
async function start(runtime: Runtime, call: GenerationCall, n: number, cancel: AbortController, promptParam: string): Promise<TextGeneration[]> {
  try {
    return await startChoices(runtime, call, n, cancel.signal);
  } catch (e) {
    // all or nothing: choices of earlier prompts of this request stop at the next step
    cancel.abort();
    if (!(e instanceof HttpProblem)) throw e;
    if (e.status === 404) throw e.about('model', 'model_not_found');
    if (e.status === 409) throw e.about('model', 'model_incompatible');
    if (e.status === 400 && 'context_length' in e.extra) throw e.about(promptParam, 'context_length_exceeded');
    if (e.status === 400) throw e.about(promptParam, 'invalid_value');
    throw e;
  }
}

/** The adapter's own tokenizer (it adds tokens), or null; the registry's refusals as `start` maps them. */
async function ownTokenizer(runtime: Runtime, adapter: string): Promise<Tokenizer | null> {
  try {
    const lease = await runtime.registry.acquire(adapter);
    lease.release();
    return lease.tokenizer;
  } catch (e) {
    if (e instanceof HttpProblem && e.status === 404) throw e.about('model', 'model_not_found');
    if (e instanceof HttpProblem && e.status === 409) throw e.about('model', 'model_incompatible');
    throw e;
  }
}

const finish = (r: TextResult) => (r.finishReason === 'cancelled' ? 'length' : r.finishReason);

export default async function openaiRoutes(app: FastifyInstance): Promise<void> {
  const { runtime } = app;
  const bytesOf = (s: string) => [...Buffer.from(s, 'utf8')];
  const observer = () => (app.hasDecorator('generationObserver') ? app.generationObserver : undefined);

  /** the legacy completions logprobs object, for a run of tokens starting at text offset `offset` */
  const completionLogprobs = (tokens: TokenEvent[], offset: number, tok: Tokenizer) => {
    // an adapter that adds tokens decodes with its own tokenizer (TextGeneration.tokenizer)
    const piece = (id: number) => tok.decode([id]);
    const text_offset: number[] = [];
    let at = offset;
    for (const t of tokens) {
      text_offset.push(at);
      at += piece(t.token).length;
    }
    return {
      tokens: tokens.map((t) => piece(t.token)),
      token_logprobs: tokens.map((t) => t.logprob),
      top_logprobs: tokens.map((t) => Object.fromEntries((t.top ?? []).map((x) => [piece(x.token), x.logprob]))),
      text_offset,
    };
  };
  const chatLogprobs = (tokens: TokenEvent[], tok: Tokenizer, piece = (id: number) => tok.decode([id])) => ({
    content: tokens.map((t) => {
      const s = piece(t.token);
      return {
        token: s,
        logprob: t.logprob,
        bytes: bytesOf(s),
        top_logprobs: (t.top ?? []).map((x) => ({ token: piece(x.token), logprob: x.logprob, bytes: bytesOf(piece(x.token)) })),
      };
    }),
  });

  app.post('/v1/completions', async (request, reply) => {
    const body = parseCompletion(request.body);
    const adapter = adapterFor(runtime, body.model);
    const n = body.n ?? 1;
    const prompts = promptsOf(body.prompt);
    if (prompts.length * n > MAX_CHOICES) throw badRequest(`${prompts.length} prompts × n = ${n} asks for more than ${MAX_CHOICES} choices`).about('prompt', 'too_many_choices');
    request.log.info({ adapter, prompts: prompts.length, n }, 'completion');
    const wantLogprobs = body.logprobs != null;
    const options = textOptions(body, wantLogprobs ? (body.logprobs ?? 0) : undefined);
    const ac = disconnectSignal(request, reply);
    const echo = (p: Prompt) => (!body.echo ? '' : 'text' in p ? p.text : runtime.tokenizer.decode(p.ids));
    const gens: TextGeneration[] = [];
    for (const p of prompts) gens.push(...(await start(runtime, { adapter, text: { ...('text' in p ? { prompt: p.text } : { promptIds: p.ids }), ...options } }, n, ac, 'prompt')));
    // choice i answers prompt ⌊i / n⌋, as OpenAI orders them
    const echoOf = gens.map((_g, i) => echo(prompts[Math.floor(i / n)]!));
    const id = `cmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const head = { id, object: 'text_completion' as const, created, model: body.model };

    if (body.stream) {
      const offsets = gens.map(() => 0);
      const pendingEcho = [...echoOf];
      await streamAll(
        reply,
        gens,
        adapter,
        {
          onDelta(i, d, es) {
            const text = pendingEcho[i] + d.text;
            es.send({ ...head, choices: [{ index: i, text, finish_reason: null, logprobs: wantLogprobs ? completionLogprobs(d.tokens, offsets[i]!, gens[i]!.tokenizer) : null }] });
            pendingEcho[i] = '';
            offsets[i]! += d.text.length;
          },
          onEnd(results, es) {
            const finals = results.map((r, i) => ({ index: i, text: pendingEcho[i], finish_reason: finish(r), logprobs: null }));
            endStream(es, head, finals, body.stream_options?.include_usage ? totalUsage(results, n) : null);
          },
          onError: streamError,
        },
        observer(),
        ac,
      );
      return reply;
    }
    const collected = await collectAll(gens, adapter, observer(), ac);
    return {
      ...head,
      choices: collected.map(({ tokens, result }, i) => ({
        index: i,
        text: echoOf[i] + result.text,
        finish_reason: finish(result),
        logprobs: wantLogprobs ? completionLogprobs(tokens, 0, gens[i]!.tokenizer) : null,
      })),
      usage: totalUsage(
        collected.map((c) => c.result),
        n,
      ),
    };
  });

  app.post('/v1/chat/completions', async (request, reply) => {
    const body = parseChat(request.body);
    const adapter = adapterFor(runtime, body.model);
    const n = body.n ?? 1;
    request.log.info({ adapter, n }, 'chat completion');
    // an adapter that adds tokens may bring its own chat template (its tokenizer_config.json)
    const own = adapter === null ? null : await ownTokenizer(runtime, adapter);
    let prompt: string;
    try {
      prompt = renderChat(own?.chatTemplate ?? runtime.tokenizer.chatTemplate, body.messages, own?.chatTemplate ? own.specialTokens : runtime.tokenizer.specialTokens);
    } catch (e) {
      if (e instanceof NoChatTemplateError) throw badRequest(e.message).about('messages', 'no_chat_template');
      throw badRequest(`the chat template failed to render these messages: ${(e as Error).message}`).about('messages', 'chat_template_error');
    }
    const wantLogprobs = body.logprobs === true;
    const ac = disconnectSignal(request, reply);
    const gens = await start(
      runtime,
      {
        adapter,
        // the template already placed BOS where the model wants it
        text: { prompt, addBos: false, ...textOptions({ ...body, max_tokens: body.max_completion_tokens ?? body.max_tokens }, wantLogprobs ? (body.top_logprobs ?? 0) : undefined) },
      },
      n,
      ac,
      'messages',
    );
    const id = `chatcmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const head = { id, created, model: body.model };

    if (body.stream) {
      const chunk = { ...head, object: 'chat.completion.chunk' as const };
      const first = gens.map(() => true);
      await streamAll(
        reply,
        gens,
        adapter,
        {
          onDelta(i, d, es) {
            const delta = first[i] ? { role: 'assistant', content: d.text } : { content: d.text };
            first[i] = false;
            es.send({ ...chunk, choices: [{ index: i, delta, finish_reason: null, logprobs: wantLogprobs ? chatLogprobs(d.tokens, gens[i]!.tokenizer) : null }] });
          },
          onEnd(results, es) {
            const finals = results.map((r, i) => ({ index: i, delta: first[i] ? { role: 'assistant', content: '' } : {}, finish_reason: finish(r), logprobs: null }));
            endStream(es, chunk, finals, body.stream_options?.include_usage ? totalUsage(results, n) : null);
          },
          onError: streamError,
        },
        observer(),
        ac,
      );
      return reply;
    }
    const collected = await collectAll(gens, adapter, observer(), ac);
    return {
      ...head,
      object: 'chat.completion',
      choices: collected.map(({ tokens, result }, i) => ({
        index: i,
        message: { role: 'assistant', content: result.text },
        finish_reason: finish(result),
        logprobs: wantLogprobs ? chatLogprobs(tokens, gens[i]!.tokenizer) : null,
      })),
      usage: totalUsage(
        collected.map((c) => c.result),
        n,
      ),
    };
  });
}
