import { mkdtemp, readdir, readFile, rm, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Runtime } from '../src/runtime.js';
import { fromIngested, toEngineWeights } from '../src/adapters/convert.js';
import { CONFIG_FILE } from '../src/adapters/peft-config.js';
import { DEFAULT_SAFETENSORS_LIMITS, isFloatDtype, readHeader, readTensorBytes, toFloat32 } from '../src/adapters/safetensors.js';
import { validateAdapter, WEIGHTS_FILE, type ModelFacts, type ValidationLimits } from '../src/adapters/validate.js';
import type { AdapterMeta } from '../src/adapters/store.js';
import { adapterForm, postForm, streamGenerate, type Server } from './api.js';
import type { AdapterFiles } from './adapters.js';
import { median, now, settledRss } from './timing.js';

/**
 * Adapter upload, end to end and in parts.
 *
 * End to end (over HTTP): POST /v1/adapters → 201, then a one-token stream with the new adapter;
 * "receive" is the same multipart body sent to /bench/receive (multipart → files, then dropped),
 * "receive-decoded" the same with the stream decode the adapter routes use. The target's number
 * is measured on the server: from the body's last byte to the response (Server.afterLastByte).
 * The registry exposes no split, so the parts are timed by calling the functions it calls, in the
 * same order, on a staged copy of the files: the stream decode (AdapterIngest), validate with the
 * streamed counts, the scale fold (fromIngested), engine load (Engine.loadAdapter: transfer to the
 * worker) and store (AdapterStore.create: move, meta.json, fsync, rename); and the path archives
 * take, which read the files back: read, validate (scanning), convert (toEngineWeights), digest
 * (sha256 of both files).
 */

export interface UploadPhases {
  /** in the stream (ingest.ts): the file's bytes pushed through the decoder in 64 KiB chunks, as busboy hands them over */
  decodeInStreamMs: number;
  /** after the stream: header read back + validateAdapter with the streamed NaN/Inf counts */
  validateStreamedMs: number;
  /** after the stream: fromIngested (the scale folded into B, in place) */
  scaleMs: number;
  /** the path without the stream decode (archives, and files the decoder gave up on): read values back */
  readMs: number;
  /** … validateAdapter scanning the values */
  validateMs: number;
  /** … toEngineWeights (transpose + scale into new arrays) */
  convertMs: number;
  engineLoadMs: number;
  /** sha256 of both files read back (archives only: file uploads hash in the stream) */
  digestMs: number;
  storeMs: number;
}

export interface UploadResult {
  rank: number;
  fileBytes: number;
  tensorBytes: number;
  /** the body over HTTP, read and dropped (client encoding + socket) */
  transferMs: number;
  /** multipart → disk only */
  receiveMs: number;
  /** multipart → disk with the weights decoded in the stream, as POST /v1/adapters receives */
  receiveDecodedMs: number;
  /** POST /v1/adapters until its 201 */
  readyMs: number;
  /** readyMs − receiveMs, from the client: includes the cost of the stream decode where it does not overlap the transfer */
  clientBeyondReadMs: number;
  /** server side: from the last byte of POST /v1/adapters's body to its 201 (the target's number) */
  beyondReadMs: number;
  /** server side, the same for /bench/receive and /bench/receive-decoded: closing the files */
  receiveAfterLastByteMs: number;
  receiveDecodedAfterLastByteMs: number;
  /** from the 201 to the first token of a stream on the new adapter */
  firstTokenAfterReadyMs: number;
  /** from the start of the upload to that first token */
  uploadToFirstTokenMs: number;
  phases: UploadPhases;
  memory: {
    adapters: number;
    rssBeforeBytes: number;
    rssAfterBytes: number;
    /** (after − before) / adapters */
    perAdapterBytes: number;
    ratioToTensorBytes: number;
    /** RSS after each adapter, and the least-squares slope through them (first-use costs drop out) */
    rssSeriesBytes: number[];
    slopeBytes: number;
  };
}

export async function measureUploads(server: Server, adapters: readonly { name: string; files: AdapterFiles }[], opts: { prompt: string; warm: AdapterFiles; rank: number; receiveRuns: number; progress: (l: string) => void }): Promise<UploadResult> {
  const { base } = server;
  const runtime = server.app.runtime;
  const first = adapters[0]!.files;
  // LoRA-shaped runs allocate onnxruntime scratch memory once; do it before the RSS baseline
  const warm = await postForm(`${base}/v1/adapters`, adapterForm('bench-warm', opts.warm.config, opts.warm.weights));
  if (warm.status !== 201) throw new Error(`upload of the warm-up adapter → ${warm.status}: ${warm.body.slice(0, 300)}`);
  await streamGenerate(base, { prompt: opts.prompt, maxTokens: 2, adapter: 'bench-warm' });

  const transfers: number[] = [];
  const receives: number[] = [];
  const receivesDecoded: number[] = [];
  for (let i = 0; i < opts.receiveRuns; i++) {
    const td = now();
    const d = await postForm(`${base}/bench/drain`, adapterForm(`bench-drain-${i}`, first.config, first.weights));
    transfers.push(now() - td);
    if (d.status !== 200) throw new Error(`POST /bench/drain → ${d.status}: ${d.body.slice(0, 300)}`);
    const t0 = now();
    const r = await postForm(`${base}/bench/receive`, adapterForm(`bench-recv-${i}`, first.config, first.weights));
    receives.push(now() - t0);
    if (r.status !== 200) throw new Error(`POST /bench/receive → ${r.status}: ${r.body.slice(0, 300)}`);
    const t1 = now();
    const rd = await postForm(`${base}/bench/receive-decoded`, adapterForm(`bench-recvd-${i}`, first.config, first.weights));
    receivesDecoded.push(now() - t1);
    if (rd.status !== 200 || !rd.body.includes('true')) throw new Error(`POST /bench/receive-decoded → ${rd.status}: ${rd.body.slice(0, 300)}`);
  }

  const rssBefore = await settledRss();
  const ready: number[] = [];
  const firstToken: number[] = [];
  const total: number[] = [];
  const series: number[] = [];
  for (const a of adapters) {
    const t0 = now();
    const r = await postForm(`${base}/v1/adapters`, adapterForm(a.name, a.files.config, a.files.weights));
    const t1 = now();
    if (r.status !== 201) throw new Error(`upload of ${a.name} → ${r.status}: ${r.body.slice(0, 300)}`);
    const trace = await streamGenerate(base, { prompt: opts.prompt, maxTokens: 1, adapter: a.name }, t1);
    const t2 = trace.tokens[0];
    if (t2 === undefined) throw new Error(`no token from ${a.name}`);
    ready.push(t1 - t0);
    firstToken.push(t2 - t1);
    total.push(t2 - t0);
    series.push(await settledRss());
  }
  const rssAfter = await settledRss();
  const perAdapter = (rssAfter - rssBefore) / adapters.length;
  opts.progress(`upload: ${adapters.length} adapters, RSS +${((rssAfter - rssBefore) / 1e6).toFixed(1)} MB`);

  const phases = await measurePhases(runtime, first, 3);
  const receiveMs = median(receives);
  const readyMs = median(ready);
  const serverSide = (path: string) => median(server.afterLastByte.get(path) ?? [Number.NaN]);
  return {
    rank: opts.rank,
    fileBytes: first.config.byteLength + first.weights.byteLength,
    tensorBytes: first.tensorBytes,
    transferMs: median(transfers),
    receiveMs,
    receiveDecodedMs: median(receivesDecoded),
    readyMs,
    clientBeyondReadMs: readyMs - receiveMs,
    beyondReadMs: serverSide('/v1/adapters'),
    receiveAfterLastByteMs: serverSide('/bench/receive'),
    receiveDecodedAfterLastByteMs: serverSide('/bench/receive-decoded'),
    firstTokenAfterReadyMs: median(firstToken),
    uploadToFirstTokenMs: median(total),
    phases,
    memory: {
      adapters: adapters.length,
      rssBeforeBytes: rssBefore,
      rssAfterBytes: rssAfter,
      perAdapterBytes: perAdapter,
      ratioToTensorBytes: perAdapter / first.tensorBytes,
      rssSeriesBytes: series,
      slopeBytes: slope([rssBefore, ...series]),
    },
  };
}

async function measurePhases(runtime: Runtime, files: AdapterFiles, runs: number): Promise<UploadPhases> {
  const { manifest, config, engine, registry } = runtime;
  const model: ModelFacts = { architecture: manifest.architecture, loraTargets: manifest.loraTargets, modelId: manifest.modelId };
  const limits: ValidationLimits = { maxLoraRank: config.MAX_LORA_RANK, strictBaseModel: config.STRICT_BASE_MODEL };
  const samples: UploadPhases[] = [];
  for (let run = 0; run < runs; run++) {
    const dir = await mkdtemp(join(registry.store.dir, '.upload-bench-'));
    try {
      await writeFile(join(dir, CONFIG_FILE), files.config);
      await writeFile(join(dir, WEIGHTS_FILE), files.weights);
      // the steps of readAdapterFolder (src/adapters/folder.ts), timed one by one: first as an
      // upload of files runs them (values decoded in the stream), then without the stream decode
      let t = now();
      const ingest = registry.ingest(config.MAX_UPLOAD_BYTES, files.config.toString('utf8'));
      for (let at = 0; at < files.weights.byteLength; at += 65536) ingest.push(files.weights.subarray(at, at + 65536));
      const ingested = ingest.finish();
      const decodeInStreamMs = now() - t;
      if (!ingested) throw new Error(`the stream decoder gave up on the benchmark adapter: ${ingest.reason}`);
      t = now();
      const names = await readdir(dir);
      const otherFiles = names.filter((f) => f !== CONFIG_FILE && f !== WEIGHTS_FILE);
      const configText = await readFile(join(dir, CONFIG_FILE), 'utf8');
      const weightsPath = join(dir, WEIGHTS_FILE);
      const head = await readHeader(weightsPath, DEFAULT_SAFETENSORS_LIMITS, WEIGHTS_FILE);
      if (!head.header) throw new Error('the benchmark adapter has no readable header');
      const streamedReport = validateAdapter({ configText, weightsFile: WEIGHTS_FILE, header: head.header, headerProblems: head.problems, nonFinite: ingested.nonFinite, otherFiles }, model, limits);
      const validateStreamedMs = now() - t;
      if (!streamedReport.ok) throw new Error(`the benchmark adapter does not validate: ${streamedReport.errors[0]?.message}`);
      t = now();
      const streamedWeights = fromIngested(streamedReport, ingested, model);
      const scaleMs = now() - t;
      if (!streamedWeights) throw new Error('fromIngested found a tensor missing from the stream decode');

      t = now();
      const values = new Map<string, Float32Array>();
      for (const h of head.header.tensors) if (isFloatDtype(h.dtype)) values.set(h.name, toFloat32(h.dtype, await readTensorBytes(weightsPath, head.header, h)));
      const readMs = now() - t;
      t = now();
      const report = validateAdapter({ configText, weightsFile: WEIGHTS_FILE, header: head.header, headerProblems: head.problems, values, otherFiles }, model, limits);
      const validateMs = now() - t;
      if (!report.ok) throw new Error(`the benchmark adapter does not validate: ${report.errors[0]?.message}`);
      t = now();
      const weights = toEngineWeights(report, values, model);
      const convertMs = now() - t;
      t = now();
      const versionId = `bench-phases@${run}#${process.pid}`;
      await engine.loadAdapter(versionId, weights);
      const engineLoadMs = now() - t;
      await engine.unloadAdapter(versionId);
      t = now();
      const digest = await registry.store.digest(dir);
      const digestMs = now() - t;
      const name = `bench-phases-${run}`;
      const meta: AdapterMeta = { metaVersion: 1, name, version: 1, created: new Date().toISOString(), files: digest, report };
      t = now();
      await registry.store.create(meta, dir);
      const storeMs = now() - t;
      await registry.store.delete(name);
      samples.push({ decodeInStreamMs, validateStreamedMs, scaleMs, readMs, validateMs, convertMs, engineLoadMs, digestMs, storeMs });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
  const pick = (k: keyof UploadPhases) => median(samples.map((s) => s[k]));
  return {
    decodeInStreamMs: pick('decodeInStreamMs'),
    validateStreamedMs: pick('validateStreamedMs'),
    scaleMs: pick('scaleMs'),
    readMs: pick('readMs'),
    validateMs: pick('validateMs'),
    convertMs: pick('convertMs'),
    engineLoadMs: pick('engineLoadMs'),
    digestMs: pick('digestMs'),
    storeMs: pick('storeMs'),
  };
}

/** least-squares slope of ys over 0, 1, 2, … */
function slope(ys: readonly number[]): number {
  const n = ys.length;
  if (n < 2) return Number.NaN;
  const mx = (n - 1) / 2;
  const my = ys.reduce((a, b) => a + b, 0) / n;
  let num = 0;
  let den = 0;
  ys.forEach((y, x) => {
    num += (x - mx) * (y - my);
    den += (x - mx) ** 2;
  });
  return num / den;
}
