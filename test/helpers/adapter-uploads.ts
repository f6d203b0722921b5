import { createHash } from 'node:crypto';
import { readdir, stat } from 'node:fs/promises';
import path from 'node:path';
import { gzipSync } from 'node:zlib';
import { zipSync, type ZipAttributes } from 'fflate';
import tar from 'tar-stream';
import type { Architecture, Projection } from '../../src/model/architecture.js';
import { encodeSafetensors } from '../../src/adapters/safetensors.js';
import { makePeftTensors, peftConfig, type PeftTensor } from './adapter-fixtures.js';

/**
 * What the adapter upload tests send: PEFT files as bytes, multipart bodies, tar/zip archives
 * (including hostile ones), and a listing of ADAPTER_DIR to prove a rejected upload left nothing.
 */

export interface AdapterBytes {
  config: Buffer;
  weights: Buffer;
}

export interface AdapterSpec {
  modelId: string;
  r?: number;
  alpha?: number;
  targets?: Projection[];
  seed?: number;
  config?: Record<string, unknown>;
  /** edit the tensors before encoding (e.g. a wrong shape) */
  tensors?: (t: PeftTensor[]) => PeftTensor[];
}

export function adapterBytes(arch: Architecture, spec: AdapterSpec): AdapterBytes {
  const r = spec.r ?? 8;
  const targets = spec.targets ?? ['q_proj', 'v_proj'];
  const cfg = peftConfig({ base_model_name_or_path: spec.modelId, r, lora_alpha: spec.alpha ?? 16, target_modules: targets, ...spec.config });
  const rankPattern = (cfg.rank_pattern ?? {}) as Record<string, number>;
  let tensors = makePeftTensors(arch, {
    r,
    targets,
    seed: spec.seed ?? 1,
    rankFor: (module) => {
      for (const [k, v] of Object.entries(rankPattern)) if (new RegExp(`(.*\\.)?(${k})$`).test(module)) return v;
      return r;
    },
  });
  if (spec.tensors) tensors = spec.tensors(tensors);
  return {
    config: Buffer.from(JSON.stringify(cfg, null, 2)),
    weights: encodeSafetensors(tensors.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data })), { format: 'pt' }),
  };
}

export const sha256 = (b: Uint8Array) => createHash('sha256').update(b).digest('hex');

export type FormPart = [field: string, value: string] | [field: string, bytes: Uint8Array, filename: string];

export function form(parts: FormPart[]): FormData {
  const fd = new FormData();
  for (const p of parts) {
    if (p.length === 2) fd.append(p[0], p[1]);
    else fd.append(p[0], new Blob([p[1]]), p[2]);
  }
  return fd;
}

export const filesForm = (name: string | null, a: AdapterBytes): FormData =>
  form([
    ...(name === null ? [] : [['name', name] as FormPart]),
    ['config', a.config, 'adapter_config.json'],
    ['weights', a.weights, 'adapter_model.safetensors'],
  ]);

export interface TarEntry {
  name: string;
  data?: Uint8Array;
  type?: 'file' | 'directory' | 'symlink' | 'link' | 'character-device' | 'block-device' | 'fifo';
  linkname?: string;
}

export async function packTar(entries: TarEntry[]): Promise<Buffer> {
  const pack = tar.pack();
  const chunks: Buffer[] = [];
  const done = (async () => {
    for await (const c of pack) chunks.push(c as Buffer);
  })();
  for (const e of entries) {
    const type = e.type ?? 'file';
    await new Promise<void>((resolve, reject) => {
      const cb = (err?: Error | null) => (err ? reject(err) : resolve());
      const header = { name: e.name, type, linkname: e.linkname, mode: type === 'directory' ? 0o755 : 0o644, devmajor: 1, devminor: 3 };
      if (type === 'file') pack.entry({ ...header, size: e.data?.byteLength ?? 0 }, Buffer.from(e.data ?? new Uint8Array(0)), cb);
      else pack.entry(header, cb);
    });
  }
  pack.finalize();
  await done;
  return Buffer.concat(chunks);
}

export const gzip = (b: Uint8Array) => gzipSync(b);

export interface ZipEntry {
  name: string;
  data: Uint8Array;
  /** unix st_mode for the entry (e.g. 0o120777 for a symlink); default a regular file */
  mode?: number;
}

export function packZip(entries: ZipEntry[]): Buffer {
  const files: Record<string, [Uint8Array, ZipAttributes & { level: 0 | 6 | 9 }]> = {};
  for (const e of entries) files[e.name] = [e.data, { os: 3, attrs: ((e.mode ?? 0o100644) << 16) >>> 0, level: 9 }];
  return Buffer.from(zipSync(files));
}

/** The folder as archive entries, at the top level or under `folder/`. */
export function adapterEntries(a: AdapterBytes, folder = ''): { name: string; data: Uint8Array }[] {
  const p = folder ? `${folder}/` : '';
  return [
    { name: `${p}adapter_config.json`, data: a.config },
    { name: `${p}adapter_model.safetensors`, data: a.weights },
  ];
}

/** Every path under `dir` with its size (folders end in /), sorted: equal listings = nothing changed. */
export async function listing(dir: string): Promise<string[]> {
  const out: string[] = [];
  async function walk(d: string, rel: string): Promise<void> {
    for (const e of await readdir(d, { withFileTypes: true })) {
      const r = rel ? `${rel}/${e.name}` : e.name;
      if (e.isDirectory()) {
        out.push(`${r}/`);
        await walk(path.join(d, e.name), r);
      } else {
        out.push(`${r} ${(await stat(path.join(d, e.name))).size}`);
      }
    }
  }
  await walk(dir, '');
  return out.sort();
}
