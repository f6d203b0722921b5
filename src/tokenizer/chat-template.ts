import { Template } from '@huggingface/jinja';
import { z } from 'zod';

export const ChatMessageSchema = z.object({
  role: z.enum(['system', 'user', 'assistant', 'tool', 'developer']),
  // OpenAI clients may send content as a list of parts; only text parts are meaningful here
  content: z.union([
    z.string(),
    z.array(z.object({ type: z.literal('text'), text: z.string() })).transform((parts) => parts.map((p) => p.text).join('')),
    z.null().transform(() => ''),
  ]),
});
export type ChatMessage = z.infer<typeof ChatMessageSchema>;

export class NoChatTemplateError extends Error {
  override name = 'NoChatTemplateError';
}

/**
 * Renders a conversation through the model's own chat template (tokenizer_config.json's
 * `chat_template`), as transformers' apply_chat_template does. The template decides BOS
 * placement, so callers encode the result without adding BOS again when the template emits it.
 */
export function renderChat(
  template: string | null,
  messages: readonly ChatMessage[],
  specialTokens: Record<string, string>,
  addGenerationPrompt = true,
): string {
  if (!template) {
    throw new NoChatTemplateError('this model has no chat template (tokenizer_config.json has no chat_template): use /v1/completions or /v1/generate with a plain prompt');
  }
  const t = new Template(template);
  return t.render({ messages, add_generation_prompt: addGenerationPrompt, ...specialTokens });
}
