import type { Logger } from 'pino';
import type { Config } from '../config.js';
import type { Manifest } from '../model/manifest.js';
import { HttpProblem, badRequest, notFound } from '../http/problem.js';
import type { AdapterWeights } from './convert.js';
import { readAdapterFolder } from './folder.js';
import { AdapterIngest, moduleScales, type IngestedWeights } from './ingest.js';
import { error, type Problem, type ValidationReport } from './report.js';
import { AdapterStore, adapterNameProblem, pauseHookFromEnv, type AdapterMeta, type FileDigest, type StoreHooks, type StoredEntry } from './store.js';
import { CONFIG_FILE, WEIGHTS_FILE } from './store.js';
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
 */

export type AdapterState = 'ready' | 'incompatible';

/** sha256 and size of a staged folder's two files (see ReceivedUpload.digests) */
export type StagedDigests = Record<typeof CONFIG_FILE | typeof WEIGHTS_FILE, FileDigest>;

/** What the upload learned while writing the staged files, so that the registry need not read them again. */
export interface StagedExtras {
  /** sha256 and sizes of the two files; otherwise they are read back and hashed */
  digests?: StagedDigests | null;
  /** the weights decoded in the stream (ingest.ts); otherwise the values are read back */
  ingested?: IngestedWeights | null;
}

/** The engine side of the registry (Engine implements it). */
export interface AdapterEngine {
  loadAdapter(versionId: string, weights: AdapterWeights): Promise<void>;
  unloadAdapter(versionId: string): void | Promise<void>;
}

export interface AdapterVersion {
  readonly name: string;
  readonly version: number;
  /** unique within this process: the key of the weights in the engine */
  readonly versionId: string;
  readonly state: AdapterState;
  readonly created: string | null;
  readonly files: Readonly<Record<typeof CONFIG_FILE | typeof WEIGHTS_FILE, FileDigest>> | null;
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
  version: number;
  created: string | null;
  sha256: { config: string; weights: string } | null;
  bytes: { config: number; weights: number; total: number } | null;
  peftType: string | null;
  baseModel: string | null;
  r: number | null;
  loraAlpha: number | null;
  useRslora: boolean | null;
  parameters: number;
  /** per projection: which layers, which ranks and which scales (alpha/r, folded into B) */
  targets: TargetSummary[];
  errors: Problem[];
  warnings: Problem[];
}

export interface AdapterDetail extends AdapterSummary {
  modules: { module: string; rank: number; alpha: number; scale: number; rankKey: string; alphaKey: string }[];
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
}

/** process-wide, so version ids never repeat, even across registries sharing one engine (tests) */
let versionSeq = 0;

const distinct = (xs: number[]) => [...new Set(xs)].sort((a, b) => a - b);

function summarize(v: AdapterVersion): AdapterSummary {
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
    version: v.version,
    created: v.created,
    sha256: f ? { config: f[CONFIG_FILE].sha256, weights: f[WEIGHTS_FILE].sha256 } : null,
    bytes: f ? { config: f[CONFIG_FILE].bytes, weights: f[WEIGHTS_FILE].bytes, total: f[CONFIG_FILE].bytes + f[WEIGHTS_FILE].bytes } : null,
    peftType: s.peftType,
    baseModel: s.baseModel,
    r: s.r,
    loraAlpha: s.loraAlpha,
    useRslora: s.useRslora,
    parameters: s.parameters,
    targets: [...byProjection].map(([projection, t]) => ({ projection, layers: distinct(t.layers), ranks: distinct(t.ranks), scales: distinct(t.scales) })),
    errors: v.report.errors,
    warnings: v.report.warnings,
  };
}

function detail(v: AdapterVersion): AdapterDetail {
  return {
    ...summarize(v),
    modules: v.report.modules.map(({ module, rank, alpha, scale, rankKey, alphaKey }) => ({ module, rank, alpha, scale, rankKey, alphaKey })),
  };
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

export function rejectedProblem(report: ValidationReport, what: string): HttpProblem {
  const first = report.errors[0];
  const detailText = `${what} does not fit this model: ${report.errors.length} error(s)${first ? `; first: ${first.message}` : ''}`;
  return new HttpProblem(422, 'Unprocessable Content', detailText, { errors: report.errors, warnings: report.warnings, report });
}

export class AdapterRegistry {
  private readonly versions = new Map<string, AdapterVersion>();
  /** creates under way, so concurrent uploads cannot overshoot MAX_ADAPTERS */
  private reserved = 0;
  private readonly locks = new Map<string, Promise<unknown>>();

  private constructor(
    readonly store: AdapterStore,
    private readonly model: ModelFacts,
    private readonly limits: ValidationLimits,
    private readonly maxAdapters: number,
    private readonly engine: AdapterEngine,
    private readonly log: RegistryOptions['log'],
  ) {}

  /**
   * Opens ADAPTER_DIR (recovering from any interrupted write), re-validates every stored adapter
   * against the current model and loads the ones that fit into the engine. One that no longer fits
   * stays on disk as `incompatible`, listed with its report and never served.
   */
  static async open(opts: RegistryOptions): Promise<AdapterRegistry> {
    const { config, manifest, engine, log } = opts;
    const { store, recovered } = await AdapterStore.open(config.ADAPTER_DIR, opts.hooks ?? pauseHookFromEnv());
    for (const r of recovered) log.warn({ entry: r.entry, action: r.action }, 'adapter store: recovered from an interrupted write');
    const registry = new AdapterRegistry(
      store,
      { architecture: manifest.architecture, loraTargets: manifest.loraTargets, modelId: manifest.modelId, dtype: manifest.dtype },
      { maxLoraRank: config.MAX_LORA_RANK, strictBaseModel: config.STRICT_BASE_MODEL },
      config.MAX_ADAPTERS,
      engine,
      log,
    );
    for (const entry of await store.list()) await registry.reopen(entry);
    const all = [...registry.versions.values()];
    log.info({ dir: store.dir, ready: all.filter((v) => v.state === 'ready').length, incompatible: all.filter((v) => v.state === 'incompatible').length }, 'adapters loaded');
    return registry;
  }

  private nextVersionId(name: string, version: number): string {
    return `${name}@${version}#${++versionSeq}`;
  }

  private async reopen(entry: StoredEntry): Promise<void> {
    const { name, meta } = entry;
    const version = meta?.version ?? 0;
    const versionId = this.nextVersionId(name, version);
    const base = { name, version, versionId, created: meta?.created ?? null, files: meta?.files ?? null };
    const incompatible = (report: ValidationReport) => {
      this.versions.set(name, { ...base, state: 'incompatible', report });
      this.log.warn({ adapter: name, errors: report.errors.map((e) => e.code) }, `adapter ${name} is incompatible with this model and will not be served: ${report.errors[0]?.message ?? ''}`);
    };
    const diffs = await this.store.verify(entry);
    if (diffs.length) {
      const problems = diffs.map((d) =>
        meta
          ? error({ code: 'corrupt_file', message: `the stored files of ${name} changed after upload: ${d}`, hint: 'delete the adapter and upload it again' })
          : error({ code: 'missing_file', file: 'meta.json', message: `${name}: ${d}`, hint: 'delete this folder and upload the adapter through the API' }),
      );
      incompatible(failedReport(problems));
      return;
    }
    const { report, weights } = await readAdapterFolder(entry.dir, this.model, this.limits, { readValues: true });
    if (!report.ok || !weights) {
      incompatible(report);
      return;
    }
    try {
      await this.engine.loadAdapter(versionId, weights);
    } catch (e) {
      incompatible(failedReport([error({ code: 'corrupt_file', message: `the engine refused ${name}: ${(e as Error).message}` })]));
      return;
    }
    this.versions.set(name, { ...base, state: 'ready', report });
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

  /**
   * The checks create() makes before reading the upload (name, taken, MAX_ADAPTERS), for routes
   * that learn the name before the files arrive. create() repeats them under its lock.
   */
  assertCreatable(name: string): void {
    this.checkName(name);
    if (this.versions.has(name)) {
      throw new HttpProblem(409, 'Adapter Exists', `an adapter named ${JSON.stringify(name)} exists; PUT /v1/adapters/${name} replaces it`);
    }
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

  private lookup(name: string): AdapterVersion {
    const v = this.versions.get(name);
    if (!v) throw notFound(`no adapter named ${JSON.stringify(name)}`);
    return v;
  }

  list(): AdapterSummary[] {
    return [...this.versions.values()].sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0)).map(summarize);
  }

  /** Names a request may use right now. */
  readyNames(): string[] {
    return this.list().filter((a) => a.state === 'ready').map((a) => a.name);
  }

  get(name: string): AdapterDetailWithReport {
    const v = this.lookup(name);
    return { ...detail(v), report: v.report };
  }

  /**
   * The versionId to hand to the engine for a request naming `name`. Call it in the same
   * synchronous turn as the engine submission, so that no replace/delete can unload the version in
   * between (the engine's messages to its worker keep their order).
   */
  resolveForGeneration(name: string): string {
    const v = this.versions.get(name);
    if (!v) throw notFound(`no adapter named ${JSON.stringify(name)}; GET /v1/adapters lists them`);
    if (v.state !== 'ready') {
      throw new HttpProblem(409, 'Adapter Incompatible', `adapter ${JSON.stringify(name)} does not fit the current model and is not served: ${v.report.errors[0]?.message ?? ''}`, {
        adapter: name,
        errors: v.report.errors,
        warnings: v.report.warnings,
      });
    }
    return v.versionId;
  }

  /** A fresh upload folder inside ADAPTER_DIR (see AdapterStore.uploadDir). */
  uploadDir(): Promise<string> {
    return this.store.uploadDir();
  }

  /** Dry run: the report for a staged folder. Stores and loads nothing. */
  async validate(stagedDir: string, staged: StagedExtras = {}): Promise<ValidationReport> {
    const { report } = await readAdapterFolder(stagedDir, this.model, this.limits, { readValues: true, ingested: staged.ingested });
    return report;
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
   * does); otherwise they are read back and hashed here.
   */
  async create(name: string, stagedDir: string, staged: StagedExtras = {}): Promise<AdapterDetail> {
    this.checkName(name);
    return this.exclusive(name, async () => {
      if (this.versions.has(name)) {
        throw new HttpProblem(409, 'Adapter Exists', `an adapter named ${JSON.stringify(name)} exists; PUT /v1/adapters/${name} replaces it`);
      }
      if (await this.store.has(name)) {
        throw new HttpProblem(409, 'Adapter Exists', `ADAPTER_DIR holds a file or folder named ${JSON.stringify(name)} that is not an adapter; remove it or choose another name`);
      }
      const release = this.reserveSlot();
      try {
        const v = await this.install(name, stagedDir, staged, 1, (meta) => this.store.create(meta, stagedDir));
        this.versions.set(name, v);
        return detail(v);
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
      const prev = this.versions.get(name);
      if (!prev && (await this.store.has(name))) {
        throw new HttpProblem(409, 'Adapter Exists', `ADAPTER_DIR holds a file or folder named ${JSON.stringify(name)} that is not an adapter; remove it or choose another name`);
      }
      const release = prev ? () => undefined : this.reserveSlot();
      try {
        const v = await this.install(name, stagedDir, staged, (prev?.version ?? 0) + 1, (meta) => this.store.replace(meta, stagedDir));
        this.versions.set(name, v);
        if (prev?.state === 'ready') this.unload(prev.versionId);
        return { created: !prev, adapter: detail(v) };
      } finally {
        release();
      }
    });
  }

  private async install(name: string, stagedDir: string, staged: StagedExtras, version: number, write: (meta: AdapterMeta) => Promise<AdapterMeta>): Promise<AdapterVersion> {
    const flushed = this.store.flushStaged(stagedDir);
    const { report, weights, source } = await readAdapterFolder(stagedDir, this.model, this.limits, { readValues: true, ingested: staged.ingested });
    if (!report.ok || !weights) throw rejectedProblem(report, `adapter ${JSON.stringify(name)}`);
    const files = staged.digests ?? (await this.store.digest(stagedDir));
    const versionId = this.nextVersionId(name, version);
    const meta: AdapterMeta = { metaVersion: 1, name, version, created: new Date().toISOString(), files, report };
    await this.engine.loadAdapter(versionId, weights);
    try {
      await flushed;
      await write(meta);
    } catch (e) {
      this.unload(versionId);
      throw e;
    }
    this.log.info({ adapter: name, version, versionId, modules: report.modules.length, bytes: files[WEIGHTS_FILE].bytes, weightsFrom: source }, 'adapter stored and loaded');
    return { name, version, versionId, state: 'ready', created: meta.created, files, report };
  }

  async delete(name: string): Promise<void> {
    return this.exclusive(name, async () => {
      const v = this.lookup(name);
      await this.store.delete(name);
      this.versions.delete(name);
      if (v.state === 'ready') this.unload(v.versionId);
      this.log.info({ adapter: name, versionId: v.versionId }, 'adapter deleted');
    });
  }
}
