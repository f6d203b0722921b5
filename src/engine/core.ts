import type { Tensor } from 'onnxruntime-node';
import { vocabOf, type EngineEmbedding } from '../adapters/convert.js';
import { hasRowEmbeddings, type Manifest } from '../model/manifest.js';
import { hasOwnHead, rowsLogits } from './head.js';
import { FeedBuilder, type LoraModule, type ResidentAdapter } from './batch.js';
import { toModelArray } from './dtype.js';
import { kvStoreFor, type KvBuffers, type KvPrefix, type KvStore, type KvTensor, type StepFeeds } from './kv-store.js';
import { runStep, type RunSession } from './step-run.js';
import type { DoneWire, EngineLimits, EngineStats, FinishReason, FromWorker, LoraModuleWire, Provider, TokenWire, WorkerRequest } from './protocol.js';
import { countTransfer, type BoundOutputs, type Transfer } from './transfer.js';
import { sample, seededRng, type Rng, type Sampled } from './sampler.js';
import { Scheduler, type StepPlan } from './scheduler.js';

/**
 * The decode loop's state and one step of it, apart from the worker plumbing: it owns the
 * session's feeds and outputs, the scheduler, the KV caches and the resident adapters, and reports
 * through `sink` (tokens, finished requests, stats, logs). Run only inside the worker: a step
 * blocks its thread for the whole forward pass.
 */
export type Sink = (msg: FromWorker) => void;
export type { RunSession };

interface AdapterEntry extends ResidentAdapter {
  /** requests holding this version (queued or running) */
  refs: number;
  /** unloaded: no new request may take it; freed when refs reaches 0 */
  unloaded: boolean;
}

/**
 * A prompt prefilled once for several requests (OpenAI's `n`): the first request runs it and
 * leaves here a copy of its slot's prompt positions and the logits of its last position; each
 * follower copies them into its own slot instead of running the prompt again. A copy, not the
 * leader's slot itself: the leader may end (and its slot be reused) before a follower is admitted.
 */
interface SharedPrefill {
  prefix: KvPrefix | null;
  logits: Float32Array | null;
  /** followers that have not taken it yet */
  followers: number;
  /** the first request ended before its prefill did: followers prefill themselves */
  abandoned: boolean;
}

interface Row {
  readonly id: number;
  readonly promptIds: number[];
  readonly promptLength: number;
  prefilled: number;
  readonly adapter: AdapterEntry | null;
  readonly req: WorkerRequest;
  readonly maxTokens: number;
  readonly eos: ReadonlySet<number>;
  readonly rng: Rng;
  /** 0 → none */
  readonly deadline: number;
  /** its KV slot from the first prefill chunk on; -1 before */
  slot: number;
  /** tokens in its KV slot */
  kvLen: number;
  generated: number;
  lastToken: number;
  cancelled: boolean;
  /** the prefill this row takes from the first request of its group (until it has taken it) */
  follows: SharedPrefill | null;
}

export class EngineCore {
  private readonly sched: Scheduler<Row>;
  private readonly feeds: FeedBuilder;
  private readonly targetIndex: Map<string, number>;
  /** findable versions: loaded and not unloaded */
  private readonly adapters = new Map<string, AdapterEntry>();
  /** every version still in memory, unloaded ones included until their last request ends */
  private readonly resident = new Set<AdapterEntry>();
  private readonly kv: KvStore<KvTensor>;
  private readonly provider: Provider;
  private readonly boundOutputs: BoundOutputs;
  private readonly transferred: Transfer = { toRuntime: 0, fromRuntime: 0 };
  private lastBatchSize = 0;
  private tokensGenerated = 0;
  private prefillTokens = 0;
  /** by the id of the request that runs the prompt */
  private readonly shared = new Map<number, SharedPrefill>();
  private cancelledCount = 0;
  private pendingTokens: TokenWire[] = [];
  private pendingDone: DoneWire[] = [];
  private dirty = false;

  constructor(
    private readonly session: RunSession,
    private readonly manifest: Manifest,
    private readonly limits: EngineLimits,
    private readonly sink: Sink,
    opts: {
      /** on cuda, onnxruntime-node copies every input to the device per run, the cache views included */
      provider?: Provider;
      initialKvCapacity?: number;
      /** where the gqa store's cache lives (capiKvBuffers with the C-API runner); default host typed arrays */
      kvBuffers?: KvBuffers<KvTensor>;
      /** whether the runtime copies pre-allocated outputs back (onnxruntime-node: yes); see transfer.ts */
      boundOutputs?: BoundOutputs;
    } = {},
  ) {
    this.sched = new Scheduler<Row>(limits);
    this.feeds = new FeedBuilder(manifest, limits.maxBatch);
    // throws for a graph the engine cannot serve (the concat contract)
    this.kv = kvStoreFor(manifest, limits.maxBatch, limits.contextLength, { ...(opts.initialKvCapacity !== undefined && { initialCapacity: opts.initialKvCapacity }), ...(opts.kvBuffers && { buffers: opts.kvBuffers }) });
    this.provider = opts.provider ?? 'cpu';
    this.boundOutputs = opts.boundOutputs ?? 'copied';
    this.targetIndex = new Map(manifest.loraTargets.map((t, i) => [t.name, i]));
  }

  hasWork(): boolean {
    return this.sched.size > 0;
  }

  // ── requests ────────────────────────────────────────────────────────────────────────────────

  submit(id: number, req: WorkerRequest): void {
    const reject = (kind: 'queue_full' | 'context_length' | 'unknown_adapter' | 'bad_request', message: string) =>
      this.sink({ type: 'rejected', id, kind, message });
    if (req.promptIds.length === 0) return reject('bad_request', 'the prompt has no tokens');
    let adapter: AdapterEntry | null = null;
    if (req.adapterVersion !== null) {
      adapter = this.adapters.get(req.adapterVersion) ?? null;
      if (!adapter) return reject('unknown_adapter', `adapter version ${req.adapterVersion} is not loaded`);
    }
    // an adapter that adds tokens has a vocabulary of its own (embed-rows.ts feeds their rows)
    const vocab = vocabOf(adapter?.embedding, this.manifest);
    const bad = req.promptIds.find((t) => !Number.isInteger(t) || t < 0 || t >= vocab);
    if (bad !== undefined) return reject('bad_request', `token id ${bad} is outside the vocabulary [0, ${vocab})`);
    if (req.promptIds.length + 1 > this.limits.contextLength) {
      return reject('context_length', `the prompt has ${req.promptIds.length} tokens; the context holds ${this.limits.contextLength}, including at least one generated token`);
    }
    if (this.sched.full) return reject('queue_full', `${this.sched.running} requests running and ${this.sched.waiting.length} waiting`);
    const row: Row = {
      id,
      promptIds: req.promptIds,
      promptLength: req.promptIds.length,
      prefilled: 0,
      adapter,
      req,
      maxTokens: Math.max(1, Math.min(req.maxTokens, this.limits.contextLength - req.promptIds.length)),
      eos: new Set(req.eosIds),
      rng: seededRng(req.seed),
      deadline: this.limits.requestTimeoutMs > 0 ? Date.now() + this.limits.requestTimeoutMs : 0,
      slot: -1,
      kvLen: 0,
      generated: 0,
      lastToken: -1,
      cancelled: false,
      follows: this.followed(req),
    };
    // a request holds the version it was given from now on, whatever unload happens meanwhile
    if (adapter) adapter.refs++;
    this.sched.enqueue(row);
    this.dirty = true;
  }

  /** The shared prefill a request may take: its leader must still be known and ask for the same prompt and adapter. */
  private followed(req: WorkerRequest): SharedPrefill | null {
    if (req.prefixOf == null) return null;
    let entry = this.shared.get(req.prefixOf);
    if (!entry) {
      const leader = this.sched.find(req.prefixOf);
      // a leader whose prefill already ended has not kept its last logits: nothing to share
      if (!leader || leader.prefilled === leader.promptLength || leader.req.adapterVersion !== req.adapterVersion || !sameIds(leader.promptIds, req.promptIds)) return null;
      entry = { prefix: null, logits: null, followers: 0, abandoned: false };
      this.shared.set(req.prefixOf, entry);
    }
    if (entry.abandoned) return null;
    entry.followers++;
    return entry;
  }

  /** A follower no longer needs the shared prefill (taken, or the follower ended). */
  private unfollow(row: Row): void {
    const entry = row.follows;
    if (!entry) return;
    row.follows = null;
    entry.followers--;
    if (entry.followers === 0) {
      for (const [id, e] of this.shared) if (e === entry) this.shared.delete(id);
      // a snapshot in device memory is freed by hand, not by the garbage collector
      if (entry.prefix) this.kv.drop(entry.prefix);
      entry.prefix = null;
    }
  }

  /** A waiting request ends at once; a running one at the next step boundary. */
  cancel(id: number): void {
    const row = this.sched.find(id);
    if (!row) return;
    if (this.sched.waiting.includes(row)) this.finish(row, 'cancelled');
    else row.cancelled = true;
  }

  /**
   * Draining: every request still waiting for a batch slot is refused (it has not started, so its
   * client can retry elsewhere); running ones go on.
   */
  shedWaiting(): void {
    for (const row of [...this.sched.waiting]) {
      this.sched.remove(row.id);
      if (row.adapter) {
        row.adapter.refs--;
        this.release(row.adapter);
      }
      this.sink({ type: 'rejected', id: row.id, kind: 'draining', message: 'draining: this replica is shutting down before the request started' });
    }
    this.dirty = true;
  }

  /** Cancels everything (shutdown). Call only between steps. */
  cancelAll(): void {
    for (const row of [...this.sched.waiting, ...this.sched.prefilling, ...this.sched.decoding]) this.finish(row, 'cancelled');
  }

  /** Frees the KV cache (device memory is not garbage-collected). After cancelAll; the core is unusable after. */
  close(): void {
    this.kv.dispose();
  }

  // ── adapters ────────────────────────────────────────────────────────────────────────────────

  loadAdapter(versionId: string, wire: readonly LoraModuleWire[], embedding?: EngineEmbedding): void {
    if (!this.manifest.lora) throw new Error('this model graph was built without LoRA inputs');
    if (embedding) checkEmbedding(versionId, embedding, this.manifest);
    if (this.adapters.has(versionId) || [...this.resident].some((a) => a.versionId === versionId)) {
      throw new Error(`adapter version ${versionId} is already loaded`);
    }
    const modules: (LoraModule | null)[] = this.manifest.loraTargets.map(() => null);
    for (const m of wire) {
      const i = this.targetIndex.get(m.name);
      if (i === undefined) throw new Error(`adapter version ${versionId}: the model has no LoRA target ${m.name}`);
      const t = this.manifest.loraTargets[i];
      if (!Number.isInteger(m.rank) || m.rank < 0) throw new Error(`adapter version ${versionId}: ${m.name} has rank ${m.rank}`);
      if (m.A.length !== t.inFeatures * m.rank || m.B.length !== m.rank * t.outFeatures) {
        throw new Error(
          `adapter version ${versionId}: ${m.name} with rank ${m.rank} needs A [${t.inFeatures}, ${m.rank}] and B [${m.rank}, ${t.outFeatures}], got ${m.A.length} and ${m.B.length} values`,
        );
      }
      for (const which of ['factor', 'bias'] as const) {
        const v = m[which];
        if (v && v.length !== t.outFeatures) throw new Error(`adapter version ${versionId}: ${m.name} needs a ${which} vector of ${t.outFeatures} values, got ${v.length}`);
      }
      if (m.rank === 0) continue;
      const { rank, A, B } = m.rank === 1 ? widenRankOne(m.A, m.B) : m;
      const dtype = this.manifest.dtype;
      modules[i] = {
        rank,
        A: toModelArray(dtype, A),
        B: toModelArray(dtype, B),
        ...(m.factor && { factor: toModelArray(dtype, m.factor) }),
        ...(m.bias && { bias: toModelArray(dtype, m.bias) }),
      };
    }
    const entry: AdapterEntry = { versionId, modules, embedding: embedding ?? null, refs: 0, unloaded: false };
    this.adapters.set(versionId, entry);
    this.resident.add(entry);
    this.dirty = true;
  }

  /** A loaded version's modules (for the probe, which runs between steps). */
  residentAdapter(versionId: string): ResidentAdapter | undefined {
    return this.adapters.get(versionId);
  }

  unloadAdapter(versionId: string): void {
    const entry = this.adapters.get(versionId);
    if (!entry) throw new Error(`adapter version ${versionId} is not loaded`);
    this.adapters.delete(versionId);
    entry.unloaded = true;
    this.release(entry);
    this.dirty = true;
  }

  private release(entry: AdapterEntry): void {
    if (entry.unloaded && entry.refs === 0) this.resident.delete(entry);
  }

  // ── the loop ────────────────────────────────────────────────────────────────────────────────

  /** Runs one step (a prefill chunk or a decode step); a failed run ends only the rows in it. */
  async step(): Promise<void> {
    this.sweep();
    const plan = this.sched.next();
    if (!plan) return;
    try {
      if (plan.kind === 'prefill') await this.prefill(plan.row, plan.start, plan.end);
      else await this.decode(plan.rows);
    } catch (e) {
      const message = e instanceof Error ? e.message : String(e);
      this.sink({ type: 'log', level: 'error', msg: 'inference step failed', data: { error: message, plan: plan.kind } });
      for (const row of rowsOf(plan)) if (this.sched.find(row.id)) this.finish(row, 'cancelled', { error: message });
      if (plan.kind === 'decode') this.feeds.resetRows();
    }
  }

  /** Ends cancelled and timed-out requests before the next step takes them. */
  private sweep(): void {
    const now = Date.now();
    for (const row of [...this.sched.waiting, ...this.sched.prefilling, ...this.sched.decoding]) {
      if (row.cancelled) this.finish(row, 'cancelled');
      else if (row.deadline > 0 && now >= row.deadline) this.finish(row, 'cancelled', { timedOut: true });
    }
  }

  private async prefill(row: Row, start: number, end: number): Promise<void> {
    const given = row.follows;
    if (given && given.prefix && given.logits && row.prefilled === 0) return this.adopt(row, given);
    // the shared prefill is not there (its first request ended before it): run the prompt
    if (given) this.unfollow(row);
    if (row.slot < 0) row.slot = this.kv.acquire();
    await this.kv.reserve(end);
    const out = await this.run(this.feeds.prefill(row.promptIds.slice(start, end), row.slot, start, this.kv, row.adapter), [row.adapter]);
    this.prefillTokens += end - start;
    this.kv.write(out, [row.slot], [start], end - start);
    row.prefilled = end;
    row.kvLen = end;
    this.dirty = true;
    const [last] = (await rowsLogits(out, [row.adapter], this.manifest)) as [Float32Array];
    const leads = this.shared.get(row.id);
    if (leads && end === row.promptLength) {
      // followers take these; the logits are copied because the output buffer is not ours to keep
      leads.prefix = await this.kv.snapshot(row.slot, end);
      leads.logits = last.slice();
    }
    if (row.cancelled) return this.finish(row, 'cancelled');
    if (end < row.promptLength) return;
    this.sched.promote(row);
    this.emit(row, this.pick(last, row));
  }

  /** A follower joins with its leader's prefill: no forward pass, its own first sample. */
  private async adopt(row: Row, given: SharedPrefill): Promise<void> {
    if (row.slot < 0) row.slot = this.kv.acquire();
    await this.kv.reserve(given.prefix!.len);
    await this.kv.restore(given.prefix!, row.slot);
    row.prefilled = row.promptLength;
    row.kvLen = row.promptLength;
    const logits = given.logits!;
    this.unfollow(row);
    this.dirty = true;
    if (row.cancelled) return this.finish(row, 'cancelled');
    this.sched.promote(row);
    this.emit(row, this.pick(logits, row));
  }

  /** Every decoding row attends to its own slot, in the order the KV store needs (KvStore.order). */
  private async decode(decoding: readonly Row[]): Promise<void> {
    const rows = (await this.kv.order(decoding.map((r) => r.slot))).map((i) => decoding[i]!);
    const slots = rows.map((r) => r.slot);
    const lens = rows.map((r) => r.kvLen);
    await this.kv.reserve(Math.max(...lens) + 1);
    const feeds: StepFeeds<KvTensor> = this.feeds.decode(
      rows.map((r) => r.lastToken),
      slots,
      lens,
      this.kv,
      rows.map((r) => r.adapter),
    );
    const out = await this.run(feeds, rows.map((r) => r.adapter));
    this.kv.write(out, slots, lens, 1);
    this.lastBatchSize = rows.length;
    // the logits first (an adapter's own head may run a session), then every row's step at once
    const logits = await rowsLogits(out, rows.map((r) => r.adapter), this.manifest);
    rows.forEach((row, b) => {
      row.kvLen++;
      if (row.cancelled) return this.finish(row, 'cancelled');
      this.emit(row, this.pick(logits[b]!, row));
    });
    this.dirty = true;
  }

  /** One run of the session, with what crosses the JS↔runtime boundary counted. */
  private async run(feeds: StepFeeds<KvTensor>, adapters: readonly (ResidentAdapter | null)[]): Promise<Record<string, Tensor>> {
    // the hidden state crosses back only for a step with a row whose adapter has its own lm_head
    const hidden = hasRowEmbeddings(this.manifest) && adapters.some((a) => hasOwnHead(a?.embedding));
    const out = await runStep(this.session, this.manifest, this.kv, feeds, hidden);
    countTransfer(this.transferred, feeds, out, this.provider, { boundOutputs: this.boundOutputs, deviceCache: this.kv.runtimeMemory });
    return out;
  }

  private pick(logits: Float32Array, row: Row): Sampled {
    return sample(row.req.vocabLimit < logits.length ? logits.subarray(0, row.req.vocabLimit) : logits, row.req.sampling, row.rng);
  }

  private emit(row: Row, s: Sampled): void {
    row.generated++;
    this.tokensGenerated++;
    if (row.eos.has(s.token)) return this.finish(row, 'stop');
    row.lastToken = s.token;
    this.pendingTokens.push([row.id, s.token, s.logprob, s.top ?? null]);
    if (row.generated >= row.maxTokens) this.finish(row, 'length');
  }

  private finish(row: Row, reason: FinishReason, extra: { timedOut?: boolean; error?: string } = {}): void {
    if (!this.sched.remove(row.id)) return;
    if (row.slot >= 0) this.kv.release(row.slot);
    row.slot = -1;
    this.unfollow(row);
    const leads = this.shared.get(row.id);
    // ended before its prompt was prefilled: its followers run the prompt themselves
    if (leads && !leads.prefix) {
      leads.abandoned = true;
      this.shared.delete(row.id);
    }
    if (row.adapter) {
      row.adapter.refs--;
      this.release(row.adapter);
    }
    if (reason === 'cancelled') this.cancelledCount++;
    this.pendingDone.push({
      id: row.id,
      finishReason: reason,
      promptTokens: row.promptLength,
      completionTokens: row.generated,
      timedOut: extra.timedOut ?? false,
      error: extra.error ?? null,
    });
    if (this.sched.decoding.length === 0) this.feeds.resetRows();
    this.dirty = true;
  }

  // ── reporting ───────────────────────────────────────────────────────────────────────────────

  stats(): EngineStats {
    const running = [...this.sched.prefilling, ...this.sched.decoding];
    const waiting = this.sched.waiting;
    const names = (rows: readonly Row[]) => rows.flatMap((r) => (r.adapter ? [r.adapter.versionId] : []));
    return {
      running: running.length,
      waiting: waiting.length,
      runningAdapters: names(running),
      waitingAdapters: names(waiting),
      batchSize: this.sched.decoding.length > 0 ? this.lastBatchSize : 0,
      kvTokens: running.reduce((n, r) => n + r.kvLen, 0),
      kvCapacity: this.limits.maxBatch * this.limits.contextLength,
      tokensGenerated: this.tokensGenerated,
      prefillTokens: this.prefillTokens,
      cancelled: this.cancelledCount,
      adaptersResident: this.resident.size,
      bytesToRuntime: this.transferred.toRuntime,
      bytesFromRuntime: this.transferred.fromRuntime,
    };
  }

  /** Sends what happened since the last flush, as one message. */
  flush(): void {
    if (!this.dirty && this.pendingTokens.length === 0 && this.pendingDone.length === 0) return;
    this.sink({ type: 'step', tokens: this.pendingTokens, done: this.pendingDone, stats: this.stats() });
    this.pendingTokens = [];
    this.pendingDone = [];
    this.dirty = false;
  }
}

/**
 * onnxruntime's CPU MatMul takes another path for a one-column matrix than for a wider one, so a
 * rank-1 module fed alone and the same module zero-padded to a larger rank in a mixed step differ
 * in the last float bits (measured by the graph tests, ~1e-7). Storing rank 1 as rank 2 with a
 * zero column keeps a row's result the same whatever shares its step.
 */
function widenRankOne(A: Float32Array, B: Float32Array): { rank: number; A: Float32Array; B: Float32Array } {
  const A2 = new Float32Array(A.length * 2);
  for (let k = 0; k < A.length; k++) A2[k * 2] = A[k];
  const B2 = new Float32Array(B.length * 2);
  B2.set(B);
  return { rank: 2, A: A2, B: B2 };
}

function rowsOf<R>(plan: StepPlan<R>): readonly R[] {
  return plan.kind === 'prefill' ? [plan.row] : plan.rows;
}

/** The sizes the worker relies on when it reads an adapter's embedding parts per token. */
function checkEmbedding(versionId: string, e: EngineEmbedding, m: Manifest): void {
  if (!hasRowEmbeddings(m)) throw new Error(`adapter version ${versionId} changes the embedding or lm_head; this model graph has no per-row embedding inputs (rebuild it)`);
  const V = m.architecture.vocabSize;
  const H = m.architecture.hiddenSize;
  const bad = (what: string) => new Error(`adapter version ${versionId}: ${what}`);
  if (e.lora && (e.lora.A.length !== V * e.lora.rank || e.lora.B.length !== e.lora.rank * H)) throw bad(`embedding LoRA of rank ${e.lora.rank} needs A [${V}, r] and B [r, ${H}]`);
  for (const [what, t] of [['trainable tokens', e.tokens], ['lm_head tokens', e.headTokens]] as const) {
    if (t && (t.values.length !== t.indices.length * H || t.indices.some((i) => i < 0 || i >= V))) throw bad(`${what} need ids below ${V} and [k, ${H}] values`);
  }
  // copies of an adapter that adds tokens have more rows than V, the same number in both
  const rows = vocabOf(e, m);
  for (const [what, t] of [['embed_tokens', e.table], ['lm_head', e.headTable]] as const) if (t && t.length !== rows * H) throw bad(`a saved ${what} must be [${rows} ≥ ${V}, ${H}]`);
  if (rows > V && (!e.table || !e.headTable)) throw bad(`an adapter with ${rows} tokens needs both a saved embed_tokens and lm_head`);
}

function sameIds(a: readonly number[], b: readonly number[]): boolean {
  return a.length === b.length && a.every((x, i) => x === b[i]);
}
