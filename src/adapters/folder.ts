import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { engineGrams } from './effect.js';
import { fromIngested, toEngineWeights, type AdapterWeights } from './convert.js';
import type { IngestedWeights } from './ingest.js';
import { parseTensorKey } from './keys.js';
import { readAdapterTokenizer } from './adapter-tokenizer.js';
import type { HfTokenizer } from '../tokenizer/hf.js';
import { CONFIG_FILE } from './peft-config.js';
import type { ValidationReport } from './report.js';
import { ADAPTER_SAFETENSORS_LIMITS, isFloatDtype, readHeader, readTensorBytes, toFloat32, type HeaderResult, type SafetensorsHeader } from './safetensors.js';
import { validateAdapter, WEIGHTS_FILE, type ModelFacts, type ValidationLimits } from './validate.js';

/**
 * The I/O edge of adapter validation: reads a PEFT adapter folder (adapter_config.json +
 * adapter_model.safetensors), validates it, and converts the weights when it passes. Tensor data
 * is read only after the header has been checked against the file's real size.
 */

export interface ReadAdapterOptions {
  /** read tensor values: enables the NaN/Inf check and conversion (default true) */
  readValues: boolean;
  /**
   * The weights file as it was decoded while it streamed in (ingest.ts). Used in place of reading
   * the values back when its header is the stored file's; consumed (its arrays become the result's).
   */
  ingested?: IngestedWeights | null;
}

/** Both parsed from the same bytes, unless the file changed after the upload wrote it. */
function sameHeader(a: SafetensorsHeader, b: SafetensorsHeader): boolean {
  if (a.fileSize !== b.fileSize || a.headerLength !== b.headerLength || a.tensors.length !== b.tensors.length) return false;
  return a.tensors.every((t, i) => {
    const u = b.tensors[i]!;
    return t.name === u.name && t.dtype === u.dtype && t.begin === u.begin && t.end === u.end && t.shape.length === u.shape.length && t.shape.every((d, k) => d === u.shape[k]);
  });
}

async function readValues(weightsPath: string, header: SafetensorsHeader): Promise<Map<string, Float32Array>> {
  const values = new Map<string, Float32Array>();
  for (const t of header.tensors) {
    if (!isFloatDtype(t.dtype)) continue;
    values.set(t.name, toFloat32(t.dtype, await readTensorBytes(weightsPath, header, t)));
  }
  return values;
}

function hasVariantVectors(header: SafetensorsHeader): boolean {
  return header.tensors.some((t) => {
    const k = parseTensorKey(t.name);
    return k.kind === 'dora_magnitude' || (k.kind === 'bias' && k.part !== null);
  });
}

export interface AdapterFolderResult {
  report: ValidationReport;
  /** engine-layout weights; null when the report has errors or values were not read */
  weights: AdapterWeights | null;
  /** where `weights` came from: the stream decode, or the file read back */
  source: 'stream' | 'file' | null;
  /** the adapter's own tokenizer, when it adds tokens (report.embedding.vocabSize): its requests use it */
  tokenizer: HfTokenizer | null;
}

export async function readAdapterFolder(dir: string, model: ModelFacts, limits: ValidationLimits, opts: ReadAdapterOptions = { readValues: true }): Promise<AdapterFolderResult> {
  const files = await readdir(dir);
  const configText = files.includes(CONFIG_FILE) ? await readFile(join(dir, CONFIG_FILE), 'utf8') : null;
  const weightsPath = join(dir, WEIGHTS_FILE);
  const head: HeaderResult = files.includes(WEIGHTS_FILE) ? await readHeader(weightsPath, ADAPTER_SAFETENSORS_LIMITS, WEIGHTS_FILE) : { header: null, problems: [] };

  const readable = opts.readValues && head.header && head.problems.length === 0 ? head.header : null;
  // a decode that left a fitting tensor out lacks what the overflow check needs: read the file
  // the stream keeps lora_A / lora_B only: with DoRA magnitudes or lora_B biases the values are read
  // from the file anyway (for conversion), so validation reads them too (their zero / NaN checks)
  const ingested = readable && opts.ingested?.keptAll && sameHeader(readable, opts.ingested.header) && !hasVariantVectors(readable) ? opts.ingested : null;
  const values = readable && !ingested ? await readValues(weightsPath, readable) : undefined;
  const otherFiles = files.filter((f) => f !== CONFIG_FILE && f !== WEIGHTS_FILE);
  const own = await readAdapterTokenizer(dir, files, model.architecture);
  // before fromIngested consumes the arrays (it folds the scale into B in place)
  const grams = ingested ? engineGrams(ingested.header.tensors, ingested.engineLayout, ingested.scaled) : undefined;
  const report = validateAdapter({ configText, weightsFile: WEIGHTS_FILE, header: head.header, headerProblems: head.problems, values, nonFinite: ingested?.nonFinite, maxAbs: ingested?.maxAbs, otherFiles, grams, tokenizer: own.facts }, model, limits);
  if (!report.ok) return { report, weights: null, source: null, tokenizer: null };
  const tokenizer = report.embedding?.vocabSize === undefined ? null : own.tokenizer;
  if (values) return { report, weights: toEngineWeights(report, values, model), source: 'file', tokenizer };
  if (ingested && readable) {
    const streamed = fromIngested(report, ingested, model);
    if (streamed) return { report, weights: streamed, source: 'stream', tokenizer };
    return { report, weights: toEngineWeights(report, await readValues(weightsPath, readable), model), source: 'file', tokenizer };
  }
  return { report, weights: null, source: null, tokenizer };
}
