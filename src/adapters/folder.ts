import { readdir, readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { toEngineWeights, type AdapterWeights } from './convert.js';
import { CONFIG_FILE } from './peft-config.js';
import type { ValidationReport } from './report.js';
import { DEFAULT_SAFETENSORS_LIMITS, isFloatDtype, readHeader, readTensorBytes, toFloat32, type HeaderResult } from './safetensors.js';
import { validateAdapter, WEIGHTS_FILE, type ModelFacts, type ValidationLimits } from './validate.js';

/**
 * The I/O edge of adapter validation: reads a PEFT adapter folder (adapter_config.json +
 * adapter_model.safetensors), validates it, and converts the weights when it passes. Tensor data
 * is read only after the header has been checked against the file's real size.
 */

export interface ReadAdapterOptions {
  /** read tensor values: enables the NaN/Inf check and conversion (default true) */
  readValues: boolean;
}

export interface AdapterFolderResult {
  report: ValidationReport;
  /** engine-layout weights; null when the report has errors or values were not read */
  weights: AdapterWeights | null;
}

export async function readAdapterFolder(dir: string, model: ModelFacts, limits: ValidationLimits, opts: ReadAdapterOptions = { readValues: true }): Promise<AdapterFolderResult> {
  const files = await readdir(dir);
  const configText = files.includes(CONFIG_FILE) ? await readFile(join(dir, CONFIG_FILE), 'utf8') : null;
  const weightsPath = join(dir, WEIGHTS_FILE);
  const head: HeaderResult = files.includes(WEIGHTS_FILE) ? await readHeader(weightsPath, DEFAULT_SAFETENSORS_LIMITS, WEIGHTS_FILE) : { header: null, problems: [] };

  let values: Map<string, Float32Array> | undefined;
  if (opts.readValues && head.header && head.problems.length === 0) {
    values = new Map();
    for (const t of head.header.tensors) {
      if (!isFloatDtype(t.dtype)) continue;
      values.set(t.name, toFloat32(t.dtype, await readTensorBytes(weightsPath, head.header, t)));
    }
  }
  const otherFiles = files.filter((f) => f !== CONFIG_FILE && f !== WEIGHTS_FILE);
  const report = validateAdapter({ configText, weightsFile: WEIGHTS_FILE, header: head.header, headerProblems: head.problems, values, otherFiles }, model, limits);
  const weights = report.ok && values ? toEngineWeights(report, values, model) : null;
  return { report, weights };
}
