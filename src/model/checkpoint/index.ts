import { readFile, stat } from 'node:fs/promises';
import { basename, dirname, resolve } from 'node:path';
import type { Architecture } from '../architecture.js';
import { architectureFromHfConfig } from './hf-config.js';
import { openHfFolder, readHfArchitecture } from './hf.js';
import { llama2cModelId, openLlama2c, readLlama2cHeader } from './llama2c.js';
import { ModelInputError, type Checkpoint } from './types.js';

export { ModelInputError } from './types.js';
export type { Checkpoint, CheckpointTensor, TokenizerSource } from './types.js';

type Kind = 'folder' | 'llama2c' | 'config';

async function kindOf(path: string): Promise<Kind> {
  let s;
  try {
    s = await stat(path);
  } catch {
    throw new ModelInputError(path, 'not found.');
  }
  if (s.isDirectory()) return 'folder';
  if (path.toLowerCase().endsWith('.bin')) return 'llama2c';
  if (path.toLowerCase().endsWith('.json')) return 'config';
  throw new ModelInputError(path, 'is neither a Hugging Face model folder nor a llama2.c .bin checkpoint.');
}

/** MODEL_PATH → checkpoint: a folder is a Hugging Face model, a `.bin` file a llama2.c checkpoint. */
export async function openCheckpoint(modelPath: string, tokenizerPath?: string): Promise<Checkpoint> {
  const path = resolve(modelPath);
  const kind = await kindOf(path);
  if (kind === 'folder') return openHfFolder(path);
  if (kind === 'llama2c') return openLlama2c(path, tokenizerPath);
  throw new ModelInputError(path, 'a config.json alone has no weights; give the model folder (or a llama2.c .bin) to serve it.');
}

/**
 * Dims only, for the offline checker: a model folder, its config.json, or a llama2.c .bin.
 * Needs no weights (a folder with only config.json works).
 */
export async function readArchitecture(path: string): Promise<{ architecture: Architecture; modelId: string }> {
  const p = resolve(path);
  const kind = await kindOf(p);
  if (kind === 'folder') return { architecture: (await readHfArchitecture(p)).architecture, modelId: basename(p) };
  if (kind === 'llama2c') return { architecture: await readLlama2cHeader(p), modelId: llama2cModelId(p) };
  let json: unknown;
  try {
    json = JSON.parse(await readFile(p, 'utf8'));
  } catch (e) {
    throw new ModelInputError(p, `is not valid JSON (${(e as Error).message}).`);
  }
  return { architecture: architectureFromHfConfig(json, p), modelId: basename(dirname(p)) };
}
