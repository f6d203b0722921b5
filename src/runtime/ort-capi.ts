import koffi from 'koffi';
import { ortLibrary, type NullablePointer, type OrtFunctions, type Out, type Pointer } from './ort-library.js';

/**
 * Thin typed wrappers over the C API: every OrtStatus is turned into a thrown Error carrying
 * onnxruntime's own message, and released exactly once; every out-pointer is checked non-NULL.
 */

/** an error reported by onnxruntime through an OrtStatus */
export class OrtError extends Error {
  constructor(
    readonly code: number,
    message: string,
  ) {
    super(message);
    this.name = 'OrtError';
  }
}

/** ONNXTensorElementDataType for the tensor types the project feeds and reads */
export const ELEMENT_TYPES = {
  float32: { id: 1, bytes: 4 },
  uint8: { id: 2, bytes: 1 },
  int8: { id: 3, bytes: 1 },
  uint16: { id: 4, bytes: 2 },
  int16: { id: 5, bytes: 2 },
  int32: { id: 6, bytes: 4 },
  int64: { id: 7, bytes: 8 },
  bool: { id: 9, bytes: 1 },
  float16: { id: 10, bytes: 2 },
  float64: { id: 11, bytes: 8 },
  uint32: { id: 12, bytes: 4 },
  uint64: { id: 13, bytes: 8 },
} as const;
export type ElementType = keyof typeof ELEMENT_TYPES;

export function isElementType(t: string): t is ElementType {
  return Object.hasOwn(ELEMENT_TYPES, t);
}

export function elementTypeOfId(id: number): ElementType {
  for (const [name, e] of Object.entries(ELEMENT_TYPES)) if (e.id === id) return name as ElementType;
  throw new Error(`onnxruntime tensor element type ${id} is not supported by RUNTIME=capi`);
}

// OrtAllocatorType / OrtMemType
const OrtDeviceAllocator = 0;
const OrtArenaAllocator = 1;
const OrtMemTypeDefault = 0;
const ORT_LOGGING_LEVEL_WARNING = 2;
export const ORT_ENABLE_ALL = 99;

export interface TensorInfo {
  type: ElementType;
  dims: number[];
}

/** the C API with status checking; one per thread, over the thread's one library handle */
export class OrtCapi {
  readonly api: OrtFunctions;
  readonly version: string;
  /** the process-wide OrtEnv (onnxruntime hands every caller the same one, ref-counted) */
  readonly env: Pointer;
  /** host memory, as onnxruntime-node wraps typed arrays */
  readonly cpuMemory: Pointer;
  /** the default CPU allocator: owned by onnxruntime, never released */
  readonly defaultAllocator: Pointer;

  private constructor() {
    const lib = ortLibrary();
    this.api = lib.api;
    this.version = lib.version;
    // The env, the CPU memory info and the default allocator are kept for the life of the thread
    // and never released: releasing the env while onnxruntime-node (or another thread) holds it,
    // or at exit after its teardown, is how a finalizer-driven attempt segfaulted.
    this.env = this.out((o) => this.api.CreateEnv(ORT_LOGGING_LEVEL_WARNING, 'loraserve-capi', o), 'CreateEnv');
    this.cpuMemory = this.out((o) => this.api.CreateCpuMemoryInfo(OrtArenaAllocator, OrtMemTypeDefault, o), 'CreateCpuMemoryInfo');
    this.defaultAllocator = this.out((o) => this.api.GetAllocatorWithDefaultOptions(o), 'GetAllocatorWithDefaultOptions');
  }

  private static instance: OrtCapi | null = null;
  static get(): OrtCapi {
    OrtCapi.instance ??= new OrtCapi();
    return OrtCapi.instance;
  }

  /** throws the status's message as an OrtError (and releases the status) when it is not NULL */
  check(status: NullablePointer, what: string): void {
    if (status === null || status === 0n) return;
    const code = this.api.GetErrorCode(status);
    const message = this.api.GetErrorMessage(status);
    this.api.ReleaseStatus(status);
    throw new OrtError(code, `${what}: ${message}`);
  }

  /** calls a function whose result comes through an out-pointer, checking status and NULL */
  out(call: (o: Out<NullablePointer>) => NullablePointer, what: string): Pointer {
    const o: Out<NullablePointer> = [null];
    this.check(call(o), what);
    if (o[0] === null || o[0] === 0n) throw new Error(`${what} returned NULL`);
    return o[0];
  }

  count(call: (o: Out<number>) => NullablePointer, what: string): number {
    const o: Out<number> = [0];
    this.check(call(o), what);
    return Number(o[0]);
  }

  /** memory info for a device's default allocator: "Cpu" or "Cuda" */
  memoryInfo(device: 'cpu' | 'cuda', deviceId = 0): Pointer {
    const name = device === 'cuda' ? 'Cuda' : 'Cpu';
    return this.out((o) => this.api.CreateMemoryInfo(name, OrtDeviceAllocator, deviceId, OrtMemTypeDefault, o), `CreateMemoryInfo(${name})`);
  }

  /** an OrtValue over memory the caller keeps alive (a typed array, or device memory) */
  wrap(memory: Pointer, data: NullablePointer, bytes: number, dims: readonly number[], type: ElementType): Pointer {
    const shape = BigInt64Array.from(dims, (d) => BigInt(d));
    return this.out((o) => this.api.CreateTensorWithDataAsOrtValue(memory, data, bytes, shape, dims.length, ELEMENT_TYPES[type].id, o), 'CreateTensorWithDataAsOrtValue');
  }

  /** an OrtValue whose memory comes from `allocator` (freed with the value) */
  allocate(allocator: Pointer, dims: readonly number[], type: ElementType): Pointer {
    const shape = BigInt64Array.from(dims, (d) => BigInt(d));
    return this.out((o) => this.api.CreateTensorAsOrtValue(allocator, shape, dims.length, ELEMENT_TYPES[type].id, o), 'CreateTensorAsOrtValue');
  }

  tensorInfo(value: Pointer): TensorInfo {
    const info = this.out((o) => this.api.GetTensorTypeAndShape(value, o), 'GetTensorTypeAndShape');
    try {
      const typeId = this.count((o) => this.api.GetTensorElementType(info, o), 'GetTensorElementType');
      const rank = this.count((o) => this.api.GetDimensionsCount(info, o), 'GetDimensionsCount');
      const dims = new BigInt64Array(rank);
      this.check(this.api.GetDimensions(info, dims, rank), 'GetDimensions');
      return { type: elementTypeOfId(typeId), dims: Array.from(dims, Number) };
    } finally {
      this.api.ReleaseTensorTypeAndShapeInfo(info);
    }
  }

  /** the tensor's first byte; NULL for an empty tensor */
  dataPointer(value: Pointer): NullablePointer {
    const o: Out<NullablePointer> = [null];
    this.check(this.api.GetTensorMutableData(value, o), 'GetTensorMutableData');
    return o[0] === 0n ? null : o[0];
  }

  byteSize(value: Pointer): number {
    return this.count((o) => this.api.GetTensorSizeInBytes(value, o), 'GetTensorSizeInBytes');
  }

  /** the name of the device that holds a tensor's memory ("Cpu", "Cuda", …) */
  memoryName(value: Pointer): string {
    const info = this.out((o) => this.api.GetTensorMemoryInfo(value, o), 'GetTensorMemoryInfo');
    const name: Out<string | null> = [null];
    this.check(this.api.MemoryInfoGetName(info, name), 'MemoryInfoGetName');
    return name[0] ?? '';
  }

  /** a string the caller's allocator owns: read, then freed */
  takeString(allocator: Pointer, p: Pointer): string {
    try {
      return koffi.decode.string(p);
    } finally {
      this.check(this.api.AllocatorFree(allocator, p), 'AllocatorFree');
    }
  }
}
