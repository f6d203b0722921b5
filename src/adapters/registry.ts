import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { Manifest } from '../model/manifest.js';
import { HttpProblem, badRequest, notFound } from '../http/problem.js';
import type { AdapterWeights } from './convert.js';
import { readAdapterFolder } from './folder.js';
import { DoraNormError } from './dora.js';
import type { Tokenizer } from '../tokenizer/types.js';
import { AdapterIngest, moduleScales, type IngestedWeights } from './ingest.js';
import { EffectSchema, error, type Effect, type EmbeddingParts, type ModuleReport, type Problem, type ValidationReport } from './report.js';
import type { ProbeResult } from '../engine/probe.js';
import { AdapterStore, NameTakenError, NotStoredError, adapterNameProblem, pauseHookFromEnv, type AdapterBackend, type AdapterMeta, type FileDigest, type StoreHooks, type StoredEntry } from './store.js';
import { SharedFolderStore } from './shared-folder.js';
import { S3Store, parseS3Url } from './s3-store.js';
import { CONFIG_FILE, WEIGHTS_FILE, type VersionFiles } from './store.js';
import type { ModelFacts, ValidationLimits } from './validate.js';

/**
 * Adapter names → immutable adapter versions, bound to one model (onnxruntime-genai's `Adapters`).
 *
 * A version is created only here, after validation, and never changes. Its weights live in the
 * inference worker under its `versionId`; generation resolves a name to the versionId current at
 * that moment and the worker keeps a version alive while any running request uses it. So replace
 * and delete only swap the name's pointer and then `unloadAdapter(old)`: running streams finish on
 * the version they started with.
 *
 * Choices where DESIGN.md left one:
 *   - MAX_ADAPTERS counts every stored adapter (ready or incompatible); one more → 409
 *     "Adapter Limit Reached" (a state of the server the client can fix by deleting one, not a
 *     rate limit, so not 429). 0 = no limit.
 *   - replace() is create-or-replace (PUT semantics); it counts against MAX_ADAPTERS only when it creates.
 *   - generation with an unknown name → 404; with an incompatible one → 409 carrying its errors.
 *   - a name equal to the base model's id is refused (409): /v1/models lists both under one namespace.
 *
 * Stored is not loaded: the registry knows every stored name (its catalog), and holds in the
 * engine at most MAX_LOADED_ADAPTERS of them (0: all). A request for one that is not loaded loads
 * it first (concurrent requests wait for that one load); the least recently used one that no
 * request is using is unloaded to make room. With a shared store (other replicas write it) a name
 * is first validated against this model when a request needs it (state `stored` until then), an
 * unknown name is looked up in the store before it is a 404, and a background sync every
 * ADAPTER_SYNC_MS picks up what other replicas replaced or deleted.
 */

/** `stored`: in a shared store, not yet validated against this replica's model */
export type AdapterState = 'ready' | 'incompatible' | 'stored';

/** sha256 and size of a staged folder's two files (see ReceivedUpload.digests) */
export type StagedDigests = Record<typeof CONFIG_FILE | typeof WEIGHTS_FILE, FileDigest>;

/** What the upload learned while writing the staged files, so that the registry need not read them again. */
export interface StagedExtras {
  /** sha256 and sizes of the two files; otherwise they are read back and hashed */
  digests?: StagedDigests | null;
  /** the weights decoded in the stream (ingest.ts); otherwise the values are read back */
  ingested?: IngestedWeights | null;
  /** the form field allow_no_effect=true: accept an adapter whose every delta is zero */
  allowNoEffect?: boolean;
}

/** The engine side of the registry (Engine implements it). */
export interface AdapterEngine {
  loadAdapter(versionId: string, weights: AdapterWeights): Promise<void>;
  unloadAdapter(versionId: string): void | Promise<void>;
  /** the loaded version's effect on the probe prompt, through the served graph (engine/probe.ts) */
  probeAdapter?(versionId: string, ids: number[]): Promise<ProbeResult>;
}

export interface AdapterVersion {
  readonly name: string;
  readonly version: number;
  /** the store's id of this version (see StoredEntry.ref) */
  readonly ref: string;
  /** where the files are, for loading on demand */
  readonly entry: StoredEntry;
  readonly state: AdapterState;
  readonly created: string | null;
  readonly files: Readonly<VersionFiles> | null;
  readonly report: ValidationReport;
}

export interface TargetSummary {
  projection: string;
  layers: number[];
  ranks: number[];
  scales: number[];
}

export interface AdapterSummary {
  name: string;
  state: AdapterState;
  /** held in this replica's engine now */
  loaded: boolean;
  version: number;
  created: string | null;
  sha256: { config: string; weights: string } | null;
  bytes: { config: number; weights: number; total: number } | null;
  peftType: string | null;
  baseModel: string | null;
  r: number | null;
  loraAlpha: number | null;
  useRslora: boolean | null;
  /** PEFT variants the modules carry: DoRA magnitudes (use_dora), lora_B biases (lora_bias) */
  useDora: boolean;
  loraBias: boolean;
  parameters: number;
  /** per projection: which layers, which ranks and which scales (alpha/r, folded into B) */
  targets: TargetSummary[];
  /** bytes the served weights take when loaded (LoRA matrices plus embedding parts); null in reports older than it */
  memoryBytes: number | null;
  errors: Problem[];
  warnings: Problem[];
}

export interface AdapterDetail extends AdapterSummary {
  modules: Pick<ModuleReport, 'module' | 'rank' | 'alpha' | 'scale' | 'rankKey' | 'alphaKey' | 'deltaNorm' | 'relativeNorm'>[];
  /** measured through the served graph on the probe prompt; null when it could not be run */
  effect: Effect | null;
  /** embedding LoRA, trainable tokens, saved embed_tokens / lm_head (embedding-parts.ts); null when none */
  embedding: EmbeddingParts | null;
}

export interface AdapterDetailWithReport extends AdapterDetail {
  report: ValidationReport;
}

export interface RegistryOptions {
  config: Config;
  manifest: Manifest;
  engine: AdapterEngine;
  log: Pick<Logger, 'info' | 'warn' | 'error'>;
  /** test hooks for the store (default: LORASERVE_TEST_PAUSE, see store.ts) */
  hooks?: StoreHooks;
  /** the probe prompt's token ids (engine/probe.ts probeIds); absent or empty: no effect is measured */
  probeIds?: number[];
}

/** process-wide, so version ids never repeat, even across registries sharing one engine (tests) */
let versionSeq = 0;

const distinct = (xs: number[]) => [...new Set(xs)].sort((a, b) => a - b);

/** A loaded version: its key in the engine, and what the LRU needs. */
interface Resident {
  readonly name: string;
  readonly ref: string;
  /** unique within this process: the key of the weights in the engine */
  readonly versionId: string;
  lastUsed: number;
  /** requests holding it (acquire … release) */
  inUse: number;
  /** its own tokenizer when it adds tokens (folder.ts), loaded once per version */
  readonly tokenizer: Tokenizer | null;
}

/** A request's hold on a loaded version: call release() when the request ends. */
export interface AdapterLease {
  versionId: string;
  /** the adapter's own tokenizer (it adds tokens): encode, decode and stop on it; null: the base's */
  tokenizer: Tokenizer | null;
  release(): void;
}

/** Counters for /metrics. */
export interface RegistryStats {
  stored: number;
  loaded: number;
  loads: number;
  evictions: number;
}

function summarize(v: AdapterVersion, loaded = false): AdapterSummary {
  const byProjection = new Map<string, { layers: number[]; ranks: number[]; scales: number[] }>();
  for (const m of v.report.modules) {
    let t = byProjection.get(m.projection);
    if (!t) byProjection.set(m.projection, (t = { layers: [], ranks: [], scales: [] }));
    t.layers.push(m.layer);
    t.ranks.push(m.rank);
    t.scales.push(m.scale);
  }
  const s = v.report.summary;
  const f = v.files;
  return {
    name: v.name,
    state: v.state,
    loaded,
    version: v.version,
    created: v.created,
    sha256: f ? { config: f[CONFIG_FILE].sha256, weights: f[WEIGHTS_FILE].sha256 } : null,
    bytes: f ? { config: f[CONFIG_FILE].bytes, weights: f[WEIGHTS_FILE].bytes, total: f[CONFIG_FILE].bytes + f[WEIGHTS_FILE].bytes } : null,
    peftType: s.peftType,
    baseModel: s.baseModel,
    r: s.r,
    loraAlpha: s.loraAlpha,
    useRslora: s.useRslora,
    useDora: v.report.modules.some((m) => Boolean(m.tensorMagnitude)),
    loraBias: v.report.modules.some((m) => Boolean(m.tensorBias)),
    parameters: s.parameters,
    targets: [...byProjection].map(([projection, t]) => ({ projection, layers: distinct(t.layers), ranks: distinct(t.ranks), scales: distinct(t.scales) })),
    memoryBytes: v.report.memoryBytes ?? null,
    errors: v.report.errors,
    warnings: v.report.warnings,
  };
}

function detail(v: AdapterVersion, loaded = false): AdapterDetail {
  return {
    ...summarize(v, loaded),
    modules: v.report.modules.map(({ module, rank, alpha, scale, rankKey, alphaKey, deltaNorm, relativeNorm }) => ({ module, rank, alpha, scale, rankKey, alphaKey, deltaNorm: deltaNorm ?? null, relativeNorm: relativeNorm ?? null })),
    effect: v.report.effect ?? null,
    embedding: v.report.embedding ?? null,
  };
}

/**
 * engine.loadAdapter, with a DoRA row whose ‖W + s·B·A‖ is 0 (known only once W is read, see
 * dora.ts) turned into the 422 it is: PEFT would produce NaN there.
 */
async function loadOrReject(engine: AdapterEngine, versionId: string, weights: AdapterWeights, report: ValidationReport, what: string): Promise<void> {
  try {
    await engine.loadAdapter(versionId, weights);
  } catch (e) {
    if (!(e instanceof DoraNormError)) throw e;
    const problem = error({ code: 'non_finite', module: e.module, expected: '‖W + scale·B·A‖ > 0 in every row', actual: 0, message: e.message, hint: "A DoRA adapter divides each output row by its norm; this base model has a zero row there (a pruned model?). Serve the base it was trained on." });
    throw rejectedProblem({ ...report, ok: false, errors: [problem] }, what);
  }
}

/** A report for a stored adapter that could not even be validated (meta.json or files damaged). */
function failedReport(errors: Problem[]): ValidationReport {
  return {
    ok: false,
    errors,
    warnings: [],
    modules: [],
    summary: { peftType: null, baseModel: null, r: null, loraAlpha: null, useRslora: null, targetedModules: 0, tensors: 0, parameters: 0 },
  };
}

/** The report stored with a version at upload (shown until this replica validates it itself). */
function storedReport(meta: AdapterMeta): ValidationReport {
  const r = meta.report as Partial<ValidationReport> | null;
  if (r && Array.isArray(r.errors) && Array.isArray(r.warnings) && Array.isArray(r.modules) && r.summary) return r as ValidationReport;
  return failedReport([]);
}

export function rejectedProblem(report: ValidationReport, what: string): HttpProblem {
  const first = report.errors[0];
  const detailText = `${what} does not fit this model: ${report.errors.length} error(s)${first ? `; first: ${first.message}` : ''}`;
  return new HttpProblem(422, 'Unprocessable Content', detailText, { errors: report.errors, warnings: report.warnings, report });
}

const notStored = (name: string) => notFound(`no adapter named ${JSON.stringify(name)}; GET /v1/adapters lists them`);

export class AdapterRegistry {
  /** the catalog: every stored name, loaded or not */
  private readonly versions = new Map<string, AdapterVersion>();
  private readonly resident = new Map<string, Resident>();
  /** creates under way, so concurrent uploads cannot overshoot MAX_ADAPTERS */
  private reserved = 0;
  private readonly locks = new Map<string, Promise<unknown>>();
  private readonly counters = { loads: 0, evictions: 0 };
  private readonly loadTimes: number[] = [];
  private syncTimer: NodeJS.Timeout | null = null;
  private closed = false;

  private constructor(
    readonly store: AdapterBackend,
    private readonly model: ModelFacts,
    private readonly limits: ValidationLimits,
    private readonly maxAdapters: number,
    private readonly maxLoaded: number,
    private readonly engine: AdapterEngine,
    private readonly log: RegistryOptions['log'],
    private readonly probe: { ids: number[]; modelHash: string },
  ) {}

  /**
   * Opens ADAPTER_DIR (recovering from any interrupted write). A local store: every stored
   * adapter is re-validated against the current model and the ones that fit are loaded (up to
   * MAX_LOADED_ADAPTERS); one that no longer fits stays on disk as `incompatible`, listed with its
   * report and never served. A shared store: the names are listed, each is validated and loaded
   * when a request first needs it, and the background sync starts.
   */
  static async open(opts: RegistryOptions): Promise<AdapterRegistry> {
    const { config, manifest, engine, log } = opts;
    const hooks = opts.hooks ?? pauseHookFromEnv();
    const logRecovery = (r: { entry: string; action: string }) => log.warn({ entry: r.entry, action: r.action }, 'adapter store: recovered from an interrupted write');
    const { store, recovered } = parseS3Url(config.ADAPTER_DIR)
      ? await S3Store.open({
          url: config.ADAPTER_DIR,
          endpoint: config.S3_ENDPOINT,
          region: config.AWS_REGION,
          cacheDir: path.join(config.CACHE_DIR, 'adapters-s3'),
          leaseMs: config.ADAPTER_LEASE_MS,
          hooks,
          log: logRecovery,
          warn: (message) => log.warn(message),
        })
      : config.ADAPTER_STORE === 'shared'
        ? await SharedFolderStore.open(config.ADAPTER_DIR, { leaseMs: config.ADAPTER_LEASE_MS, hooks, log: logRecovery })
        : await AdapterStore.open(config.ADAPTER_DIR, hooks);
    recovered.forEach(logRecovery);
    const registry = new AdapterRegistry(
      store,
      { architecture: manifest.architecture, loraTargets: manifest.loraTargets, modelId: manifest.modelId, dtype: manifest.dtype },
      { maxLoraRank: config.MAX_LORA_RANK, strictBaseModel: config.STRICT_BASE_MODEL, ...(config.ADAPTER_MEMORY_BUDGET_MB > 0 && { maxAdapterBytes: config.ADAPTER_MEMORY_BUDGET_MB * 2 ** 20 }) },
      config.MAX_ADAPTERS,
      config.MAX_LOADED_ADAPTERS,
      engine,
      log,
      { ids: opts.probeIds ?? [], modelHash: manifest.sourceHash },
    );
    for (const entry of await store.list()) {
      if (store.shared) registry.versions.set(entry.name, registry.fromEntry(entry));
      else await registry.reopen(entry);
    }
    const all = [...registry.versions.values()];
    const count = (state: AdapterState) => all.filter((v) => v.state === state).length;
    log.info({ dir: store.location, ready: count('ready'), stored: count('stored'), incompatible: count('incompatible'), loaded: registry.resident.size }, 'adapters loaded');
    if (store.shared) registry.scheduleSync(config.ADAPTER_SYNC_MS);
    return registry;
  }

  /** Stops the background sync and the store's background work. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.syncTimer) clearTimeout(this.syncTimer);
    await this.store.close();
  }

  private nextVersionId(name: string, version: number): string {
    return `${name}@${version}#${++versionSeq}`;
  }

  /** A catalog entry for a stored version not (yet) validated here. */
  private fromEntry(entry: StoredEntry): AdapterVersion {
    const { name, meta, ref } = entry;
    const base = { name, ref, entry, version: meta?.version ?? 0, created: meta?.created ?? null, files: meta?.files ?? null };
    if (!meta) return { ...base, state: 'incompatible', report: failedReport([error({ code: 'missing_file', file: 'meta.json', message: `${name}: ${entry.metaError ?? 'meta.json is missing'}`, hint: 'delete the adapter and upload it again' })]) };
    return { ...base, state: 'stored', report: storedReport(meta) };
  }

  private markIncompatible(v: AdapterVersion, report: ValidationReport): void {
    this.versions.set(v.name, { ...v, state: 'incompatible', report });
    this.log.warn({ adapter: v.name, errors: report.errors.map((e) => e.code) }, `adapter ${v.name} is incompatible with this model and will not be served: ${report.errors[0]?.message ?? ''}`);
  }

  private async reopen(entry: StoredEntry): Promise<void> {
    const v = this.fromEntry(entry);
    this.versions.set(entry.name, v);
    // beyond MAX_LOADED_ADAPTERS: validated now (quarantine at start is the same), loaded on demand
    await this.validateAndLoad(v, this.maxLoaded === 0 || this.resident.size < this.maxLoaded);
  }

  /**
   * Checks a stored version's files against its meta.json, validates it against this model and
   * (when `load`) hands it to the engine. An adapter that fails is marked incompatible here.
   * Returns the version now in the catalog, or null when the name is no longer stored.
   */
  private async validateAndLoad(v: AdapterVersion, load: boolean): Promise<AdapterVersion | null> {
    const { name } = v;
    for (let attempt = 0; ; attempt++) {
      const { entry } = v;
      const meta = entry.meta;
      const t0 = performance.now();
      const diffs = await this.store.verify(entry);
      const verified = performance.now();
      if (diffs.length && this.store.shared && attempt < 3) {
        // a replace or delete through another replica removes the old version's files: follow the pointer
        const fresh = await this.store.find(name);
        if (!fresh) {
          this.forget(name);
          return null;
        }
        if (fresh.ref !== entry.ref) {
          v = this.fromEntry(fresh);
          this.versions.set(name, v);
          this.dropResident(name);
          continue;
        }
      }
      if (diffs.length) {
        const problems = diffs.map((d) =>
          meta
            ? error({ code: 'corrupt_file', message: `the stored files of ${name} changed after upload: ${d}`, hint: 'delete the adapter and upload it again' })
            : error({ code: 'missing_file', file: 'meta.json', message: `${name}: ${d}`, hint: 'delete this folder and upload the adapter through the API' }),
        );
        this.markIncompatible(v, failedReport(problems));
        return this.versions.get(name)!;
      }
      const { report: validatedReport, weights, tokenizer } = await readAdapterFolder(entry.dir, this.model, { ...this.limits, allowNoEffect: meta?.allowNoEffect === true }, { readValues: true });
      // measured on this very graph before: the same numbers again, without the probe's cost
      const stored = EffectSchema.safeParse((meta?.report as { effect?: unknown } | undefined)?.effect);
      const storedEffect = stored.success && stored.data.modelHash === this.probe.modelHash ? stored.data : null;
      let report: ValidationReport = { ...validatedReport, effect: storedEffect };
      const validated = performance.now();
      if (!report.ok || (load && !weights)) {
        this.markIncompatible(v, report);
        return this.versions.get(name)!;
      }
      let ready: AdapterVersion = { ...v, state: 'ready', report };
      if (load && weights) {
        this.makeRoom(name);
        const versionId = this.nextVersionId(name, ready.version);
        try {
          await this.engine.loadAdapter(versionId, weights);
        } catch (e) {
          this.markIncompatible(v, failedReport([error({ code: 'corrupt_file', message: `the engine refused ${name}: ${(e as Error).message}` })]));
          return this.versions.get(name)!;
        }
        if (!storedEffect) ready = { ...ready, report: { ...report, effect: await this.measure(versionId, name) } };
        this.resident.set(name, { name, ref: ready.ref, versionId, lastUsed: performance.now(), inUse: 0, tokenizer });
        this.counters.loads++;
        const done = performance.now();
        if (this.loadTimes.length < 10_000) this.loadTimes.push((done - t0) / 1000);
        this.log.info({ adapter: name, version: ready.version, versionId, verifyMs: Math.round(verified - t0), validateMs: Math.round(validated - verified), engineMs: Math.round(done - validated) }, 'adapter loaded from the store');
      }
      this.versions.set(name, ready);
      return ready;
    }
  }

  /** The seconds of each load since the last call (bounded), for the metrics' histogram. */
  takeLoadSeconds(): number[] {
    return this.loadTimes.splice(0);
  }

  /**
   * The loaded version's effect through the served graph (engine/probe.ts). A failed probe is
   * logged and leaves `effect` null: the adapter passed validation and the engine holds it.
   */
  private async measure(versionId: string, name: string): Promise<Effect | null> {
    if (this.probe.ids.length === 0 || !this.engine.probeAdapter) return null;
    try {
      return { ...(await this.engine.probeAdapter(versionId, this.probe.ids)), modelHash: this.probe.modelHash };
    } catch (err) {
      this.log.error({ err, adapter: name, versionId }, 'the effect probe failed');
      return null;
    }
  }

  /**
   * Tells the engine that no new request may use a version. The engine stops handing it out at
   * once; the worker frees it after its last running request, so this need not be awaited.
   */
  private unload(versionId: string): void {
    try {
      void Promise.resolve(this.engine.unloadAdapter(versionId)).catch((err: unknown) => this.log.error({ err, versionId }, 'engine could not unload an adapter version'));
    } catch (err) {
      this.log.error({ err, versionId }, 'engine could not unload an adapter version');
    }
  }

  private dropResident(name: string): void {
    const r = this.resident.get(name);
    if (!r) return;
    this.resident.delete(name);
    this.unload(r.versionId);
  }

  private forget(name: string): void {
    this.versions.delete(name);
    this.dropResident(name);
  }

  /** Unloads least recently used idle adapters until one more fits under MAX_LOADED_ADAPTERS. */
  private makeRoom(keep: string, extra = 1): void {
    if (this.maxLoaded === 0) return;
    while (this.resident.size + extra > this.maxLoaded) {
      let victim: Resident | null = null;
      for (const r of this.resident.values()) if (r.inUse === 0 && r.name !== keep && (!victim || r.lastUsed < victim.lastUsed)) victim = r;
      // every loaded adapter is serving a request: go over the bound until one finishes (trim)
      if (!victim) return;
      this.resident.delete(victim.name);
      this.unload(victim.versionId);
      this.counters.evictions++;
      this.log.info({ adapter: victim.name, versionId: victim.versionId }, 'adapter unloaded to make room (MAX_LOADED_ADAPTERS)');
    }
  }

  /** Runs `fn` after every earlier operation on `name` has finished. */
  private async exclusive<T>(name: string, fn: () => Promise<T>): Promise<T> {
    const prev = this.locks.get(name) ?? Promise.resolve();
    const run = prev.then(fn, fn);
    const tail = run.then(
      () => undefined,
      () => undefined,
    );
    this.locks.set(name, tail);
    try {
      return await run;
    } finally {
      if (this.locks.get(name) === tail) this.locks.delete(name);
    }
  }

  private checkName(name: string): void {
    const why = adapterNameProblem(name);
    if (why) throw badRequest(why);
    if (name === this.model.modelId) throw new HttpProblem(409, 'Adapter Exists', `${JSON.stringify(name)} is the base model's name; choose another adapter name`);
  }

  private exists(name: string): HttpProblem {
    return new HttpProblem(409, 'Adapter Exists', `an adapter named ${JSON.stringify(name)} exists; PUT /v1/adapters/${name} replaces it`);
  }

  /**
   * The checks create() makes before reading the upload (name, taken, MAX_ADAPTERS), for routes
   * that learn the name before the files arrive. create() repeats them under its lock.
   */
  assertCreatable(name: string): void {
    this.checkName(name);
    if (this.versions.has(name)) throw this.exists(name);
    this.checkLimit();
  }

  private checkLimit(): void {
    if (this.maxAdapters > 0 && this.versions.size + this.reserved >= this.maxAdapters) {
      throw new HttpProblem(409, 'Adapter Limit Reached', `this server holds at most ${this.maxAdapters} adapters (MAX_ADAPTERS); delete one first`, { limit: this.maxAdapters, count: this.versions.size });
    }
  }

  /** Throws 409 when one more adapter would pass MAX_ADAPTERS; returns the release function of the reservation. */
  private reserveSlot(): () => void {
    this.checkLimit();
    this.reserved++;
    let released = false;
    return () => {
      if (!released) this.reserved--;
      released = true;
    };
  }

  /** The catalog entry of a name; on a shared store a name not seen yet is looked up in the store. */
  private async lookup(name: string): Promise<AdapterVersion> {
    const v = this.versions.get(name);
    if (v) return v;
    if (this.store.shared && !adapterNameProblem(name)) {
      const entry = await this.store.find(name);
      if (entry) {
        const fresh = this.fromEntry(entry);
        this.versions.set(name, fresh);
        return fresh;
      }
    }
    throw notFound(`no adapter named ${JSON.stringify(name)}`);
  }

  private isLoaded(v: AdapterVersion): boolean {
    return this.resident.get(v.name)?.ref === v.ref;
  }

  list(): AdapterSummary[] {
    return [...this.versions.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)).map((v) => summarize(v, this.isLoaded(v)));
  }

  /** One page of the listing, by name: the names after `after`, at most `limit`; `next` is the cursor of the following page. */
  page(after: string | null, limit: number): { adapters: AdapterSummary[]; next: string | null } {
    const names = [...this.versions.keys()].filter((n) => after === null || n > after).sort();
    const slice = names.slice(0, limit);
    const adapters = slice.map((n) => this.versions.get(n)!).map((v) => summarize(v, this.isLoaded(v)));
    return { adapters, next: names.length > limit ? slice[slice.length - 1]! : null };
  }

  /** Names a request may use right now (a `stored` one is validated and loaded by its first request). */
  readyNames(): string[] {
    return this.list().filter((a) => a.state !== 'incompatible').map((a) => a.name);
  }

  /** Stored vs loaded, loads, evictions (for /metrics). */
  stats(): RegistryStats {
    return { stored: this.versions.size, loaded: this.resident.size, ...this.counters };
  }

  /** The names loaded in the engine now. */
  loadedNames(): string[] {
    return [...this.resident.keys()].sort();
  }

  get(name: string): AdapterDetailWithReport {
    const v = this.versions.get(name);
    if (!v) throw notFound(`no adapter named ${JSON.stringify(name)}`);
    return { ...detail(v, this.isLoaded(v)), report: v.report };
  }

  /** get(), after looking a name this replica has not seen yet up in a shared store. */
  async describe(name: string): Promise<AdapterDetailWithReport> {
    await this.lookup(name);
    return this.get(name);
  }

  private incompatibleProblem(v: AdapterVersion): HttpProblem {
    return new HttpProblem(409, 'Adapter Incompatible', `adapter ${JSON.stringify(v.name)} does not fit the current model and is not served: ${v.report.errors[0]?.message ?? ''}`, {
      adapter: v.name,
      errors: v.report.errors,
      warnings: v.report.warnings,
    });
  }

  /**
   * The versionId of a loaded adapter's current version, without holding it (tests, the probe
   * bench). Requests use acquire(), which also loads what is not loaded and keeps the version
   * from being evicted while the request runs.
   */
  resolveForGeneration(name: string): string {
    const v = this.versions.get(name);
    if (!v) throw notStored(name);
    if (v.state === 'incompatible') throw this.incompatibleProblem(v);
    const r = this.resident.get(name);
    if (!r || r.ref !== v.ref) throw new HttpProblem(503, 'Service Unavailable', `adapter ${JSON.stringify(name)} is not loaded on this replica yet; retry`, {}, { 'retry-after': '1' });
    r.lastUsed = performance.now();
    return r.versionId;
  }

  /**
   * A hold on the current version of `name` for one request, loading it first when this replica
   * does not hold it (concurrent requests for it wait for the same load). While held, the version
   * is not evicted; release() when the request ends.
   */
  async acquire(name: string): Promise<AdapterLease> {
    for (let attempt = 0; attempt < 4; attempt++) {
      const v = this.versions.get(name);
      if (v?.state === 'incompatible') throw this.incompatibleProblem(v);
      const r = v ? this.resident.get(name) : undefined;
      if (v && r && r.ref === v.ref) {
        r.inUse++;
        r.lastUsed = performance.now();
        let released = false;
        return {
          versionId: r.versionId,
          tokenizer: r.tokenizer,
          release: () => {
            if (released) return;
            released = true;
            r.inUse--;
            this.trim();
          },
        };
      }
      if (!v && !this.store.shared) throw notStored(name);
      await this.exclusive(name, async () => {
        const cur = await this.lookup(name).catch(() => null);
        if (!cur) throw notStored(name);
        if (cur.state === 'incompatible' || this.isLoaded(cur)) return;
        await this.validateAndLoad(cur, true);
      });
      if (!this.versions.has(name)) throw notStored(name);
    }
    throw new HttpProblem(503, 'Service Unavailable', `adapter ${JSON.stringify(name)} changed while it was being loaded; retry`, {}, { 'retry-after': '1' });
  }

  /** After a request ends: back under MAX_LOADED_ADAPTERS if loads went over it while all were busy. */
  private trim(): void {
    if (this.maxLoaded > 0 && this.resident.size > this.maxLoaded) this.makeRoom('', 0);
  }

  private scheduleSync(ms: number): void {
    if (this.closed) return;
    this.syncTimer = setTimeout(() => {
      void this.sync()
        .catch((err: unknown) => this.log.error({ err }, 'adapter store sync failed'))
        .finally(() => this.scheduleSync(ms));
    }, ms);
    this.syncTimer.unref();
  }

  /**
   * Compares the store's versions with the catalog: a name replaced elsewhere gets its new version
   * (loaded by its next request; running requests finish on the old one), a name deleted elsewhere
   * is forgotten, a new one is listed.
   */
  async sync(): Promise<void> {
    const refs = await this.store.refs();
    const names = new Set([...this.versions.keys(), ...refs.keys()]);
    for (const name of names) {
      if (this.versions.get(name)?.ref === refs.get(name)) continue;
      await this.exclusive(name, async () => {
        const entry = await this.store.find(name);
        const cur = this.versions.get(name);
        if (!entry) {
          if (cur) {
            this.forget(name);
            this.log.info({ adapter: name }, 'adapter deleted through another replica');
          }
          return;
        }
        if (cur?.ref === entry.ref) return;
        this.versions.set(name, this.fromEntry(entry));
        this.dropResident(name);
        this.log.info({ adapter: name, version: entry.meta?.version ?? null }, cur ? 'adapter replaced through another replica' : 'adapter stored through another replica');
      });
    }
  }

  /** A fresh upload folder (see AdapterBackend.uploadDir). */
  uploadDir(): Promise<string> {
    return this.store.uploadDir();
  }

  /**
   * Dry run: the report for a staged folder, with the effect measured on a version the engine holds
   * only for the probe. Stores nothing; no request can name that version.
   */
  async validate(stagedDir: string, staged: StagedExtras = {}): Promise<ValidationReport> {
    const { report, weights } = await readAdapterFolder(stagedDir, this.model, { ...this.limits, allowNoEffect: staged.allowNoEffect === true }, { readValues: true, ingested: staged.ingested });
    if (!report.ok || !weights || this.probe.ids.length === 0 || !this.engine.probeAdapter) return report;
    const versionId = `.validate#${++versionSeq}`;
    await loadOrReject(this.engine, versionId, weights, report, 'the adapter');
    try {
      return { ...report, effect: await this.measure(versionId, versionId) };
    } finally {
      // awaited: a dry run answers only once the engine holds what it held before
      await Promise.resolve(this.engine.unloadAdapter(versionId)).catch((err: unknown) => this.log.error({ err, versionId }, 'engine could not unload an adapter version'));
    }
  }

  /**
   * A decoder for an upload's weights file, fitted to this model (see ingest.ts); with the text of
   * an adapter_config.json that arrived first, it folds each module's scale in on the way.
   */
  ingest(maxBytes: number, configText: string | null = null): AdapterIngest {
    return new AdapterIngest({ loraTargets: this.model.loraTargets, maxRank: this.limits.maxLoraRank, maxBytes, file: WEIGHTS_FILE, scales: configText === null ? undefined : moduleScales(configText, this.model.loraTargets) });
  }

  /**
   * Validates the staged folder, loads the new version into the engine and stores it. Either all
   * of that happens or none of it: a failure leaves no folder, no entry and nothing in the engine.
   * The staged adapter files are moved into the store (the folder is consumed). `digests`: the
   * files' sha256 and sizes when the caller computed them while writing the files (the upload
   * does); otherwise they are read back and hashed here. On a shared store, of concurrent creates
   * of one name through different replicas exactly one succeeds; the others are 409.
   */
  async create(name: string, stagedDir: string, staged: StagedExtras = {}): Promise<AdapterDetail> {
    this.checkName(name);
    return this.exclusive(name, async () => {
      if (this.versions.has(name)) throw this.exists(name);
      if (await this.store.has(name)) {
        if (this.store.shared) {
          const entry = await this.store.find(name);
          if (entry) this.versions.set(name, this.fromEntry(entry));
          throw this.exists(name);
        }
        throw new HttpProblem(409, 'Adapter Exists', `ADAPTER_DIR holds a file or folder named ${JSON.stringify(name)} that is not an adapter; remove it or choose another name`);
      }
      const release = this.reserveSlot();
      try {
        const v = await this.install(name, stagedDir, staged, 1, (meta) => this.store.create(meta, stagedDir));
        return detail(v, true);
      } catch (e) {
        if (e instanceof NameTakenError) throw this.exists(name);
        throw e;
      } finally {
        release();
      }
    });
  }

  /**
   * Create-or-replace. The old version keeps serving the requests that started with it; it is
   * unloaded from the engine after the swap (the worker frees it when its last request ends).
   */
  async replace(name: string, stagedDir: string, staged: StagedExtras = {}): Promise<{ created: boolean; adapter: AdapterDetail }> {
    this.checkName(name);
    return this.exclusive(name, async () => {
      let prev = this.versions.get(name);
      if (this.store.shared) {
        // another replica may have replaced or deleted it since the last sync: number after the store's version
        const entry = await this.store.find(name);
        if (!entry && prev) this.forget(name);
        prev = entry ? this.fromEntry(entry) : undefined;
      } else if (!prev && (await this.store.has(name))) {
        throw new HttpProblem(409, 'Adapter Exists', `ADAPTER_DIR holds a file or folder named ${JSON.stringify(name)} that is not an adapter; remove it or choose another name`);
      }
      const release = prev ? () => undefined : this.reserveSlot();
      try {
        const v = await this.install(name, stagedDir, staged, (prev?.version ?? 0) + 1, (meta) => this.store.replace(meta, stagedDir));
        return { created: !prev, adapter: detail(v, true) };
      } finally {
        release();
      }
    });
  }

  private async install(name: string, stagedDir: string, staged: StagedExtras, version: number, write: (meta: AdapterMeta) => Promise<StoredEntry>): Promise<AdapterVersion> {
    const flushed = this.store.flushStaged(stagedDir);
    const allowNoEffect = staged.allowNoEffect === true;
    const { report: validated, weights, source, tokenizer } = await readAdapterFolder(stagedDir, this.model, { ...this.limits, allowNoEffect }, { readValues: true, ingested: staged.ingested });
    if (!validated.ok || !weights) throw rejectedProblem(validated, `adapter ${JSON.stringify(name)}`);
    const files = staged.digests ?? (await this.store.digest(stagedDir));
    const versionId = this.nextVersionId(name, version);
    this.makeRoom(name);
    await loadOrReject(this.engine, versionId, weights, validated, `adapter ${JSON.stringify(name)}`);
    const report: ValidationReport = { ...validated, effect: await this.measure(versionId, name) };
    const meta: AdapterMeta = { metaVersion: 1, name, version, created: new Date().toISOString(), files, report, ...(allowNoEffect ? { allowNoEffect } : {}) };
    let entry: StoredEntry;
    try {
      await flushed;
      entry = await write(meta);
    } catch (e) {
      this.unload(versionId);
      throw e;
    }
    this.log.info({ adapter: name, version, versionId, modules: report.modules.length, bytes: files[WEIGHTS_FILE].bytes, weightsFrom: source, effect: report.effect }, 'adapter stored and loaded');
    const v: AdapterVersion = { name, version, ref: entry.ref, entry, state: 'ready', created: meta.created, files, report };
    this.versions.set(name, v);
    this.dropResident(name);
    this.resident.set(name, { name, ref: entry.ref, versionId, lastUsed: performance.now(), inUse: 0, tokenizer });
    return v;
  }

  async delete(name: string): Promise<void> {
    return this.exclusive(name, async () => {
      await this.lookup(name);
      try {
        await this.store.delete(name);
      } catch (e) {
        if (!(e instanceof NotStoredError)) throw e;
        this.forget(name);
        throw notFound(`no adapter named ${JSON.stringify(name)}`);
      }
      const versionId = this.resident.get(name)?.versionId ?? null;
      this.forget(name);
      this.log.info({ adapter: name, versionId }, 'adapter deleted');
    });
  }
}
