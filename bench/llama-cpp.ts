import { createHash } from 'node:crypto';
import { mkdir, readFile, rename, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Llama, LlamaModel, Token } from 'node-llama-cpp';
import type { Checkpoint } from '../src/model/checkpoint/types.js';
import { GGUF_WRITER_VERSION, writeCheckpointGguf, type GgufFileType } from './gguf/convert.js';
import { now, throughput, type StreamTrace, type Throughput } from './timing.js';

/**
 * llama.cpp as users would run it from Node: node-llama-cpp's prebuilt CPU binary, the bench
 * model's own weights written as GGUF (F32, Q8_0, Q4_0; bench/gguf), fed the same prompt token
 * ids (no tokenizer in between) and decoding the same number of tokens greedily, with as many
 * threads as our sessions use. Batch 1 is one sequence; 8 sequences are 8 context sequences of
 * one context generating at once, which node-llama-cpp batches into shared llama_decode calls.
 *
 * node-llama-cpp creates every context with `kv_unified = false` (llama/addon/AddonContext.cpp):
 * each sequence gets its own KV stream of `contextSize` cells, the context holds
 * contextSize × sequences. That is its layout; the bench does not change it.
 */

export const LLAMA_CPP_TYPES = ['F32', 'Q8_0', 'Q4_0'] as const satisfies readonly GgufFileType[];

export type LlamaCppLoad = { ok: true; llama: Llama; version: string; release: string } | { ok: false; missing: string };

/** node-llama-cpp's prebuilt CPU binary, never a build from source, never a download */
export async function loadLlamaCpp(): Promise<LlamaCppLoad> {
  let mod: typeof import('node-llama-cpp');
  try {
    mod = await import('node-llama-cpp');
  } catch (e) {
    return { ok: false, missing: `node-llama-cpp is not installed (npm ci installs it as a dev dependency): ${(e as Error).message}` };
  }
  try {
    const llama = await mod.getLlama({ gpu: false, build: 'never', usePrebuiltBinaries: true, progressLogs: false, logLevel: mod.LlamaLogLevel.error });
    let version = 'unknown';
    try {
      const pkg = JSON.parse(await readFile(new URL('../node_modules/node-llama-cpp/package.json', import.meta.url), 'utf8')) as { version?: string };
      version = pkg.version ?? version;
    } catch {
      // the version is only reported
    }
    return { ok: true, llama, version, release: llama.llamaCppRelease.release };
  } catch (e) {
    return { ok: false, missing: `node-llama-cpp's prebuilt binary did not load on this machine: ${(e as Error).message}` };
  }
}

/** the cache key of a checkpoint's GGUF: writer version, model id and the source files' sizes and times */
async function ggufKey(ck: Checkpoint): Promise<string> {
  const h = createHash('sha256');
  h.update(`gguf-writer ${GGUF_WRITER_VERSION}\n${ck.modelId}\n${JSON.stringify(ck.architecture)}\n`);
  for (const f of ck.sourceFiles) {
    const s = await stat(f);
    h.update(`${f} ${s.size} ${s.mtimeMs}\n`);
  }
  return h.digest('hex').slice(0, 16);
}

/** The checkpoint as GGUF under `cacheDir/gguf/`, written on first use (through a temp name) and reused. */
export async function ensureGguf(ck: Checkpoint, tokenizerJson: string, cacheDir: string, fileType: GgufFileType, progress: (l: string) => void): Promise<string> {
  const dir = join(cacheDir, 'gguf', await ggufKey(ck));
  const path = join(dir, `model-${fileType}.gguf`);
  const mark = `${path}.complete`;
  try {
    await stat(mark);
    return path;
  } catch {
    // not written yet
  }
  await mkdir(dir, { recursive: true });
  progress(`llama.cpp: writing ${fileType} GGUF into ${dir}`);
  const tmp = `${path}.writing-${process.pid}`;
  try {
    const t0 = now();
    const written = await writeCheckpointGguf(ck, tokenizerJson, tmp, fileType);
    progress(`llama.cpp: wrote ${fileType} GGUF, ${(written.bytes / 1e6).toFixed(0)} MB in ${((now() - t0) / 1000).toFixed(1)} s`);
    await rename(tmp, path);
    await writeFile(mark, `${GGUF_WRITER_VERSION}\n`);
  } catch (e) {
    await rm(tmp, { force: true });
    throw e;
  }
  return path;
}

export interface LlamaCppRunSpec {
  promptIds: readonly number[];
  maxTokens: number;
  threads: number;
}

export interface LlamaCppLoaded {
  model: LlamaModel;
  close(): Promise<void>;
}

export async function loadGguf(llama: Llama, path: string): Promise<LlamaCppLoaded> {
  const model = await llama.loadModel({ modelPath: path, gpuLayers: 0, useMmap: true });
  return { model, close: () => model.dispose() };
}

/**
 * `sequences` streams of the same prompt, greedy, each stopped after `maxTokens` generated tokens.
 * A fresh context per run so every run starts with an empty KV cache, as ours do.
 */
export async function runLlamaCpp(model: LlamaModel, spec: LlamaCppRunSpec, sequences: number): Promise<{ throughput: Throughput; tokens: number[] }> {
  const perSequence = spec.promptIds.length + spec.maxTokens + 8;
  const context = await model.createContext({ sequences, contextSize: perSequence, batchSize: Math.max(spec.promptIds.length * sequences, 512), threads: { ideal: spec.threads, min: spec.threads } });
  try {
    const start = now();
    const first: number[] = [];
    const traces = await Promise.all(
      Array.from({ length: sequences }, async (_, i): Promise<StreamTrace> => {
        const seq = context.getSequence();
        const trace: StreamTrace = { start, tokens: [] };
        try {
          for await (const tok of seq.evaluate([...spec.promptIds] as Token[], { temperature: 0 })) {
            trace.tokens.push(now());
            if (i === 0) first.push(tok);
            if (trace.tokens.length >= spec.maxTokens) break;
          }
        } finally {
          seq.dispose();
        }
        return trace;
      }),
    );
    return { throughput: throughput(traces), tokens: first };
  } finally {
    await context.dispose();
  }
}

/**
 * Raw logits for every position of `tokens` (one sequence, one context), each row the full
 * vocabulary. The KV cache is F32 here (llama.cpp's default is F16, which the bench keeps) so the
 * only differences from an exact forward are float32 summation orders.
 */
export async function llamaCppLogits(model: LlamaModel, tokens: readonly number[], vocab: number, threads: number): Promise<Float32Array[]> {
  const context = await model.createContext({ sequences: 1, contextSize: tokens.length + 8, threads: { ideal: threads, min: threads }, flashAttention: false, experimentalKvCacheKeyType: 'F32', experimentalKvCacheValueType: 'F32' });
  try {
    const seq = context.getSequence();
    const out = await seq.controlledEvaluate(tokens.map((t) => [t as Token, { generateNext: { logits: true } }]));
    return tokens.map((_, i) => {
      const logits = out[i]?.next.logits;
      if (!logits) throw new Error(`node-llama-cpp returned no logits for position ${i}`);
      const row = new Float32Array(vocab).fill(Number.NaN);
      for (const [tok, v] of logits) {
        if (tok >= vocab) throw new Error(`node-llama-cpp returned a logit for token ${tok}, past the vocabulary of ${vocab}`);
        row[tok] = v;
      }
      return row;
    });
  } finally {
    await context.dispose();
  }
}

export interface LlamaCppLine {
  type: GgufFileType;
  fileBytes: number;
  /** one sequence */
  b1: Throughput;
  /** 8 sequences of one context generating at once */
  seq8: Throughput;
}

export type LlamaCppSection =
  | {
      available: true;
      what: string;
      nodeLlamaCpp: string;
      llamaCppRelease: string;
      threads: number;
      /** node-llama-cpp's KV layout and what it does to the 8-sequence lines */
      layout: string;
      lines: LlamaCppLine[];
      /** greedy tokens of the F32 line's first stream against ours (full vocabulary, no EOS) */
      agreement: { compared: number; equal: number };
    }
  | { available: false; missing: string };

export const LAYOUT_NOTE =
  'node-llama-cpp creates every context with kv_unified = false: each of the 8 sequences has its own KV stream of contextSize cells (the context holds contextSize × 8), and its batch dispatcher gathers the sequences\' next tokens into shared llama_decode calls only when their evaluations are queued in the same cycle';

/**
 * F32, Q8_0 and Q4_0 GGUF of `ck` (written once into `cacheDir/gguf`), each loaded and run at 1 and
 * 8 sequences with `threads` threads, best of `reps` by decode tokens/s.
 */
export async function measureLlamaCpp(
  ck: Checkpoint,
  o: { tokenizerJson: string; cacheDir: string; spec: LlamaCppRunSpec; reps: number; agreementTokens: readonly number[]; types?: readonly GgufFileType[]; progress: (l: string) => void },
): Promise<LlamaCppSection> {
  const load = await loadLlamaCpp();
  if (!load.ok) return { available: false, missing: load.missing };
  const best = async (f: () => Promise<{ throughput: Throughput; tokens: number[] }>) => {
    let top = await f();
    for (let i = 1; i < o.reps; i++) {
      const next = await f();
      if (next.throughput.decodeTokPerS > top.throughput.decodeTokPerS || !Number.isFinite(top.throughput.decodeTokPerS)) top = next;
    }
    return top;
  };
  const lines: LlamaCppLine[] = [];
  let agreement = { compared: 0, equal: 0 };
  try {
    for (const type of o.types ?? LLAMA_CPP_TYPES) {
      const path = await ensureGguf(ck, o.tokenizerJson, o.cacheDir, type, o.progress);
      o.progress(`llama.cpp: ${type}, 1 and 8 sequences, ${o.spec.threads} threads`);
      const m = await loadGguf(load.llama, path);
      try {
        await runLlamaCpp(m.model, { ...o.spec, maxTokens: 2 }, 1);
        const b1 = await best(() => runLlamaCpp(m.model, o.spec, 1));
        const seq8 = await best(() => runLlamaCpp(m.model, o.spec, 8));
        if (type === 'F32') {
          const compared = Math.min(o.agreementTokens.length, b1.tokens.length);
          let equal = 0;
          while (equal < compared && o.agreementTokens[equal] === b1.tokens[equal]) equal++;
          agreement = { compared, equal };
        }
        lines.push({ type, fileBytes: (await stat(path)).size, b1: b1.throughput, seq8: seq8.throughput });
      } finally {
        await m.close();
      }
    }
  } catch (e) {
    return { available: false, missing: `llama.cpp could not run the GGUF files: ${(e as Error).message}` };
  } finally {
    // its thread pool and backends go before our sessions run the int8/int4 lines
    await load.llama.dispose();
  }
  return {
    available: true,
    what: `node-llama-cpp ${load.version} (llama.cpp ${load.release}, prebuilt CPU binary) on GGUF files written from the same weights (bench/gguf: 2-D weights in the file type, norms and biases F32), fed our prompt token ids, greedy, the library's defaults otherwise (F16 KV cache, flash attention auto); b1: one sequence; seq8: 8 sequences of one context at once`,
    nodeLlamaCpp: load.version,
    llamaCppRelease: load.release,
    threads: o.spec.threads,
    layout: LAYOUT_NOTE,
    lines,
    agreement,
  };
}

/** the section's line for one GGUF file type; undefined when llama.cpp was not measured */
export function llamaCppLine(section: LlamaCppSection, type: GgufFileType): LlamaCppLine | undefined {
  return section.available ? section.lines.find((l) => l.type === type) : undefined;
}

/** ratios named as the bench's others: ours over llama.cpp's */
export function llamaCppRatios(section: LlamaCppSection, ours: { fp32B1: Throughput | null; int8B1: Throughput | null; int4B1: Throughput | null; int4Mixed8: Throughput | null }): Record<string, number> {
  if (!section.available) return {};
  const d = (t: Throughput | null | undefined) => (t ? t.decodeTokPerS : Number.NaN);
  const line = (type: GgufFileType) => llamaCppLine(section, type);
  const out: Record<string, number> = {
    fp32B1OverLlamaCppF32: d(ours.fp32B1) / d(line('F32')?.b1),
    int8B1OverLlamaCppQ8_0: d(ours.int8B1) / d(line('Q8_0')?.b1),
    int4B1OverLlamaCppQ4_0: d(ours.int4B1) / d(line('Q4_0')?.b1),
    int4Mixed8OverLlamaCppQ4_0Seq8: d(ours.int4Mixed8) / d(line('Q4_0')?.seq8),
  };
  for (const l of section.lines) out[`llamaCpp${l.type}Seq8OverB1`] = d(l.seq8) / d(l.b1);
  return out;
}
