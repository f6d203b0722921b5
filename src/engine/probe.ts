import { hasRowEmbeddings, type Manifest } from '../model/manifest.js';
import { FeedBuilder, type ResidentAdapter } from './batch.js';
import { kvStoreFor, type KvBuffers, type KvStore, type KvTensor } from './kv-store.js';
import { hasOwnHead, rowsLogits } from './head.js';
import { runStep, type RunSession } from './step-run.js';

/**
 * The measured effect of an adapter (issue 17): the served graph runs the fixed probe prompt twice
 * in one batch — row 0 without the adapter, row 1 with it — and the two rows' next-token
 * distributions are compared at every position of the prompt.
 *
 * The probe walks the prompt one token per run, as decode steps of its own two-slot cache (slot 0
 * the base row, slot 1 the adapter row) fed by the engine's FeedBuilder: the served graph emits
 * logits for the last position only, so one full-sequence run would compare a single
 * distribution. It touches nothing of the decode loop (no scheduler row, no engine KV), and the
 * worker runs it between steps.
 */

/** The probe prompt, the same for every adapter of a model; tokenized with the model's tokenizer (BOS added). */
export const PROBE_TEXT = 'The capital of France is Paris. Question: What is two plus three? Answer: five. Once upon a time, a little robot wrote a poem about the sea:';

/** Most tokens the probe compares (its cost grows with each: one batch-2 run per token). */
export const PROBE_MAX_TOKENS = 32;

export interface ProbeResult {
  /** next-token distributions compared */
  probeTokens: number;
  /** largest |log p_adapter − log p_base| over every vocabulary entry at every position */
  maxLogprobDelta: number;
  /** mean over positions of KL(adapter ‖ base) = Σ p_a (log p_a − log p_b), in nats */
  klDivergence: number;
}

export type { RunSession };

/** The probe's token ids for a tokenizer's output: capped in length and to the model's vocabulary and context. */
export function probeIds(encoded: readonly number[], manifest: Pick<Manifest, 'architecture'>, contextLength = Infinity): number[] {
  const a = manifest.architecture;
  return encoded.filter((t) => Number.isInteger(t) && t >= 0 && t < a.vocabSize).slice(0, Math.min(PROBE_MAX_TOKENS, a.maxPositions, contextLength));
}

/** log-softmax in float64 */
function logSoftmax(logits: Float32Array): Float64Array {
  let max = -Infinity;
  for (let i = 0; i < logits.length; i++) if (logits[i]! > max) max = logits[i]!;
  let sum = 0;
  for (let i = 0; i < logits.length; i++) sum += Math.exp(logits[i]! - max);
  const lse = max + Math.log(sum);
  const out = new Float64Array(logits.length);
  for (let i = 0; i < logits.length; i++) out[i] = logits[i]! - lse;
  return out;
}

/** KL(adapter ‖ base) and max |Δ log p| of two logit vectors (also used by the tests' reference). */
export function compareDistributions(adapterLogits: Float32Array, baseLogits: Float32Array): { kl: number; maxDelta: number } {
  const la = logSoftmax(adapterLogits);
  const lb = logSoftmax(baseLogits);
  let kl = 0;
  let maxDelta = 0;
  // an adapter that adds tokens has more logits: compared over the base's ids, where both are defined
  const n = Math.min(la.length, lb.length);
  for (let i = 0; i < n; i++) {
    const d = la[i]! - lb[i]!;
    kl += Math.exp(la[i]!) * d;
    const ad = Math.abs(d);
    if (ad > maxDelta) maxDelta = ad;
  }
  // a sum of p·(log p − log q) is ≥ 0 in exact arithmetic; rounding may leave −1e-17
  return { kl: Math.max(0, kl), maxDelta };
}

/**
 * The probe through `session` (the served graph), one batch-2 run per `step()`, so that the worker
 * can interleave it with decode steps and no running stream waits for the whole probe. Each run
 * blocks its thread like a decode step: use it in the inference worker only.
 */
export class ProbeRun {
  private readonly feeds: FeedBuilder;
  private readonly kv: KvStore<KvTensor>;
  /** the store's handles of the base row and the adapter row */
  private readonly slots: readonly [number, number];
  private readonly rows: readonly (ResidentAdapter | null)[];
  private t = 0;
  private klSum = 0;
  private maxDelta = 0;

  constructor(
    private readonly session: RunSession,
    private readonly manifest: Manifest,
    adapter: ResidentAdapter,
    private readonly ids: readonly number[],
    /** where a gqa cache lives: the engine's choice (capiKvBuffers with the C-API runner) */
    buffers?: KvBuffers<KvTensor>,
  ) {
    if (ids.length === 0) throw new Error('the probe prompt has no tokens');
    this.feeds = new FeedBuilder(manifest, 2);
    this.kv = kvStoreFor(manifest, 2, ids.length, { initialCapacity: ids.length, ...(buffers && { buffers }) });
    this.slots = [this.kv.acquire(), this.kv.acquire()];
    this.rows = [null, adapter];
  }

  get done(): boolean {
    return this.t >= this.ids.length;
  }

  /** Runs the next probe token; true when it was the last. */
  async step(): Promise<boolean> {
    if (this.done) return true;
    const { t } = this;
    const id = this.ids[t]!;
    await this.kv.reserve(t + 1);
    // acquired first on an empty store, the two rows sit in slots 0 and 1: the order any store takes
    const feeds = this.feeds.decode([id, id], this.slots, [t, t], this.kv, this.rows);
    const out = await runStep(this.session, this.manifest, this.kv, feeds, hasRowEmbeddings(this.manifest) && hasOwnHead(this.rows[1]?.embedding));
    // row 0 is the base, row 1 the adapter (its own lm_head applied, head.ts)
    const [base, tuned] = (await rowsLogits(out, this.rows, this.manifest)) as [Float32Array, Float32Array];
    const c = compareDistributions(tuned, base);
    this.klSum += c.kl;
    if (c.maxDelta > this.maxDelta) this.maxDelta = c.maxDelta;
    this.kv.write(out, this.slots, [t, t], 1);
    this.t++;
    if (this.done) this.dispose();
    return this.done;
  }

  /** Frees the probe's cache (at its end, or when the worker gives up on a failed step). Once is enough; more is harmless. */
  dispose(): void {
    this.kv.dispose();
  }

  result(): ProbeResult {
    if (!this.done) throw new Error('the probe has not finished');
    return { probeTokens: this.ids.length, maxLogprobDelta: this.maxDelta, klDivergence: this.klSum / this.ids.length };
  }
}

/** The whole probe at once (tests, benchmarks). */
export async function runProbe(session: RunSession, manifest: Manifest, adapter: ResidentAdapter, ids: readonly number[], buffers?: KvBuffers<KvTensor>): Promise<ProbeResult> {
  const run = new ProbeRun(session, manifest, adapter, ids, buffers);
  try {
    while (!(await run.step()));
  } finally {
    run.dispose();
  }
  return run.result();
}
