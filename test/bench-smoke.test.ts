import { execFile } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

/**
 * `npm run bench -- --quick --json` on the tiny preset, as a child process: every section is
 * present and every number in it is finite (NaN and ±Infinity become null in JSON). No timing is
 * asserted: the numbers of a loaded 2-core CI machine mean nothing; the benchmark itself is run by
 * hand (bench/RESULTS.md).
 */

const run = promisify(execFile);
const root = resolve(import.meta.dirname, '..');

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

/** paths of every leaf that is not a finite number, a string or a boolean */
function nonFinite(v: Json, path: string, out: string[]): string[] {
  if (v === null) out.push(path);
  else if (typeof v === 'number') {
    if (!Number.isFinite(v)) out.push(path);
  } else if (Array.isArray(v)) v.forEach((x, i) => nonFinite(x, `${path}[${i}]`, out));
  else if (typeof v === 'object') for (const [k, x] of Object.entries(v)) nonFinite(x, `${path}.${k}`, out);
  return out;
}

describe('bench --quick --json', () => {
  let cache: string;
  let report: Record<string, Json>;
  let stderr: string;

  beforeAll(async () => {
    cache = await mkdtemp(join(tmpdir(), 'loraserve-bench-smoke-'));
    const out = await run(process.execPath, ['bin/loraserve-bench.js', '--quick', '--json', '--cache', cache], { cwd: root, maxBuffer: 16 * 1024 * 1024, timeout: 230_000 });
    stderr = out.stderr;
    report = JSON.parse(out.stdout) as Record<string, Json>;
  }, 240_000);

  afterAll(async () => {
    if (cache) await rm(cache, { recursive: true, force: true });
  });

  it('reports every section', () => {
    for (const k of ['machine', 'model', 'limit', 'raw', 'engine', 'minimal', 'api', 'paired', 'upload', 'peer', 'llamaCpp', 'quantized', 'kernels', 'ratios', 'targets']) expect(report, k).toHaveProperty(k);
    expect(report.model).toMatchObject({ name: 'tiny', maxTokens: 24 });
    for (const k of ['api1', 'same8', 'mixed8', 'base8']) expect(report.api).toHaveProperty(k);
    for (const k of ['b1', 'b8', 'profile1', 'profile8']) expect(report.raw).toHaveProperty(k);
    // the peer ran (transformers.js on the peer export), unless it says exactly what is missing
    expect(report.peer, stderr).toMatchObject({ available: true });
  });

  it('has only finite numbers in the measured sections', () => {
    const bad: string[] = [];
    for (const k of ['limit', 'raw', 'engine', 'minimal', 'api', 'paired', 'upload', 'peer', 'ratios', 'targets']) nonFinite(report[k] ?? null, k, bad);
    if ((report.llamaCpp as { available: boolean }).available) for (const k of ['llamaCpp', 'quantized']) nonFinite(report[k] ?? null, k, bad);
    expect(bad).toEqual([]);
  });

  it('counts the tokens it asked for', () => {
    // every stream runs its full length: the presets' EOS lies outside what the sampler may pick
    const api = report.api as Record<string, { streams: number; tokens: number }>;
    expect(api.api1).toMatchObject({ streams: 1, tokens: 24 });
    for (const k of ['same8', 'mixed8', 'base8']) expect(api[k], k).toMatchObject({ streams: 8, tokens: 8 * 24 });
    // the targets' ratios come from alternating pairs: 3 in a --quick run, each side a full run
    const paired = report.paired as Record<string, { ratios: number[]; median: number; a: { streams: number; tokens: number }[]; b: { streams: number; tokens: number }[] }>;
    const ratios = report.ratios as Record<string, number>;
    expect(paired.api1OverRaw.ratios).toHaveLength(3);
    expect(paired.api1OverRaw.b.every((t) => t.streams === 1 && t.tokens === 24)).toBe(true);
    expect(paired.mixedOverSame.b.every((t) => t.streams === 8 && t.tokens === 8 * 24)).toBe(true);
    expect(ratios.api1OverRaw).toBe(paired.api1OverRaw.median);
    expect(ratios.mixedOverSame).toBe(paired.mixedOverSame.median);
    const peer = report.peer as { b8: { tokens: number }; c8: { streams: number; tokens: number }; concurrentAgreement: { streams: number; equalToB1: number } };
    expect(peer.b8.tokens).toBe(8 * 24);
    // 8 concurrent generate calls, each its full length and each the same tokens as the peer alone
    expect(peer.c8).toMatchObject({ streams: 8, tokens: 8 * 24 });
    expect(peer.concurrentAgreement).toEqual({ streams: 8, equalToB1: 8 });
    const upload = report.upload as { memory: { adapters: number }; rank: number; tensorBytes: number; beyondReadMs: number };
    expect(upload.memory.adapters).toBe(2);
    // measured on the server, from the upload's last byte to its 201
    expect(upload.beyondReadMs).toBeGreaterThan(0);
    expect(upload.rank).toBe(16);
    expect(upload.tensorBytes).toBeGreaterThan(0);
  });

  it('measures llama.cpp on the same weights and tokens, or says why not', () => {
    const l = report.llamaCpp as { available: boolean; missing?: string; lines?: { type: string; b1: { streams: number; tokens: number }; seq8: { streams: number; tokens: number } }[]; agreement?: { compared: number; equal: number } };
    if (!l.available) {
      // node-llama-cpp's prebuilt binary may not load on every machine: the report must say why
      console.warn(`bench smoke: llama.cpp section not measured: ${l.missing}`);
      expect(l.missing).toMatch(/node-llama-cpp|llama\.cpp/);
      return;
    }
    expect(l.lines?.map((x) => x.type)).toEqual(['F32', 'Q8_0', 'Q4_0']);
    for (const x of l.lines ?? []) {
      expect(x.b1, x.type).toMatchObject({ streams: 1, tokens: 24 });
      expect(x.seq8, x.type).toMatchObject({ streams: 8, tokens: 8 * 24 });
    }
    // the F32 GGUF decodes the greedy tokens our graph does: the same weights, the same prompt ids
    expect(l.agreement?.compared).toBeGreaterThan(0);
    expect(l.agreement?.equal).toBe(l.agreement?.compared);
    const q = report.quantized as Record<string, { streams: number; tokens: number }>;
    expect(q.int4B1).toMatchObject({ streams: 1, tokens: 24 });
    expect(q.int8B1).toMatchObject({ streams: 1, tokens: 24 });
    expect(q.int4Mixed8).toMatchObject({ streams: 8, tokens: 8 * 24 });
    for (const k of ['int4B1OverLlamaCppQ4_0', 'int8B1OverLlamaCppQ8_0', 'fp32B1OverLlamaCppF32', 'int4Mixed8OverLlamaCppQ4_0Seq8']) expect(report.ratios, k).toHaveProperty(k);
    // the kernels' ceiling beside both: 4 and 8 bits at 1 and 8 rows, over ours and under llama.cpp
    const kernels = report.kernels as { lines: { bits: number; rows: number; tokPerS: number }[] };
    expect(kernels.lines.map((x) => [x.bits, x.rows])).toEqual([[4, 1], [4, 8], [8, 1], [8, 8]]);
    for (const x of kernels.lines) expect(x.tokPerS).toBeGreaterThan(0);
    const ratios = report.ratios as Record<string, number>;
    for (const k of ['int4B1OverKernelCeiling', 'int8B1OverKernelCeiling', 'int4Mixed8OverKernelCeiling', 'kernelCeilingInt4B1OverLlamaCppQ4_0', 'kernelCeilingInt8B1OverLlamaCppQ8_0', 'kernelCeilingInt4Rows8OverLlamaCppQ4_0Seq8']) {
      expect(ratios[k], k).toBeGreaterThan(0);
    }
  });

  it('agrees with the peer on the greedy tokens of the same weights', () => {
    const agreement = (report.peer as { agreement: { compared: number; equal: number } }).agreement;
    expect(agreement.compared).toBeGreaterThan(0);
    expect(agreement.equal).toBe(agreement.compared);
  });
});
