import { performance } from 'node:perf_hooks';

/**
 * How throughput is counted, the same way for every section (ours, over HTTP, the peer):
 *
 *   decode tokens/s — steady state with every stream running: the window opens when the last
 *   stream has its first token and closes when the first stream has its last token; tokens that
 *   arrive inside it, divided by its length. Prefill and the ramp-up of the batch are outside it.
 *   For one stream this is (n − 1) / (last − first).
 *
 *   end-to-end tokens/s — every generated token over the time from the first request to the last
 *   token (prefill, admission and ramp-up included).
 */

export const now = (): number => performance.now();

/** One stream's token arrival times (ms, performance.now()). */
export interface StreamTrace {
  start: number;
  tokens: number[];
}

export interface Throughput {
  streams: number;
  tokens: number;
  /** steady state with all streams decoding (see `steady`) */
  decodeTokPerS: number;
  /**
   * false when the streams never all ran at once (the first finished before the last began, as
   * in a --quick run): decodeTokPerS then counts every token after each stream's first over the
   * span from the first first-token to the last token
   */
  steady: boolean;
  /** all tokens over the whole wall time */
  e2eTokPerS: number;
  /** mean time to first token */
  ttftMs: number;
  wallMs: number;
}

export function throughput(traces: readonly StreamTrace[]): Throughput {
  const live = traces.filter((t) => t.tokens.length > 0);
  const tokens = traces.reduce((n, t) => n + t.tokens.length, 0);
  const start = Math.min(...traces.map((t) => t.start));
  const end = Math.max(...live.map((t) => t.tokens[t.tokens.length - 1]));
  const wallMs = end - start;
  const open = Math.max(...live.map((t) => t.tokens[0]));
  const close = Math.min(...live.map((t) => t.tokens[t.tokens.length - 1]));
  let decodeTokPerS = Number.NaN;
  const steady = live.length > 0 && close > open;
  if (steady) {
    let inWindow = 0;
    for (const t of live) for (const x of t.tokens) if (x > open && x <= close) inWindow++;
    decodeTokPerS = (inWindow * 1000) / (close - open);
  } else if (live.length > 0) {
    const first = Math.min(...live.map((t) => t.tokens[0]));
    if (end > first) decodeTokPerS = ((tokens - live.length) * 1000) / (end - first);
  }
  const ttftMs = live.reduce((s, t) => s + (t.tokens[0] - t.start), 0) / Math.max(1, live.length);
  return { streams: traces.length, tokens, decodeTokPerS, steady, e2eTokPerS: (tokens * 1000) / wallMs, ttftMs, wallMs };
}

export function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  if (s.length === 0) return Number.NaN;
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
}

export function sum(xs: readonly number[]): number {
  return xs.reduce((a, b) => a + b, 0);
}

export async function timed<T>(f: () => Promise<T>): Promise<{ value: T; ms: number }> {
  const t0 = now();
  const value = await f();
  return { value, ms: now() - t0 };
}

/** resident set size after a full collection (the bench runs with --expose-gc) */
export async function settledRss(): Promise<number> {
  const gc = (globalThis as { gc?: () => void }).gc;
  for (let i = 0; i < 3; i++) {
    gc?.();
    await new Promise((r) => setTimeout(r, 50));
  }
  return process.memoryUsage().rss;
}
