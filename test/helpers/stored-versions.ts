import { writeFile } from 'node:fs/promises';
import path from 'node:path';
import type { AdapterMeta } from '../../src/adapters/store.js';
import { sha256 } from './adapter-uploads.js';

/** Writes an upload's two files into `dir`, as the upload route stages them for a store; returns `dir`. */
export async function writeStagedFiles(dir: string, config: string, weights: Buffer): Promise<string> {
  await writeFile(path.join(dir, 'adapter_config.json'), config);
  await writeFile(path.join(dir, 'adapter_model.safetensors'), weights);
  return dir;
}

/** meta.json of a stored version of these two files (sizes and sha256 as the store checks them). */
export function versionMeta(name: string, version: number, config: string, weights: Buffer, report: unknown = {}): AdapterMeta {
  return {
    metaVersion: 1,
    name,
    version,
    created: new Date().toISOString(),
    files: {
      'adapter_config.json': { bytes: Buffer.byteLength(config), sha256: sha256(Buffer.from(config)) },
      'adapter_model.safetensors': { bytes: weights.byteLength, sha256: sha256(weights) },
    },
    report,
  };
}
