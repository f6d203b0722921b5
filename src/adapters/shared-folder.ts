import { randomUUID } from 'node:crypto';
import { link, mkdir, readFile, readdir, rename, rm, stat, utimes, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fsyncPath } from '../durable-fs.js';
import {
  META_FILE,
  NameTakenError,
  NotStoredError,
  adapterNameProblem,
  digestFolder,
  flushStagedFiles,
  makeUploadDir,
  parseMeta,
  verifyEntry,
  writeVersionFiles,
  type AdapterBackend,
  type VersionFiles,
  type AdapterMeta,
  type RecoveryAction,
  type StoreHooks,
  type StoredEntry,
} from './store.js';
import { LeaseTimers } from './lease-timers.js';

/**
 * An adapter store in a folder that several replicas mount at once (NFS, EFS, a ReadWriteMany
 * volume): `ADAPTER_STORE=shared`. Layout (every entry starts with a dot, so a replica started
 * without ADAPTER_STORE=shared on the same folder sees no adapter and removes nothing of it):
 *
 *   ADAPTER_DIR/.versions/<name>@<version>-<uuid>/   adapter_config.json, adapter_model.safetensors, meta.json
 *   ADAPTER_DIR/.names/<name>                        the pointer: {"name", "version", "ref"}
 *   ADAPTER_DIR/.work/                               uploads in progress, pointers being written, deleted pointers
 *
 * - A version folder is written once (files, then meta.json, each fsynced) and never changed.
 *   Readers find versions only through a pointer, and a pointer is written only after its version
 *   is complete, so no reader sees half an adapter; a crash leaves the old pointer or the new one.
 * - create: the new pointer is written to a temp file and hard-linked to `.names/<name>`. link()
 *   fails with EEXIST when the name exists, atomically, on NFS too (the classic NFS lock-file
 *   idiom, unlike O_EXCL on NFSv2), so concurrent creates through different replicas give exactly
 *   one winner.
 * - replace: the temp pointer is renamed over `.names/<name>` (atomic); the old version folder is
 *   then removed. A replica that was just reading it finds its files gone and re-reads the pointer.
 * - delete: `.names/<name>` is renamed into `.work/` (atomic: of two concurrent deletes one gets
 *   ENOENT), then its version is removed.
 * - Leases: everything this replica is still writing (upload folders, version folders whose
 *   pointer is not yet written) has its mtime renewed every lease/3. Clean-up, at start and then
 *   once per lease, removes `.work/` entries and unreferenced versions whose mtime is older than
 *   the lease: what a crashed replica left, never what a live one is writing. Replica clocks must
 *   agree to well within the lease (NTP).
 */

const NAMES = '.names';
const VERSIONS = '.versions';
const WORK = '.work';

interface Pointer {
  name: string;
  version: number;
  ref: string;
}

function parsePointer(raw: string, name: string): Pointer {
  const p = JSON.parse(raw) as Partial<Pointer> | null;
  if (!p || p.name !== name || typeof p.version !== 'number' || typeof p.ref !== 'string' || p.ref.includes('/') || p.ref.startsWith('.')) {
    throw new Error(`the pointer of ${JSON.stringify(name)} is not in the expected format`);
  }
  return p as Pointer;
}

const isCode = (e: unknown, code: string) => (e as NodeJS.ErrnoException | null)?.code === code;

export interface SharedFolderOptions {
  /** how long an entry of a live writer is kept without renewal (ADAPTER_LEASE_MS) */
  leaseMs: number;
  hooks?: StoreHooks;
  log?: (action: RecoveryAction) => void;
}

export class SharedFolderStore implements AdapterBackend {
  readonly shared = true;
  /** entries this process is writing: their mtime is renewed so that other replicas leave them alone */
  private readonly leased = new Set<string>();
  /** versions are immutable, so what was read of one stays true */
  private readonly metaCache = new Map<string, { meta: AdapterMeta | null; metaError?: string }>();
  private readonly pointerCache = new Map<string, { ino: number; mtimeMs: number; size: number; pointer: Pointer }>();
  private timers: LeaseTimers | null = null;

  private constructor(
    readonly dir: string,
    private readonly opts: SharedFolderOptions,
  ) {}

  static async open(dir: string, opts: SharedFolderOptions): Promise<{ store: SharedFolderStore; recovered: RecoveryAction[] }> {
    const abs = path.resolve(dir);
    for (const d of [NAMES, VERSIONS, WORK]) await mkdir(path.join(abs, d), { recursive: true });
    const store = new SharedFolderStore(abs, opts);
    const recovered = await store.collect();
    store.timers = new LeaseTimers(opts.leaseMs, () => store.renew(), () => store.collect(), (a) => opts.log?.(a));
    return { store, recovered };
  }

  get location(): string {
    return `${this.dir} (shared)`;
  }

  async close(): Promise<void> {
    this.timers?.stop();
    this.timers = null;
  }

  private namePath(name: string): string {
    const why = adapterNameProblem(name);
    if (why) throw new Error(why);
    return path.join(this.dir, NAMES, name);
  }

  private versionDir(ref: string): string {
    return path.join(this.dir, VERSIONS, ref);
  }

  /** Renews the mtime of everything this process is writing; a vanished entry leaves the set. */
  private async renew(): Promise<void> {
    const now = new Date();
    await Promise.all(
      [...this.leased].map((p) =>
        utimes(p, now, now).catch((e: unknown) => {
          if (isCode(e, 'ENOENT')) this.leased.delete(p);
        }),
      ),
    );
  }

  private async lease(p: string): Promise<void> {
    this.leased.add(p);
  }

  /**
   * Removes what crashed writers left: `.work/` entries and unreferenced version folders whose
   * lease ran out. Pointers are read first, versions second: a version that becomes referenced in
   * between was renewed within the last lease/3, so it is not old enough to go.
   */
  async collect(): Promise<RecoveryAction[]> {
    const actions: RecoveryAction[] = [];
    const cutoff = Date.now() - this.opts.leaseMs;
    const stale = async (p: string) => {
      try {
        return (await stat(p)).mtimeMs < cutoff && !this.leased.has(p);
      } catch {
        return false;
      }
    };
    for (const e of await readdir(path.join(this.dir, WORK))) {
      const p = path.join(this.dir, WORK, e);
      if (await stale(p)) {
        await rm(p, { recursive: true, force: true });
        actions.push({ entry: `${WORK}/${e}`, action: 'removed temp' });
      }
    }
    const referenced = new Set((await this.refs()).values());
    for (const e of await readdir(path.join(this.dir, VERSIONS))) {
      if (referenced.has(e)) continue;
      const p = this.versionDir(e);
      if (await stale(p)) {
        await rm(p, { recursive: true, force: true });
        this.metaCache.delete(e);
        actions.push({ entry: `${VERSIONS}/${e}`, action: 'removed unreferenced version' });
      }
    }
    return actions;
  }

  private async readPointer(name: string): Promise<Pointer | null> {
    const p = this.namePath(name);
    let st;
    try {
      st = await stat(p);
    } catch (e) {
      if (isCode(e, 'ENOENT')) {
        this.pointerCache.delete(name);
        return null;
      }
      throw e;
    }
    // a switch renames a new file over the pointer: a new inode
    const cached = this.pointerCache.get(name);
    if (cached && cached.ino === st.ino && cached.mtimeMs === st.mtimeMs && cached.size === st.size) return cached.pointer;
    let raw: string;
    try {
      raw = await readFile(p, 'utf8');
    } catch (e) {
      if (isCode(e, 'ENOENT')) return null;
      throw e;
    }
    const pointer = parsePointer(raw, name);
    this.pointerCache.set(name, { ino: st.ino, mtimeMs: st.mtimeMs, size: st.size, pointer });
    return pointer;
  }

  async refs(): Promise<Map<string, string>> {
    const out = new Map<string, string>();
    const names = (await readdir(path.join(this.dir, NAMES))).filter((n) => !adapterNameProblem(n)).sort();
    for (const name of names) {
      try {
        const p = await this.readPointer(name);
        if (p) out.set(name, p.ref);
      } catch {
        // a pointer that cannot be parsed: find() reports it; the listing shows it as broken
        out.set(name, 'unreadable');
      }
    }
    return out;
  }

  private async entryOf(name: string, ref: string): Promise<StoredEntry> {
    const dir = this.versionDir(ref);
    let m = this.metaCache.get(ref);
    if (!m) {
      try {
        m = { meta: parseMeta(await readFile(path.join(dir, META_FILE), 'utf8'), name) };
        this.metaCache.set(ref, m);
      } catch (e) {
        // not cached: a version being removed by a replace is read again through the new pointer
        m = { meta: null, metaError: isCode(e, 'ENOENT') ? `${META_FILE} of version ${ref} is missing` : `${META_FILE} of version ${ref} is unreadable: ${(e as Error).message}` };
      }
    }
    return { name, ref, dir, ...m };
  }

  async find(name: string): Promise<StoredEntry | null> {
    let p: Pointer | null;
    try {
      p = await this.readPointer(name);
    } catch (e) {
      return { name, ref: 'unreadable', dir: this.namePath(name), meta: null, metaError: (e as Error).message };
    }
    return p ? this.entryOf(name, p.ref) : null;
  }

  async list(): Promise<StoredEntry[]> {
    const out: StoredEntry[] = [];
    for (const name of (await this.refs()).keys()) {
      const e = await this.find(name);
      if (e) out.push(e);
    }
    return out;
  }

  async has(name: string): Promise<boolean> {
    try {
      await stat(this.namePath(name));
      return true;
    } catch (e) {
      if (isCode(e, 'ENOENT')) return false;
      throw e;
    }
  }

  verify(entry: StoredEntry): Promise<string[]> {
    return verifyEntry(entry);
  }

  async uploadDir(): Promise<string> {
    const dir = await makeUploadDir(path.join(this.dir, WORK), 'upload-');
    await this.lease(dir);
    return dir;
  }

  flushStaged(stagedDir: string): Promise<void> {
    return flushStagedFiles(stagedDir);
  }

  digest(stagedDir: string): Promise<VersionFiles> {
    return digestFolder(stagedDir);
  }

  /** Writes the version folder and a temp pointer to it; both leased until the caller is done. */
  private async stage(meta: AdapterMeta, stagedDir: string): Promise<{ ref: string; dir: string; tmpPointer: string }> {
    const ref = `${meta.name}@${meta.version}-${randomUUID()}`;
    const dir = this.versionDir(ref);
    await mkdir(dir);
    await this.lease(dir);
    const tmpPointer = path.join(this.dir, WORK, `pointer-${randomUUID()}`);
    try {
      await writeVersionFiles(dir, meta, stagedDir, this.opts.hooks ?? {});
      await fsyncPath(path.join(this.dir, VERSIONS));
      const pointer: Pointer = { name: meta.name, version: meta.version, ref };
      await writeFile(tmpPointer, `${JSON.stringify(pointer)}\n`, { flag: 'wx' });
      this.leased.add(tmpPointer);
      await fsyncPath(tmpPointer);
      await this.opts.hooks?.pause?.('before-swap', meta.name);
    } catch (e) {
      await this.unstage(dir, tmpPointer);
      throw e;
    }
    return { ref, dir, tmpPointer };
  }

  private async unstage(dir: string | null, tmpPointer: string): Promise<void> {
    if (dir) {
      this.leased.delete(dir);
      await rm(dir, { recursive: true, force: true });
    }
    this.leased.delete(tmpPointer);
    await rm(tmpPointer, { force: true });
  }

  async create(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry> {
    const target = this.namePath(meta.name);
    const { ref, dir, tmpPointer } = await this.stage(meta, stagedDir);
    try {
      await link(tmpPointer, target);
    } catch (e) {
      await this.unstage(dir, tmpPointer);
      if (isCode(e, 'EEXIST')) throw new NameTakenError(`an adapter named ${JSON.stringify(meta.name)} is stored`);
      throw e;
    }
    this.leased.delete(dir);
    this.leased.delete(tmpPointer);
    await fsyncPath(path.join(this.dir, NAMES));
    await rm(tmpPointer, { force: true });
    this.metaCache.set(ref, { meta });
    return { name: meta.name, ref, dir, meta };
  }

  async replace(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry> {
    const target = this.namePath(meta.name);
    const { ref, dir, tmpPointer } = await this.stage(meta, stagedDir);
    let previous: Pointer | null = null;
    try {
      previous = await this.readPointer(meta.name).catch(() => null);
      await this.opts.hooks?.pause?.('mid-swap', meta.name);
      await rename(tmpPointer, target);
    } catch (e) {
      await this.unstage(dir, tmpPointer);
      throw e;
    }
    this.leased.delete(dir);
    this.leased.delete(tmpPointer);
    await fsyncPath(path.join(this.dir, NAMES));
    this.metaCache.set(ref, { meta });
    await this.opts.hooks?.pause?.('after-swap', meta.name);
    // a concurrent replace through another replica may have orphaned a version between our read
    // and our rename: the clean-up removes it once its lease has run out
    if (previous && previous.ref !== ref) await this.removeVersion(previous.ref);
    return { name: meta.name, ref, dir, meta };
  }

  private async removeVersion(ref: string): Promise<void> {
    this.metaCache.delete(ref);
    await rm(this.versionDir(ref), { recursive: true, force: true });
  }

  async delete(name: string): Promise<void> {
    const target = this.namePath(name);
    const gone = path.join(this.dir, WORK, `deleted-${randomUUID()}`);
    try {
      await rename(target, gone);
    } catch (e) {
      if (isCode(e, 'ENOENT')) throw new NotStoredError(`no adapter named ${JSON.stringify(name)} is stored`);
      throw e;
    }
    this.pointerCache.delete(name);
    await fsyncPath(path.join(this.dir, NAMES));
    try {
      const p = parsePointer(await readFile(gone, 'utf8'), name);
      await this.removeVersion(p.ref);
    } catch {
      // an unreadable pointer: its version, if any, is unreferenced now and cleaned up by age
    }
    await rm(gone, { force: true });
  }
}
