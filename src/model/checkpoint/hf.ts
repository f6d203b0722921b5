import { closeSync, openSync, readSync } from 'node:fs';
import { readFile, stat } from 'node:fs/promises';
import { basename, join, resolve } from 'node:path';
import type { Architecture } from '../architecture.js';
import { checkpointTensorShapes } from '../tensors.js';
import { isFloatDtype, readHeader, toFloat32, type SafetensorsHeader, type TensorHeader } from '../../adapters/safetensors.js';
import { architectureFromHfConfig, eosFromGenerationConfig } from './hf-config.js';
import { ModelInputError, type Checkpoint, type CheckpointTensor, type TokenizerSource } from './types.js';

/**
 * Hugging Face model folder: config.json, model.safetensors or a sharded
 * model.safetensors.index.json, and the tokenizer files. Only headers are read at open; each
 * tensor's bytes are read from disk when asked for.
 */

const WEIGHTS = 'model.safetensors';
const INDEX = 'model.safetensors.index.json';

async function exists(path: string): Promise<boolean> {
  return stat(path).then(
    (s) => s.isFile(),
    () => false,
  );
}

async function readJson(path: string): Promise<unknown> {
  let text: string;
  try {
    text = await readFile(path, 'utf8');
  } catch (e) {
    throw new ModelInputError(path, `cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}).`);
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw new ModelInputError(path, `is not valid JSON (${(e as Error).message}).`);
  }
}

/**
 * Architecture from a folder's config.json, with generation_config.json's extra EOS ids.
 * Reads no weights, so the offline checker can run on a folder holding only config.json.
 */
export async function readHfArchitecture(dir: string): Promise<{ architecture: Architecture; files: string[] }> {
  const configPath = join(dir, 'config.json');
  if (!(await exists(configPath))) throw new ModelInputError(configPath, 'not found: a Hugging Face model folder needs config.json.');
  const architecture = architectureFromHfConfig(await readJson(configPath), configPath);
  const files = [configPath];
  const genPath = join(dir, 'generation_config.json');
  if (await exists(genPath)) {
    files.push(genPath);
    const extra = eosFromGenerationConfig(await readJson(genPath));
    architecture.eosTokenIds = [...new Set([...architecture.eosTokenIds, ...extra])];
  }
  return { architecture, files };
}

/** Every tensor the graph needs, with its [out, in] (or [n]) shape, in HF names. */
export const requiredTensorShapes = checkpointTensorShapes;

interface Located {
  file: string;
  header: SafetensorsHeader;
  tensor: TensorHeader;
}

async function headerOf(path: string): Promise<SafetensorsHeader> {
  const label = basename(path);
  let result;
  try {
    result = await readHeader(path, undefined, label);
  } catch (e) {
    throw new ModelInputError(path, `cannot be read (${(e as NodeJS.ErrnoException).code ?? (e as Error).message}).`);
  }
  const errors = result.problems.filter((p) => p.severity === 'error');
  if (!result.header || errors.length) {
    throw new ModelInputError(path, limitLines(errors.map((p) => p.message), 3) || 'unreadable safetensors header.');
  }
  return result.header;
}

/** Shard file names come from a JSON file we do not trust: keep them inside the folder. */
function safeShardName(name: unknown, indexPath: string): string {
  if (typeof name !== 'string' || name === '' || name.includes('/') || name.includes('\\') || name === '.' || name === '..') {
    throw new ModelInputError(indexPath, `weight_map names shard ${JSON.stringify(name)}; shards must be plain file names inside the model folder.`);
  }
  return name;
}

async function locateTensors(dir: string): Promise<{ tensors: Map<string, Located>; files: string[] }> {
  const single = join(dir, WEIGHTS);
  const indexPath = join(dir, INDEX);
  const tensors = new Map<string, Located>();
  if (await exists(single)) {
    const header = await headerOf(single);
    for (const t of header.tensors) tensors.set(t.name, { file: single, header, tensor: t });
    return { tensors, files: [single] };
  }
  if (await exists(indexPath)) {
    const index = await readJson(indexPath);
    const weightMap = index && typeof index === 'object' && !Array.isArray(index) ? (index as Record<string, unknown>).weight_map : undefined;
    if (!weightMap || typeof weightMap !== 'object' || Array.isArray(weightMap)) {
      throw new ModelInputError(indexPath, 'missing required key "weight_map" (tensor name → shard file).');
    }
    const wanted = Object.entries(weightMap as Record<string, unknown>).map(([t, f]) => [t, safeShardName(f, indexPath)] as const);
    const shards = [...new Set(wanted.map(([, f]) => f))].sort();
    const headers = new Map<string, SafetensorsHeader>();
    for (const shard of shards) {
      const path = join(dir, shard);
      if (!(await exists(path))) throw new ModelInputError(path, `not found, but ${INDEX} maps tensors to it.`);
      headers.set(shard, await headerOf(path));
    }
    for (const [name, shard] of wanted) {
      const header = headers.get(shard)!;
      const t = header.tensors.find((x) => x.name === name);
      if (!t) throw new ModelInputError(join(dir, shard), `${INDEX} maps ${name} to this shard, but the shard has no such tensor.`);
      tensors.set(name, { file: join(dir, shard), header, tensor: t });
    }
    return { tensors, files: [indexPath, ...shards.map((s) => join(dir, s))] };
  }
  const hint = (await exists(join(dir, 'pytorch_model.bin'))) ? ' This folder has pytorch_model.bin (pickle), which is never loaded: convert it to safetensors.' : '';
  throw new ModelInputError(dir, `no ${WEIGHTS} or ${INDEX} found.${hint}`);
}

/**
 * Every dtype and shape problem at once, and every tensor the graph would not consume. Missing tensors are charged to the file that lists the
 * tensors (model.safetensors or the index); when all problems are in one file it is the one named.
 */
function checkTensors(dir: string, listing: string, arch: Architecture, tensors: Map<string, Located>, redundant: ReadonlySet<string>): void {
  const problems: { file: string; text: string }[] = [];
  for (const [name, loc] of tensors) {
    if (!isFloatDtype(loc.tensor.dtype)) {
      problems.push({ file: loc.file, text: `tensor ${name}: dtype ${loc.tensor.dtype} not supported (only F32, F16, BF16).` });
    }
  }
  const required = requiredTensorShapes(arch);
  for (const [name, loc] of tensors) {
    if (required.has(name) || redundant.has(name)) continue;
    problems.push({ file: loc.file, text: `tensor ${name} [${loc.tensor.shape.join(', ')}] is not used by the ${arch.family} graph built from config.json; serving without it would not be the trained model, so it is refused (is config.json the one this checkpoint was saved with?).` });
  }
  for (const [name, shape] of required) {
    const loc = tensors.get(name);
    if (!loc) {
      problems.push({ file: listing, text: `tensor ${name} is missing; expected shape [${shape.join(', ')}], actual: absent.` });
    } else if (loc.tensor.shape.length !== shape.length || loc.tensor.shape.some((d, i) => d !== shape[i])) {
      problems.push({ file: loc.file, text: `tensor ${name} has the wrong shape: expected [${shape.join(', ')}], actual [${loc.tensor.shape.join(', ')}].` });
    }
  }
  if (!problems.length) return;
  const oneFile = problems.every((p) => p.file === problems[0]!.file);
  const lines = problems.map((p) => (oneFile ? p.text : `${basename(p.file)}: ${p.text}`));
  throw new ModelInputError(oneFile ? problems[0]!.file : dir, limitLines(lines));
}

function limitLines(lines: string[], max = 8): string {
  const shown = lines.slice(0, max);
  if (lines.length > max) shown.push(`(and ${lines.length - max} more)`);
  return shown.join(' ');
}

function lazyTensor(loc: Located): CheckpointTensor {
  const { file, header, tensor } = loc;
  const dtype = tensor.dtype as CheckpointTensor['dtype'];
  return {
    shape: tensor.shape,
    dtype,
    read(): Float32Array {
      const bytes = Buffer.alloc(tensor.end - tensor.begin);
      const fd = openSync(file, 'r');
      try {
        let done = 0;
        while (done < bytes.byteLength) {
          const n = readSync(fd, bytes, done, bytes.byteLength - done, header.dataStart + tensor.begin + done);
          if (n === 0) throw new ModelInputError(file, `${tensor.name}: short read (the file shrank after it was opened).`);
          done += n;
        }
      } finally {
        closeSync(fd);
      }
      return toFloat32(dtype, bytes);
    },
  };
}

/** Reads tokenizer files as text; chat_template.jinja (newer transformers) is folded into the config. */
async function readTokenizerSource(dir: string): Promise<{ source: TokenizerSource | null; files: string[] }> {
  const tjPath = join(dir, 'tokenizer.json');
  if (!(await exists(tjPath))) return { source: null, files: [] };
  const files = [tjPath];
  const tokenizerJson = await readFile(tjPath, 'utf8');
  let tokenizerConfigJson: string | null = null;
  const tcPath = join(dir, 'tokenizer_config.json');
  if (await exists(tcPath)) {
    files.push(tcPath);
    tokenizerConfigJson = await readFile(tcPath, 'utf8');
  }
  const jinjaPath = join(dir, 'chat_template.jinja');
  if (await exists(jinjaPath)) {
    files.push(jinjaPath);
    const template = await readFile(jinjaPath, 'utf8');
    const cfg = tokenizerConfigJson === null ? {} : await readJson(tcPath);
    if (cfg && typeof cfg === 'object' && !Array.isArray(cfg) && !('chat_template' in cfg)) {
      tokenizerConfigJson = JSON.stringify({ ...(cfg as Record<string, unknown>), chat_template: template });
    }
  }
  return { source: { kind: 'hf', tokenizerJson, tokenizerConfigJson }, files };
}

/**
 * Tensors transformers loads and then discards, accepted only when they provably carry nothing
 * of their own: an `lm_head.weight` saved beside tied embeddings (tie_weights overwrites it) when
 * it equals them, and the `rotary_emb.inv_freq` buffers of older exports when they equal the
 * table of plain RoPE at this rope_theta. Anything else unused is refused by checkTensors.
 */
function redundantTensors(arch: Architecture, tensors: Map<string, Located>): Set<string> {
  const out = new Set<string>();
  const head = tensors.get('lm_head.weight');
  const embed = tensors.get('model.embed_tokens.weight');
  if (arch.tieWordEmbeddings && head && embed && sameShape(head.tensor.shape, embed.tensor.shape)) {
    const a = lazyTensor(head).read();
    const b = lazyTensor(embed).read();
    if (a.every((v, i) => v === b[i])) out.add('lm_head.weight');
  }
  const half = arch.headDim / 2;
  for (const [name, loc] of tensors) {
    if (!/^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$/.test(name) || arch.rope || !sameShape(loc.tensor.shape, [half])) continue;
    const v = lazyTensor(loc).read();
    const plain = (i: number) => 1 / Math.pow(arch.ropeTheta, (2 * i) / arch.headDim);
    if (v.every((x, i) => Math.abs(x - plain(i)) <= 1e-6 * plain(i))) out.add(name);
  }
  return out;
}

const sameShape = (a: readonly number[], b: readonly number[]) => a.length === b.length && a.every((d, i) => d === b[i]);

export async function openHfFolder(dirIn: string): Promise<Checkpoint> {
  const dir = resolve(dirIn);
  const { architecture, files: configFiles } = await readHfArchitecture(dir);
  const { tensors: located, files: weightFiles } = await locateTensors(dir);
  const redundant = redundantTensors(architecture, located);
  checkTensors(dir, weightFiles[0]!, architecture, located, redundant);
  // what the graph never reads is not exposed, so the builder's own "all consumed" check holds too
  const tensors = new Map([...located].filter(([name]) => !redundant.has(name)));
  const { source, files: tokenizerFiles } = await readTokenizerSource(dir);
  const views = new Map<string, CheckpointTensor>();
  return {
    architecture,
    modelId: basename(dir),
    sourceFiles: [...configFiles, ...weightFiles, ...tokenizerFiles],
    tokenizer: source,
    names: () => [...tensors.keys()],
    tensor(name: string): CheckpointTensor | undefined {
      const loc = tensors.get(name);
      if (!loc) return undefined;
      let v = views.get(name);
      if (!v) views.set(name, (v = lazyTensor(loc)));
      return v;
    },
  };
}
