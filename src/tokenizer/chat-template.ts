import { existsSync, readFileSync, statSync } from 'node:fs';
import { Template } from '@huggingface/jinja';
import type { Tokenizer } from './types.js';
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
    throw new NoChatTemplateError(
      'this model has no chat template (tokenizer_config.json has no chat_template, and CHAT_TEMPLATE is unset): start the server with CHAT_TEMPLATE set to a Jinja template (a file path or the template itself), or use /v1/completions with a plain prompt',
    );
  }
  const t = new Template(template);
  return t.render({ messages, add_generation_prompt: addGenerationPrompt, ...specialTokens });
}

export class ChatTemplateSettingError extends Error {
  override name = 'ChatTemplateSettingError';
}

/**
 * CHAT_TEMPLATE → the template text. As vLLM's `--chat-template`: a path to a file holding the
 * template, or the template itself; a value that is neither (no such file, and no Jinja
 * delimiters) is a start-up error rather than a literal template that renders every conversation
 * as that text. The template must parse.
 */
export function readChatTemplate(setting: string): string {
  let text: string;
  if (existsSync(setting) && statSync(setting).isFile()) text = readFileSync(setting, 'utf8');
  else if (/\{[{%#]/.test(setting)) text = setting;
  else throw new ChatTemplateSettingError(`CHAT_TEMPLATE=${JSON.stringify(setting.slice(0, 80))}: no such file, and not a Jinja template (no {{ or {%)`);
  try {
    new Template(text);
  } catch (e) {
    throw new ChatTemplateSettingError(`CHAT_TEMPLATE: the template does not parse: ${(e as Error).message}`);
  }
  return text;
}

/** The tokenizer with its chat template replaced (CHAT_TEMPLATE wins over the model's own). */
export function withChatTemplate(t: Tokenizer, chatTemplate: string): Tokenizer {
  return {
    encode: (text, opts) => t.encode(text, opts),
    decode: (ids) => t.decode(ids),
    bosId: t.bosId,
    eosIds: t.eosIds,
    vocabSize: t.vocabSize,
    chatTemplate,
    specialTokens: t.specialTokens,
  };
}
