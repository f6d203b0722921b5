import { existsSync } from 'node:fs';
import { join } from 'node:path';
import koffi from 'koffi';
import { ortBinaryDir } from '../model/session.js';

/**
 * onnxruntime's C API, reached through koffi in the very `libonnxruntime.so.1` that onnxruntime-node
 * loads: in one process that is one library, one ORT version and one OrtEnv for both runtimes.
 *
 * The C API is one struct of function pointers (`OrtApi`), append-only across releases. The indices
 * below were counted in `include/onnxruntime/core/session/onnxruntime_c_api.h` (ORT_API_VERSION 30,
 * after expanding ORT_CLASS_RELEASE / ORT_API_T) and cross-checked against published ones (23, 24,
 * 49, 65, 69, 92–100); test/capi-session.test.ts calls functions at both ends of the table and
 * fails if an index is off.
 */

/** a native pointer (koffi gives pointers as BigInt); null is C's NULL */
export type Pointer = bigint;
export type NullablePointer = Pointer | null;

/** the header this table was counted in */
export const ORT_API_VERSION = 30;

/** koffi writes an `_Out_` pointer argument into element 0 of a one-element array */
export type Out<T> = [T];

/** a function that koffi can also run on one of its worker threads */
export type AsyncCallable<Args extends unknown[], R> = ((...args: Args) => R) & {
  async: (...args: [...Args, (err: unknown, result: R) => void]) => void;
};

type Status = NullablePointer;

/** the OrtApi entries this project uses, typed; every Ort* handle is an opaque Pointer */
export interface OrtFunctions {
  CreateStatus(code: number, msg: string): NullablePointer;
  GetErrorCode(status: Pointer): number;
  GetErrorMessage(status: Pointer): string;
  CreateEnv(level: number, logId: string, out: Out<NullablePointer>): Status;
  CreateSession: AsyncCallable<[env: Pointer, path: string, options: Pointer, out: Out<NullablePointer>], Status>;
  CreateSessionFromArray: AsyncCallable<[env: Pointer, data: Uint8Array, length: number, options: Pointer, out: Out<NullablePointer>], Status>;
  CreateSessionOptions(out: Out<NullablePointer>): Status;
  SetSessionGraphOptimizationLevel(options: Pointer, level: number): Status;
  SetIntraOpNumThreads(options: Pointer, threads: number): Status;
  SessionGetInputCount(session: Pointer, out: Out<number>): Status;
  SessionGetOutputCount(session: Pointer, out: Out<number>): Status;
  SessionGetInputName(session: Pointer, index: number, allocator: Pointer, out: Out<NullablePointer>): Status;
  SessionGetOutputName(session: Pointer, index: number, allocator: Pointer, out: Out<NullablePointer>): Status;
  CreateTensorAsOrtValue(allocator: Pointer, shape: BigInt64Array, rank: number, type: number, out: Out<NullablePointer>): Status;
  CreateTensorWithDataAsOrtValue(info: Pointer, data: NullablePointer, bytes: number, shape: BigInt64Array, rank: number, type: number, out: Out<NullablePointer>): Status;
  GetTensorMutableData(value: Pointer, out: Out<NullablePointer>): Status;
  GetTensorElementType(info: Pointer, out: Out<number>): Status;
  GetDimensionsCount(info: Pointer, out: Out<number>): Status;
  GetDimensions(info: Pointer, dims: BigInt64Array, count: number): Status;
  GetTensorTypeAndShape(value: Pointer, out: Out<NullablePointer>): Status;
  CreateMemoryInfo(name: string, allocatorType: number, deviceId: number, memType: number, out: Out<NullablePointer>): Status;
  CreateCpuMemoryInfo(allocatorType: number, memType: number, out: Out<NullablePointer>): Status;
  MemoryInfoGetName(info: Pointer, out: Out<string | null>): Status;
  AllocatorFree(allocator: Pointer, p: Pointer): Status;
  GetAllocatorWithDefaultOptions(out: Out<NullablePointer>): Status;
  ReleaseEnv(p: Pointer): void;
  ReleaseStatus(p: Pointer): void;
  ReleaseMemoryInfo(p: Pointer): void;
  ReleaseSession(p: Pointer): void;
  ReleaseValue(p: Pointer): void;
  ReleaseTensorTypeAndShapeInfo(p: Pointer): void;
  ReleaseSessionOptions(p: Pointer): void;
  CreateAllocator(session: Pointer, info: Pointer, out: Out<NullablePointer>): Status;
  ReleaseAllocator(p: Pointer): void;
  RunWithBinding: AsyncCallable<[session: Pointer, runOptions: NullablePointer, binding: Pointer], Status>;
  CreateIoBinding(session: Pointer, out: Out<NullablePointer>): Status;
  ReleaseIoBinding(p: Pointer): void;
  ClearBoundInputs(binding: Pointer): void;
  ClearBoundOutputs(binding: Pointer): void;
  BindInput(binding: Pointer, name: string, value: Pointer): Status;
  BindOutput(binding: Pointer, name: string, value: Pointer): Status;
  BindOutputToDevice(binding: Pointer, name: string, info: Pointer): Status;
  GetBoundOutputValues(binding: Pointer, allocator: Pointer, out: Out<NullablePointer>, count: Out<number>): Status;
  GetTensorMemoryInfo(value: Pointer, out: Out<NullablePointer>): Status;
  SessionOptionsAppendExecutionProvider_CUDA_V2(options: Pointer, cuda: Pointer): Status;
  CreateCUDAProviderOptions(out: Out<NullablePointer>): Status;
  UpdateCUDAProviderOptions(cuda: Pointer, keys: string[], values: string[], count: number): Status;
  ReleaseCUDAProviderOptions(p: Pointer): void;
  GetBuildInfoString(): string;
  GetTensorSizeInBytes(value: Pointer, out: Out<number>): Status;
}

/** index in OrtApi and C prototype (handles as void*) of each entry in OrtFunctions */
const TABLE: { [K in keyof OrtFunctions]: [number, string] } = {
  CreateStatus: [0, 'void* f(int code, const char* msg)'],
  GetErrorCode: [1, 'int f(void* status)'],
  GetErrorMessage: [2, 'const char* f(void* status)'],
  CreateEnv: [3, 'void* f(int level, const char* logid, _Out_ void** out)'],
  CreateSession: [7, 'void* f(void* env, const char* path, void* options, _Out_ void** out)'],
  CreateSessionFromArray: [8, 'void* f(void* env, const void* data, size_t length, void* options, _Out_ void** out)'],
  CreateSessionOptions: [10, 'void* f(_Out_ void** out)'],
  SetSessionGraphOptimizationLevel: [23, 'void* f(void* options, int level)'],
  SetIntraOpNumThreads: [24, 'void* f(void* options, int threads)'],
  SessionGetInputCount: [30, 'void* f(void* session, _Out_ size_t* out)'],
  SessionGetOutputCount: [31, 'void* f(void* session, _Out_ size_t* out)'],
  SessionGetInputName: [36, 'void* f(void* session, size_t index, void* allocator, _Out_ void** out)'],
  SessionGetOutputName: [37, 'void* f(void* session, size_t index, void* allocator, _Out_ void** out)'],
  CreateTensorAsOrtValue: [48, 'void* f(void* allocator, const int64_t* shape, size_t rank, int type, _Out_ void** out)'],
  CreateTensorWithDataAsOrtValue: [49, 'void* f(void* info, void* data, size_t bytes, const int64_t* shape, size_t rank, int type, _Out_ void** out)'],
  GetTensorMutableData: [51, 'void* f(void* value, _Out_ void** out)'],
  GetTensorElementType: [60, 'void* f(void* info, _Out_ int* out)'],
  GetDimensionsCount: [61, 'void* f(void* info, _Out_ size_t* out)'],
  GetDimensions: [62, 'void* f(void* info, int64_t* dims, size_t count)'],
  GetTensorTypeAndShape: [65, 'void* f(void* value, _Out_ void** out)'],
  CreateMemoryInfo: [68, 'void* f(const char* name, int allocatorType, int deviceId, int memType, _Out_ void** out)'],
  CreateCpuMemoryInfo: [69, 'void* f(int allocatorType, int memType, _Out_ void** out)'],
  MemoryInfoGetName: [71, 'void* f(void* info, _Out_ const char** out)'],
  AllocatorFree: [76, 'void* f(void* allocator, void* p)'],
  GetAllocatorWithDefaultOptions: [78, 'void* f(_Out_ void** out)'],
  ReleaseEnv: [92, 'void f(void* p)'],
  ReleaseStatus: [93, 'void f(void* p)'],
  ReleaseMemoryInfo: [94, 'void f(void* p)'],
  ReleaseSession: [95, 'void f(void* p)'],
  ReleaseValue: [96, 'void f(void* p)'],
  ReleaseTensorTypeAndShapeInfo: [99, 'void f(void* p)'],
  ReleaseSessionOptions: [100, 'void f(void* p)'],
  CreateAllocator: [131, 'void* f(void* session, void* info, _Out_ void** out)'],
  ReleaseAllocator: [132, 'void f(void* p)'],
  RunWithBinding: [133, 'void* f(void* session, void* runOptions, void* binding)'],
  CreateIoBinding: [134, 'void* f(void* session, _Out_ void** out)'],
  ReleaseIoBinding: [135, 'void f(void* p)'],
  BindInput: [136, 'void* f(void* binding, const char* name, void* value)'],
  BindOutput: [137, 'void* f(void* binding, const char* name, void* value)'],
  BindOutputToDevice: [138, 'void* f(void* binding, const char* name, void* info)'],
  ClearBoundInputs: [141, 'void f(void* binding)'],
  ClearBoundOutputs: [142, 'void f(void* binding)'],
  GetBoundOutputValues: [140, 'void* f(void* binding, void* allocator, _Out_ void** out, _Out_ size_t* count)'],
  GetTensorMemoryInfo: [194, 'void* f(void* value, _Out_ void** out)'],
  SessionOptionsAppendExecutionProvider_CUDA_V2: [204, 'void* f(void* options, void* cuda)'],
  CreateCUDAProviderOptions: [205, 'void* f(_Out_ void** out)'],
  UpdateCUDAProviderOptions: [206, 'void* f(void* cuda, const char** keys, const char** values, size_t count)'],
  ReleaseCUDAProviderOptions: [208, 'void f(void* p)'],
  GetBuildInfoString: [254, 'const char* f()'],
  GetTensorSizeInBytes: [318, 'void* f(void* value, _Out_ size_t* out)'],
};

export interface OrtLibrary {
  readonly path: string;
  /** OrtApiBase::GetVersionString, e.g. "1.30.0" */
  readonly version: string;
  readonly api: OrtFunctions;
}

let loaded: OrtLibrary | null = null;

/**
 * Loads the library once per thread and keeps it for the life of the thread: OrtValues, sessions
 * and the env live in it, so it is never unloaded (a release after an unload would jump into freed
 * code). Throws if the library is not the version the table was counted for.
 */
export function ortLibrary(dir = ortBinaryDir()): OrtLibrary {
  if (loaded) return loaded;
  const path = join(dir, 'libonnxruntime.so.1');
  if (!existsSync(path)) throw new Error(`onnxruntime's C library is not at ${path} (RUNTIME=capi loads the one onnxruntime-node ships)`);
  const lib = koffi.load(path);
  const base = lib.func('void* OrtGetApiBase()')() as NullablePointer;
  if (!base) throw new Error(`OrtGetApiBase() returned NULL in ${path}`);
  const getApi = koffi.decode(koffi.decode(base, 0, 'void*'), koffi.proto('void* OrtGetApiFn(uint32_t version)')) as (v: number) => NullablePointer;
  const getVersion = koffi.decode(koffi.decode(base, 8, 'void*'), koffi.proto('const char* OrtGetVersionStringFn()')) as () => string;
  const version = getVersion();
  if (!version.startsWith(`1.${ORT_API_VERSION}.`)) throw new Error(`RUNTIME=capi was written for onnxruntime 1.${ORT_API_VERSION}.x, but ${path} is ${version}`);
  const table = getApi(ORT_API_VERSION);
  if (!table) throw new Error(`onnxruntime ${version} does not offer C API version ${ORT_API_VERSION}`);
  const api: Record<string, unknown> = {};
  for (const [name, [index, proto]] of Object.entries(TABLE)) {
    const fn = koffi.decode(table, index * koffi.sizeof('void*'), 'void*') as NullablePointer;
    if (!fn) throw new Error(`OrtApi entry ${index} (${name}) is NULL in onnxruntime ${version}`);
    api[name] = koffi.decode(fn, koffi.proto(proto.replace(' f(', ` Ort${name}Fn(`)));
  }
  loaded = { path, version, api: api as unknown as OrtFunctions };
  return loaded;
}
