/**
 * Who runs next. Pure bookkeeping, no inference: a FIFO queue of waiting requests, the admitted
 * ones (at most maxBatch) split into those still being prefilled and those in the decode batch,
 * and the choice of the next step.
 *
 * Policy: a prompt is prefilled in chunks of `prefillChunk` tokens, each chunk its own batch-1
 * run, and while both kinds of work exist prefill chunks and decode steps alternate — a long
 * prompt costs running streams one chunk of latency per token, never the whole prompt. Prompts are
 * prefilled one at a time in arrival order (the first to arrive gets its first token first); when
 * its prefill ends, a row joins the decode batch at the next decode step.
 */
export interface SchedulerLimits {
  maxBatch: number;
  maxQueue: number;
  prefillChunk: number;
}

export interface Schedulable {
  readonly id: number;
  readonly promptLength: number;
  /** prompt tokens already run through the model */
  prefilled: number;
}

export type StepPlan<R> =
  | { kind: 'prefill'; row: R; start: number; end: number }
  | { kind: 'decode'; rows: readonly R[] };

export class Scheduler<R extends Schedulable> {
  private readonly waitingRows: R[] = [];
  private readonly prefillRows: R[] = [];
  private readonly decodeRows: R[] = [];
  private prefillTurn = true;

  constructor(readonly limits: SchedulerLimits) {}

  get waiting(): readonly R[] {
    return this.waitingRows;
  }
  get prefilling(): readonly R[] {
    return this.prefillRows;
  }
  get decoding(): readonly R[] {
    return this.decodeRows;
  }
  get running(): number {
    return this.prefillRows.length + this.decodeRows.length;
  }
  get size(): number {
    return this.running + this.waitingRows.length;
  }

  /**
   * Full when maxBatch are running and maxQueue wait. Counting both (not only the queue) keeps
   * this in step with the main thread, which only knows how many requests are outstanding.
   */
  get full(): boolean {
    return this.size >= this.limits.maxBatch + this.limits.maxQueue;
  }

  /** Queues a request; false when full. Admits at once if the batch has room. */
  enqueue(row: R): boolean {
    if (this.full) return false;
    this.waitingRows.push(row);
    this.admit();
    return true;
  }

  /** Moves waiting requests into the batch while it has room; returns those admitted. */
  admit(): R[] {
    const admitted: R[] = [];
    while (this.waitingRows.length > 0 && this.running < this.limits.maxBatch) {
      const row = this.waitingRows.shift()!;
      this.prefillRows.push(row);
      admitted.push(row);
    }
    return admitted;
  }

  /** Prefill of `row` is complete: it decodes from the next decode step on. */
  promote(row: R): void {
    const i = this.prefillRows.indexOf(row);
    if (i < 0) throw new Error(`request ${row.id} is not being prefilled`);
    this.prefillRows.splice(i, 1);
    this.decodeRows.push(row);
  }

  /** Takes a request out wherever it is; returns where it was (null if unknown). */
  remove(id: number): { row: R; was: 'waiting' | 'prefill' | 'decode' } | null {
    for (const [list, was] of [
      [this.waitingRows, 'waiting'],
      [this.prefillRows, 'prefill'],
      [this.decodeRows, 'decode'],
    ] as const) {
      const i = list.findIndex((r) => r.id === id);
      if (i >= 0) {
        const [row] = list.splice(i, 1);
        return { row, was };
      }
    }
    return null;
  }

  find(id: number): R | undefined {
    return (
      this.prefillRows.find((r) => r.id === id) ??
      this.decodeRows.find((r) => r.id === id) ??
      this.waitingRows.find((r) => r.id === id)
    );
  }

  /** The next step to run, or null when there is nothing to do. */
  next(): StepPlan<R> | null {
    this.admit();
    const canPrefill = this.prefillRows.length > 0;
    const canDecode = this.decodeRows.length > 0;
    if (!canPrefill && !canDecode) return null;
    const prefill = canPrefill && (!canDecode || this.prefillTurn);
    this.prefillTurn = !prefill;
    if (prefill) {
      const row = this.prefillRows[0];
      const start = row.prefilled;
      return { kind: 'prefill', row, start, end: Math.min(row.promptLength, start + this.limits.prefillChunk) };
    }
    return { kind: 'decode', rows: [...this.decodeRows] };
  }
}
