import type { EngineEmbedding } from '../adapters/convert.js';
/**
 * Messages between the main thread (`Engine`) and the inference worker. Only structured-clonable
 * data crosses; adapter weights travel as transferred buffers, so the main thread keeps no copy.
 */
import type { Manifest } from '../model/manifest.js';
import type { Device, Provider, RuntimeSetting } from '../model/session.js';
import type { ProbeResult } from './probe.js';
import type { SamplingParams, TokenLogprob } from './sampler.js';

export type { Device, Provider };

export interface EngineLimits {
  maxBatch: number;
  maxQueue: number;
  prefillChunk: number;
  /** 0 → no timeout */
  requestTimeoutMs: number;
  /** the longest sequence (prompt + generated) a request may reach */
  contextLength: number;
}

export interface WorkerData {
  /** URL of worker.ts (or its compiled .js), imported by worker-entry.mjs */
  entry: string;
  modelDir: string;
  manifest: Manifest;
  device: Device;
  runtime: RuntimeSetting;
  limits: EngineLimits;
}

/** One request as the worker sees it: token ids in, token ids out. */
export interface WorkerRequest {
  promptIds: number[];
  /** null → the base model */
  adapterVersion: string | null;
  /** already capped to the context by the main thread */
  maxTokens: number;
  sampling: SamplingParams;
  seed: number;
  /** generating one of these ends the request with finish reason `stop` */
  eosIds: number[];
  /** only ids below this are sampled (a model's embedding may be padded past its tokenizer) */
  vocabLimit: number;
  /**
   * the id of a request submitted just before with the same prompt and adapter (OpenAI's `n`):
   * this one takes that request's prefilled KV cache and last logits instead of running the prompt
   */
  prefixOf?: number | null;
}

export type FinishReason = 'stop' | 'length' | 'cancelled';

export interface EngineStats {
  /** requests admitted to the batch (prefilling or decoding) */
  running: number;
  waiting: number;
  /** adapter version of every running request (a version twice if two requests use it); base omitted */
  runningAdapters: string[];
  waitingAdapters: string[];
  /** rows of the last decode step */
  batchSize: number;
  /** tokens held in KV caches (real tokens, padding not counted) */
  kvTokens: number;
  /** maxBatch × contextLength */
  kvCapacity: number;
  tokensGenerated: number;
  /** prompt tokens run through the model (a prompt shared by n choices counts once) */
  prefillTokens: number;
  cancelled: number;
  /** adapter versions resident in the worker (unloaded ones stay until their last request ends) */
  adaptersResident: number;
  /** bytes handed to onnxruntime and taken back, summed over every run (see transfer.ts) */
  bytesToRuntime: number;
  bytesFromRuntime: number;
}

export interface LoraModuleWire {
  name: string;
  rank: number;
  /** [in, rank] row-major */
  A: Float32Array;
  /** [rank, out] row-major, scale folded in */
  B: Float32Array;
  /** [out]: DoRA's factor m / ‖W + s·B·A‖ (adapters/dora.ts), for use_dora modules */
  factor?: Float32Array;
  /** [out]: lora_B.bias × scale, for lora_bias modules */
  bias?: Float32Array;
}

export type ToWorker =
  /**
   * `followers`: more requests of the same prompt (OpenAI's `n`), in the same message so the worker
   * queues them all before it runs a step; each takes the first one's prefill (`prefixOf`)
   */
  | { type: 'generate'; id: number; req: WorkerRequest; followers?: { id: number; seed: number }[] }
  | { type: 'cancel'; id: number }
  /** draining: refuse every request still waiting for a batch slot (kind 'draining') */
  | { type: 'shedWaiting' }
  | { type: 'loadAdapter'; callId: number; versionId: string; modules: LoraModuleWire[]; embedding?: EngineEmbedding }
  | { type: 'unloadAdapter'; callId: number; versionId: string }
  /** the adapter's effect on the probe prompt (probe.ts); answered by a reply carrying `probe` */
  | { type: 'probe'; callId: number; versionId: string; ids: number[] }
  | { type: 'close' };

export type RejectKind = 'queue_full' | 'context_length' | 'unknown_adapter' | 'bad_request' | 'draining';

/** [request id, token, logprob, top logprobs] — compact: one step carries a token for every row. */
export type TokenWire = [id: number, token: number, logprob: number, top: TokenLogprob[] | null];

export interface DoneWire {
  id: number;
  finishReason: FinishReason;
  promptTokens: number;
  completionTokens: number;
  /** cancelled because REQUEST_TIMEOUT_MS passed */
  timedOut: boolean;
  /** the run failed (the request ends with an error, not a finish reason) */
  error: string | null;
}

export type LogLevel = 'debug' | 'info' | 'warn' | 'error';

export type FromWorker =
  | { type: 'ready'; provider: Provider; reason: string | null }
  | { type: 'startupError'; message: string }
  | { type: 'step'; tokens: TokenWire[]; done: DoneWire[]; stats: EngineStats }
  | { type: 'rejected'; id: number; kind: RejectKind; message: string }
  | { type: 'reply'; callId: number; error: string | null; probe?: ProbeResult }
  | { type: 'log'; level: LogLevel; msg: string; data: Record<string, unknown> | null }
  | { type: 'fatal'; message: string };
