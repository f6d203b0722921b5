import type { Architecture } from '../architecture.js';

/**
 * A checkpoint, whatever its file format, exposes its tensors under Hugging Face Llama names
 * (`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight` [out, in],
 * `...q_proj.bias`, `model.layers.{i}.input_layernorm.weight`, `...post_attention_layernorm.weight`,
 * `model.layers.{i}.mlp.{gate,up,down}_proj.weight`, `model.norm.weight`, `lm_head.weight` unless
 * tied), always in the checkpoint's own row order: no reader permutes rows.
 */
export interface CheckpointTensor {
  readonly shape: readonly number[];
  /** the stored element type; `read()` always converts to float32 */
  readonly dtype: 'F32' | 'F16' | 'BF16';
  read(): Float32Array;
}

export type TokenizerSource =
  | { kind: 'hf'; tokenizerJson: string; tokenizerConfigJson: string | null }
  | { kind: 'llama2c'; path: string };

export interface Checkpoint {
  readonly architecture: Architecture;
  /** a readable id: folder or file name */
  readonly modelId: string;
  /** every file whose bytes determine the built graph, for the cache hash */
  readonly sourceFiles: readonly string[];
  readonly tokenizer: TokenizerSource | null;
  names(): string[];
  tensor(name: string): CheckpointTensor | undefined;
}

/** Thrown for bad model input; the message names the file and what is wrong. */
export class ModelInputError extends Error {
  constructor(
    readonly file: string,
    detail: string,
  ) {
    super(`${file}: ${detail}`);
    this.name = 'ModelInputError';
  }
}
