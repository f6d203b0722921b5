import { createHash } from 'node:crypto';
import { mkdir, readFile, rename, rm, stat } from 'node:fs/promises';
import path from 'node:path';
import { Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import type { IncomingMessage } from 'node:http';
import type { FastifyRequest } from 'fastify';
import type { Multipart } from '@fastify/multipart';
import { createFlushingWriteStream } from '../durable-fs.js';
import { HttpProblem, badRequest } from '../http/problem.js';
import { error, type Problem } from './report.js';
import { ArchiveError, extractAdapterArchive, sniffArchiveFile } from './archive.js';
import type { AdapterIngest, IngestedWeights } from './ingest.js';
import { CONFIG_FILE, TOKENIZER_FILES, WEIGHTS_FILE, type FileDigest, type TokenizerFile, type VersionFiles } from './store.js';

/**
 * multipart/form-data → a staged folder holding adapter_config.json + adapter_model.safetensors.
 *
 * Accepted parts: text fields listed by the caller (`name`), and either
 *   - the two files as PEFT wrote them, recognised by file name (adapter_config.json,
 *     adapter_model.safetensors) or by field name (`config`, `weights`), or
 *   - one archive of the folder (.tar, .tar.gz/.tgz, .zip; field `archive` or any field with such
 *     a file name), whose adapter folder may sit at the top or one folder down.
 * Optionally, beside either form: tokenizer.json and tokenizer_config.json (fields `tokenizer`,
 * `tokenizer_config`), as PEFT output folders of adapters that add tokens carry them; each at most
 * MAX_TOKENIZER_FILE_BYTES.
 * Every file part is streamed to a temp file inside the upload folder, never held in memory.
 * Status codes: 400 malformed request (unknown, duplicate or missing parts; unsafe or unreadable
 * archive), 413 over MAX_UPLOAD_BYTES (request, any file, or an archive's expansion), 415 not
 * multipart, 422 a pickle (`adapter_model.bin`) or an archive without the adapter files. A body
 * that stalls for `idleTimeoutMs` is cut (the connection is destroyed, its staged files removed);
 * `UploadSlots` bounds how many uploads run at once (429 beyond).
 */

export interface UploadOptions {
  /** creates an empty folder for this upload (the store's `.upload-*` folder, removed after a crash) */
  workDir: () => Promise<string>;
  maxBytes: number;
  /** abort the body when no bytes arrived for this long (0: never) */
  idleTimeoutMs?: number;
  /** text fields this route accepts */
  fields: readonly string[];
  /**
   * Called as each accepted field arrives; may throw (e.g. a taken or invalid name) so that a
   * client which sends `name` first is refused before its files are received.
   */
  onField?: (name: string, value: string) => void;
  /**
   * A decoder for the weights file as it streams in (ingest.ts), given adapter_config.json's text
   * when that part came first; without it the registry reads the file back.
   */
  ingest?: (configText: string | null) => AdapterIngest;
}

export interface ReceivedUpload {
  /** folder holding the two adapter files */
  dir: string;
  fields: Record<string, string>;
  /** what the client sent, for logs: 'files' or the archive kind */
  source: 'files' | 'tar' | 'tgz' | 'zip';
  /**
   * sha256 and size of the two files, computed while they streamed to disk (hand them to the
   * registry so it need not read the files again to hash them); null for archives, whose files
   * come out of the extractor.
   */
  digests: VersionFiles | null;
  /** the weights as decoded in the stream; null for archives, without `ingest`, or when the decoder gave up */
  ingested: IngestedWeights | null;
  /** removes everything this upload wrote */
  cleanup(): Promise<void>;
}

type Role = 'config' | 'weights' | 'archive' | 'pickle' | TokenizerFile;

/** A tokenizer.json is tens of MB at most for real vocabularies (Gemma's 256k tokens: ~34 MB). */
export const MAX_TOKENIZER_FILE_BYTES = 64 * 1024 * 1024;
const TOKENIZER_FIELDS: Record<string, TokenizerFile> = { tokenizer: 'tokenizer.json', tokenizer_config: 'tokenizer_config.json' };
const isTokenizerFile = (n: string): n is TokenizerFile => (TOKENIZER_FILES as readonly string[]).includes(n);

/** Pure: why the optional tokenizer files of a staged upload cannot be kept (413), or null. */
export function tokenizerTooLarge(sizes: Partial<Record<TokenizerFile, number>>): string | null {
  const over = TOKENIZER_FILES.filter((f) => (sizes[f] ?? 0) > MAX_TOKENIZER_FILE_BYTES);
  return over.length ? `${over.map((f) => `${f} is ${sizes[f]} bytes`).join('; ')}: at most ${MAX_TOKENIZER_FILE_BYTES} bytes are accepted per tokenizer file` : null;
}

const ARCHIVE_EXT = /\.(tar|tar\.gz|tgz|zip)$/i;
const PICKLE_EXT = /\.(bin|pt|pth|pkl|ckpt)$/i;

/** Pure: what a file part is, from its file name first and its field name second. */
export function classifyPart(fieldname: string, filename: string): Role | null {
  const base = path.basename(filename.replace(/\\/g, '/'));
  if (base === CONFIG_FILE) return 'config';
  if (base === WEIGHTS_FILE) return 'weights';
  if (isTokenizerFile(base)) return base;
  if (ARCHIVE_EXT.test(base)) return 'archive';
  if (base === 'adapter_model.bin' || ((fieldname === 'weights' || fieldname === 'archive') && PICKLE_EXT.test(base))) return 'pickle';
  if (fieldname === 'config') return 'config';
  if (fieldname === 'weights') return 'weights';
  if (fieldname === 'archive') return 'archive';
  return TOKENIZER_FIELDS[fieldname] ?? null;
}

export const payloadTooLarge = (detail: string) => new HttpProblem(413, 'Payload Too Large', detail);

/** 422 for uploads whose adapter cannot even be validated: same body shape as a validation failure. */
export function unprocessable(detail: string, errors: Problem[]): HttpProblem {
  return new HttpProblem(422, 'Unprocessable Content', detail, { errors, warnings: [], report: null });
}

/** Same problem (code, file) as the validator reports when a folder holds only the pickle. */
export function pickleProblem(file: string): HttpProblem {
  return unprocessable(`${file} is a Python pickle; loraserve never loads pickles, because unpickling runs arbitrary code. ${WEIGHTS_FILE} is required.`, [
    error({
      code: 'missing_file',
      file: WEIGHTS_FILE,
      actual: file,
      message: `Only ${file} was given: it is a Python pickle (torch.save), and pickles can run arbitrary code when loaded, so it is refused unopened; ${WEIGHTS_FILE} is required.`,
      hint: "Save the adapter as safetensors: PEFT does so by default (`model.save_pretrained(dir)`, safe_serialization=True). To convert an old one: `from peft import PeftModel; PeftModel.from_pretrained(base, dir).save_pretrained(out, safe_serialization=True)`.",
    }),
  ]);
}

function missingFile(file: string, where: string): Problem {
  return error({ code: 'missing_file', file, message: `${file} is missing ${where}.`, hint: 'Upload the folder that PEFT `save_pretrained` wrote: adapter_config.json and adapter_model.safetensors.' });
}

/** Counts bytes across every file part of the request. */
function totalBudget(state: { used: number }, max: number): Transform {
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      state.used += chunk.byteLength;
      if (state.used > max) cb(payloadTooLarge(`the upload is larger than MAX_UPLOAD_BYTES (${max} bytes)`));
      else cb(null, chunk);
    },
  });
}

/** Hashes and counts the bytes that pass through, on their way to disk. */
function hashing(out: { digest: FileDigest | null }): Transform {
  const hash = createHash('sha256');
  let bytes = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      hash.update(chunk);
      bytes += chunk.byteLength;
      cb(null, chunk);
    },
    flush(cb) {
      out.digest = { bytes, sha256: hash.digest('hex') };
      cb();
    },
  });
}

/** The config part's text for the stream decoder, when it came first and is of a sane size (the validator reads it again either way). */
async function configTextOf(file: string | undefined): Promise<string | null> {
  if (!file || (await stat(file)).size > 1024 * 1024) return null;
  return readFile(file, 'utf8');
}

const MULTIPART_LIMIT_CODES = new Set(['FST_PARTS_LIMIT', 'FST_FILES_LIMIT', 'FST_FIELDS_LIMIT']);

/** Maps @fastify/multipart's errors onto our problems; anything else passes through. */
function mapMultipartError(e: unknown, maxBytes: number): unknown {
  if (e instanceof HttpProblem || e instanceof ArchiveError) return e;
  const code = (e as { code?: unknown }).code;
  if (code === 'FST_REQ_FILE_TOO_LARGE') return payloadTooLarge(`a file in the upload is larger than MAX_UPLOAD_BYTES (${maxBytes} bytes)`);
  if (typeof code === 'string' && MULTIPART_LIMIT_CODES.has(code)) {
    return badRequest('the upload has too many parts: send `name` and the two adapter files (or one archive)');
  }
  if (code === 'FST_PROTO_VIOLATION') return badRequest('a part name is reserved (prototype property)');
  if (code === 'FST_INVALID_JSON_FIELD_ERROR') return badRequest('a field declared as JSON is not valid JSON');
  const message = (e as Error).message ?? String(e);
  if (/multipart|part terminated|unexpected end/i.test(message)) return badRequest(`the multipart body is malformed: ${message}`);
  return e;
}

/** Raised (and logged) when a stalled upload is cut; the client's connection is already gone. */
export const uploadIdleProblem = (ms: number) => new HttpProblem(408, 'Request Timeout', `the upload sent nothing for ${ms} ms (UPLOAD_IDLE_TIMEOUT_MS) and was aborted`);

/**
 * Watches an upload body for progress: bytes read from the socket, or bytes our pipeline moved
 * (so that our own back-pressure is not taken for a stalled client). After `ms` without either,
 * destroys the request: @fastify/multipart then ends the part iteration with an error, which
 * fails the file pipeline (closing its descriptor), and the socket is closed.
 */
function idleWatchdog(request: FastifyRequest, ms: number, moved: () => number): { fired: () => boolean; stop: () => void } {
  if (!(ms > 0)) return { fired: () => false, stop: () => undefined };
  const socket = request.raw.socket;
  const progress = () => (socket?.bytesRead ?? 0) + moved();
  let last = progress();
  let lastChange = Date.now();
  let fired = false;
  const timer = setInterval(() => {
    // the whole body is in: what follows (extracting an archive) is our work, not the client's
    if (request.raw.complete) return clearInterval(timer);
    const now = progress();
    if (now !== last) {
      last = now;
      lastChange = Date.now();
      return;
    }
    if (Date.now() - lastChange < ms) return;
    fired = true;
    clearInterval(timer);
    request.log.warn({ idleMs: ms, bytesRead: socket?.bytesRead }, 'upload stalled: aborting it');
    request.raw.destroy(uploadIdleProblem(ms));
  }, Math.max(10, Math.min(1000, Math.floor(ms / 4))));
  timer.unref();
  return { fired: () => fired, stop: () => clearInterval(timer) };
}

/**
 * At most `max` uploads at once. A slot is held from the first byte to the end of the route's
 * work (receipt, validation, storing); beyond it a 429 whose Retry-After is the recent mean
 * upload time, so a retry lands about when a slot frees.
 */
export class UploadSlots {
  private used = 0;
  private meanSeconds = 1;

  constructor(readonly max: number) {}

  get active(): number {
    return this.used;
  }

  /** A release function, or a 429 problem to throw. */
  acquire(): (() => void) | HttpProblem {
    if (this.used >= this.max) {
      const retry = Math.max(1, Math.ceil(this.meanSeconds));
      return new HttpProblem(429, 'Too Many Requests', `${this.used} uploads are being received (MAX_CONCURRENT_UPLOADS ${this.max}); retry after ${retry} s`, { retry_after: retry }, { 'retry-after': String(retry), connection: 'close' });
    }
    this.used++;
    const started = performance.now();
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.used--;
      const s = (performance.now() - started) / 1000;
      this.meanSeconds = Math.min(60, 0.8 * this.meanSeconds + 0.2 * s);
    };
  }
}

/**
 * Reads and discards a refused upload's body before the refusal is sent, up to a bound. A reply
 * sent while the client is still writing, on a connection the server then closes, reaches the
 * client as a reset (EPIPE) instead of the 429; past the bound the connection is closed anyway, so
 * a client cannot hold it open by sending slowly.
 */
export function discardBody(raw: IncomingMessage, limits: { bytes: number; ms: number } = { bytes: 1 << 20, ms: 2000 }): Promise<void> {
  if (raw.readableEnded || raw.destroyed) return Promise.resolve();
  return new Promise((resolve) => {
    let seen = 0;
    const done = () => {
      clearTimeout(timer);
      raw.off('data', onData).off('end', done).off('error', done).off('close', done);
      resolve();
    };
    const onData = (chunk: Buffer) => {
      seen += chunk.length;
      if (seen > limits.bytes) done();
    };
    const timer = setTimeout(done, limits.ms);
    raw.on('data', onData).once('end', done).once('error', done).once('close', done);
  });
}

export async function receiveAdapterUpload(request: FastifyRequest, opts: UploadOptions): Promise<ReceivedUpload> {
  if (!request.isMultipart()) {
    throw new HttpProblem(415, 'Unsupported Media Type', 'send the adapter as multipart/form-data: a `name` field plus adapter_config.json and adapter_model.safetensors, or one .tar/.tar.gz/.zip of the folder');
  }
  const declared = Number(request.headers['content-length']);
  // a little room for the multipart boundaries and part headers
  if (Number.isFinite(declared) && declared > opts.maxBytes + 64 * 1024) {
    throw payloadTooLarge(`the request is ${declared} bytes; MAX_UPLOAD_BYTES is ${opts.maxBytes}`);
  }

  const work = await opts.workDir();
  const cleanup = () => rm(work, { recursive: true, force: true });
  const budget = { used: 0 };
  const watchdog = idleWatchdog(request, opts.idleTimeoutMs ?? 0, () => budget.used);
  try {
    return { ...(await receive(request, opts, work, budget)), cleanup };
  } catch (e) {
    // drain what the client is still sending so it can read our answer, then drop the files
    request.raw.resume();
    await cleanup();
    if (watchdog.fired()) throw uploadIdleProblem(opts.idleTimeoutMs ?? 0);
    if (e instanceof ArchiveError) {
      throw e.status === 413 ? payloadTooLarge(e.message) : badRequest(e.message, { entries: e.entries });
    }
    throw mapMultipartError(e, opts.maxBytes);
  } finally {
    watchdog.stop();
  }
}

async function receive(request: FastifyRequest, opts: UploadOptions, work: string, budget: { used: number }): Promise<Omit<ReceivedUpload, 'cleanup'>> {
  const fields: Record<string, string> = {};
  const got = new Map<Role, { file: string; filename: string; digest: FileDigest | null; ingested: IngestedWeights | null }>();
  const unknown: string[] = [];
  const duplicate: string[] = [];
  let index = 0;

  const parts = request.parts({
    limits: { fileSize: opts.maxBytes, files: 16, fields: 16, parts: 32, fieldSize: 4096, fieldNameSize: 200, headerPairs: 64 },
  }) as AsyncIterableIterator<Multipart>;
  for await (const part of parts) {
    if (part.type === 'field') {
      if (!opts.fields.includes(part.fieldname)) unknown.push(`field \`${part.fieldname}\``);
      else if (part.fieldname in fields) duplicate.push(`field \`${part.fieldname}\``);
      else if (part.valueTruncated) throw badRequest(`field \`${part.fieldname}\` is longer than 4096 bytes`);
      else {
        fields[part.fieldname] = String(part.value);
        opts.onField?.(part.fieldname, fields[part.fieldname]!);
      }
      continue;
    }
    const role = classifyPart(part.fieldname, part.filename ?? '');
    const label = `file \`${part.fieldname}\`${part.filename ? ` (${part.filename})` : ''}`;
    if (role === null || got.has(role) || role === 'pickle') {
      // read it to the end (counted against the budget) so the parts after it still arrive
      await pipeline(part.file, totalBudget(budget, opts.maxBytes), async function* (src: AsyncIterable<Buffer>) {
        for await (const _ of src) yield* [];
      });
      if (role === 'pickle') throw pickleProblem(path.basename(part.filename || 'adapter_model.bin'));
      (role === null ? unknown : duplicate).push(label);
      continue;
    }
    const dest = path.join(work, `part-${index++}`);
    const hashed: { digest: FileDigest | null } = { digest: null };
    const ingest = role === 'weights' && opts.ingest ? opts.ingest(await configTextOf(got.get('config')?.file)) : null;
    const stages: Transform[] = [totalBudget(budget, opts.maxBytes), hashing(hashed)];
    if (ingest) stages.push(ingest.tap());
    await pipeline([part.file, ...stages, createFlushingWriteStream(dest)]);
    if (part.file.truncated) throw payloadTooLarge(`${label} is larger than MAX_UPLOAD_BYTES (${opts.maxBytes} bytes)`);
    if (isTokenizerFile(role) && hashed.digest) {
      const why = tokenizerTooLarge({ [role]: hashed.digest.bytes });
      if (why) throw payloadTooLarge(why);
    }
    const ingested = ingest?.finish() ?? null;
    if (ingest && !ingested) request.log.info({ reason: ingest.reason }, 'upload: the weights could not be decoded in the stream; they will be read back from the file');
    got.set(role, { file: dest, filename: part.filename ?? '', digest: hashed.digest, ingested });
  }

  if (unknown.length) {
    throw badRequest(`unexpected part(s): ${unknown.join(', ')}. Send ${opts.fields.map((f) => `\`${f}\``).join(', ')} and either adapter_config.json + adapter_model.safetensors (fields \`config\`, \`weights\`) or one archive (\`archive\`).`, { unexpected: unknown });
  }
  if (duplicate.length) throw badRequest(`part(s) sent more than once: ${duplicate.join(', ')}`, { duplicate });

  const archive = got.get('archive');
  if (archive) {
    if (got.has('config') || got.has('weights') || TOKENIZER_FILES.some((f) => got.has(f))) throw badRequest('send either the adapter files or one archive, not both (an archive carries its tokenizer files inside)');
    const kind = await sniffArchiveFile(archive.file, archive.filename);
    if (!kind) throw badRequest(`${archive.filename || 'the archive'} is neither tar, gzip-compressed tar nor zip`);
    const out = path.join(work, 'extracted');
    await mkdir(out);
    const found = await extractAdapterArchive(archive.file, kind, out, opts.maxBytes);
    await rm(archive.file, { force: true });
    const where = found.folderInArchive ? `from folder ${found.folderInArchive}/ of the archive` : 'from the archive';
    if (!found.files.includes('adapter_config.json')) throw unprocessable('the archive holds no adapter_config.json at its top level or one folder down', [missingFile(CONFIG_FILE, 'from the archive (looked at its top level and one folder down)')]);
    if (!found.files.includes('adapter_model.safetensors')) {
      if (found.files.includes('adapter_model.bin')) throw pickleProblem('adapter_model.bin');
      throw unprocessable(`adapter_model.safetensors is missing ${where}`, [missingFile(WEIGHTS_FILE, where)]);
    }
    const sizes: Partial<Record<TokenizerFile, number>> = {};
    for (const f of TOKENIZER_FILES) if ((found.files as readonly string[]).includes(f)) sizes[f] = (await stat(path.join(found.dir, f))).size;
    const why = tokenizerTooLarge(sizes);
    if (why) throw payloadTooLarge(why);
    return { dir: found.dir, fields, source: kind, digests: null, ingested: null };
  }

  const missing = [
    got.has('config') ? null : `${CONFIG_FILE} (field \`config\`)`,
    got.has('weights') ? null : `${WEIGHTS_FILE} (field \`weights\`)`,
  ].filter((x): x is string => x !== null);
  if (missing.length) {
    throw badRequest(`missing part(s): ${missing.join(' and ')}; or send one .tar/.tar.gz/.zip of the adapter folder (field \`archive\`)`, { missing });
  }
  const dir = path.join(work, 'files');
  await mkdir(dir);
  await rename(got.get('config')!.file, path.join(dir, CONFIG_FILE));
  await rename(got.get('weights')!.file, path.join(dir, WEIGHTS_FILE));
  const config = got.get('config')!.digest;
  const weights = got.get('weights')!.digest;
  let digests: VersionFiles | null = config && weights ? { [CONFIG_FILE]: config, [WEIGHTS_FILE]: weights } : null;
  for (const f of TOKENIZER_FILES) {
    const part = got.get(f);
    if (!part) continue;
    await rename(part.file, path.join(dir, f));
    digests = digests && part.digest ? { ...digests, [f]: part.digest } : null;
  }
  return { dir, fields, source: 'files', digests, ingested: got.get('weights')!.ingested };
}
