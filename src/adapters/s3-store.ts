import { randomUUID } from 'node:crypto';
import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, readdir, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import type { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import {
  DeleteObjectsCommand,
  GetObjectCommand,
  ListObjectsV2Command,
  PutObjectCommand,
  S3Client,
  S3ServiceException,
  type _Object,
} from '@aws-sdk/client-s3';
import {
  filesOf,
  META_FILE,
  NameTakenError,
  NotStoredError,
  adapterNameProblem,
  digestFolder,
  flushStagedFiles,
  makeUploadDir,
  parseMeta,
  verifyEntry,
  type AdapterBackend,
  type VersionFiles,
  type AdapterMeta,
  type RecoveryAction,
  type StoreHooks,
  type StoredEntry,
} from './store.js';
import { LeaseTimers } from './lease-timers.js';

/**
 * An adapter store in S3-compatible object storage (AWS S3, MinIO, R2): `ADAPTER_DIR=s3://bucket/prefix`,
 * through the official AWS SDK v3, with its standard credential chain (environment, shared files,
 * container or instance roles), `AWS_REGION`, and `S3_ENDPOINT` for a server other than AWS
 * (path-style addressing then). The same scheme as the shared folder (shared-folder.ts):
 *
 *   <prefix>/versions/<name>@<version>-<uuid>/adapter_config.json, adapter_model.safetensors, meta.json
 *   <prefix>/versions/<ref>/.lease          rewritten every lease/3 while the version is being written
 *   <prefix>/names/<name>                   the pointer {"name", "version", "ref"}
 *
 * - A version's objects are written first (meta.json last); the pointer after them. One object
 *   PUT is atomic in S3, so a reader sees the old pointer or the new one, each naming a whole version.
 * - create writes the pointer with `If-None-Match: *` (S3 conditional writes): of concurrent
 *   creates exactly one succeeds, the others get 412 → NameTakenError. A server that ignores the
 *   header cannot give that guarantee: open() probes for it and says so in the log.
 * - The clean-up (at start, then once per lease) deletes versions that no pointer names and whose
 *   newest object (the lease marker included) is older than the lease.
 * - Versions are read into a local cache folder (immutable, so a cached copy never goes stale);
 *   uploads are staged locally too.
 */

export interface S3Location {
  bucket: string;
  prefix: string;
}

/** `s3://bucket/prefix` → bucket and prefix (no leading or trailing slash); null when not an s3 URL. */
export function parseS3Url(url: string): S3Location | null {
  const m = /^s3:\/\/([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:\/(.*))?$/.exec(url);
  if (!m) return null;
  return { bucket: m[1]!, prefix: (m[2] ?? '').replace(/^\/+|\/+$/g, '') };
}

interface Pointer {
  name: string;
  version: number;
  ref: string;
}

export interface S3StoreOptions {
  url: string;
  endpoint?: string;
  region?: string;
  /** local folder for cached versions and staged uploads */
  cacheDir: string;
  leaseMs: number;
  hooks?: StoreHooks;
  log?: (action: RecoveryAction) => void;
  warn?: (message: string) => void;
  /** for tests: a client built elsewhere */
  client?: S3Client;
}

const statusOf = (e: unknown): number | undefined => (e instanceof S3ServiceException ? e.$metadata.httpStatusCode : (e as { $metadata?: { httpStatusCode?: number } })?.$metadata?.httpStatusCode);

export class S3Store implements AdapterBackend {
  readonly shared = true;
  readonly dir: string;
  /** whether the server refused a second `If-None-Match: *` PUT of one key (measured at open) */
  conditionalWrites = false;
  private readonly leased = new Set<string>();
  private readonly metaCache = new Map<string, AdapterMeta>();
  private readonly pointerCache = new Map<string, { etag: string; pointer: Pointer }>();
  private timers: LeaseTimers | null = null;

  private constructor(
    private readonly client: S3Client,
    private readonly loc: S3Location,
    private readonly opts: S3StoreOptions,
  ) {
    this.dir = path.resolve(opts.cacheDir);
  }

  static async open(opts: S3StoreOptions): Promise<{ store: S3Store; recovered: RecoveryAction[] }> {
    const loc = parseS3Url(opts.url);
    if (!loc) throw new Error(`ADAPTER_DIR ${JSON.stringify(opts.url)} is not s3://bucket/prefix`);
    const client =
      opts.client ??
      new S3Client({
        // other S3 servers: path-style, and no default CRC32 trailers (aws-chunked bodies, which
        // several of them store verbatim)
        ...(opts.endpoint ? { endpoint: opts.endpoint, forcePathStyle: true, requestChecksumCalculation: 'WHEN_REQUIRED' as const, responseChecksumValidation: 'WHEN_REQUIRED' as const } : {}),
        region: opts.region ?? process.env.AWS_REGION ?? process.env.AWS_DEFAULT_REGION ?? 'us-east-1',
      });
    const store = new S3Store(client, loc, opts);
    await mkdir(path.join(store.dir, 'versions'), { recursive: true });
    await mkdir(path.join(store.dir, 'uploads'), { recursive: true });
    const recovered = await store.collect();
    store.conditionalWrites = await store.probeConditionalWrites();
    if (!store.conditionalWrites) {
      opts.warn?.(`the S3 server at ${opts.endpoint ?? 'AWS'} ignores If-None-Match: * on PUT: concurrent creates of one name through different replicas may both succeed (the last one wins)`);
    }
    store.timers = new LeaseTimers(opts.leaseMs, () => store.renew(), () => store.collect(), (a) => opts.log?.(a));
    return { store, recovered };
  }

  get location(): string {
    return `s3://${this.loc.bucket}/${this.loc.prefix}`;
  }

  async close(): Promise<void> {
    this.timers?.stop();
    this.timers = null;
    this.client.destroy();
  }

  private key(...parts: string[]): string {
    return [this.loc.prefix, ...parts].filter(Boolean).join('/');
  }

  private nameKey(name: string): string {
    const why = adapterNameProblem(name);
    if (why) throw new Error(why);
    return this.key('names', name);
  }

  private async put(key: string, body: string | Readable, extra: { ContentLength?: number; IfNoneMatch?: string } = {}): Promise<void> {
    await this.client.send(new PutObjectCommand({ Bucket: this.loc.bucket, Key: key, Body: body, ...extra }));
  }

  private async getText(key: string): Promise<{ text: string; etag: string } | null> {
    try {
      const res = await this.client.send(new GetObjectCommand({ Bucket: this.loc.bucket, Key: key }));
      return { text: await res.Body!.transformToString(), etag: res.ETag ?? '' };
    } catch (e) {
      if (statusOf(e) === 404) return null;
      throw e;
    }
  }

  private async listAll(prefix: string): Promise<_Object[]> {
    const out: _Object[] = [];
    let token: string | undefined;
    do {
      const res = await this.client.send(new ListObjectsV2Command({ Bucket: this.loc.bucket, Prefix: prefix, ContinuationToken: token }));
      out.push(...(res.Contents ?? []));
      token = res.IsTruncated ? res.NextContinuationToken : undefined;
    } while (token);
    return out;
  }

  private async deleteKeys(keys: string[]): Promise<void> {
    for (let i = 0; i < keys.length; i += 1000) {
      const batch = keys.slice(i, i + 1000);
      if (batch.length) await this.client.send(new DeleteObjectsCommand({ Bucket: this.loc.bucket, Delete: { Objects: batch.map((Key) => ({ Key })), Quiet: true } }));
    }
  }

  /** Two conditional PUTs of one probe key: the second must be refused (412) for names to be unique. */
  private async probeConditionalWrites(): Promise<boolean> {
    const key = this.key('probe', randomUUID());
    try {
      await this.put(key, 'probe', { IfNoneMatch: '*' });
      try {
        await this.put(key, 'probe', { IfNoneMatch: '*' });
        return false;
      } catch (e) {
        return statusOf(e) === 412 || statusOf(e) === 409;
      }
    } finally {
      await this.deleteKeys([key]).catch(() => undefined);
    }
  }

  private async renew(): Promise<void> {
    await Promise.all([...this.leased].map((ref) => this.put(this.key('versions', ref, '.lease'), String(Date.now())).catch(() => undefined)));
  }

  async collect(): Promise<RecoveryAction[]> {
    const actions: RecoveryAction[] = [];
    const cutoff = Date.now() - this.opts.leaseMs;
    const referenced = new Set((await this.refs()).values());
    const groups = new Map<string, { keys: string[]; newest: number }>();
    const versionsPrefix = `${this.key('versions')}/`;
    for (const o of await this.listAll(versionsPrefix)) {
      const ref = o.Key!.slice(versionsPrefix.length).split('/')[0]!;
      let g = groups.get(ref);
      if (!g) groups.set(ref, (g = { keys: [], newest: 0 }));
      g.keys.push(o.Key!);
      g.newest = Math.max(g.newest, o.LastModified?.getTime() ?? 0);
    }
    for (const [ref, g] of groups) {
      if (referenced.has(ref) || this.leased.has(ref) || g.newest >= cutoff) continue;
      await this.deleteKeys(g.keys);
      actions.push({ entry: `versions/${ref}`, action: 'removed unreferenced version' });
    }
    // local staging left by a crashed process of this host
    for (const e of await readdir(path.join(this.dir, 'uploads'))) {
      const p = path.join(this.dir, 'uploads', e);
      const st = await stat(p).catch(() => null);
      if (st && st.mtimeMs < cutoff && !this.leased.has(p)) {
        await rm(p, { recursive: true, force: true });
        actions.push({ entry: `uploads/${e}`, action: 'removed temp' });
      }
    }
    return actions;
  }

  private async readPointer(name: string, etag?: string): Promise<Pointer | null> {
    const cached = this.pointerCache.get(name);
    if (cached && etag && cached.etag === etag) return cached.pointer;
    const got = await this.getText(this.nameKey(name));
    if (!got) {
      this.pointerCache.delete(name);
      return null;
    }
    const p = JSON.parse(got.text) as Partial<Pointer>;
    if (p.name !== name || typeof p.version !== 'number' || typeof p.ref !== 'string' || p.ref.includes('/')) throw new Error(`the pointer of ${JSON.stringify(name)} is not in the expected format`);
    this.pointerCache.set(name, { etag: got.etag, pointer: p as Pointer });
    return p as Pointer;
  }

  async refs(): Promise<Map<string, string>> {
    const prefix = `${this.key('names')}/`;
    const out = new Map<string, string>();
    const objects = (await this.listAll(prefix)).sort((a, b) => (a.Key! < b.Key! ? -1 : 1));
    for (const o of objects) {
      const name = o.Key!.slice(prefix.length);
      if (adapterNameProblem(name)) continue;
      try {
        const p = await this.readPointer(name, o.ETag);
        if (p) out.set(name, p.ref);
      } catch {
        out.set(name, 'unreadable');
      }
    }
    return out;
  }

  private cachedDir(ref: string): string {
    return path.join(this.dir, 'versions', ref);
  }

  private async entryOf(name: string, ref: string): Promise<StoredEntry> {
    const dir = this.cachedDir(ref);
    let meta = this.metaCache.get(ref);
    if (!meta) {
      try {
        const got = await this.getText(this.key('versions', ref, META_FILE));
        if (!got) return { name, ref, dir, meta: null, metaError: `${META_FILE} of version ${ref} is missing` };
        meta = parseMeta(got.text, name);
        this.metaCache.set(ref, meta);
      } catch (e) {
        return { name, ref, dir, meta: null, metaError: `${META_FILE} of version ${ref} is unreadable: ${(e as Error).message}` };
      }
    }
    return { name, ref, dir, meta };
  }

  async find(name: string): Promise<StoredEntry | null> {
    let p: Pointer | null;
    try {
      p = await this.readPointer(name);
    } catch (e) {
      return { name, ref: 'unreadable', dir: this.dir, meta: null, metaError: (e as Error).message };
    }
    return p ? this.entryOf(name, p.ref) : null;
  }

  async list(): Promise<StoredEntry[]> {
    const out: StoredEntry[] = [];
    for (const [name, ref] of await this.refs()) out.push(await this.entryOf(name, ref));
    return out;
  }

  async has(name: string): Promise<boolean> {
    return (await this.readPointer(name).catch(() => null)) !== null;
  }

  /** Downloads the version into the local cache (once), then checks the files against meta.json. */
  async verify(entry: StoredEntry): Promise<string[]> {
    if (!entry.meta) return [entry.metaError ?? `${META_FILE} is missing`];
    if (!(await stat(path.join(entry.dir, META_FILE)).catch(() => null))) {
      const tmp = path.join(this.dir, 'versions', `.download-${randomUUID()}`);
      await mkdir(tmp, { recursive: true });
      try {
        for (const f of [...filesOf(entry.meta.files), META_FILE]) {
          let res;
          try {
            res = await this.client.send(new GetObjectCommand({ Bucket: this.loc.bucket, Key: this.key('versions', entry.ref, f) }));
          } catch (e) {
            if (statusOf(e) === 404) return [`${f}: missing`];
            throw e;
          }
          await pipeline(res.Body as Readable, createWriteStream(path.join(tmp, f)));
        }
        await rename(tmp, entry.dir).catch(async (e: unknown) => {
          // another request downloaded it meanwhile
          if ((e as NodeJS.ErrnoException).code !== 'ENOTEMPTY' && (e as NodeJS.ErrnoException).code !== 'EEXIST') throw e;
        });
      } finally {
        await rm(tmp, { recursive: true, force: true });
      }
    }
    return verifyEntry(entry);
  }

  async uploadDir(): Promise<string> {
    return makeUploadDir(path.join(this.dir, 'uploads'), 'upload-');
  }

  flushStaged(stagedDir: string): Promise<void> {
    return flushStagedFiles(stagedDir);
  }

  digest(stagedDir: string): Promise<VersionFiles> {
    return digestFolder(stagedDir);
  }

  /** Uploads a version's objects (meta.json last) under a lease; returns its ref. */
  private async writeVersion(meta: AdapterMeta, stagedDir: string): Promise<string> {
    const ref = `${meta.name}@${meta.version}-${randomUUID()}`;
    this.leased.add(ref);
    try {
      await this.put(this.key('versions', ref, '.lease'), String(Date.now()));
      for (const [i, f] of filesOf(meta.files).entries()) {
        const file = path.join(stagedDir, f);
        await this.put(this.key('versions', ref, f), createReadStream(file), { ContentLength: (await stat(file)).size });
        if (i === 0) await this.opts.hooks?.pause?.('mid-write', meta.name);
      }
      await this.put(this.key('versions', ref, META_FILE), `${JSON.stringify(meta, null, 2)}\n`);
      await this.opts.hooks?.pause?.('before-swap', meta.name);
    } catch (e) {
      await this.removeVersion(ref).catch(() => undefined);
      throw e;
    }
    return ref;
  }

  private async removeVersion(ref: string): Promise<void> {
    this.leased.delete(ref);
    this.metaCache.delete(ref);
    await rm(this.cachedDir(ref), { recursive: true, force: true });
    await this.deleteKeys((await this.listAll(`${this.key('versions', ref)}/`)).map((o) => o.Key!));
  }

  private async done(ref: string, meta: AdapterMeta): Promise<StoredEntry> {
    this.leased.delete(ref);
    await this.deleteKeys([this.key('versions', ref, '.lease')]).catch(() => undefined);
    this.metaCache.set(ref, meta);
    return { name: meta.name, ref, dir: this.cachedDir(ref), meta };
  }

  async create(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry> {
    const ref = await this.writeVersion(meta, stagedDir);
    const pointer: Pointer = { name: meta.name, version: meta.version, ref };
    try {
      await this.put(this.nameKey(meta.name), JSON.stringify(pointer), { IfNoneMatch: '*' });
    } catch (e) {
      await this.removeVersion(ref).catch(() => undefined);
      if (statusOf(e) === 412 || statusOf(e) === 409) throw new NameTakenError(`an adapter named ${JSON.stringify(meta.name)} is stored`);
      throw e;
    }
    return this.done(ref, meta);
  }

  async replace(meta: AdapterMeta, stagedDir: string): Promise<StoredEntry> {
    const ref = await this.writeVersion(meta, stagedDir);
    let previous: Pointer | null = null;
    try {
      previous = await this.readPointer(meta.name).catch(() => null);
      await this.opts.hooks?.pause?.('mid-swap', meta.name);
      await this.put(this.nameKey(meta.name), JSON.stringify({ name: meta.name, version: meta.version, ref } satisfies Pointer));
    } catch (e) {
      await this.removeVersion(ref).catch(() => undefined);
      throw e;
    }
    const entry = await this.done(ref, meta);
    await this.opts.hooks?.pause?.('after-swap', meta.name);
    if (previous && previous.ref !== ref) await this.removeVersion(previous.ref);
    return entry;
  }

  async delete(name: string): Promise<void> {
    const p = await this.readPointer(name).catch(() => null);
    if (!p) throw new NotStoredError(`no adapter named ${JSON.stringify(name)} is stored`);
    await this.deleteKeys([this.nameKey(name)]);
    this.pointerCache.delete(name);
    await this.removeVersion(p.ref);
  }
}
