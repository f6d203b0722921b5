import http from 'node:http';
import type { FastifyInstance } from 'fastify';
import multipart from '@fastify/multipart';
import { pino } from 'pino';
import { buildApp } from '../src/app.js';
import { makeConfig, type Config } from '../src/config.js';
import { receiveAdapterUpload } from '../src/adapters/upload.js';
import { now, throughput, type StreamTrace, type Throughput } from './timing.js';

/**
 * The service as clients see it: buildApp listening on 127.0.0.1 (port 0), requests over real
 * sockets from this process. Logging stays at `info` as in production, written to /dev/null.
 *
 * Two routes are added for the benchmark only: POST /bench/receive runs the real multipart
 * receiver (receiveAdapterUpload: multipart → files in ADAPTER_DIR) and then discards the files,
 * which prices "reading the upload" apart from validation, conversion, loading and storing
 * (POST /bench/receive-decoded: the same with the weights decoded in the stream, as the adapter
 * routes do);
 * POST /bench/drain reads the same body and drops it, which prices the HTTP transfer alone.
 */

export interface Server {
  app: FastifyInstance;
  base: string;
  /**
   * Per request path: ms from the moment the server had read the request body's last byte to the
   * moment its response was handed to the socket (what the server did after reading the upload).
   */
  afterLastByte: Map<string, number[]>;
  close(): Promise<void>;
}

export interface ServerOptions {
  modelPath: string;
  cacheDir: string;
  adapterDir: string;
  maxBatch: number;
  /** default cpu, dtype auto (fp32 there) */
  device?: 'cpu' | 'cuda';
  dtype?: 'fp32' | 'fp16';
  /** WEIGHTS: block-quantized base projections (the llama.cpp comparison's int8/int4 lines); default plain */
  weights?: 'int8' | 'int4';
  /** KV: the contract the raw lines of the same run were built with; default the service's */
  kv?: Config['KV'];
}

export async function startServer(o: ServerOptions): Promise<Server> {
  const config = makeConfig({
    MODEL_PATH: o.modelPath,
    CACHE_DIR: o.cacheDir,
    ADAPTER_DIR: o.adapterDir,
    DEVICE: o.device ?? 'cpu',
    DTYPE: o.dtype ?? 'auto',
    ...(o.weights ? { WEIGHTS: o.weights } : {}),
    ...(o.kv ? { KV: o.kv } : {}),
    HOST: '127.0.0.1',
    PORT: 0,
    MAX_BATCH: o.maxBatch,
    MAX_ADAPTERS: 64,
    LOG_LEVEL: 'info',
  });
  const logger = pino({ level: 'info' }, pino.destination({ dest: '/dev/null', sync: false }));
  const app = await buildApp(config, { logger });
  const { registry } = app.runtime;
  await app.register(async (scope) => {
    await scope.register(multipart, { limits: { fileSize: config.MAX_UPLOAD_BYTES }, throwFileSizeLimit: true });
    scope.post('/bench/receive', async (request) => {
      const u = await receiveAdapterUpload(request, { workDir: () => registry.uploadDir(), maxBytes: config.MAX_UPLOAD_BYTES, fields: ['name'] });
      await u.cleanup();
      return { received: true };
    });
    // as the adapter routes receive: with the weights decoded while they stream in
    scope.post('/bench/receive-decoded', async (request) => {
      const u = await receiveAdapterUpload(request, { workDir: () => registry.uploadDir(), maxBytes: config.MAX_UPLOAD_BYTES, fields: ['name'], ingest: (configText) => registry.ingest(config.MAX_UPLOAD_BYTES, configText) });
      await u.cleanup();
      return { received: u.ingested !== null };
    });
  });
  // the bytes alone: the same multipart body read off the socket and dropped (no parsing, no disk)
  await app.register(async (scope) => {
    scope.addContentTypeParser('multipart/form-data', (_req, payload, done) => {
      payload.resume();
      payload.on('end', () => done(null, null));
      payload.on('error', (e: Error) => done(e, undefined));
    });
    scope.post('/bench/drain', async () => ({ drained: true }));
  });
  const afterLastByte = new Map<string, number[]>();
  app.server.on('request', (req: http.IncomingMessage, res: http.ServerResponse) => {
    if (req.method !== 'POST' && req.method !== 'PUT') return;
    let lastByte: number | null = null;
    // an 'end' listener does not switch the stream to flowing mode: the route still reads the body
    req.on('end', () => (lastByte = now()));
    res.on('finish', () => {
      if (lastByte === null) return;
      const key = (req.url ?? '').split('?')[0]!;
      afterLastByte.set(key, [...(afterLastByte.get(key) ?? []), now() - lastByte]);
    });
  });
  await app.listen({ host: '127.0.0.1', port: 0 });
  const addr = app.server.address();
  if (!addr || typeof addr === 'string') throw new Error('the server has no TCP address');
  return { app, base: `http://127.0.0.1:${addr.port}`, afterLastByte, close: () => app.close() };
}

export interface StreamRequest {
  prompt: string;
  maxTokens: number;
  adapter: string | null;
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

/**
 * POST /v1/generate with stream: true; one timestamp per `token` event. The client runs on the
 * server's own thread, so it does as little per event as it can (no regex, no JSON.parse of the
 * token events: the route writes `data: {"index":…,"token":<id>,…}`): what it costs counts
 * against api-1 and would not on a real client's machine.
 */
export function streamGenerate(base: string, r: StreamRequest, start = now()): Promise<StreamTrace> {
  const body = JSON.stringify({ prompt: r.prompt, max_tokens: r.maxTokens, temperature: 0, stream: true, ...(r.adapter ? { adapter: r.adapter } : {}) });
  return new Promise((resolve, reject) => {
    const trace: StreamTrace = { start, tokens: [] };
    const req = http.request(`${base}/v1/generate`, { method: 'POST', agent, headers: { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) } }, (res) => {
      res.setEncoding('utf8');
      let buf = '';
      let done = false;
      let failure: string | null = null;
      res.on('data', (chunk: string) => {
        if (res.statusCode !== 200) {
          buf += chunk;
          return;
        }
        const t = now();
        buf = buf.length ? buf + chunk : chunk;
        let from = 0;
        let cut: number;
        while ((cut = buf.indexOf('\n\n', from)) >= 0) {
          if (buf.startsWith('data: ', from)) {
            // a token event has a numeric token; the held-back text event has "token":null
            const at = buf.indexOf('"token":', from);
            if (at >= 0 && at < cut) {
              const c = buf.charCodeAt(at + 8);
              if (c >= 48 && c <= 57) trace.tokens.push(t);
            }
          } else if (buf.startsWith('event: done', from)) done = true;
          else if (buf.startsWith('event: error', from)) failure = /^data: (.*)$/m.exec(buf.slice(from, cut))?.[1] ?? 'error event';
          from = cut + 2;
        }
        buf = from === buf.length ? '' : buf.slice(from);
      });
      res.on('end', () => {
        if (res.statusCode !== 200) reject(new Error(`POST /v1/generate → ${res.statusCode}: ${buf.slice(0, 300)}`));
        else if (failure) reject(new Error(`the stream failed: ${failure}`));
        else if (!done) reject(new Error('the stream ended without its done event'));
        else resolve(trace);
      });
      res.on('error', reject);
    });
    req.on('error', reject);
    req.end(body);
  });
}

/** `n` concurrent streams, stream i on adapters[i] (null → base). */
export async function concurrentStreams(base: string, prompt: string, maxTokens: number, adapters: readonly (string | null)[]): Promise<Throughput> {
  const start = now();
  const traces = await Promise.all(adapters.map((adapter) => streamGenerate(base, { prompt, maxTokens, adapter }, start)));
  return throughput(traces);
}

/** multipart with the two PEFT files, as `curl -F` sends them */
export function adapterForm(name: string, config: Uint8Array, weights: Uint8Array): FormData {
  const fd = new FormData();
  fd.append('name', name);
  fd.append('config', new Blob([config]), 'adapter_config.json');
  fd.append('weights', new Blob([weights]), 'adapter_model.safetensors');
  return fd;
}

export async function postForm(url: string, form: FormData): Promise<{ status: number; body: string }> {
  const res = await fetch(url, { method: 'POST', body: form });
  return { status: res.status, body: await res.text() };
}
