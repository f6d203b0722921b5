import { performance } from 'node:perf_hooks';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client';
import type { GenerationObserver } from './generation.js';

/**
 * Prometheus metrics, one Registry per app (tests build several apps in one process).
 *
 * Three kinds:
 * - HTTP: request count and latency by method, route pattern and status (a stream is timed until
 *   its last byte; a client that went away before the end is counted with status 499);
 * - generation: time to first token, time per output token, tokens and requests per adapter —
 *   recorded through `app.generationObserver` (which the generation routes call), or
 *   `app.metrics.startGeneration(adapter)`, or the observe* methods;
 * - engine state, read on each scrape from the runtime (engine.stats(), the adapter registry),
 *   under the names vLLM uses, because inference gateways (Gateway API Inference Extension,
 *   llm-d, KServe) route on exactly these: `vllm:num_requests_running`,
 *   `vllm:num_requests_waiting`, `vllm:gpu_cache_usage_perc` (also `vllm:kv_cache_usage_perc`,
 *   vLLM ≥ 0.10's name; the fraction of KV capacity in use, on CPU too) and
 *   `vllm:lora_requests_info`.
 */

/** Label value for requests served by the base model (no adapter). */
export const BASE_LABEL = '(base)';

/** What the metrics read from the engine; `engine.stats()` returns a superset. */
export interface EngineStatsLike {
  running: number;
  waiting: number;
  /** adapter ids of running requests, one per request */
  runningAdapters: readonly string[];
  waitingAdapters: readonly string[];
  batchSize: number;
  kvTokens: number;
  kvCapacity: number;
  tokensGenerated: number;
  cancelled: number;
  adaptersResident?: number;
  /** bytes handed to onnxruntime / taken back, over every run (engine/transfer.ts) */
  bytesToRuntime?: number;
  bytesFromRuntime?: number;
}

export interface AdapterStateLike {
  name: string;
  state: string;
  /** held in this replica's memory (absent: a ready adapter counts as loaded) */
  loaded?: boolean;
  /** bytes its served weights take when loaded (LoRA matrices and saved embedding/lm_head rows) */
  memoryBytes?: number | null;
}

/** The adapter store's counters (AdapterRegistry.stats()). */
export interface AdapterStoreStatsLike {
  loads: number;
  evictions: number;
}

/** The live state behind the scrape-time gauges. */
export interface MetricsSource {
  stats(): EngineStatsLike;
  adapters(): readonly AdapterStateLike[];
  /** the id the engine reports (e.g. an adapter version) → the adapter's name */
  adapterName(id: string): string;
  /**
   * vLLM's `max_lora` label: how many different adapters one batch can serve at once. Here every
   * row may carry its own adapter, so min(MAX_BATCH, MAX_ADAPTERS).
   */
  maxLora: number;
  /** loads and evictions so far; absent: not reported */
  storeStats?(): AdapterStoreStatsLike;
  /** seconds of each adapter load since the last call (for the load latency histogram) */
  takeLoadSeconds?(): number[];
}

export interface GenerationTimer {
  /** `n` output tokens arrived (call per token, or once with the count) */
  tokens(n?: number): void;
  /** the request ended; `reason`: stop | length | cancelled | error */
  finish(reason: string): void;
}

const HTTP_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
// the buckets vLLM uses for the same two quantities, so dashboards carry over
const TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80];
const TPOT_BUCKETS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5];

const adapterLabel = (adapter: string | null | undefined): string => adapter || BASE_LABEL;

export class Metrics {
  readonly registry = new Registry();
  private readonly httpRequests: Counter<'method' | 'route' | 'status'>;
  private readonly httpDuration: Histogram<'method' | 'route' | 'status'>;
  private readonly ttft: Histogram<'adapter'>;
  private readonly tpot: Histogram<'adapter'>;
  private readonly generatedTokens: Counter<'adapter'>;
  private readonly generationRequests: Counter<'adapter' | 'finish_reason'>;
  private readonly generationDuration: Histogram<'adapter'>;
  private readonly adapterRejections: Counter<'code'>;
  private snapshot: { stats: EngineStatsLike; adapters: readonly AdapterStateLike[] } | null = null;
  /** adapter labels with series, and the finish reasons seen: what pruning has to remove */
  private readonly adapterLabels = new Set<string>();
  private readonly finishReasons = new Set<string>();

  constructor(private readonly source: () => MetricsSource | null) {
    const registers = [this.registry];
    collectDefaultMetrics({ register: this.registry, prefix: 'loraserve_' });

    this.httpRequests = new Counter({ name: 'loraserve_http_requests_total', help: 'HTTP requests by method, route pattern and status', labelNames: ['method', 'route', 'status'], registers });
    this.httpDuration = new Histogram({ name: 'loraserve_http_request_duration_seconds', help: 'HTTP request duration until the last byte (streams included)', labelNames: ['method', 'route', 'status'], buckets: HTTP_BUCKETS, registers });
    this.ttft = new Histogram({ name: 'loraserve_time_to_first_token_seconds', help: 'time from accepting a generation request to its first output token', labelNames: ['adapter'], buckets: TTFT_BUCKETS, registers });
    this.tpot = new Histogram({ name: 'loraserve_time_per_output_token_seconds', help: 'mean time between output tokens of one request, after the first', labelNames: ['adapter'], buckets: TPOT_BUCKETS, registers });
    this.generatedTokens = new Counter({ name: 'loraserve_generation_tokens_total', help: 'output tokens sent to clients, by adapter', labelNames: ['adapter'], registers });
    this.generationRequests = new Counter({ name: 'loraserve_generation_requests_total', help: 'generation requests completed, by adapter and finish reason', labelNames: ['adapter', 'finish_reason'], registers });
    this.generationDuration = new Histogram({ name: 'loraserve_generation_duration_seconds', help: 'generation request duration, accept to last token', labelNames: ['adapter'], buckets: HTTP_BUCKETS, registers });

    this.adapterRejections = new Counter({ name: 'loraserve_adapter_rejections_total', help: 'adapter uploads and validations answered 422, by error code (each code once per rejection)', labelNames: ['code'], registers });

    const self = this;
    const gauge = (name: string, help: string, read: (s: EngineStatsLike) => number) =>
      new Gauge({
        name,
        help,
        registers,
        collect() {
          const snap = self.read();
          this.set(snap ? read(snap.stats) : 0);
        },
      });
    gauge('vllm:num_requests_running', 'requests in the running batch (prefilling or decoding)', (s) => s.running);
    gauge('vllm:num_requests_waiting', 'requests queued for a batch slot', (s) => s.waiting);
    const kvUsage = (s: EngineStatsLike) => (s.kvCapacity > 0 ? Math.min(1, s.kvTokens / s.kvCapacity) : 0);
    gauge('vllm:gpu_cache_usage_perc', 'KV cache usage, 0..1 (name kept from vLLM; also on CPU)', kvUsage);
    gauge('vllm:kv_cache_usage_perc', 'KV cache usage, 0..1', kvUsage);
    gauge('loraserve_queue_depth', 'requests queued for a batch slot', (s) => s.waiting);
    gauge('loraserve_batch_size', 'rows of the last decode step', (s) => s.batchSize);
    gauge('loraserve_kv_cache_tokens', 'tokens held in KV caches', (s) => s.kvTokens);
    gauge('loraserve_kv_cache_capacity_tokens', 'KV cache capacity in tokens (MAX_BATCH × context length)', (s) => s.kvCapacity);
    gauge('loraserve_adapters_resident', 'adapter versions resident in the inference worker (unloaded ones stay until their last request ends)', (s) => s.adaptersResident ?? 0);

    new Gauge({
      name: 'vllm:lora_requests_info',
      help: 'adapters of running and waiting requests (labels); the value is the time of the scrape, as vLLM does',
      labelNames: ['running_lora_adapters', 'waiting_lora_adapters', 'max_lora'],
      registers,
      collect() {
        this.reset();
        const src = self.source();
        const snap = self.read();
        if (!src || !snap) return;
        const names = (ids: readonly string[]) => [...new Set(ids.map((id) => src.adapterName(id)))].join(',');
        this.set(
          { running_lora_adapters: names(snap.stats.runningAdapters), waiting_lora_adapters: names(snap.stats.waitingAdapters), max_lora: String(src.maxLora) },
          Date.now() / 1000,
        );
      },
    });

    new Gauge({
      name: 'loraserve_adapters',
      help: 'registered adapters by state',
      labelNames: ['state'],
      registers,
      collect() {
        this.reset();
        const snap = self.read();
        if (!snap) return;
        const counts = new Map<string, number>();
        for (const a of snap.adapters) counts.set(a.state, (counts.get(a.state) ?? 0) + 1);
        for (const [state, n] of counts) this.set({ state }, n);
      },
    });
    const isLoaded = (a: AdapterStateLike) => a.loaded ?? a.state === 'ready';
    new Gauge({
      name: 'loraserve_adapters_loaded',
      help: 'adapters held in memory on this replica (MAX_LOADED_ADAPTERS bounds it); the others are loaded on demand',
      registers,
      collect() {
        const snap = self.read();
        this.set(snap ? snap.adapters.filter(isLoaded).length : 0);
      },
    });
    new Gauge({
      name: 'loraserve_adapters_stored',
      help: 'adapters in the store (shared by every replica with ADAPTER_STORE=shared), loaded or not',
      registers,
      collect() {
        const snap = self.read();
        this.set(snap ? snap.adapters.length : 0);
      },
    });
    new Gauge({
      name: 'loraserve_adapter_loaded',
      help: '1 for each adapter held in memory on this replica, by name (for adapter-affinity routing)',
      labelNames: ['adapter'],
      registers,
      collect() {
        this.reset();
        const snap = self.read();
        for (const a of snap?.adapters ?? []) if (isLoaded(a)) this.set({ adapter: a.name }, 1);
      },
    });
    new Gauge({
      name: 'loraserve_adapter_memory_bytes',
      help: 'bytes each loaded adapter holds in memory (LoRA matrices plus saved embed_tokens / lm_head copies and token rows), by name',
      labelNames: ['adapter'],
      registers,
      collect() {
        this.reset();
        const snap = self.read();
        for (const a of snap?.adapters ?? []) if (isLoaded(a) && typeof a.memoryBytes === 'number') this.set({ adapter: a.name }, a.memoryBytes);
      },
    });
    const loadSeconds = new Histogram({
      name: 'loraserve_adapter_load_seconds',
      help: 'time to load an adapter on demand or at start: verify its files, validate, hand it to the engine',
      buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
      registers,
      collect() {
        for (const s of self.source()?.takeLoadSeconds?.() ?? []) loadSeconds.observe(s);
      },
    });
    // a cumulative count read on each scrape → a Prometheus counter, increased by what was added since the last scrape
    // (undefined: nothing to read this time, the counter stays as it is)
    const cumulativeCounter = (name: string, help: string, readTotal: () => number | undefined) => {
      let last = 0;
      new Counter({
        name,
        help,
        registers,
        collect() {
          const now = readTotal();
          if (now === undefined) return;
          if (now > last) this.inc(now - last);
          last = now;
        },
      });
    };
    const storeCounter = (name: string, help: string, read: (s: AdapterStoreStatsLike) => number) =>
      cumulativeCounter(name, help, () => {
        const stats = self.source()?.storeStats?.();
        return stats ? read(stats) : undefined;
      });
    storeCounter('loraserve_adapter_loads_total', 'adapters loaded into memory (at start, on demand, after an eviction)', (s) => s.loads);
    storeCounter('loraserve_adapter_evictions_total', 'idle adapters unloaded to stay within MAX_LOADED_ADAPTERS', (s) => s.evictions);

    // cumulative engine counters → Prometheus counters (increase by what the engine added)
    const mirror = (name: string, help: string, read: (s: EngineStatsLike) => number) =>
      cumulativeCounter(name, help, () => {
        const snap = self.read();
        return snap ? read(snap.stats) : undefined;
      });
    mirror('vllm:generation_tokens_total', 'tokens generated by the engine', (s) => s.tokensGenerated);
    mirror('loraserve_requests_cancelled_total', 'requests the engine cancelled (client gone, timeout)', (s) => s.cancelled);

    // what crosses the JS↔onnxruntime boundary: O(rows) per decode step, never O(context)
    const last = { to_runtime: 0, from_runtime: 0 };
    new Counter({
      name: 'loraserve_runtime_bytes_transferred_total',
      help: 'bytes handed to onnxruntime (to_runtime) and taken back (from_runtime) by inference runs; the resident KV cache is not copied on cpu and so not counted there',
      labelNames: ['direction'],
      registers,
      collect() {
        const snap = self.read();
        for (const direction of ['to_runtime', 'from_runtime'] as const) {
          const now = (direction === 'to_runtime' ? snap?.stats.bytesToRuntime : snap?.stats.bytesFromRuntime) ?? 0;
          // both series exist from the first scrape on, at 0 until a run happens
          this.inc({ direction }, Math.max(0, now - last[direction]));
          last[direction] = Math.max(last[direction], now);
        }
      },
    });
  }

  /** The engine snapshot of the current scrape (one read per scrape, so gauges agree). */
  private read(): { stats: EngineStatsLike; adapters: readonly AdapterStateLike[] } | null {
    if (this.snapshot) return this.snapshot;
    const src = this.source();
    if (!src) return null;
    return { stats: src.stats(), adapters: src.adapters() };
  }

  /**
   * Drops the per-adapter series of adapters that are gone (deleted, or removed by another
   * replica): neither registered nor named by a running or waiting request. Without it every
   * adapter ever served would keep its series for the life of the process.
   */
  private prune(snap: { stats: EngineStatsLike; adapters: readonly AdapterStateLike[] }): void {
    const src = this.source();
    if (!src) return;
    const live = new Set<string>([BASE_LABEL, ...snap.adapters.map((a) => a.name)]);
    for (const id of [...snap.stats.runningAdapters, ...snap.stats.waitingAdapters]) live.add(src.adapterName(id));
    for (const adapter of this.adapterLabels) {
      if (live.has(adapter)) continue;
      this.forgetAdapter(adapter);
    }
  }

  /** Removes every series labelled with this adapter. */
  forgetAdapter(name: string): void {
    const adapter = adapterLabel(name);
    for (const m of [this.ttft, this.tpot, this.generatedTokens, this.generationDuration]) m.remove({ adapter });
    for (const finish_reason of this.finishReasons) this.generationRequests.remove({ adapter, finish_reason });
    this.adapterLabels.delete(adapter);
  }

  private seen(adapter: string | null): string {
    const label = adapterLabel(adapter);
    this.adapterLabels.add(label);
    return label;
  }

  /** An upload or validation was rejected with these problem codes. */
  adapterRejected(codes: readonly string[]): void {
    for (const code of new Set(codes)) this.adapterRejections.inc({ code });
  }

  /** The exposition text of one scrape. */
  async scrape(): Promise<string> {
    this.snapshot = null;
    this.snapshot = this.read();
    if (this.snapshot) this.prune(this.snapshot);
    try {
      return await this.registry.metrics();
    } finally {
      this.snapshot = null;
    }
  }

  get contentType(): string {
    return this.registry.contentType;
  }

  observeHttp(method: string, route: string, status: number, seconds: number): void {
    const labels = { method, route, status: String(status) };
    this.httpRequests.inc(labels);
    this.httpDuration.observe(labels, seconds);
  }

  /** `adapter`: a resolved adapter name, null for the base model (labels must stay few: never a name a client made up). */
  observeFirstToken(adapter: string | null, seconds: number): void {
    this.ttft.observe({ adapter: this.seen(adapter) }, seconds);
  }

  /**
   * `n` output tokens (the first included) generated over `seconds` from the first token to the
   * last: adds n to the token counter and, when n > 1, observes seconds / (n − 1) as the time per
   * output token (vLLM's definition).
   */
  observeTokens(adapter: string | null, n: number, seconds: number): void {
    if (n <= 0) return;
    this.generatedTokens.inc({ adapter: this.seen(adapter) }, n);
    if (n > 1) this.tpot.observe({ adapter: adapterLabel(adapter) }, seconds / (n - 1));
  }

  requestFinished(adapter: string | null, finishReason: string, seconds?: number): void {
    this.finishReasons.add(finishReason);
    this.generationRequests.inc({ adapter: this.seen(adapter), finish_reason: finishReason });
    if (seconds !== undefined) this.generationDuration.observe({ adapter: adapterLabel(adapter) }, seconds);
  }

  /**
   * Times one generation: call right after the request is accepted, `tokens()` as tokens reach
   * the client, `finish(reason)` once at the end (a second call is ignored).
   */
  startGeneration(adapter: string | null): GenerationTimer {
    const t0 = performance.now();
    let first = 0;
    let last = 0;
    let count = 0;
    let done = false;
    return {
      tokens: (n = 1) => {
        if (done || n <= 0) return;
        const t = performance.now();
        if (count === 0) {
          first = t;
          this.observeFirstToken(adapter, (t - t0) / 1000);
        }
        last = t;
        count += n;
        this.generatedTokens.inc({ adapter: this.seen(adapter) }, n);
      },
      finish: (reason: string) => {
        if (done) return;
        done = true;
        if (count > 1) this.tpot.observe({ adapter: adapterLabel(adapter) }, (last - first) / 1000 / (count - 1));
        this.requestFinished(adapter, reason, (performance.now() - t0) / 1000);
      },
    };
  }

  /**
   * The observer the generation routes call (src/http/generation.ts): first token, then the end
   * with the completion token count and the whole duration. `firstTokenSeconds` (optional, from
   * the same clock) gives the time per output token: (seconds − firstTokenSeconds) / (tokens − 1).
   */
  observer(): GenerationObserver {
    return {
      firstToken: (adapter, seconds) => this.observeFirstToken(adapter, seconds),
      finished: (adapter, tokens, seconds, result, firstTokenSeconds?: number) => {
        if (tokens > 0) this.generatedTokens.inc({ adapter: this.seen(adapter) }, tokens);
        if (tokens > 1 && firstTokenSeconds !== undefined) this.tpot.observe({ adapter: adapterLabel(adapter) }, Math.max(0, seconds - firstTokenSeconds) / (tokens - 1));
        this.requestFinished(adapter, result.finishReason, seconds);
      },
    };
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    metrics: Metrics;
  }
}

export interface MetricsOptions {
  /** where the scrape-time gauges read from; default: the app's runtime */
  source?: () => MetricsSource | null;
}

/**
 * The engine reports adapter *versions* (the registry's versionId, `name@version#seq`; names are
 * [A-Za-z0-9._-] so they hold no `@`); gateways want the names requests use.
 */
export function adapterNameOfVersion(versionId: string): string {
  const m = /^(.+)@\d+#\d+$/.exec(versionId);
  return m ? m[1]! : versionId;
}

/** The runtime's engine and adapter registry as a metrics source; null while the app has no runtime. */
export function runtimeSource(app: FastifyInstance): () => MetricsSource | null {
  return () => {
    if (!app.hasDecorator('runtime') || !app.runtime) return null;
    const { engine, registry, config } = app.runtime;
    return {
      stats: () => engine.stats(),
      adapters: () => registry.list().map((a) => ({ name: a.name, state: a.state, loaded: a.loaded, memoryBytes: a.memoryBytes })),
      adapterName: adapterNameOfVersion,
      maxLora: Math.min(config.MAX_BATCH, config.MAX_LOADED_ADAPTERS || config.MAX_ADAPTERS || config.MAX_BATCH),
      storeStats: () => registry.stats(),
      takeLoadSeconds: () => registry.takeLoadSeconds(),
    };
  };
}

/**
 * Fastify plugin: decorates `app.metrics`, times every request, serves GET /metrics. Not
 * encapsulated (skip-override) so the timing hook sees every route.
 */
async function metricsPlugin(app: FastifyInstance, opts: MetricsOptions): Promise<void> {
  const metrics = new Metrics(opts.source ?? runtimeSource(app));
  app.decorate('metrics', metrics);
  app.decorate('generationObserver', metrics.observer());

  app.addHook('onRequest', async (request: FastifyRequest, reply: FastifyReply) => {
    const t0 = performance.now();
    const route = request.routeOptions.url ?? 'unmatched';
    const res = reply.raw;
    // 'close' fires for every response, streamed (hijacked) ones and broken-off ones included;
    // without a 'finish' before it the client left first (nginx's 499)
    let finished = false;
    res.once('finish', () => (finished = true));
    res.once('close', () => {
      metrics.observeHttp(request.method, route, finished ? res.statusCode : 499, (performance.now() - t0) / 1000);
    });
  });

  app.get('/metrics', async (_request, reply) => {
    const text = await metrics.scrape();
    return reply.type(metrics.contentType).send(text);
  });
}
(metricsPlugin as unknown as Record<symbol, boolean>)[Symbol.for('skip-override')] = true;

export default metricsPlugin;
