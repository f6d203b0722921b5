import { createHash, randomUUID } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { copyFile, lstat, mkdir, readFile, readdir, rename, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { pipeline } from 'node:stream/promises';
import { CONFIG_FILE } from './peft-config.js';
import { WEIGHTS_FILE } from './validate.js';
import { fsyncPath } from '../durable-fs.js';

/**
 * The adapters on disk. Layout:
 *
 *   ADAPTER_DIR/<name>/adapter_config.json
 *   ADAPTER_DIR/<name>/adapter_model.safetensors
 *   ADAPTER_DIR/<name>/meta.json              {name, version, created, files: {sha256, bytes}, report}
 *
 * Every change is made so that a crash (SIGKILL, power loss) at any instant leaves each name
 * holding either its old version or its new one, whole:
 *   - a version is written into `.tmp-<uuid>/` (files, then meta.json last), every file and the
 *     folder are fsynced, and only then is the folder renamed to its name;
 *   - replace = rename `<name>` → `.old-<name>`, rename `.tmp-…` → `<name>`, remove `.old-<name>`,
 *     with ADAPTER_DIR fsynced after each rename so the two renames reach the disk in order;
 *   - delete = rename `<name>` → `.del-<uuid>`, then remove it.
 * `open()` recovers: `.tmp-*`, `.upload-*` and `.del-*` are removed; `.old-<name>` next to
 * `<name>` means the swap finished (the old copy is removed), `.old-<name>` alone means it was
 * interrupted between the renames (it is renamed back: rolled back).
 * Names never start with a dot, so no temporary entry can be mistaken for an adapter.
 * One server process owns an ADAPTER_DIR; two sharing one would remove each other's temp folders:
 * replicas share a store through another backend of the same interface (`AdapterBackend`), the
 * shared folder of shared-folder.ts (`ADAPTER_STORE=shared`).
 */

export { CONFIG_FILE, WEIGHTS_FILE };
export const META_FILE = 'meta.json';
export const ADAPTER_FILES = [CONFIG_FILE, WEIGHTS_FILE] as const;
export type AdapterFile = (typeof ADAPTER_FILES)[number];
/** optional files kept with a version when the upload has them: the tokenizer of an adapter that adds tokens */
export const TOKENIZER_FILES = ['tokenizer.json', 'tokenizer_config.json'] as const;
export type TokenizerFile = (typeof TOKENIZER_FILES)[number];
export type VersionFiles = Record<AdapterFile, FileDigest> & Partial<Record<TokenizerFile, FileDigest>>;
/** The files a version holds: the two adapter files, then whichever tokenizer files it was stored with. */
export const filesOf = (files: Partial<VersionFiles>): string[] => [...ADAPTER_FILES, ...TOKENIZER_FILES.filter((f) => files[f] !== undefined)];

const NAME_RE = /^[a-zA-Z0-9._-]{1,64}$/;

/** Why `name` cannot name an adapter, or null when it can. */
export function adapterNameProblem(name: string): string | null {
  if (name.length === 0) return 'the adapter name is empty';
  if (name.length > 64) return `the adapter name is ${name.length} characters long; at most 64 are allowed`;
  if (!NAME_RE.test(name)) return `the adapter name ${JSON.stringify(name)} may hold only letters, digits, '.', '_' and '-'`;
  if (name.startsWith('.')) return `the adapter name ${JSON.stringify(name)} may not start with a dot`;
  return null;
}

export interface FileDigest {
  bytes: number;
  sha256: string;
}

export interface AdapterMeta {
  metaVersion: 1;
  name: string;
  /** 1 when created, +1 on every replace */
  version: number;
  /** when this version was stored (ISO 8601) */
  created: string;
  files: VersionFiles;
  /** the validation report at upload time (the registry re-validates at every start) */
  report: unknown;
  /** uploaded with allow_no_effect=true: re-validation at start accepts it too */
  allowNoEffect?: boolean;
}

export interface StoredEntry {
  name: string;
  /**
   * Which stored version this is: changes whenever the name is pointed at another version (the
   * background sync of shared stores compares refs). The local store keeps one version per name.
   */
  ref: string;
  /** a local folder holding the version's files */
  dir: string;
  /** null when meta.json is missing or unreadable; `metaError` says why */
  meta: AdapterMeta | null;
  metaError?: string;
}

/** Points where the test-only pause hook can hold a write (see `pauseHookFromEnv`). */
export type PausePoint = 'mid-write' | 'before-swap' | 'mid-swap' | 'after-swap';

export interface StoreHooks {
  pause?: (point: PausePoint, name: string) => Promise<void>;
}

/**
 * Test-only: `LORASERVE_TEST_PAUSE=<point>:<ms>` (e.g. `mid-swap:10000`) sleeps at that point of a
 * write so a crash test can SIGKILL the server there. Not a setting: README leaves it out.
 */
export function pauseHookFromEnv(env: Record<string, string | undefined> = process.env): StoreHooks {
  const raw = env.LORASERVE_TEST_PAUSE;
  const m = raw ? /^(mid-write|before-swap|mid-swap|after-swap):(\d+)$/.exec(raw) : null;
  if (!m) return {};
  const [, point, ms] = m;
  return {
    pause: async (at) => {
      if (at !== point) return;
      process.stderr.write(`LORASERVE_TEST_PAUSE: holding at ${at} for ${ms} ms\n`);
      await new Promise((r) => setTimeout(r, Number(ms)));
    },
  };
}

export interface RecoveryAction {
  entry: string;
  action: 'removed temp' | 'completed swap' | 'rolled back swap' | 'removed deleted' | 'removed unreferenced version';
}

/** Another replica stored the name first (shared stores: the conditional create lost). */
export class NameTakenError extends Error {
  override name = 'NameTakenError';
}

/** The name is not (or no longer) in the store. */
export class NotStoredError extends Error {
  override name = 'NotStoredError';
}

/**
 * What the registry needs of a store. The local folder (AdapterStore, one server per folder) and
 * the folder shared by replicas (SharedFolderStore) implement it; a version once stored never
 * changes, and a name is switched from one version to the next atomically.
 */
export interface AdapterBackend {
  /** where it lives, for logs */
  readonly location: string;
  /** a local folder under which uploads are staged (uploadDir) */
  readonly dir: string;
  /** other replicas may change it: the registry loads on demand and syncs in the background */
  readonly shared: boolean;
  /** every stored name, sorted */
  list(): Promise<StoredEntry[]>;
  /** name → ref of its current version, without reading the versions (the sync calls it often) */
  refs(): Promise<Map<string, string>>;
  /** the current version of a name, or null when none is stored */
  find(name: string): Promise<StoredEntry | null>;
  /** whether anything occupies the name (an adapter, or a foreign folder on a local store) */
  has(name: string): Promise<boolean>;
  verify(entry: StoredEntry): Promise<string[]>;
  uploadDir(): Promise<string>;
  flushStaged(stagedDir: string): Promise<void>;
  digest(stagedDir: string): Promise<VersionFiles>;
  /** stores a new name; NameTakenError when it exists (across replicas on a shared store) */
  create(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry>;
  /** create-or-replace */
  replace(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry>;
  /** NotStoredError when the name is not stored */
  delete(name: string): Promise<void>;
  /** stops background work (lease renewal, clean-up) */
  close(): Promise<void>;
}

/** Checks that the stored files are exactly the ones meta.json describes; returns one line per difference. */
export async function verifyEntry(entry: StoredEntry): Promise<string[]> {
  if (!entry.meta) return [entry.metaError ?? `${META_FILE} is missing`];
  const diffs: string[] = [];
  for (const f of filesOf(entry.meta.files)) {
    const want = entry.meta.files[f as AdapterFile];
    let got: FileDigest;
    try {
      got = await sha256File(path.join(entry.dir, f));
    } catch (e) {
      diffs.push(`${f}: ${(e as NodeJS.ErrnoException).code === 'ENOENT' ? 'missing' : (e as Error).message}`);
      continue;
    }
    if (got.bytes !== want.bytes || got.sha256 !== want.sha256) {
      diffs.push(`${f} is ${got.bytes} bytes with sha256 ${got.sha256}; ${META_FILE} recorded ${want.bytes} bytes with sha256 ${want.sha256}`);
    }
  }
  return diffs;
}

/** See AdapterBackend.flushStaged: starts flushing a staged folder's files; never rejects. */
export function flushStagedFiles(stagedDir: string): Promise<void> {
  return Promise.all([...ADAPTER_FILES, ...TOKENIZER_FILES].map((f) => fsyncPath(path.join(stagedDir, f)).catch(() => undefined))).then(() => undefined);
}

/** A fresh, uniquely named folder under `parent` for an upload being staged (see AdapterBackend.uploadDir). */
export async function makeUploadDir(parent: string, prefix: string): Promise<string> {
  const dir = path.join(parent, `${prefix}${randomUUID()}`);
  await mkdir(dir);
  return dir;
}

/** sha256 and size of the two adapter files of a folder, and of the tokenizer files it has. */
export async function digestFolder(stagedDir: string): Promise<VersionFiles> {
  const [config, weights] = await Promise.all(ADAPTER_FILES.map((f) => sha256File(path.join(stagedDir, f))));
  const out: VersionFiles = { [CONFIG_FILE]: config!, [WEIGHTS_FILE]: weights! };
  for (const f of TOKENIZER_FILES) if (await exists(path.join(stagedDir, f))) out[f] = await sha256File(path.join(stagedDir, f));
  return out;
}

/**
 * Writes a complete version into `dir` (which must exist): moves the staged files in (the staged
 * folder is consumed), writes meta.json last, fsyncs all of it. A folder with meta.json is
 * complete by construction.
 */
export async function writeVersionFiles(dir: string, meta: AdapterMeta, stagedDir: string, hooks: StoreHooks): Promise<void> {
  for (const [i, f] of filesOf(meta.files).entries()) {
    await moveFile(path.join(stagedDir, f), path.join(dir, f));
    await fsyncPath(path.join(dir, f));
    if (i === 0) await hooks.pause?.('mid-write', meta.name);
  }
  const metaPath = path.join(dir, META_FILE);
  await writeFile(metaPath, `${JSON.stringify(meta, null, 2)}\n`, { flag: 'wx' });
  await fsyncPath(metaPath);
  await fsyncPath(dir);
}

export async function sha256File(file: string): Promise<FileDigest> {
  const hash = createHash('sha256');
  let bytes = 0;
  await pipeline(createReadStream(file), async function* (source: AsyncIterable<Buffer>) {
    for await (const chunk of source) {
      bytes += chunk.byteLength;
      hash.update(chunk);
    }
  });
  return { bytes, sha256: hash.digest('hex') };
}

export async function exists(p: string): Promise<boolean> {
  try {
    await lstat(p);
    return true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw e;
  }
}

/** Moves a file (rename; a copy when the source is on another filesystem). */
export async function moveFile(from: string, to: string): Promise<void> {
  try {
    await rename(from, to);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EXDEV') throw e;
    await copyFile(from, to);
    await rm(from, { force: true });
  }
}

export function parseMeta(raw: string, name: string): AdapterMeta {
  const m = JSON.parse(raw) as Partial<AdapterMeta> | null;
  const digestOk = (d: unknown): d is FileDigest =>
    typeof d === 'object' && d !== null && typeof (d as FileDigest).bytes === 'number' && typeof (d as FileDigest).sha256 === 'string';
  if (
    !m ||
    typeof m !== 'object' ||
    m.metaVersion !== 1 ||
    m.name !== name ||
    typeof m.version !== 'number' ||
    typeof m.created !== 'string' ||
    !m.files ||
    !ADAPTER_FILES.every((f) => digestOk(m.files?.[f])) ||
    !TOKENIZER_FILES.every((f) => m.files?.[f] === undefined || digestOk(m.files[f]))
  ) {
    throw new Error(`${META_FILE} does not describe adapter ${JSON.stringify(name)} in the expected format`);
  }
  return m as AdapterMeta;
}

export class AdapterStore implements AdapterBackend {
  readonly shared = false;

  private constructor(
    readonly dir: string,
    private readonly hooks: StoreHooks,
  ) {}

  /** Creates ADAPTER_DIR if needed and finishes or rolls back whatever a crash interrupted. */
  static async open(dir: string, hooks: StoreHooks = {}): Promise<{ store: AdapterStore; recovered: RecoveryAction[] }> {
    const abs = path.resolve(dir);
    await mkdir(abs, { recursive: true });
    const store = new AdapterStore(abs, hooks);
    const recovered = await store.recover();
    return { store, recovered };
  }

  get location(): string {
    return this.dir;
  }

  async close(): Promise<void> {}

  pathOf(name: string): string {
    const why = adapterNameProblem(name);
    if (why) throw new Error(why);
    return path.join(this.dir, name);
  }

  private async recover(): Promise<RecoveryAction[]> {
    const actions: RecoveryAction[] = [];
    const entries = await readdir(this.dir);
    for (const entry of entries) {
      const full = path.join(this.dir, entry);
      if (entry.startsWith('.tmp-') || entry.startsWith('.upload-')) {
        await rm(full, { recursive: true, force: true });
        actions.push({ entry, action: 'removed temp' });
      } else if (entry.startsWith('.del-')) {
        await rm(full, { recursive: true, force: true });
        actions.push({ entry, action: 'removed deleted' });
      } else if (entry.startsWith('.old-')) {
        const name = entry.slice('.old-'.length);
        if (adapterNameProblem(name)) continue;
        if (await exists(path.join(this.dir, name))) {
          await rm(full, { recursive: true, force: true });
          actions.push({ entry, action: 'completed swap' });
        } else {
          await rename(full, path.join(this.dir, name));
          actions.push({ entry, action: 'rolled back swap' });
        }
      }
    }
    if (actions.length) await fsyncPath(this.dir);
    return actions;
  }

  /** Every stored adapter folder (names that are valid adapter names), sorted by name. */
  async list(): Promise<StoredEntry[]> {
    const out: StoredEntry[] = [];
    const entries = await readdir(this.dir, { withFileTypes: true });
    for (const e of entries) {
      if (!e.isDirectory() || adapterNameProblem(e.name)) continue;
      out.push(await this.read(e.name));
    }
    return out.sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async read(name: string): Promise<StoredEntry> {
    const dir = this.pathOf(name);
    try {
      const meta = parseMeta(await readFile(path.join(dir, META_FILE), 'utf8'), name);
      return { name, ref: `${meta.version}:${meta.created}`, dir, meta };
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      const metaError =
        code === 'ENOENT'
          ? `${META_FILE} is missing: the folder was not written by loraserve (copy adapters in through the API, POST /v1/adapters)`
          : `${META_FILE} is unreadable: ${(e as Error).message}`;
      return { name, ref: 'unreadable', dir, meta: null, metaError };
    }
  }

  async refs(): Promise<Map<string, string>> {
    return new Map((await this.list()).map((e) => [e.name, e.ref]));
  }

  async find(name: string): Promise<StoredEntry | null> {
    return (await this.has(name)) ? this.read(name) : null;
  }

  async has(name: string): Promise<boolean> {
    return exists(this.pathOf(name));
  }

  verify(entry: StoredEntry): Promise<string[]> {
    return verifyEntry(entry);
  }

  /** A fresh folder for an upload in progress, inside ADAPTER_DIR so that storing it is a rename; removed at startup if a crash leaves it. */
  async uploadDir(): Promise<string> {
    return makeUploadDir(this.dir, '.upload-');
  }

  /**
   * Starts flushing a staged folder's files to disk so that the flush overlaps validation and the
   * engine load; writeVersion's own fsync then finds little left to write. Never rejects: a failure
   * here shows again, and is reported, in writeVersion.
   */
  flushStaged(stagedDir: string): Promise<void> {
    return flushStagedFiles(stagedDir);
  }

  digest(stagedDir: string): Promise<VersionFiles> {
    return digestFolder(stagedDir);
  }

  /**
   * Writes a complete version into a temp folder: moves the staged files in (the staged folder is
   * consumed), writes meta.json, fsyncs all of it. Returns the temp folder.
   */
  private async writeVersion(meta: AdapterMeta, stagedDir: string): Promise<string> {
    const tmp = path.join(this.dir, `.tmp-${randomUUID()}`);
    await mkdir(tmp);
    try {
      await writeVersionFiles(tmp, meta, stagedDir, this.hooks);
      return tmp;
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
  }

  /** Stores a new adapter; throws if the name is taken on disk. */
  async create(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry> {
    const target = this.pathOf(meta.name);
    if (await exists(target)) throw new NameTakenError(`${target} already exists`);
    const tmp = await this.writeVersion(meta, stagedDir);
    try {
      await this.hooks.pause?.('before-swap', meta.name);
      await rename(tmp, target);
    } catch (e) {
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
    await fsyncPath(this.dir);
    return this.read(meta.name);
  }

  /** Replaces a stored adapter (or stores it when absent) with the crash-safe swap described above. */
  async replace(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry> {
    const target = this.pathOf(meta.name);
    const old = path.join(this.dir, `.old-${meta.name}`);
    const tmp = await this.writeVersion(meta, stagedDir);
    let movedAside = false;
    try {
      await this.hooks.pause?.('before-swap', meta.name);
      // a leftover from an earlier failed swap of this name (recovery normally removes it)
      await rm(old, { recursive: true, force: true });
      if (await exists(target)) {
        await rename(target, old);
        movedAside = true;
        await fsyncPath(this.dir);
      }
      await this.hooks.pause?.('mid-swap', meta.name);
      await rename(tmp, target);
      await fsyncPath(this.dir);
    } catch (e) {
      if (movedAside && !(await exists(target))) await rename(old, target);
      await rm(tmp, { recursive: true, force: true });
      throw e;
    }
    await this.hooks.pause?.('after-swap', meta.name);
    await rm(old, { recursive: true, force: true });
    return this.read(meta.name);
  }

  /** Removes an adapter: one atomic rename out of the namespace, then the files. */
  async delete(name: string): Promise<void> {
    const target = this.pathOf(name);
    const gone = path.join(this.dir, `.del-${randomUUID()}`);
    try {
      await rename(target, gone);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code === 'ENOENT') throw new NotStoredError(`no adapter named ${JSON.stringify(name)} is stored`);
      throw e;
    }
    await fsyncPath(this.dir);
    await rm(gone, { recursive: true, force: true });
  }
}
