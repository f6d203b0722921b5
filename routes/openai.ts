import type { FastifyInstance } from 'fastify';
import { randomUUID } from 'node:crypto';
import { z } from 'zod';
import { collect, disconnectSignal, startGeneration, stream, usage, type EventStream } from '../src/http/generation.js';
import { badRequest, zodProblem } from '../src/http/problem.js';
import { samplingFields, textOptions } from '../src/http/sampling.js';
import { ChatMessageSchema, NoChatTemplateError, renderChat } from '../src/tokenizer/chat-template.js';
import type { Runtime } from '../src/runtime.js';
import type { TokenEvent } from '../src/engine/engine.js';
import type { TextResult } from '../src/engine/generation.js';

/**
 * OpenAI-compatible completions and chat completions. As with vLLM, `model` is either the base
 * model's id or the name of a ready adapter: that is how an unmodified OpenAI client picks one.
 */
const CompletionBody = z.object({
  model: z.string().min(1),
  prompt: z.union([z.string(), z.array(z.string()).length(1).transform((a) => a[0]!)]),
  ...samplingFields,
  // OpenAI's default for completions
  max_tokens: z.number().int().positive().default(16),
  logprobs: z.number().int().min(0).max(5).nullish(),
  n: z.literal(1).optional(),
  echo: z.literal(false).optional(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullish(),
  user: z.string().optional(),
});

const ChatBody = z.object({
  model: z.string().min(1),
  messages: z.array(ChatMessageSchema).min(1),
  ...samplingFields,
  max_completion_tokens: z.number().int().positive().optional(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.number().int().min(0).max(20).nullish(),
  n: z.literal(1).optional(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullish(),
  user: z.string().optional(),
});

function adapterFor(runtime: Runtime, model: string): string | null {
  return model === runtime.manifest.modelId ? null : model;
}

/** OpenAI's stream ending: the choice with its finish_reason, the usage chunk when asked for, then [DONE] */
function endStream(es: EventStream, head: object, finalChoice: object, withUsage: TextResult | null): void {
  es.send({ ...head, choices: [finalChoice] });
  if (withUsage) es.send({ ...head, choices: [], usage: usage(withUsage.usage) });
  es.send('[DONE]');
}

const finish = (r: TextResult) => (r.finishReason === 'cancelled' ? 'length' : r.finishReason);

export default async function openaiRoutes(app: FastifyInstance): Promise<void> {
  const { runtime } = app;
  const piece = (id: number) => runtime.tokenizer.decode([id]);
  const bytesOf = (s: string) => [...Buffer.from(s, 'utf8')];
  const observer = () => (app.hasDecorator('generationObserver') ? app.generationObserver : undefined);

  /** the legacy completions logprobs object, for a run of tokens starting at text offset `offset` */
  const completionLogprobs = (tokens: TokenEvent[], offset: number) => {
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
  const chatLogprobs = (tokens: TokenEvent[]) => ({
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
    const parsed = CompletionBody.safeParse(request.body);
    if (!parsed.success) throw zodProblem(parsed.error.issues);
    const body = parsed.data;
    const adapter = adapterFor(runtime, body.model);
    request.log.info({ adapter }, 'completion');
    const wantLogprobs = body.logprobs != null;
    const ac = disconnectSignal(request, reply);
    const gen = await startGeneration(runtime, { adapter, text: { prompt: body.prompt, ...textOptions(body, wantLogprobs ? (body.logprobs ?? 0) : undefined) } }, ac.signal);
    const id = `cmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const head = { id, object: 'text_completion' as const, created, model: body.model };

    if (body.stream) {
      let offset = 0;
      await stream(
        reply,
        gen,
        adapter,
        {
          onDelta(d, es) {
            es.send({ ...head, choices: [{ index: 0, text: d.text, finish_reason: null, logprobs: wantLogprobs ? completionLogprobs(d.tokens, offset) : null }] });
            offset += d.text.length;
          },
          onEnd(r, es) {
            endStream(es, head, { index: 0, text: '', finish_reason: finish(r), logprobs: null }, body.stream_options?.include_usage ? r : null);
          },
        },
        observer(),
      );
      return reply;
    }
    const { tokens, result } = await collect(gen, adapter, observer());
    return {
      ...head,
      choices: [{ index: 0, text: result.text, finish_reason: finish(result), logprobs: wantLogprobs ? completionLogprobs(tokens, 0) : null }],
      usage: usage(result.usage),
    };
  });

  app.post('/v1/chat/completions', async (request, reply) => {
    const parsed = ChatBody.safeParse(request.body);
    if (!parsed.success) throw zodProblem(parsed.error.issues);
    const body = parsed.data;
    const adapter = adapterFor(runtime, body.model);
    request.log.info({ adapter }, 'chat completion');
    let prompt: string;
    try {
      prompt = renderChat(runtime.tokenizer.chatTemplate, body.messages, runtime.tokenizer.specialTokens);
    } catch (e) {
      if (e instanceof NoChatTemplateError) throw badRequest(e.message);
      throw badRequest(`the chat template failed to render these messages: ${(e as Error).message}`);
    }
    const wantLogprobs = body.logprobs === true;
    const ac = disconnectSignal(request, reply);
    const gen = await startGeneration(
      runtime,
      {
        adapter,
        // the template already placed BOS where the model wants it
        text: { prompt, addBos: false, ...textOptions({ ...body, max_tokens: body.max_completion_tokens ?? body.max_tokens }, wantLogprobs ? (body.top_logprobs ?? 0) : undefined) },
      },
      ac.signal,
    );
    const id = `chatcmpl-${randomUUID()}`;
    const created = Math.floor(Date.now() / 1000);
    const head = { id, created, model: body.model };

    if (body.stream) {
      const chunk = { ...head, object: 'chat.completion.chunk' as const };
      let first = true;
      await stream(
        reply,
        gen,
        adapter,
        {
          onDelta(d, es) {
            const delta = first ? { role: 'assistant', content: d.text } : { content: d.text };
            first = false;
            es.send({ ...chunk, choices: [{ index: 0, delta, finish_reason: null, logprobs: wantLogprobs ? chatLogprobs(d.tokens) : null }] });
          },
          onEnd(r, es) {
            endStream(es, chunk, { index: 0, delta: first ? { role: 'assistant', content: '' } : {}, finish_reason: finish(r), logprobs: null }, body.stream_options?.include_usage ? r : null);
          },
        },
        observer(),
      );
      return reply;
    }
    const { tokens, result } = await collect(gen, adapter, observer());
    return {
      ...head,
      object: 'chat.completion',
      choices: [
        {
          index: 0,
          message: { role: 'assistant', content: result.text },
          finish_reason: finish(result),
          logprobs: wantLogprobs ? chatLogprobs(tokens) : null,
        },
      ],
      usage: usage(result.usage),
    };
  });
}
