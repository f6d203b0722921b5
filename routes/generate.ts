import type { FastifyInstance } from 'fastify';
import { z } from 'zod';
import { collect, disconnectSignal, startGeneration, stream, usage } from '../src/http/generation.js';
import { zodProblem } from '../src/http/problem.js';
import { samplingFields, textOptions } from '../src/http/sampling.js';
import { MAX_TOP_LOGPROBS } from '../src/engine/engine.js';

const GenerateBody = z.object({
  prompt: z.string(),
  adapter: z.string().min(1).nullish(),
  ...samplingFields,
  /** top logprobs per token (0 = the chosen token's logprob only) */
  logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).optional(),
});

/** The native API: POST /v1/generate, plain JSON or server-sent events (one per token). */
export default async function generateRoutes(app: FastifyInstance): Promise<void> {
  app.post('/v1/generate', async (request, reply) => {
    const parsed = GenerateBody.safeParse(request.body);
    if (!parsed.success) throw zodProblem(parsed.error.issues);
    const body = parsed.data;
    const { runtime } = app;
    const adapter = body.adapter ?? null;
    request.log.info({ adapter }, 'generate');
    const ac = disconnectSignal(request, reply);
    const gen = await startGeneration(
      runtime,
      {
        adapter,
        text: { prompt: body.prompt, ...textOptions(body, body.logprobs) },
      },
      ac.signal,
    );
    const observer = app.hasDecorator('generationObserver') ? app.generationObserver : undefined;
    const tokenOut = (t: { token: number; logprob: number }) => ({ id: t.token, text: gen.tokenizer.decode([t.token]), logprob: t.logprob });

    if (body.stream) {
      let index = 0;
      await stream(
        reply,
        gen,
        adapter,
        {
          // one event per token; text held back (half a character, a possible stop string) arrives with a later token
          onDelta(d, es) {
            d.tokens.forEach((t, i) => {
              es.send({ index: index++, token: t.token, text: i === d.tokens.length - 1 ? d.text : '', logprob: t.logprob, top_logprobs: t.top });
            });
            if (d.tokens.length === 0 && d.text) es.send({ index, token: null, text: d.text });
          },
          onEnd(r, es) {
            es.send({ text: r.text, finish_reason: r.finishReason, usage: usage(r.usage) }, 'done');
          },
        },
        observer,
      );
      return reply;
    }
    const { tokens, result } = await collect(gen, adapter, observer);
    return {
      model: runtime.manifest.modelId,
      adapter,
      text: result.text,
      tokens: tokens.map((t) => t.token),
      ...(body.logprobs !== undefined ? { logprobs: tokens.map((t) => ({ ...tokenOut(t), top_logprobs: t.top })) } : {}),
      finish_reason: result.finishReason,
      usage: usage(result.usage),
    };
  });
}
