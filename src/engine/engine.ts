import { Worker } from 'node:worker_threads';
import { doraFactorsOffThread, type BaseWeightSource } from '../adapters/dora-factors.js';
import { vocabOf, type AdapterWeights } from '../adapters/convert.js';
import type { Config } from '../config.js';
import { kvContractOf, type Manifest } from '../model/manifest.js';
import type {
  DoneWire,
  EngineLimits,
  EngineStats,
  FinishReason,
  FromWorker,
  LogLevel,
  LoraModuleWire,
  Provider,
  RejectKind,
  ToWorker,
  WorkerData,
  WorkerRequest,
} from './protocol.js';
import type { ProbeResult } from './probe.js';
import { randomSeed, type SamplingParams, type TokenLogprob } from './sampler.js';

export type { EngineStats, FinishReason } from './protocol.js';
export type { TokenLogprob } from './sampler.js';

/** The most top logprobs a request may ask for (the OpenAI API's limit). */
export const MAX_TOP_LOGPROBS = 20;

export class EngineError extends Error {
  override name = 'EngineError';
}
/** MAX_BATCH running and MAX_QUEUE waiting: HTTP 429 with Retry-After. */
export class QueueFullError extends EngineError {
  override name = 'QueueFullError';
  constructor(
    message: string,
    readonly retryAfterSeconds: number,
  ) {
    super(message);
  }
}
/** The prompt leaves no room for one generated token: HTTP 400. */
export class ContextLengthError extends EngineError {
  override name = 'ContextLengthError';
  constructor(
    readonly promptTokens: number,
    readonly contextLength: number,
    /** promptTokens is a lower bound: the prompt was refused before it was encoded */
    readonly atLeast = false,
  ) {
    super(`the prompt has ${atLeast ? 'at least ' : ''}${promptTokens} tokens; this model's context holds ${contextLength} tokens, including at least one generated token`);
  }
}
/** The adapter version is not (or no longer) loaded in the engine. */
export class UnknownAdapterError extends EngineError {
  override name = 'UnknownAdapterError';
  constructor(readonly versionId: string) {
    super(`adapter version ${versionId} is not loaded`);
  }
}
/** Refused because the engine is draining before the request started: HTTP 503 with Retry-After. */
export class DrainingError extends EngineError {
  override name = 'DrainingError';
}
/** A request parameter is out of range: HTTP 400. */
export class InvalidRequestError extends EngineError {
  override name = 'InvalidRequestError';
}
export class EngineClosedError extends EngineError {
  override name = 'EngineClosedError';
}

export interface EngineOptions {
  modelDir: string;
  manifest: Manifest;
  config: Pick<Config, 'DEVICE' | 'MAX_BATCH' | 'MAX_QUEUE' | 'PREFILL_CHUNK' | 'REQUEST_TIMEOUT_MS' | 'MAX_TOKENS_DEFAULT'> & Partial<Pick<Config, 'RUNTIME'>>;
  log?: EngineLog;
  /** the longest sequence served (prompt + generated); default and maximum: the model's maxPositions */
  contextLength?: number;
  /** the base checkpoint, read off-thread for DoRA's factors when such an adapter loads; absent: DoRA adapters are refused */
  baseWeights?: BaseWeightSource;
}

type LogFn = (obj: Record<string, unknown>, msg: string) => void;
export type EngineLog = Record<LogLevel, LogFn>;

export interface GenerateRequest {
  promptIds: readonly number[];
  /** null/absent → the base model */
  adapterVersion?: string | null;
  /** default MAX_TOKENS_DEFAULT; capped so prompt + completion fit the context (then finish `length`) */
  maxTokens?: number;
  /** default 1; 0 → greedy */
  temperature?: number;
  /** default 1 (off) */
  topP?: number;
  /** default 0 (off) */
  topK?: number;
  /** same seed + same request → same tokens, whatever else is in the batch; default random */
  seed?: number;
  /** number of top logprobs reported with each token (0 … MAX_TOP_LOGPROBS); default 0 */
  logprobs?: number;
  /** tokens that end the request with finish `stop` (not emitted); default the model's EOS ids */
  eosIds?: readonly number[];
  /**
   * only ids below this are sampled; generateText passes the tokenizer's vocabSize, since a
   * model's embedding may be padded past the ids its tokenizer can decode. Default: all.
   */
  vocabLimit?: number;
}

export interface TokenEvent {
  token: number;
  /** log-probability under the model's distribution (before temperature / top-k / top-p) */
  logprob: number;
  top: TokenLogprob[] | null;
}

export interface GenerateResult {
  /** `stop`: an EOS token (not emitted); `length`: maxTokens or the context; `cancelled`: abort, close or timeout */
  finishReason: FinishReason;
  promptTokens: number;
  /** tokens generated, the EOS token included */
  completionTokens: number;
  /** finished `cancelled` because REQUEST_TIMEOUT_MS passed (counted from submission, queueing included) */
  timedOut: boolean;
}

/**
 * One request's stream: iterate for tokens, await `result` for how it ended. Leaving the loop
 * early (break, throw) cancels the request. An error after submission (the worker failed)
 * rejects both the iteration and `result`.
 */
export class Generation implements AsyncIterable<TokenEvent> {
  readonly result: Promise<GenerateResult>;
  private readonly events: TokenEvent[] = [];
  private wakeReader: (() => void) | null = null;
  private outcome: { result: GenerateResult } | { error: Error } | null = null;
  private resolveResult!: (r: GenerateResult) => void;
  private rejectResult!: (e: Error) => void;
  private iterated = false;

  constructor(
    readonly id: number,
    /** what the request asked for, for error messages */
    readonly request: { promptTokens: number; adapterVersion: string | null },
    private readonly onCancel: () => void,
  ) {
    this.result = new Promise<GenerateResult>((resolve, reject) => {
      this.resolveResult = resolve;
      this.rejectResult = reject;
    });
    // a caller that only iterates must not get an unhandled rejection
    this.result.catch(() => undefined);
  }

  get finished(): boolean {
    return this.outcome !== null;
  }

  /** Asks the engine to stop this request; `result` then ends `cancelled`. */
  cancel(): void {
    if (!this.outcome) this.onCancel();
  }

  /** @internal */
  push(e: TokenEvent): void {
    if (this.outcome) return;
    this.events.push(e);
    this.wake();
  }

  /** @internal */
  end(result: GenerateResult): void {
    if (this.outcome) return;
    this.outcome = { result };
    this.resolveResult(result);
    this.wake();
  }

  /** @internal */
  fail(error: Error): void {
    if (this.outcome) return;
    this.outcome = { error };
    this.rejectResult(error);
    this.wake();
  }

  private wake(): void {
    const w = this.wakeReader;
    this.wakeReader = null;
    w?.();
  }

  async *[Symbol.asyncIterator](): AsyncIterator<TokenEvent> {
    if (this.iterated) throw new Error('a Generation can be iterated only once');
    this.iterated = true;
    try {
      for (;;) {
        const e = this.events.shift();
        if (e) {
          yield e;
          continue;
        }
        if (this.outcome) {
          if ('error' in this.outcome) throw this.outcome.error;
          return;
        }
        await new Promise<void>((resolve) => (this.wakeReader = resolve));
      }
    } finally {
      this.cancel();
    }
  }
}

interface Pending {
  resolve: (probe?: ProbeResult) => void;
  reject: (e: Error) => void;
}

const EMPTY_STATS = (limits: EngineLimits): EngineStats => ({
  running: 0,
  waiting: 0,
  runningAdapters: [],
  waitingAdapters: [],
  batchSize: 0,
  kvTokens: 0,
  kvCapacity: limits.maxBatch * limits.contextLength,
  tokensGenerated: 0,
  prefillTokens: 0,
  cancelled: 0,
  adaptersResident: 0,
  bytesToRuntime: 0,
  bytesFromRuntime: 0,
});

/**
 * The main thread's handle on the inference worker. Requests are checked here, synchronously
 * (the route learns 400/429 before it sends a header), then run in the worker; tokens come back
 * one message per step for all rows. Adapter weights are transferred, not copied: after
 * `loadAdapter` the caller's arrays are detached.
 */
export class Engine {
  private readonly gens = new Map<number, Generation>();
  /** submit time per request, and a moving mean of finished requests' durations (for Retry-After) */
  private readonly submitted = new Map<number, number>();
  private meanRequestSeconds = 1;
  private readonly calls = new Map<number, Pending>();
  /** versions loaded (or being loaded) in the worker and not unloaded */
  /** loaded version → the ids its rows may hold (larger than the base's when it adds tokens) */
  private readonly loaded = new Map<string, number>();
  private nextId = 1;
  private snapshot: EngineStats;
  private closing: Promise<void> | null = null;
  private dead: Error | null = null;
  private readonly exited: Promise<void>;

  private constructor(
    private readonly worker: Worker,
    readonly provider: Provider,
    readonly providerReason: string | null,
    readonly manifest: Manifest,
    readonly limits: EngineLimits,
    private readonly maxTokensDefault: number,
    private readonly log: EngineLog | undefined,
    private readonly baseWeights: BaseWeightSource | undefined,
  ) {
    this.snapshot = EMPTY_STATS(limits);
    worker.on('message', (m: FromWorker) => this.onMessage(m));
    worker.on('error', (e) => this.die(new EngineError(`inference worker failed: ${e.message}`)));
    this.exited = new Promise((resolve) => worker.once('exit', () => resolve()));
    void this.exited.then(() => this.die(this.closing ? new EngineClosedError('the engine is closed') : new EngineError('inference worker exited')));
  }

  /** Spawns the worker and waits until its session is open. */
  static async start(opts: EngineOptions): Promise<Engine> {
    const { config, manifest } = opts;
    if (manifest.peer) throw new EngineError('this graph is the Optimum-style peer export (attention_mask, no LoRA inputs); the engine serves graphs built with kv: resident');
    if (kvContractOf(manifest) !== 'resident' && kvContractOf(manifest) !== 'gqa') {
      throw new EngineError(`this graph was built with the ${kvContractOf(manifest)} KV contract; the engine serves graphs built with kv: resident or gqa (rebuild the model)`);
    }
    const maxPositions = manifest.architecture.maxPositions;
    const limits: EngineLimits = {
      maxBatch: config.MAX_BATCH,
      maxQueue: config.MAX_QUEUE,
      prefillChunk: config.PREFILL_CHUNK,
      requestTimeoutMs: config.REQUEST_TIMEOUT_MS,
      contextLength: Math.min(opts.contextLength ?? maxPositions, maxPositions),
    };
    const self = import.meta.url;
    const data: WorkerData = {
      entry: new URL(self.endsWith('.ts') ? './worker.ts' : './worker.js', self).href,
      modelDir: opts.modelDir,
      manifest,
      device: config.DEVICE,
      runtime: config.RUNTIME ?? 'auto',
      limits,
    };
    const worker = new Worker(new URL('./worker-entry.mjs', self), { workerData: data });
    const ready = await new Promise<{ provider: Provider; reason: string | null }>((resolve, reject) => {
      const onMessage = (m: FromWorker) => {
        if (m.type === 'log') forwardLog(opts.log, m);
        else if (m.type === 'ready') done(() => resolve({ provider: m.provider, reason: m.reason }));
        else if (m.type === 'startupError' || m.type === 'fatal') done(() => reject(new EngineError(`inference worker could not start: ${m.message}`)));
      };
      const onError = (e: Error) => done(() => reject(new EngineError(`inference worker could not start: ${e.message}`)));
      const onExit = (code: number) => done(() => reject(new EngineError(`inference worker exited with code ${code} while starting`)));
      const done = (f: () => void) => {
        worker.off('message', onMessage);
        worker.off('error', onError);
        worker.off('exit', onExit);
        f();
      };
      worker.on('message', onMessage);
      worker.on('error', onError);
      worker.on('exit', onExit);
    }).catch(async (e: unknown) => {
      await worker.terminate();
      throw e;
    });
    return new Engine(worker, ready.provider, ready.reason, manifest, limits, config.MAX_TOKENS_DEFAULT, opts.log, opts.baseWeights);
  }

  get contextLength(): number {
    return this.limits.contextLength;
  }

  /** The latest numbers from the worker (sent after every step). */
  stats(): EngineStats {
    return this.snapshot;
  }

  /**
   * Submits a request. Throws at once: InvalidRequestError, ContextLengthError,
   * UnknownAdapterError, QueueFullError, EngineClosedError. An aborted `signal` cancels the row at
   * the next step; the result then ends `cancelled`.
   */
  generate(req: GenerateRequest, signal?: AbortSignal): Generation {
    return this.generateGroup(req, 1, signal)[0]!;
  }

  /**
   * `n` generations of one prompt (OpenAI's `n`), all admitted or none (QueueFullError). The
   * prompt is prefilled once: the first request runs it, the others take its KV cache and last
   * logits (see EngineCore). Request j samples with `seed + j` when a seed is given, else each
   * with its own random seed.
   */
  generateGroup(req: GenerateRequest, n: number, signal?: AbortSignal): Generation[] {
    if (this.closing || this.dead) throw new EngineClosedError(this.dead?.message ?? 'the engine is closed');
    if (!Number.isInteger(n) || n < 1) throw new InvalidRequestError(`n must be a positive integer, got ${n}`);
    const wire = this.check(req);
    if (req.seed !== undefined && !Number.isSafeInteger(req.seed + n - 1)) throw new InvalidRequestError(`seed + n - 1 must be a safe integer, got ${req.seed} + ${n - 1}`);
    const outstanding = this.gens.size;
    if (outstanding + n > this.limits.maxBatch + this.limits.maxQueue) {
      throw new QueueFullError(`the engine is full: ${this.limits.maxBatch} requests running and ${this.limits.maxQueue} waiting`, this.retryAfter());
    }
    const gens: Generation[] = [];
    for (let j = 0; j < n; j++) gens.push(this.track(wire, signal));
    if (signal?.aborted) return gens;
    // one message: the worker must hold every row of the group before it runs the first one's prefill
    const followers = gens.slice(1).map((g, k) => ({ id: g.id, seed: req.seed === undefined ? randomSeed() : req.seed + k + 1 }));
    this.post({ type: 'generate', id: gens[0]!.id, req: wire, followers });
    return gens;
  }

  /** A Generation for a request about to be posted (ended at once when `signal` is already aborted). */
  private track(wire: WorkerRequest, signal?: AbortSignal): Generation {
    const id = this.nextId++;
    const gen = new Generation(id, { promptTokens: wire.promptIds.length, adapterVersion: wire.adapterVersion }, () => this.post({ type: 'cancel', id }));
    if (signal?.aborted) {
      gen.end({ finishReason: 'cancelled', promptTokens: wire.promptIds.length, completionTokens: 0, timedOut: false });
      return gen;
    }
    this.gens.set(id, gen);
    this.submitted.set(id, performance.now());
    if (signal) {
      const onAbort = () => gen.cancel();
      signal.addEventListener('abort', onAbort, { once: true });
      void gen.result.then(
        () => signal.removeEventListener('abort', onAbort),
        () => signal.removeEventListener('abort', onAbort),
      );
    }
    return gen;
  }

  private check(req: GenerateRequest): WorkerRequest {
    const adapterVersion = req.adapterVersion ?? null;
    if (adapterVersion !== null && !this.loaded.has(adapterVersion)) throw new UnknownAdapterError(adapterVersion);
    const vocab = adapterVersion === null ? this.manifest.architecture.vocabSize : this.loaded.get(adapterVersion)!;
    const ids = req.promptIds;
    if (!Array.isArray(ids) || ids.length === 0) throw new InvalidRequestError('the prompt has no tokens');
    for (const t of ids) {
      if (!Number.isInteger(t) || t < 0 || t >= vocab) throw new InvalidRequestError(`token id ${t} is outside the vocabulary [0, ${vocab})`);
    }
    if (ids.length + 1 > this.limits.contextLength) throw new ContextLengthError(ids.length, this.limits.contextLength);
    const maxTokens = req.maxTokens ?? this.maxTokensDefault;
    if (!Number.isInteger(maxTokens) || maxTokens < 1) throw new InvalidRequestError(`max tokens must be a positive integer, got ${maxTokens}`);
    const temperature = req.temperature ?? 1;
    if (!Number.isFinite(temperature) || temperature < 0) throw new InvalidRequestError(`temperature must be ≥ 0, got ${temperature}`);
    const topP = req.topP ?? 1;
    if (!(topP > 0 && topP <= 1)) throw new InvalidRequestError(`top_p must be in (0, 1], got ${topP}`);
    const topK = req.topK ?? 0;
    if (!Number.isInteger(topK) || topK < 0) throw new InvalidRequestError(`top_k must be a non-negative integer, got ${topK}`);
    const topLogprobs = req.logprobs ?? 0;
    if (!Number.isInteger(topLogprobs) || topLogprobs < 0 || topLogprobs > MAX_TOP_LOGPROBS) {
      throw new InvalidRequestError(`logprobs must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${topLogprobs}`);
    }
    const seed = req.seed ?? randomSeed();
    if (!Number.isSafeInteger(seed)) throw new InvalidRequestError(`seed must be an integer, got ${seed}`);
    const vocabLimit = req.vocabLimit ?? vocab;
    if (!Number.isInteger(vocabLimit) || vocabLimit < 1) throw new InvalidRequestError(`vocabLimit must be a positive integer, got ${vocabLimit}`);
    const sampling: SamplingParams = { temperature, topK, topP, topLogprobs };
    return {
      promptIds: [...ids],
      adapterVersion,
      maxTokens: Math.min(maxTokens, this.limits.contextLength - ids.length),
      sampling,
      seed,
      eosIds: [...(req.eosIds ?? this.manifest.architecture.eosTokenIds)],
      vocabLimit: Math.min(vocabLimit, vocab),
    };
  }

  /**
   * Draining: requests still waiting for a batch slot fail with DrainingError (their clients get
   * a 503 and retry elsewhere); running ones go on.
   */
  shedWaiting(): void {
    if (this.closing || this.dead) return;
    this.post({ type: 'shedWaiting' });
  }

  /**
   * Retry-After for a full queue, in whole seconds: the time for the queue ahead to drain at the
   * batch's pace — (waiting + 1) requests, MAX_BATCH at a time, each taking the recent mean
   * request time (1 s before any has finished) — between 1 and 120.
   */
  private retryAfter(): number {
    const waiting = Math.max(0, this.gens.size - this.limits.maxBatch);
    const seconds = (this.meanRequestSeconds * (waiting + 1)) / this.limits.maxBatch;
    return Math.min(120, Math.max(1, Math.ceil(seconds)));
  }

  /**
   * Hands an adapter version to the worker. Its buffers are transferred (the caller's arrays are
   * detached afterwards; the main thread keeps no copy). A DoRA adapter's factors are computed
   * first, in a thread of their own (DoraNormError: a zero row, a 422); from then on requests may
   * name the version, and the promise settles when the worker has checked and stored it.
   */
  async loadAdapter(versionId: string, weights: AdapterWeights): Promise<void> {
    if (this.closing || this.dead) throw new EngineClosedError(this.dead?.message ?? 'the engine is closed');
    if (this.loaded.has(versionId)) throw new EngineError(`adapter version ${versionId} is already loaded`);
    const factors = await this.doraFactors(weights);
    // the factors take a while: the engine may have closed meanwhile
    if (this.isClosed()) throw new EngineClosedError('the engine is closed');
    if (this.loaded.has(versionId)) throw new EngineError(`adapter version ${versionId} is already loaded`);
    const modules: LoraModuleWire[] = [];
    const buffers = new Set<ArrayBuffer>();
    for (const [name, m] of weights.modules) {
      const factor = factors.get(name);
      modules.push({ name, rank: m.rank, A: m.A, B: m.B, ...(factor && { factor }), ...(m.bias && { bias: m.bias }) });
      for (const a of [m.A, m.B, factor, m.bias]) if (a?.buffer instanceof ArrayBuffer) buffers.add(a.buffer);
    }
    const e = weights.embedding;
    for (const a of e ? [e.lora?.A, e.lora?.B, e.tokens?.values, e.table, e.headTable, e.headTokens?.values] : []) if (a && a.buffer instanceof ArrayBuffer) buffers.add(a.buffer);
    // before the arrays are transferred to the worker (which empties them here)
    this.loaded.set(versionId, vocabOf(e, this.manifest));
    try {
      await this.call((callId) => ({ type: 'loadAdapter', callId, versionId, modules, ...(e && { embedding: e }) }), [...buffers]);
    } catch (e) {
      this.loaded.delete(versionId);
      throw e;
    }
  }

  private isClosed(): boolean {
    return this.closing !== null || this.dead !== null;
  }

  /** DoRA's g = m / ‖W + s·B·A‖ per DoRA module, computed off both threads (adapters/dora-factors.ts) */
  private async doraFactors(weights: AdapterWeights): Promise<Map<string, Float32Array>> {
    const dora = [...weights.modules].filter(([, m]) => m.magnitude);
    if (dora.length === 0) return new Map();
    if (!this.baseWeights) throw new EngineError('this engine was started without the base checkpoint (baseWeights), which DoRA adapters need for their norms');
    const targets = new Map(this.manifest.loraTargets.map((t) => [t.name, t]));
    const modules = dora.map(([name, m]) => {
      const t = targets.get(name);
      if (!t) throw new EngineError(`the model has no LoRA target ${name}`);
      return { name, inFeatures: t.inFeatures, outFeatures: t.outFeatures, rank: m.rank, A: m.A, B: m.B, magnitude: m.magnitude! };
    });
    const served = { dtype: this.manifest.dtype, ...(this.manifest.weights && { weights: this.manifest.weights }) };
    return doraFactorsOffThread({ ...this.baseWeights, served, modules });
  }

  /**
   * New requests can no longer name the version (UnknownAdapterError); requests already holding it
   * (running or queued) finish with it, and the worker frees it after the last one ends.
   */
  async unloadAdapter(versionId: string): Promise<void> {
    if (!this.loaded.has(versionId)) throw new UnknownAdapterError(versionId);
    this.loaded.delete(versionId);
    if (this.dead) return;
    await this.call((callId) => ({ type: 'unloadAdapter', callId, versionId }));
  }

  /**
   * The effect of a loaded version on the probe prompt `ids` (probe.ts), measured in the worker
   * between decode steps: one batch of two rows (base, adapter) per probe token.
   */
  async probeAdapter(versionId: string, ids: number[]): Promise<ProbeResult> {
    if (this.closing || this.dead) throw new EngineClosedError(this.dead?.message ?? 'the engine is closed');
    if (!this.loaded.has(versionId)) throw new UnknownAdapterError(versionId);
    let result: ProbeResult | undefined;
    await this.call((callId) => ({ type: 'probe', callId, versionId, ids }), [], (r) => (result = r));
    if (!result) throw new EngineError('the worker answered the probe without a result');
    return result;
  }

  hasAdapter(versionId: string): boolean {
    return this.loaded.has(versionId);
  }

  /** Cancels every request (they end `cancelled`), closes the session and stops the worker. */
  close(): Promise<void> {
    if (!this.closing) {
      this.closing = (async () => {
        if (!this.dead) {
          this.post({ type: 'close' });
          const timer = setTimeout(() => void this.worker.terminate(), CLOSE_TIMEOUT_MS);
          await this.exited;
          clearTimeout(timer);
        }
        this.die(new EngineClosedError('the engine is closed'));
      })();
    }
    return this.closing;
  }

  private post(msg: ToWorker, transfer: ArrayBuffer[] = []): void {
    if (this.dead) return;
    this.worker.postMessage(msg, transfer);
  }

  private callIds = 1;
  private call(make: (callId: number) => ToWorker, transfer: ArrayBuffer[] = [], onProbe?: (r: ProbeResult) => void): Promise<void> {
    if (this.dead) return Promise.reject(this.dead);
    const callId = this.callIds++;
    return new Promise<void>((resolve, reject) => {
      this.calls.set(callId, { resolve: (probe) => (probe && onProbe?.(probe), resolve()), reject });
      this.post(make(callId), transfer);
    });
  }

  private onMessage(m: FromWorker): void {
    switch (m.type) {
      case 'step':
        for (const [id, token, logprob, top] of m.tokens) this.gens.get(id)?.push({ token, logprob, top });
        for (const d of m.done) this.onDone(d);
        this.snapshot = m.stats;
        break;
      case 'rejected': {
        const gen = this.gens.get(m.id);
        this.gens.delete(m.id);
        this.submitted.delete(m.id);
        gen?.fail(this.rejection(gen, m.kind, m.message));
        break;
      }
      case 'reply': {
        const call = this.calls.get(m.callId);
        this.calls.delete(m.callId);
        if (m.error === null) call?.resolve(m.probe);
        else call?.reject(new EngineError(m.error));
        break;
      }
      case 'log':
        forwardLog(this.log, m);
        break;
      case 'fatal':
        this.log?.error({ error: m.message }, 'inference worker failed');
        this.die(new EngineError(`inference worker failed: ${m.message}`));
        break;
      case 'ready':
      case 'startupError':
        break;
    }
  }

  /** The worker refused a request the main thread let through (its view was a step behind). */
  private rejection(gen: Generation, kind: RejectKind, message: string): EngineError {
    switch (kind) {
      case 'queue_full':
        return new QueueFullError(message, this.retryAfter());
      case 'context_length':
        return new ContextLengthError(gen.request.promptTokens, this.limits.contextLength);
      case 'unknown_adapter':
        return new UnknownAdapterError(gen.request.adapterVersion ?? '');
      case 'bad_request':
        return new InvalidRequestError(message);
      case 'draining':
        return new DrainingError(message);
    }
  }

  private onDone(d: DoneWire): void {
    const gen = this.gens.get(d.id);
    this.gens.delete(d.id);
    const t0 = this.submitted.get(d.id);
    this.submitted.delete(d.id);
    if (t0 !== undefined && d.finishReason !== 'cancelled' && d.error === null) {
      this.meanRequestSeconds = 0.8 * this.meanRequestSeconds + 0.2 * ((performance.now() - t0) / 1000);
    }
    if (!gen) return;
    if (d.error !== null) gen.fail(new EngineError(`inference failed: ${d.error}`));
    else gen.end({ finishReason: d.finishReason, promptTokens: d.promptTokens, completionTokens: d.completionTokens, timedOut: d.timedOut });
  }

  /** The worker is gone: every outstanding request and call fails (after close: ends `cancelled`). */
  private die(reason: Error): void {
    if (this.dead) return;
    this.dead = reason;
    const closed = reason instanceof EngineClosedError;
    for (const gen of this.gens.values()) {
      if (closed) gen.end({ finishReason: 'cancelled', promptTokens: 0, completionTokens: 0, timedOut: false });
      else gen.fail(reason);
    }
    this.gens.clear();
    this.submitted.clear();
    for (const c of this.calls.values()) c.reject(reason);
    this.calls.clear();
    this.snapshot = { ...EMPTY_STATS(this.limits), tokensGenerated: this.snapshot.tokensGenerated, prefillTokens: this.snapshot.prefillTokens, cancelled: this.snapshot.cancelled };
    if (!closed) void this.worker.terminate();
  }
}

const CLOSE_TIMEOUT_MS = 10_000;


function forwardLog(log: EngineLog | undefined, m: Extract<FromWorker, { type: 'log' }>): void {
  log?.[m.level]({ ...(m.data ?? {}), component: 'engine-worker' }, m.msg);
}
