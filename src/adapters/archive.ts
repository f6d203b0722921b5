import { createReadStream, createWriteStream } from 'node:fs';
import { mkdir, open, stat } from 'node:fs/promises';
import path from 'node:path';
import { Transform, type Readable, type Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { crc32, createGunzip } from 'node:zlib';
import { Inflate } from 'fflate';
import tar from 'tar-stream';

/**
 * Unpacks the adapter folder out of an uploaded `.tar`, `.tar.gz`/`.tgz` or `.zip`.
 *
 * Nothing in an archive is trusted. The whole upload is refused when any entry is a symlink, a
 * hard link or a device, or has an absolute path or a `..` segment — even one we would not have
 * extracted — because such an archive was not made by `tar`/`zip` of a PEFT folder. Only the
 * adapter files themselves are written, under names we choose, so no entry name ever becomes a
 * path. The bytes extracted (and, for tar, every byte decompressed) count against
 * MAX_UPLOAD_BYTES, which stops zip and gzip bombs after at most one block.
 */

export const ADAPTER_FILE_NAMES = ['adapter_config.json', 'adapter_model.safetensors', 'adapter_model.bin', 'tokenizer.json', 'tokenizer_config.json'] as const;
type WantedName = (typeof ADAPTER_FILE_NAMES)[number];
const isWanted = (n: string): n is WantedName => (ADAPTER_FILE_NAMES as readonly string[]).includes(n);

export type ArchiveKind = 'tar' | 'tgz' | 'zip';

/** Packaging problems. `status` is 400 for a malformed or unsafe archive, 413 when it is too large. */
export class ArchiveError extends Error {
  constructor(
    readonly status: 400 | 413,
    message: string,
    readonly entries: string[] = [],
  ) {
    super(message);
    this.name = 'ArchiveError';
  }
}

export interface ExtractedFolder {
  /** the folder (under outDir) holding the extracted adapter files */
  dir: string;
  /** where adapter_config.json sat inside the archive ('' = top level) */
  folderInArchive: string;
  /** adapter files found in that folder */
  files: WantedName[];
}

export const MAX_ARCHIVE_ENTRIES = 10_000;

/** Pure: an archive entry name → its path segments, or why it is unsafe. */
export function entrySegments(name: string): { segments: string[] } | { unsafe: string } {
  if (name.includes('\0')) return { unsafe: 'has a NUL byte in its name' };
  const n = name.replace(/\\/g, '/');
  if (n.startsWith('/') || /^[a-zA-Z]:/.test(n)) return { unsafe: 'has an absolute path' };
  const segments = n.split('/').filter((s) => s !== '' && s !== '.');
  if (segments.includes('..')) return { unsafe: 'climbs out of the archive with ..' };
  return { segments };
}

/** Detects the archive kind from its first bytes, else from the file name. */
export function sniffArchive(head: Uint8Array, filename: string): ArchiveKind | null {
  if (head[0] === 0x50 && head[1] === 0x4b && (head[2] === 3 || head[2] === 5) && (head[3] === 4 || head[3] === 6)) return 'zip';
  if (head[0] === 0x1f && head[1] === 0x8b) return 'tgz';
  if (head.length >= 262 && Buffer.from(head.subarray(257, 262)).toString('latin1') === 'ustar') return 'tar';
  const f = filename.toLowerCase();
  if (f.endsWith('.zip')) return 'zip';
  if (f.endsWith('.tar.gz') || f.endsWith('.tgz')) return 'tgz';
  if (f.endsWith('.tar')) return 'tar';
  return null;
}

export async function sniffArchiveFile(file: string, filename: string): Promise<ArchiveKind | null> {
  const fh = await open(file, 'r');
  try {
    const head = Buffer.alloc(512);
    const { bytesRead } = await fh.read(head, 0, 512, 0);
    return sniffArchive(head.subarray(0, bytesRead), filename);
  } finally {
    await fh.close();
  }
}

/**
 * Collects the adapter files of every folder at depth 0 or 1 as entries stream by, then picks the
 * one folder holding adapter_config.json.
 */
class FolderCollector {
  private readonly folders = new Map<string, { index: number; files: Set<WantedName> }>();
  private readonly unsafe: string[] = [];

  constructor(private readonly outDir: string) {}

  /** Checks an entry's name; returns where to write it (null: not an adapter file, skip it). */
  place(name: string): string | null {
    const parsed = entrySegments(name);
    if ('unsafe' in parsed) {
      this.unsafe.push(`${name} (${parsed.unsafe})`);
      return null;
    }
    const segs = parsed.segments;
    const base = segs[segs.length - 1];
    if (segs.length === 0 || segs.length > 2 || !base || !isWanted(base)) return null;
    const folder = segs.length === 2 ? segs[0]! : '';
    let f = this.folders.get(folder);
    if (!f) {
      f = { index: this.folders.size, files: new Set() };
      this.folders.set(folder, f);
    }
    if (f.files.has(base)) throw new ArchiveError(400, `the archive holds ${folder ? `${folder}/` : ''}${base} twice`, [name]);
    f.files.add(base);
    return path.join(this.outDir, String(f.index), base);
  }

  reject(name: string, why: string): void {
    this.unsafe.push(`${name} (${why})`);
  }

  async dirFor(file: string): Promise<void> {
    await mkdir(path.dirname(file), { recursive: true });
  }

  assertSafe(): void {
    if (this.unsafe.length) {
      throw new ArchiveError(400, `the archive holds entries that a packed adapter folder never has, so it was refused: ${this.unsafe.join('; ')}. Pack the folder with plain files only (e.g. \`tar -czf adapter.tgz -C my-adapter .\`).`, this.unsafe);
    }
  }

  finish(): ExtractedFolder {
    this.assertSafe();
    const withConfig = [...this.folders.entries()].filter(([, f]) => f.files.has('adapter_config.json'));
    if (withConfig.length > 1) {
      const names = withConfig.map(([k]) => (k ? `${k}/` : '(top level)'));
      throw new ArchiveError(400, `the archive holds several adapters (adapter_config.json in ${names.join(', ')}); upload one adapter per request`, names);
    }
    const found = withConfig[0];
    if (!found) {
      // no config: report what was there so the message says what is missing
      return { dir: path.join(this.outDir, 'none'), folderInArchive: '', files: [] };
    }
    const [folder, f] = found;
    return { dir: path.join(this.outDir, String(f.index)), folderInArchive: folder, files: [...f.files] };
  }
}

/** Counts bytes flowing through and fails once they pass the budget. */
function byteBudget(budget: number, what: string): Transform {
  let seen = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      seen += chunk.byteLength;
      if (seen > budget) cb(new ArchiveError(413, `${what} expands to more than ${budget} bytes (MAX_UPLOAD_BYTES)`));
      else cb(null, chunk);
    },
  });
}

async function extractTar(file: string, gz: boolean, collector: FolderCollector, maxBytes: number): Promise<void> {
  const extract = tar.extract();
  const stages: (Readable | Writable | Transform)[] = [createReadStream(file)];
  if (gz) stages.push(createGunzip());
  // headers and padding add to the payload: allow them, but still bound a stream of empty entries
  stages.push(byteBudget(maxBytes + 1024 * 1024 + MAX_ARCHIVE_ENTRIES * 1024, 'the archive'));
  const feeding = pipeline([...stages, extract] as unknown as [Readable, Writable]);
  // a failure while feeding ends the iteration below with that error
  feeding.catch((e: unknown) => extract.destroy(e as Error));
  let entries = 0;
  let extracted = 0;
  try {
    for await (const entry of extract) {
      const h = entry.header;
      if (++entries > MAX_ARCHIVE_ENTRIES) throw new ArchiveError(400, `the archive holds more than ${MAX_ARCHIVE_ENTRIES} entries`);
      const type = h.type ?? 'file';
      // (pax and GNU long-name headers are consumed by tar-stream itself)
      if (type === 'directory') {
        const parsed = entrySegments(h.name);
        if ('unsafe' in parsed) collector.reject(h.name, parsed.unsafe);
        entry.resume();
        continue;
      }
      if (type !== 'file' && type !== 'contiguous-file') {
        collector.reject(h.name, `is a ${type}${h.linkname ? ` to ${h.linkname}` : ''}`);
        entry.resume();
        continue;
      }
      const size = h.size ?? 0;
      extracted += size;
      if (extracted > maxBytes) throw new ArchiveError(413, `the archive's files add up to more than ${maxBytes} bytes (MAX_UPLOAD_BYTES); ${h.name} alone is ${size} bytes`, [h.name]);
      const dest = collector.place(h.name);
      if (!dest) {
        entry.resume();
        continue;
      }
      await collector.dirFor(dest);
      // streamx's own iterator, not stream.pipeline: an entry destroyed while we awaited above
      // (the gzip stream failed) then rejects here instead of never settling
      const fh = await open(dest, 'wx');
      try {
        for await (const chunk of entry as AsyncIterable<Buffer>) await fh.write(chunk);
      } finally {
        await fh.close();
      }
    }
    await feeding;
  } catch (e) {
    extract.destroy();
    await feeding.catch(() => undefined);
    if (e instanceof ArchiveError) throw e;
    throw new ArchiveError(400, `the archive could not be read as ${gz ? 'gzip-compressed tar' : 'tar'}: ${(e as Error).message}`);
  }
}

interface ZipEntry {
  name: string;
  method: number;
  flags: number;
  crc: number;
  compressedSize: number;
  size: number;
  localOffset: number;
  mode: number | null;
}

async function readAt(fh: Awaited<ReturnType<typeof open>>, position: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length);
  const { bytesRead } = await fh.read(buf, 0, length, position);
  if (bytesRead !== length) throw new ArchiveError(400, 'the zip file is truncated');
  return buf;
}

/** Reads the central directory: the only place a zip records entry types (unix mode), so streaming local headers is not enough. */
async function readZipDirectory(file: string): Promise<{ entries: ZipEntry[]; cdOffset: number }> {
  const size = (await stat(file)).size;
  const fh = await open(file, 'r');
  try {
    const tailLen = Math.min(size, 22 + 0xffff);
    if (tailLen < 22) throw new ArchiveError(400, 'the zip file is too short to hold a zip directory');
    const tail = await readAt(fh, size - tailLen, tailLen);
    let eocd = -1;
    for (let i = tailLen - 22; i >= 0; i--) {
      if (tail.readUInt32LE(i) === 0x06054b50) {
        eocd = i;
        break;
      }
    }
    if (eocd < 0) throw new ArchiveError(400, 'the zip file has no end-of-directory record: it is truncated or not a zip');
    const count = tail.readUInt16LE(eocd + 10);
    const cdSize = tail.readUInt32LE(eocd + 12);
    const cdOffset = tail.readUInt32LE(eocd + 16);
    if (tail.readUInt16LE(eocd + 4) !== 0 || tail.readUInt16LE(eocd + 6) !== 0) throw new ArchiveError(400, 'multi-part zip files are not supported');
    if (count === 0xffff || cdSize === 0xffffffff || cdOffset === 0xffffffff) throw new ArchiveError(400, 'ZIP64 archives are not supported; pack the adapter as .tar.gz');
    if (count > MAX_ARCHIVE_ENTRIES) throw new ArchiveError(400, `the archive holds more than ${MAX_ARCHIVE_ENTRIES} entries`);
    const eocdPos = size - tailLen + eocd;
    if (cdOffset + cdSize > eocdPos) throw new ArchiveError(400, 'the zip directory lies outside the file');
    const cd = await readAt(fh, cdOffset, cdSize);
    const entries: ZipEntry[] = [];
    let p = 0;
    for (let i = 0; i < count; i++) {
      if (p + 46 > cd.length || cd.readUInt32LE(p) !== 0x02014b50) throw new ArchiveError(400, 'the zip directory is corrupt');
      const madeBy = cd.readUInt16LE(p + 4) >> 8;
      const nameLen = cd.readUInt16LE(p + 28);
      const extraLen = cd.readUInt16LE(p + 30);
      const commentLen = cd.readUInt16LE(p + 32);
      if (p + 46 + nameLen > cd.length) throw new ArchiveError(400, 'the zip directory is corrupt');
      const external = cd.readUInt32LE(p + 38);
      entries.push({
        flags: cd.readUInt16LE(p + 8),
        method: cd.readUInt16LE(p + 10),
        crc: cd.readUInt32LE(p + 16),
        compressedSize: cd.readUInt32LE(p + 20),
        size: cd.readUInt32LE(p + 24),
        localOffset: cd.readUInt32LE(p + 42),
        name: cd.subarray(p + 46, p + 46 + nameLen).toString('utf8'),
        // host 3 = unix: the high 16 bits are st_mode; other hosts record no file type
        mode: madeBy === 3 ? external >>> 16 : null,
      });
      p += 46 + nameLen + extraLen + commentLen;
    }
    return { entries, cdOffset };
  } finally {
    await fh.close();
  }
}

const S_IFMT = 0o170000;
const S_IFREG = 0o100000;
const S_IFDIR = 0o040000;
const S_IFLNK = 0o120000;

function zipEntryType(e: ZipEntry): 'file' | 'directory' | string {
  const fmt = e.mode === null ? 0 : e.mode & S_IFMT;
  if (fmt === S_IFLNK) return 'symlink';
  if (fmt === S_IFDIR || (fmt === 0 && e.name.endsWith('/'))) return 'directory';
  if (fmt === S_IFREG || fmt === 0) return 'file';
  const kinds: Record<number, string> = { 0o020000: 'character device', 0o060000: 'block device', 0o010000: 'fifo', 0o140000: 'socket' };
  return kinds[fmt] ?? `special file (mode ${fmt.toString(8)})`;
}

async function extractZipEntry(file: string, e: ZipEntry, dataStart: number, dest: string, budget: { left: number }): Promise<void> {
  const out = createWriteStream(dest, { flags: 'wx' });
  let written = 0;
  let crc = 0;
  const take = (chunk: Uint8Array): void => {
    written += chunk.byteLength;
    budget.left -= chunk.byteLength;
    if (budget.left < 0) throw new ArchiveError(413, `the archive's files expand to more than MAX_UPLOAD_BYTES (stopped inside ${e.name})`, [e.name]);
    if (written > e.size) throw new ArchiveError(400, `${e.name} expands past the ${e.size} bytes its zip directory declares`, [e.name]);
    crc = crc32(chunk, crc);
  };
  const source = e.compressedSize > 0 ? createReadStream(file, { start: dataStart, end: dataStart + e.compressedSize - 1, highWaterMark: 16 * 1024 }) : null;
  async function* decode(): AsyncGenerator<Uint8Array> {
    if (!source) {
      if (e.method === 8) throw new ArchiveError(400, `${e.name} has no compressed data`, [e.name]);
      return;
    }
    if (e.method === 0) {
      for await (const chunk of source as AsyncIterable<Buffer>) {
        take(chunk);
        yield chunk;
      }
      return;
    }
    // fflate's Inflate is synchronous: each push yields at most one 16 KiB chunk's expansion, and
    // `take` throws as soon as the budget is passed
    const pending: Uint8Array[] = [];
    const inflate = new Inflate((data) => {
      take(data);
      pending.push(data);
    });
    for await (const chunk of source as AsyncIterable<Buffer>) {
      inflate.push(chunk);
      while (pending.length) yield pending.shift()!;
    }
    inflate.push(new Uint8Array(0), true);
    while (pending.length) yield pending.shift()!;
  }
  try {
    await pipeline(decode(), out);
  } catch (err) {
    if (err instanceof ArchiveError) throw err;
    throw new ArchiveError(400, `${e.name} could not be decompressed: ${(err as Error).message}`, [e.name]);
  }
  if (written !== e.size) throw new ArchiveError(400, `${e.name} expands to ${written} bytes but the zip directory declares ${e.size}`, [e.name]);
  if ((crc >>> 0) !== e.crc) throw new ArchiveError(400, `${e.name} fails its CRC-32 check: the zip is corrupt`, [e.name]);
}

async function extractZip(file: string, collector: FolderCollector, maxBytes: number): Promise<void> {
  const { entries, cdOffset } = await readZipDirectory(file);
  const planned: { e: ZipEntry; dest: string }[] = [];
  for (const e of entries) {
    const type = zipEntryType(e);
    if (type === 'directory') {
      const parsed = entrySegments(e.name);
      if ('unsafe' in parsed) collector.reject(e.name, parsed.unsafe);
      continue;
    }
    if (type !== 'file') {
      collector.reject(e.name, `is a ${type}`);
      continue;
    }
    const dest = collector.place(e.name);
    if (dest) planned.push({ e, dest });
  }
  // refuse unsafe archives before writing anything
  collector.assertSafe();
  const budget = { left: maxBytes };
  const fh = await open(file, 'r');
  try {
    for (const { e, dest } of planned) {
      if (e.flags & 1) throw new ArchiveError(400, `${e.name} is encrypted; upload an unencrypted archive`, [e.name]);
      if (e.method !== 0 && e.method !== 8) throw new ArchiveError(400, `${e.name} uses zip compression method ${e.method}; only stored and deflate are supported`, [e.name]);
      if (e.size > budget.left) throw new ArchiveError(413, `${e.name} declares ${e.size} bytes, over what is left of MAX_UPLOAD_BYTES (${maxBytes})`, [e.name]);
      const local = await readAt(fh, e.localOffset, 30);
      if (local.readUInt32LE(0) !== 0x04034b50) throw new ArchiveError(400, `${e.name}: the zip's local header is missing`, [e.name]);
      const dataStart = e.localOffset + 30 + local.readUInt16LE(26) + local.readUInt16LE(28);
      if (dataStart + e.compressedSize > cdOffset) throw new ArchiveError(400, `${e.name}: its data runs past the zip directory`, [e.name]);
      await collector.dirFor(dest);
      await extractZipEntry(file, e, dataStart, dest, budget);
    }
  } finally {
    await fh.close();
  }
}

/**
 * Extracts the adapter folder of an archive into `outDir` (which must exist and be empty).
 * Throws ArchiveError for unsafe, unreadable or oversized archives.
 */
export async function extractAdapterArchive(file: string, kind: ArchiveKind, outDir: string, maxBytes: number): Promise<ExtractedFolder> {
  const collector = new FolderCollector(outDir);
  if (kind === 'zip') await extractZip(file, collector, maxBytes);
  else await extractTar(file, kind === 'tgz', collector, maxBytes);
  return collector.finish();
}
