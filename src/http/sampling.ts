import { z } from 'zod';
import type { TextRequest } from '../engine/generation.js';

/** Sampling fields shared by the native and OpenAI-style bodies (snake_case, as on the wire). */
export const stopField = z
  .union([z.string().min(1), z.array(z.string().min(1)).max(16)])
  .nullish()
  .transform((s) => (s == null ? [] : typeof s === 'string' ? [s] : s));

export const samplingFields = {
  max_tokens: z.number().int().positive().optional(),
  temperature: z.number().min(0).max(2).optional(),
  top_p: z.number().gt(0).max(1).optional(),
  top_k: z.number().int().min(0).optional(),
  seed: z.number().int().optional(),
  stop: stopField,
  stream: z.boolean().optional(),
};

export interface SamplingBody {
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  top_k?: number;
  seed?: number;
  stop: string[];
}

/** wire (snake_case) sampling fields → the engine's text request options */
export function textOptions(body: SamplingBody, logprobs: number | undefined): Omit<TextRequest, 'adapterVersion' | 'prompt'> {
  return {
    maxTokens: body.max_tokens,
    temperature: body.temperature,
    topP: body.top_p,
    topK: body.top_k,
    seed: body.seed,
    stop: body.stop,
    logprobs,
  };
}
