import { z } from 'zod';
import { ChatMessageSchema } from '../tokenizer/chat-template.js';
import { badRequest, zodProblem, type HttpProblem } from './problem.js';
import { samplingFields } from './sampling.js';

/**
 * The bodies of OpenAI's completions and chat completions as this server accepts them: pure
 * parsing, no I/O. Fields the server cannot honour are refused by name (OpenAI's `param`) rather
 * than dropped: an answer that ignores `tools` or `response_format` would pretend to follow them.
 */

/** The most choices one request may ask for (OpenAI allows 128; each is a row of the batch). */
export const MAX_N = 16;

/** A list of prompts, each text or token ids: OpenAI's four shapes of `prompt`. */
export type Prompt = { text: string } | { ids: number[] };

const tokenIds = z.array(z.number().int().min(0)).min(1);
const promptField = z.union([z.string(), z.array(z.string()).min(1), tokenIds, z.array(tokenIds).min(1)]);

/** OpenAI's `prompt` → one entry per prompt (a choice each, `index` in this order). */
export function promptsOf(prompt: z.infer<typeof promptField>): Prompt[] {
  if (typeof prompt === 'string') return [{ text: prompt }];
  if (prompt.length > 0 && typeof prompt[0] === 'number') return [{ ids: prompt as number[] }];
  return (prompt as (string | number[])[]).map((p) => (typeof p === 'string' ? { text: p } : { ids: p }));
}

const n = z.number().int().min(1).max(MAX_N).nullish();

export const CompletionBody = z.object({
  model: z.string().min(1),
  prompt: promptField,
  ...samplingFields,
  // OpenAI's default for completions
  max_tokens: z.number().int().positive().default(16),
  logprobs: z.number().int().min(0).max(5).nullish(),
  n,
  best_of: z.number().int().min(1).nullish(),
  echo: z.boolean().nullish(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullish(),
  user: z.string().optional(),
});
export type CompletionBody = z.infer<typeof CompletionBody>;

export const ChatBody = z.object({
  model: z.string().min(1),
  messages: z.array(ChatMessageSchema).min(1),
  ...samplingFields,
  max_completion_tokens: z.number().int().positive().optional(),
  logprobs: z.boolean().nullish(),
  top_logprobs: z.number().int().min(0).max(20).nullish(),
  n,
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullish(),
  user: z.string().optional(),
});
export type ChatBody = z.infer<typeof ChatBody>;

/** A field is refused unless absent, null, or a value that asks for nothing (e.g. `tools: []`). */
interface Refusal {
  field: string;
  neutral: (v: unknown) => boolean;
  why: string;
}

const isZero = (v: unknown) => v === 0;
const isEmptyList = (v: unknown) => Array.isArray(v) && v.length === 0;
const isEmptyObject = (v: unknown) => typeof v === 'object' && v !== null && !Array.isArray(v) && Object.keys(v).length === 0;
const never = () => false;

const SHARED: Refusal[] = [
  { field: 'logit_bias', neutral: isEmptyObject, why: 'logit_bias is not supported yet' },
  { field: 'presence_penalty', neutral: isZero, why: 'presence_penalty is not supported yet (only 0)' },
  { field: 'frequency_penalty', neutral: isZero, why: 'frequency_penalty is not supported yet (only 0)' },
];

const COMPLETION_REFUSALS: Refusal[] = [
  { field: 'suffix', neutral: (v) => v === '', why: 'suffix (insertion) is not supported yet' },
  { field: 'best_of', neutral: (v) => v === 1, why: 'best_of > 1 is not supported yet; use n to get several choices' },
  ...SHARED,
];

const CHAT_REFUSALS: Refusal[] = [
  { field: 'tools', neutral: isEmptyList, why: 'tools (function calling) are not supported yet' },
  { field: 'tool_choice', neutral: (v) => v === 'none', why: 'tool_choice is not supported yet (tools are not)' },
  { field: 'parallel_tool_calls', neutral: never, why: 'parallel_tool_calls is not supported yet (tools are not)' },
  { field: 'functions', neutral: isEmptyList, why: 'functions (function calling) are not supported yet' },
  { field: 'function_call', neutral: (v) => v === 'none', why: 'function_call is not supported yet (functions are not)' },
  {
    field: 'response_format',
    neutral: (v) => typeof v === 'object' && v !== null && (v as { type?: unknown }).type === 'text',
    why: 'response_format (JSON mode, structured outputs) is not supported yet; only {"type": "text"}',
  },
  { field: 'audio', neutral: never, why: 'audio output is not supported' },
  { field: 'modalities', neutral: (v) => Array.isArray(v) && v.every((m) => m === 'text'), why: 'only the text modality is supported' },
  ...SHARED,
];

/** The first field of `body` this server would have to ignore; null when there is none. */
function refusal(body: unknown, list: readonly Refusal[]): HttpProblem | null {
  if (typeof body !== 'object' || body === null) return null;
  const b = body as Record<string, unknown>;
  for (const r of list) {
    const v = b[r.field];
    if (v === undefined || v === null || r.neutral(v)) continue;
    return badRequest(`${r.why}: the request was refused rather than answered without it`).about(r.field, 'unsupported_parameter');
  }
  return null;
}

export function parseCompletion(body: unknown): CompletionBody {
  const refused = refusal(body, COMPLETION_REFUSALS);
  if (refused) throw refused;
  const parsed = CompletionBody.safeParse(body);
  if (!parsed.success) throw zodProblem(parsed.error.issues);
  if (parsed.data.echo && parsed.data.logprobs != null) {
    // OpenAI would return the prompt's own logprobs too; the engine computes logits for generated positions only
    throw badRequest('echo together with logprobs is not supported yet (the prompt tokens would need their logprobs)').about('echo', 'unsupported_parameter');
  }
  return parsed.data;
}

export function parseChat(body: unknown): ChatBody {
  const refused = refusal(body, CHAT_REFUSALS);
  if (refused) throw refused;
  const parsed = ChatBody.safeParse(body);
  if (!parsed.success) throw zodProblem(parsed.error.issues);
  return parsed.data;
}
