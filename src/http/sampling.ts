import { z } from 'zod';

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
