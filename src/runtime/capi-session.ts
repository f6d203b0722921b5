import koffi from 'koffi';
import ort from 'onnxruntime-node';
import '../model/ort-float16.js';
import { GraphBuilder } from '../model/graph/onnx-builder.js';
import { ELEMENT_TYPES, isElementType, ORT_ENABLE_ALL, OrtCapi, type ElementType } from './ort-capi.js';
import type { NullablePointer, Out, Pointer } from './ort-library.js';

/**
 * An onnxruntime session driven through the C API with IO binding, shaped like onnxruntime-node's
 * InferenceSession (create / inputNames / outputNames / run / release) so the engine can use either.
 *
 * What it does that the Node API cannot:
 * - an output given as a Tensor in `fetches` is written in place and that same Tensor is returned
 *   (onnxruntime-node binds it too, then copies it into a new ArrayBuffer anyway);
 * - a feed and a fetch may be one Tensor: one OrtValue is bound as both, which is what
 *   GroupQueryAttention's past/present share-buffer mode needs;
 * - DeviceTensor: memory from the session's device allocator (CUDA memory on `cuda`), bound without
 *   any copy, so a KV cache can stay on the device across steps;
 * - the forward pass runs on a koffi worker thread, so the calling thread's event loop stays free.
 */

export type CapiProvider = 'cpu' | 'cuda';

export interface CapiSessionOptions {
  provider?: CapiProvider;
  intraOpThreads?: number;
  /** CUDA device ordinal (cuda only); default 0 */
  deviceId?: number;
}

type HostData = ort.Tensor['data'];
type TypedArray = Exclude<HostData, string[]>;

const ARRAYS: Record<ElementType, (buffer: ArrayBuffer, offset: number, length: number) => TypedArray> = {
  float32: (b, o, n) => new Float32Array(b, o, n),
  uint8: (b, o, n) => new Uint8Array(b, o, n),
  int8: (b, o, n) => new Int8Array(b, o, n),
  uint16: (b, o, n) => new Uint16Array(b, o, n),
  int16: (b, o, n) => new Int16Array(b, o, n),
  int32: (b, o, n) => new Int32Array(b, o, n),
  int64: (b, o, n) => new BigInt64Array(b, o, n),
  bool: (b, o, n) => new Uint8Array(b, o, n),
  // float16 as raw bits, the engine's convention (see model/ort-float16.ts)
  float16: (b, o, n) => new Uint16Array(b, o, n),
  float64: (b, o, n) => new Float64Array(b, o, n),
  uint32: (b, o, n) => new Uint32Array(b, o, n),
  uint64: (b, o, n) => new BigUint64Array(b, o, n),
};

const elementCount = (dims: readonly number[]) => dims.reduce((a, d) => a * d, 1);

function checkDims(dims: readonly number[]): void {
  for (const d of dims) if (!Number.isSafeInteger(d) || d < 0) throw new Error(`tensor dimensions must be non-negative integers, got [${dims.join(', ')}]`);
}

/**
 * A tensor in memory onnxruntime allocated for the session's device (CUDA memory on `cuda`, host
 * memory on `cpu`), or a view of a sub-range of one. Bound to runs without copies. Owned by its
 * session: dispose it when done; the session disposes what is left when it is released.
 */
export class DeviceTensor {
  private released = false;
  private readonly views = new Set<DeviceTensor>();

  /** @internal use CapiSession.allocate / view */
  constructor(
    private readonly capi: OrtCapi,
    /** the OrtValue; valid until dispose() */
    readonly handle: Pointer,
    readonly type: ElementType,
    readonly dims: readonly number[],
    readonly location: CapiProvider,
    private readonly onDispose: (t: DeviceTensor) => void,
    /** a view's parent: its memory belongs to the parent, so the view dies with it */
    readonly base: DeviceTensor | null,
  ) {
    base?.views.add(this);
  }

  get disposed(): boolean {
    return this.released;
  }

  get size(): number {
    return elementCount(this.dims);
  }

  get byteLength(): number {
    return this.size * ELEMENT_TYPES[this.type].bytes;
  }

  /** throws if disposed (a released OrtValue must never reach onnxruntime) */
  live(): Pointer {
    if (this.released) throw new Error(`DeviceTensor ${this.type}[${this.dims.join(', ')}] was disposed`);
    return this.handle;
  }

  dispose(): void {
    if (this.released) return;
    for (const v of [...this.views]) v.dispose();
    this.released = true;
    this.base?.views.delete(this);
    this.capi.api.ReleaseValue(this.handle);
    this.onDispose(this);
  }
}

export type CapiValue = ort.Tensor | DeviceTensor;
export type CapiFeeds = Readonly<Record<string, CapiValue>>;
export type CapiFetches = readonly string[] | Readonly<Record<string, CapiValue | null>>;
export type CapiResults = Record<string, ort.Tensor>;

/** a host tensor's element type, checked against what the C API runner handles */
function hostType(t: ort.Tensor): ElementType {
  if (!isElementType(t.type)) throw new Error(`tensor type ${t.type} is not supported by RUNTIME=capi`);
  if (t.location !== 'cpu') throw new Error(`RUNTIME=capi binds host tensors (location cpu), got location ${t.location}`);
  return t.type;
}

function hostArray(t: ort.Tensor): TypedArray {
  const data = t.data;
  if (Array.isArray(data)) throw new Error('string tensors are not supported by RUNTIME=capi');
  return data as TypedArray;
}

/** the address of a typed array's first element; reading `.buffer` first moves a small on-heap array off the V8 heap, so the address stays valid */
function addressOf(data: TypedArray): NullablePointer {
  if (data.byteLength === 0) return null;
  void data.buffer;
  return koffi.address(data);
}

const isDeviceTensor = (v: unknown): v is DeviceTensor => v instanceof DeviceTensor;

/** a host Tensor's memory as onnxruntime will be given it, checked: its array holds the bytes its type and shape say */
interface HostMemory {
  memory: ArrayBufferLike;
  offset: number;
  bytes: number;
  type: ElementType;
  dims: readonly number[];
  /** the array itself, referenced while onnxruntime may read it */
  keep: TypedArray;
}

/** what one input of the kept binding is bound to: a device tensor, or host memory */
type BoundInput = HostMemory | { memory: DeviceTensor; offset: 0; bytes: 0; type: ElementType; dims: readonly number[] };

/** the IoBinding a session keeps between runs, with what each input name is bound to */
interface KeptBinding {
  binding: Pointer;
  inputs: Map<string, BoundInput>;
}

function hostMemory(v: CapiValue, role: string): HostMemory {
  if (!(v instanceof ort.Tensor)) throw new Error(`${role} is neither an onnxruntime Tensor nor a DeviceTensor`);
  const type = hostType(v);
  const data = hostArray(v);
  const bytes = v.size * ELEMENT_TYPES[type].bytes;
  if (data.byteLength < bytes) throw new Error(`${role}: ${type}[${v.dims.join(', ')}] needs ${bytes} bytes, its data has ${data.byteLength}`);
  return { memory: data.buffer, offset: data.byteOffset, bytes, type, dims: [...v.dims], keep: data };
}

function boundInput(v: CapiValue, role: string): BoundInput {
  return isDeviceTensor(v) ? { memory: v, offset: 0, bytes: 0, type: v.type, dims: v.dims } : hostMemory(v, role);
}

function sameInput(a: BoundInput, b: BoundInput): boolean {
  return a.memory === b.memory && a.offset === b.offset && a.bytes === b.bytes && a.type === b.type && a.dims.length === b.dims.length && a.dims.every((d, i) => d === b.dims[i]);
}

const valueType = (v: CapiValue): ElementType => (isDeviceTensor(v) ? v.type : hostType(v));
const dimsOf = (v: CapiValue): readonly number[] => v.dims;

/** uint8 bytes [n] → Identity → copy [n]: the graph behind CapiSession.copy */
function identityBytesGraph(): Uint8Array {
  const g = new GraphBuilder(null);
  g.input('bytes', 'uint8', ['n']);
  g.node('Identity', ['bytes'], { outputs: ['copy'] });
  g.output('copy', 'uint8', ['n']);
  return g.encode('loraserve-capi-copy', { '': 17 }, 'loraserve');
}

/** n independent uint8 Identity nodes (bytes_i [n_i] → copy_i [n_i]): the graphs behind CapiSession.copyMany */
function identityBytesGraphs(n: number): Uint8Array {
  const g = new GraphBuilder(null);
  for (let i = 0; i < n; i++) {
    g.input(`bytes_${i}`, 'uint8', [`n_${i}`]);
    g.node('Identity', [`bytes_${i}`], { outputs: [`copy_${i}`] });
    g.output(`copy_${i}`, 'uint8', [`n_${i}`]);
  }
  return g.encode(`loraserve-capi-copy-${n}`, { '': 17 }, 'loraserve');
}

/** most copies one copyMany run takes; a batch is split into power-of-two runs up to this */
const COPY_BATCH = 64;

export class CapiSession {
  private released = false;
  private readonly inFlight = new Set<Promise<unknown>>();
  private readonly deviceTensors = new Set<DeviceTensor>();

  private constructor(
    private readonly capi: OrtCapi,
    private readonly session: Pointer,
    /** memory info and allocator of the session's device */
    private readonly deviceMemory: Pointer,
    private readonly allocator: Pointer,
    readonly provider: CapiProvider,
    readonly inputNames: readonly string[],
    readonly outputNames: readonly string[],
    private readonly deviceId: number,
  ) {}

  /** the Identity session behind copy(), opened on first use */
  private copier: Promise<CapiSession> | null = null;

  /**
   * The IoBinding kept from one run to the next, with what each input was bound to. A step of the
   * LoRA graph feeds ~700 inputs, most of them the arrays of the step before (the base rows' empty
   * LoRA matrices, DoRA's neutral vectors, an adapter's resident weights); binding every one again
   * took ~3 ms of a 44 ms int4 step on Qwen2.5-0.5B. An input fed with the memory, type and shape it
   * is bound to stays bound: onnxruntime reads that memory at each run, so values written into it
   * in place are seen. On cuda that holds for device tensors only (a host input is copied to the
   * device when it is bound, so host inputs are bound every run there, as before). One run at a
   * time uses it; a run that overlaps it binds on its own.
   */
  private kept: KeptBinding | null = null;
  private keptInUse = false;
  private bindings = 0;

  /** inputs bound by runs so far (the kept binding skips unchanged ones) */
  get inputsBound(): number {
    return this.bindings;
  }

  /**
   * Opens a model (a path, or its bytes) on `cpu` or `cuda`. On `cuda` the CPU provider stays behind
   * CUDA for nodes CUDA lacks, as with onnxruntime-node. Creation (graph optimisation) runs off the
   * calling thread.
   */
  static async create(model: string | Uint8Array, options: CapiSessionOptions = {}): Promise<CapiSession> {
    const capi = OrtCapi.get();
    const { api } = capi;
    const provider = options.provider ?? 'cpu';
    const opts = capi.out((o) => api.CreateSessionOptions(o), 'CreateSessionOptions');
    let session: Pointer;
    try {
      capi.check(api.SetSessionGraphOptimizationLevel(opts, ORT_ENABLE_ALL), 'SetSessionGraphOptimizationLevel');
      if (options.intraOpThreads !== undefined) capi.check(api.SetIntraOpNumThreads(opts, options.intraOpThreads), 'SetIntraOpNumThreads');
      if (provider === 'cuda') {
        const cuda = capi.out((o) => api.CreateCUDAProviderOptions(o), 'CreateCUDAProviderOptions');
        try {
          capi.check(api.UpdateCUDAProviderOptions(cuda, ['device_id'], [String(options.deviceId ?? 0)], 1), 'UpdateCUDAProviderOptions');
          capi.check(api.SessionOptionsAppendExecutionProvider_CUDA_V2(opts, cuda), 'SessionOptionsAppendExecutionProvider_CUDA_V2');
        } finally {
          api.ReleaseCUDAProviderOptions(cuda);
        }
      }
      const out: Out<NullablePointer> = [null];
      const status = await new Promise<NullablePointer>((resolve, reject) => {
        const done = (err: unknown, s: NullablePointer) => (err ? reject(err instanceof Error ? err : new Error(String(err))) : resolve(s));
        if (typeof model === 'string') api.CreateSession.async(capi.env, model, opts, out, done);
        else api.CreateSessionFromArray.async(capi.env, model, model.byteLength, opts, out, done);
      });
      capi.check(status, 'CreateSession');
      if (!out[0]) throw new Error('CreateSession returned NULL');
      session = out[0];
    } finally {
      api.ReleaseSessionOptions(opts);
    }
    let deviceMemory: Pointer | null = null;
    try {
      const names = (count: number, get: (i: number, o: Out<NullablePointer>) => NullablePointer, what: string) =>
        Array.from({ length: count }, (_, i) => capi.takeString(capi.defaultAllocator, capi.out((o) => get(i, o), what)));
      const inputNames = names(capi.count((o) => api.SessionGetInputCount(session, o), 'SessionGetInputCount'), (i, o) => api.SessionGetInputName(session, i, capi.defaultAllocator, o), 'SessionGetInputName');
      const outputNames = names(capi.count((o) => api.SessionGetOutputCount(session, o), 'SessionGetOutputCount'), (i, o) => api.SessionGetOutputName(session, i, capi.defaultAllocator, o), 'SessionGetOutputName');
      deviceMemory = capi.memoryInfo(provider, options.deviceId ?? 0);
      const memory = deviceMemory;
      const allocator = capi.out((o) => api.CreateAllocator(session, memory, o), 'CreateAllocator');
      return new CapiSession(capi, session, memory, allocator, provider, inputNames, outputNames, options.deviceId ?? 0);
    } catch (e) {
      if (deviceMemory !== null) api.ReleaseMemoryInfo(deviceMemory);
      api.ReleaseSession(session);
      throw e;
    }
  }

  private alive(): void {
    if (this.released) throw new Error('the session was released');
  }

  private track(t: DeviceTensor): DeviceTensor {
    this.deviceTensors.add(t);
    return t;
  }

  private readonly forget = (t: DeviceTensor) => {
    this.deviceTensors.delete(t);
  };

  /** a tensor in the session device's memory; its contents are undefined until written */
  allocate(type: ElementType, dims: readonly number[]): DeviceTensor {
    this.alive();
    checkDims(dims);
    const handle = this.capi.allocate(this.allocator, dims, type);
    return this.track(new DeviceTensor(this.capi, handle, type, [...dims], this.provider, this.forget, null));
  }

  /**
   * A view of `base`'s elements [offset, offset + size(dims)) as a tensor of `dims`, in place (no
   * copy): e.g. one slot's rows of a cache. Dies with `base`.
   */
  view(base: DeviceTensor, offset: number, dims: readonly number[]): DeviceTensor {
    this.alive();
    checkDims(dims);
    const handle = base.live();
    const size = elementCount(dims);
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + size > base.size)
      throw new Error(`view [${offset}, ${offset + size}) is outside the tensor's ${base.size} elements`);
    const info = this.capi.out((o) => this.capi.api.GetTensorMemoryInfo(handle, o), 'GetTensorMemoryInfo');
    const start = this.capi.dataPointer(handle);
    const bytes = ELEMENT_TYPES[base.type].bytes;
    const data = start === null || size === 0 ? null : start + BigInt(offset * bytes);
    // the memory info belongs to `base`'s value, so the view carries the same device
    const value = this.capi.wrap(info, data, size * bytes, dims, base.type);
    return this.track(new DeviceTensor(this.capi, value, base.type, [...dims], base.location, this.forget, base));
  }

  /**
   * Copies `src` into `dst` (host Tensor or DeviceTensor on either side; same type and element
   * count; shapes may differ). onnxruntime's CopyTensors finds no data transfer for providers added
   * the classic way ("Data transfer implementation between source and destination device was not
   * found", even cpu→cpu), so the copy is a one-node Identity graph on this session's provider,
   * run with both sides bound as flat bytes: onnxruntime moves the bytes between devices itself.
   */
  async copy(dst: CapiValue, src: CapiValue): Promise<void> {
    this.alive();
    const [dt, st] = [valueType(dst), valueType(src)];
    const [dn, sn] = [dst.size, src.size];
    if (dt !== st || dn !== sn) throw new Error(`copy of ${st}[${dimsOf(src).join(', ')}] into ${dt}[${dimsOf(dst).join(', ')}]: types or sizes differ`);
    if (dn === 0) return;
    this.copier ??= CapiSession.create(identityBytesGraph(), { provider: this.provider, deviceId: this.deviceId, intraOpThreads: 1 });
    const copier = await this.copier;
    const from = this.bytes(src);
    const to = this.bytes(dst);
    try {
      await copier.run({ bytes: from }, { copy: to });
    } finally {
      if (isDeviceTensor(from)) from.dispose();
      if (isDeviceTensor(to)) to.dispose();
    }
  }

  /** the n-copy sessions behind copyMany, by n (powers of two up to COPY_BATCH), opened on first use */
  private readonly batchCopiers = new Map<number, Promise<CapiSession>>();

  /**
   * copy() for many [dst, src] pairs (distinct, non-overlapping destinations), in few runs: one
   * graph of n Identity nodes copies n pairs per run, so a batch of k pairs costs about log2(k) +
   * k / 64 runs instead of k. Copies that move a KV cache's rows (engine/device-kv.ts) are one
   * pair per layer and head.
   */
  async copyMany(pairs: readonly (readonly [dst: CapiValue, src: CapiValue])[]): Promise<void> {
    this.alive();
    for (const [dst, src] of pairs) {
      const [dt, st] = [valueType(dst), valueType(src)];
      if (dt !== st || dst.size !== src.size) throw new Error(`copy of ${st}[${dimsOf(src).join(', ')}] into ${dt}[${dimsOf(dst).join(', ')}]: types or sizes differ`);
    }
    const todo = pairs.filter(([dst]) => dst.size > 0);
    for (let at = 0; at < todo.length; ) {
      let n = COPY_BATCH;
      while (n > todo.length - at) n /= 2;
      const chunk = todo.slice(at, at + n);
      at += n;
      let copier = this.batchCopiers.get(n);
      if (!copier) {
        copier = CapiSession.create(identityBytesGraphs(n), { provider: this.provider, deviceId: this.deviceId, intraOpThreads: 1 });
        this.batchCopiers.set(n, copier);
      }
      const session = await copier;
      const feeds: Record<string, CapiValue> = {};
      const fetches: Record<string, CapiValue> = {};
      chunk.forEach(([dst, src], i) => {
        feeds[`bytes_${i}`] = this.bytes(src);
        fetches[`copy_${i}`] = this.bytes(dst);
      });
      try {
        await session.run(feeds, fetches);
      } finally {
        for (const v of [...Object.values(feeds), ...Object.values(fetches)]) if (isDeviceTensor(v)) v.dispose();
      }
    }
  }

  /** a tensor's memory as flat uint8 [byteLength], in place */
  private bytes(v: CapiValue): CapiValue {
    if (!isDeviceTensor(v)) {
      const data = hostArray(v);
      const n = v.size * ELEMENT_TYPES[hostType(v)].bytes;
      return new ort.Tensor('uint8', new Uint8Array(data.buffer, data.byteOffset, n), [n]);
    }
    const handle = v.live();
    const info = this.capi.out((o) => this.capi.api.GetTensorMemoryInfo(handle, o), 'GetTensorMemoryInfo');
    const value = this.capi.wrap(info, this.capi.dataPointer(handle), v.byteLength, [v.byteLength], 'uint8');
    return new DeviceTensor(this.capi, value, 'uint8', [v.byteLength], v.location, () => {}, v);
  }

  /** copies a host tensor into a device tensor of the same type and size */
  upload(dst: DeviceTensor, src: ort.Tensor): Promise<void> {
    return this.copy(dst, src);
  }

  /** copies a device tensor into a new host tensor */
  async download(src: DeviceTensor): Promise<ort.Tensor> {
    const out = new ort.Tensor(src.type, ARRAYS[src.type](new ArrayBuffer(src.byteLength), 0, src.size), src.dims);
    await this.copy(out, src);
    return out;
  }

  /**
   * A cpu DeviceTensor's memory as a typed array, without a copy. Valid only until the tensor is
   * disposed (it aliases onnxruntime's allocation); on cuda there is no host view: use download().
   */
  hostView(t: DeviceTensor): TypedArray {
    const handle = t.live();
    if (t.location !== 'cpu') throw new Error(`a ${t.location} tensor has no host view; use download()`);
    const p = this.capi.dataPointer(handle);
    if (p === null) return ARRAYS[t.type](new ArrayBuffer(0), 0, 0);
    return ARRAYS[t.type](koffi.view(p, t.byteLength), 0, t.size);
  }

  run(feeds: CapiFeeds, options?: ort.InferenceSession.RunOptions): Promise<CapiResults>;
  run(feeds: CapiFeeds, fetches: CapiFetches, options?: ort.InferenceSession.RunOptions): Promise<CapiResults>;
  /**
   * One forward pass with IO binding. `fetches`: omitted → every output; names → those outputs,
   * each returned as a new Tensor; a record → a Tensor or DeviceTensor is written in place (a
   * Tensor is returned as itself, a DeviceTensor is not returned: it stays on the device), null is
   * returned as a new Tensor. Results are keyed by output name, whatever the order asked.
   * RunOptions are taken for the InferenceSession shape and not used.
   */
  async run(feeds: CapiFeeds, fetchesOrOptions?: CapiFetches | ort.InferenceSession.RunOptions, runOptions?: ort.InferenceSession.RunOptions): Promise<CapiResults> {
    this.alive();
    const fetches = normaliseFetches(this.outputNames, fetchesOrOptions, runOptions !== undefined);
    const { api } = this.capi;
    const wrapped = new Map<ort.Tensor, Pointer>();
    // Everything whose memory onnxruntime reads or writes during the run stays referenced here
    // until the run is over (koffi hands the run to another thread; a collected typed array would
    // leave onnxruntime writing into freed memory).
    const keepAlive: unknown[] = [feeds, fetchesOrOptions];
    const valueOf = (v: CapiValue, role: string): Pointer => {
      if (isDeviceTensor(v)) return v.live();
      const known = v instanceof ort.Tensor ? wrapped.get(v) : undefined;
      if (known !== undefined) return known;
      const host = hostMemory(v, role);
      keepAlive.push(host.keep);
      const value = this.wrapHost(host);
      wrapped.set(v as ort.Tensor, value);
      return value;
    };
    const kept = this.keptInUse ? null : (this.kept ??= { binding: this.capi.out((o) => api.CreateIoBinding(this.session, o), 'CreateIoBinding'), inputs: new Map() });
    const binding = kept ? kept.binding : this.capi.out((o) => api.CreateIoBinding(this.session, o), 'CreateIoBinding');
    if (kept) this.keptInUse = true;
    const run = (async () => {
      try {
        if (kept) this.bindChanged(kept, feeds);
        else {
          for (const [name, v] of Object.entries(feeds)) this.capi.check(api.BindInput(binding, name, valueOf(v, `input ${name}`)), `input ${name}`);
          this.bindings += Object.keys(feeds).length;
        }
        for (const [name, v] of fetches) {
          if (v === null) this.capi.check(api.BindOutputToDevice(binding, name, this.capi.cpuMemory), `output ${name}`);
          else this.capi.check(api.BindOutput(binding, name, valueOf(v, `output ${name}`)), `output ${name}`);
        }
        const status = await new Promise<NullablePointer>((resolve, reject) =>
          api.RunWithBinding.async(this.session, null, binding, (err, s) => (err ? reject(err instanceof Error ? err : new Error(String(err))) : resolve(s))),
        );
        this.capi.check(status, 'run');
        return this.collect(binding, fetches);
      } catch (e) {
        // what a failed run left bound is not known: the next run starts from a fresh binding
        if (kept) this.dropKept();
        throw e;
      } finally {
        if (!kept) api.ReleaseIoBinding(binding);
        else if (this.kept === kept) api.ClearBoundOutputs(binding);
        if (kept) this.keptInUse = false;
        for (const value of wrapped.values()) api.ReleaseValue(value);
        keepAlive.length = 0;
      }
    })();
    this.inFlight.add(run);
    try {
      return await run;
    } finally {
      this.inFlight.delete(run);
    }
  }

  /**
   * Binds the feeds whose memory, type or shape differ from what the kept binding holds for their
   * name; a different set of names starts the inputs over. Each bound host array stays referenced
   * in `kept.inputs` while onnxruntime may read it.
   */
  private bindChanged(kept: KeptBinding, feeds: CapiFeeds): void {
    const { api } = this.capi;
    const entries = Object.entries(feeds);
    if (entries.length !== kept.inputs.size || entries.some(([name]) => !kept.inputs.has(name))) {
      api.ClearBoundInputs(kept.binding);
      kept.inputs.clear();
    }
    for (const [name, v] of entries) {
      const now = boundInput(v, `input ${name}`);
      const was = kept.inputs.get(name);
      // on cuda BindInput copies a host array to the device there and then, so a host input written
      // in place since would be stale: only device tensors, and every input on cpu, stay bound
      const readEachRun = this.provider === 'cpu' || !('keep' in now);
      if (was && readEachRun && sameInput(was, now)) continue;
      // a new binding replaces the old one under the same name
      kept.inputs.delete(name);
      if (!('keep' in now)) {
        this.capi.check(api.BindInput(kept.binding, name, now.memory.live()), `input ${name}`);
      } else {
        // the binding holds its own reference to the value, so ours is released at once
        const value = this.wrapHost(now);
        try {
          this.capi.check(api.BindInput(kept.binding, name, value), `input ${name}`);
        } finally {
          api.ReleaseValue(value);
        }
      }
      kept.inputs.set(name, now);
      this.bindings++;
    }
  }

  /** an OrtValue over host memory, no copy; the caller keeps `host.keep` alive while it is used */
  private wrapHost(host: HostMemory): Pointer {
    return this.capi.wrap(this.capi.cpuMemory, addressOf(host.keep), host.bytes, host.dims, host.type);
  }

  private dropKept(): void {
    if (!this.kept) return;
    this.capi.api.ReleaseIoBinding(this.kept.binding);
    this.kept = null;
  }

  /** the bound outputs (in binding order, which is `fetches` order), as results */
  private collect(binding: Pointer, fetches: readonly (readonly [string, CapiValue | null])[]): CapiResults {
    const { api } = this.capi;
    const list: Out<NullablePointer> = [null];
    const count: Out<number> = [0];
    this.capi.check(api.GetBoundOutputValues(binding, this.capi.defaultAllocator, list, count), 'GetBoundOutputValues');
    const n = Number(count[0]);
    if (n === 0 || list[0] === null) return {};
    const values = koffi.decode(list[0], 'void*', n) as Pointer[];
    try {
      if (n !== fetches.length) throw new Error(`onnxruntime returned ${n} outputs for ${fetches.length} bound`);
      const results: CapiResults = {};
      fetches.forEach(([name, given], i) => {
        if (given instanceof ort.Tensor) results[name] = given;
        else if (given === null) results[name] = this.toHost(values[i]);
      });
      return results;
    } finally {
      for (const v of values) api.ReleaseValue(v);
      this.capi.check(api.AllocatorFree(this.capi.defaultAllocator, list[0]), 'AllocatorFree');
    }
  }

  /** one copy of an output onnxruntime placed in host memory, into a new Tensor */
  private toHost(value: Pointer): ort.Tensor {
    const { type, dims } = this.capi.tensorInfo(value);
    const size = elementCount(dims);
    const bytes = size * ELEMENT_TYPES[type].bytes;
    const p = this.capi.dataPointer(value);
    const buffer = p === null || bytes === 0 ? new ArrayBuffer(0) : koffi.view(p, bytes).slice(0);
    return new ort.Tensor(type, ARRAYS[type](buffer, 0, size), dims);
  }

  /** waits for runs in flight, then releases every DeviceTensor left, the allocator and the session; once */
  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    await Promise.allSettled([...this.inFlight]);
    const copier = await this.copier?.catch(() => null);
    await copier?.release();
    for (const c of this.batchCopiers.values()) await (await c.catch(() => null))?.release();
    const { api } = this.capi;
    this.dropKept();
    for (const t of [...this.deviceTensors]) t.dispose();
    api.ReleaseAllocator(this.allocator);
    api.ReleaseMemoryInfo(this.deviceMemory);
    api.ReleaseSession(this.session);
  }
}

/** [name, pre-allocated value or null] per output to bind, in order */
function normaliseFetches(outputs: readonly string[], fetches: CapiFetches | ort.InferenceSession.RunOptions | undefined, thirdArgGiven: boolean): (readonly [string, CapiValue | null])[] {
  if (fetches === undefined || (!thirdArgGiven && !Array.isArray(fetches) && isRunOptions(fetches))) return outputs.map((n) => [n, null] as const);
  if (Array.isArray(fetches)) {
    const names = fetches as readonly unknown[];
    for (const n of names) if (typeof n !== 'string') throw new Error('fetches must be output names, or a record of output name → Tensor | DeviceTensor | null');
    if (new Set(names).size !== names.length) throw new Error(`fetches name an output twice: ${names.join(', ')}`);
    return (names as string[]).map((n) => [n, null] as const);
  }
  return Object.entries(fetches as Readonly<Record<string, CapiValue | null>>).map(([n, v]) => [n, v ?? null] as const);
}

/** run options are recognised by having only RunOptions keys and no tensor values */
function isRunOptions(x: object): boolean {
  const values = Object.values(x) as unknown[];
  return values.every((v) => v !== null && !(v instanceof ort.Tensor) && !isDeviceTensor(v));
}
