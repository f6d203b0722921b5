import type { LimitResult } from './limit.js';
import type { CoreProfile } from './raw.js';
import type { ContextScaling } from './context.js';
import type { Throughput } from './timing.js';
import type { UploadResult } from './upload.js';
import type { PairedRatio } from './paired.js';
import { llamaCppLine, type LlamaCppSection } from './llama-cpp.js';
import type { QuantizedLines } from './quantized.js';
import type { KernelCeiling } from './kernels.js';

/** Everything one run measured; every comparison is between numbers of this same run. */
export interface BenchReport {
  machine: {
    cpus: number;
    cpuModel: string;
    memoryGB: number;
    node: string;
    onnxruntime: string;
    transformersJs: string | null;
    /** 1-minute load average at the start and the end: above `cpus`, other work shared the cores */
    loadAverage: { before: number; after: number };
    /** runs per throughput number (the best is kept) */
    reps: number;
  };
  model: { name: string; path: string; parameters: number; streamedWeightBytes: number; fileBytes: number; dims: string; promptTokens: number; maxTokens: number };
  limit: LimitResult;
  raw: {
    what: string;
    b1: Throughput;
    b8: Throughput;
    profile1: CoreProfile;
    profile8: CoreProfile;
  };
  engine: { what: string; b1: Throughput; b8: Throughput };
  /** where the model ran (DEVICE / DTYPE from the environment) */
  placement: { provider: string; dtype: string; reason: string };
  /** decode step time against context length, same batch */
  context: ContextScaling;
  minimal: { what: string; b1: Throughput; b8: Throughput; runMs1: number; runMs8: number } | null;
  api: { api1: Throughput; same8: Throughput; mixed8: Throughput; base8: Throughput };
  /** the two targets' ratios, measured in alternating pairs (api1 and same8/mixed8 above are the fastest of these runs) */
  paired: { api1OverRaw: PairedRatio; mixedOverSame: PairedRatio };
  upload: UploadResult;
  peer:
    | {
        available: true;
        what: string;
        b1: Throughput;
        /** one generate call with a static batch of 8 identical prompts: the peer's upper bound */
        b8: Throughput;
        /** 8 concurrent batch-1 generate calls on the one model: what 8 concurrent requests get */
        c8: Throughput;
        /** greedy tokens of b1 against ours */
        agreement: { compared: number; equal: number };
        /** concurrent streams whose greedy tokens equal b1's (the same prompt at batch 1) */
        concurrentAgreement: { streams: number; equalToB1: number };
      }
    | { available: false; missing: string };
  /** node-llama-cpp on GGUF files of the same weights (CPU) */
  llamaCpp: LlamaCppSection;
  /** ours with int8/int4 base weights, for the llama.cpp ratios; null when llama.cpp was not measured */
  quantized: QuantizedLines | null;
  /** onnxruntime's MatMulNBits products of one step alone (CPU runs only): the ceiling of the quantized lines */
  kernels: KernelCeiling | null;
  ratios: Record<string, number>;
  targets: Target[];
  seconds: number;
}

export interface Target {
  name: string;
  /** the comparison, in words */
  rule: string;
  value: number;
  threshold: number;
  /** `min`: value must be ≥ threshold; `max`: ≤ */
  kind: 'min' | 'max';
  met: boolean;
}

export function target(name: string, rule: string, value: number, threshold: number, kind: 'min' | 'max'): Target {
  const met = Number.isFinite(value) && (kind === 'min' ? value >= threshold : value <= threshold);
  return { name, rule, value, threshold, kind, met };
}

const f = (x: number, digits = 1) => (Number.isFinite(x) ? x.toFixed(digits) : 'n/a');
const pad = (s: string, n: number) => (s.length >= n ? s : s + ' '.repeat(n - s.length));
const lpad = (s: string, n: number) => (s.length >= n ? s : ' '.repeat(n - s.length) + s);

function table(header: string[], rows: string[][]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]) => cells.map((c, i) => (i === 0 ? pad(c, widths[i]) : lpad(c, widths[i]))).join('  ');
  return [line(header), widths.map((w) => '-'.repeat(w)).join('  '), ...rows.map(line)].join('\n');
}

export function formatReport(r: BenchReport): string {
  const out: string[] = [];
  const m = r.machine;
  out.push(`loraserve bench — ${r.model.name} (${r.model.dims}; ${(r.model.parameters / 1e6).toFixed(1)}M params, ${(r.model.streamedWeightBytes / 1e9).toFixed(3)} GB streamed per token)`);
  out.push(`machine: ${m.cpus} CPUs (${m.cpuModel}), ${m.memoryGB.toFixed(0)} GB RAM, node ${m.node}, onnxruntime-node ${m.onnxruntime}${m.transformersJs ? `, transformers.js ${m.transformersJs}` : ''}`);
  const load = Math.max(m.loadAverage.before, m.loadAverage.after);
  out.push(`load average ${m.loadAverage.before.toFixed(2)} → ${m.loadAverage.after.toFixed(2)}${load > m.cpus * 0.75 ? ' — WARNING: other work shared the CPUs; the numbers are not trustworthy' : ''}; best of ${m.reps} run(s) per number`);
  out.push(`prompt ${r.model.promptTokens} tokens, ${r.model.maxTokens} generated per stream, greedy; tokens/s: decode = steady state with all streams running, e2e = all tokens / wall time`);
  out.push('');
  const tp = (name: string, t: Throughput, ratio = '') => [name, String(t.streams), String(t.tokens), f(t.decodeTokPerS), f(t.e2eTokPerS), f(t.ttftMs), ratio];
  const rows: string[][] = [
    ['limit (bandwidth)', '1', '', f(r.limit.limitTokPerS), '', '', `${f(r.limit.bandwidthGBs)} GB/s`],
    tp('raw b1 (core loop)', r.raw.b1, `${f(r.ratios.rawB1OverLimit, 2)}× limit`),
    tp('raw b8 (core loop)', r.raw.b8, `${f(r.ratios.rawB8OverB1, 2)}× raw b1`),
    tp('engine b1 (worker)', r.engine.b1, `${f(r.ratios.engineB1OverRaw, 2)}× raw`),
    tp('engine b8 (worker)', r.engine.b8, `${f(r.ratios.engineB8OverRawB8, 2)}× raw b8`),
  ];
  if (r.minimal) {
    rows.push(tp('minimal b1 (peer graph)', r.minimal.b1, `raw/this ${f(r.ratios.rawB1OverMinimal, 2)}`));
    rows.push(tp('minimal b8 (peer graph)', r.minimal.b8, `raw/this ${f(r.ratios.rawB8OverMinimal, 2)}`));
  }
  rows.push(
    tp('api-1 (HTTP SSE)', r.api.api1, `${f(r.ratios.api1OverRaw, 2)}× raw (paired)`),
    tp('api-8-base', r.api.base8, `${f(r.ratios.base8OverApi1, 2)}× api-1`),
    tp('api-8-same', r.api.same8, `${f(r.ratios.same8OverApi1, 2)}× api-1`),
    tp('api-8-mixed', r.api.mixed8, `${f(r.ratios.mixedOverSame, 2)}× same (paired)`),
  );
  if (r.peer.available) {
    rows.push(tp('peer b1 (transformers.js)', r.peer.b1, `engine b1 ${f(r.ratios.engineB1OverPeer, 2)}×`));
    rows.push(tp('peer b8 (static batch)', r.peer.b8, `engine b8 ${f(r.ratios.engineB8OverPeer, 2)}× (info)`));
    rows.push(tp('peer 8 concurrent', r.peer.c8, `engine b8 ${f(r.ratios.engineB8OverPeerConcurrent, 2)}×`));
  }
  if (r.quantized && r.llamaCpp.available) {
    const q = r.quantized;
    for (const l of r.llamaCpp.lines) {
      rows.push(tp(`llama.cpp ${l.type} b1`, l.b1, l.type === 'F32' ? `raw b1 ${f(r.ratios.fp32B1OverLlamaCppF32, 2)}×` : ''));
      rows.push(tp(`llama.cpp ${l.type} 8 seqs`, l.seq8, `${f(r.ratios[`llamaCpp${l.type}Seq8OverB1`], 2)}× its b1`));
    }
    rows.push(tp('int8 raw b1', q.int8B1, llamaCppLine(r.llamaCpp, 'Q8_0') ? `${f(r.ratios.int8B1OverLlamaCppQ8_0, 2)}× Q8_0` : ''));
    rows.push(tp('int4 raw b1', q.int4B1, llamaCppLine(r.llamaCpp, 'Q4_0') ? `${f(r.ratios.int4B1OverLlamaCppQ4_0, 2)}× Q4_0` : ''));
    rows.push(tp('int4 api-8-mixed', q.int4Mixed8, llamaCppLine(r.llamaCpp, 'Q4_0') ? `${f(r.ratios.int4Mixed8OverLlamaCppQ4_0Seq8, 2)}× Q4_0 8 seqs` : ''));
  }
  out.push(table(['section', 'streams', 'tokens', 'decode tok/s', 'e2e tok/s', 'ttft ms', 'ratio'], rows));
  if (r.kernels) {
    const k = r.kernels;
    const ours: Record<string, string> = { '4x1': 'int4B1OverKernelCeiling', '8x1': 'int8B1OverKernelCeiling', '4x8': 'int4Mixed8OverKernelCeiling' };
    const peer: Record<string, string> = { '4x1': 'kernelCeilingInt4B1OverLlamaCppQ4_0', '8x1': 'kernelCeilingInt8B1OverLlamaCppQ8_0', '4x8': 'kernelCeilingInt4Rows8OverLlamaCppQ4_0Seq8' };
    out.push(`kernels: ${k.products} MatMulNBits products of one step alone (accuracy_level ${k.accuracyLevel}), the ceiling of the quantized lines`);
    out.push(
      table(
        ['bits', 'rows', 'run ms', 'head alone ms', 'tok/s', 'served ÷ this', 'this ÷ llama.cpp'],
        k.lines.map((l) => [String(l.bits), String(l.rows), f(l.runMs, 1), f(l.headMs, 1), f(l.tokPerS, 1), f(r.ratios[ours[`${l.bits}x${l.rows}`] ?? ''] ?? Number.NaN, 2), f(r.ratios[peer[`${l.bits}x${l.rows}`] ?? ''] ?? Number.NaN, 2)]),
      ),
    );
  }
  for (const p of [r.paired.api1OverRaw, r.paired.mixedOverSame]) {
    out.push(`paired: ${p.what} = median ${f(p.median, 3)} of ${p.ratios.length} alternating pairs [${p.ratios.map((x) => f(x, 3)).join(', ')}]`);
  }
  if (!r.llamaCpp.available) out.push(`llama.cpp: not measured — ${r.llamaCpp.missing}`);
  else {
    const l = r.llamaCpp;
    out.push(`llama.cpp: node-llama-cpp ${l.nodeLlamaCpp} (llama.cpp ${l.llamaCppRelease}), ${l.threads} threads; greedy agreement of its F32 line with ours: ${l.agreement.equal}/${l.agreement.compared} tokens; GGUF ${l.lines.map((x) => `${x.type} ${(x.fileBytes / 1e6).toFixed(0)} MB`).join(', ')}`);
    out.push(`  layout: ${l.layout}`);
  }
  if (!r.peer.available) out.push(`peer: not measured — ${r.peer.missing}`);
  else {
    const p = r.peer;
    out.push(`peer agreement (greedy, full vocabulary): ${p.agreement.equal}/${p.agreement.compared} tokens equal to ours; ${p.concurrentAgreement.equalToB1}/${p.concurrentAgreement.streams} concurrent streams equal to peer b1`);
    out.push(`peer b8 (static batch) = one generate call with 8 identical prompts, the peer's upper bound (needs all 8 to arrive together with the same length); peer 8 concurrent = 8 batch-1 generate calls started together on one model (${f(r.ratios.peerC8OverB1, 2)}× peer b1), what 8 concurrent requests get`);
  }
  const cx = r.context;
  out.push(
    `decode step vs context (batch ${cx.batch}, ${r.placement.provider}/${r.placement.dtype}): ` +
      cx.points.map((p) => `context ${p.context}: step ${f(p.stepMs, 2)} ms (run ${f(p.runMs, 2)} ms), ${f(p.bytesPerStep.toRuntime, 0)} B in / ${f(p.bytesPerStep.fromRuntime, 0)} B out per step`).join('; ') +
      ` — step-time ratio ${f(cx.ratio, 2)}×`,
  );
  out.push('');
  const p1 = r.raw.profile1;
  const p8 = r.raw.profile8;
  out.push(
    table(
      ['decode step profile (ms)', 'step', 'mean step', 'session.run', 'outside run', 'feeds', 'sample', 'sample, all ids', 'between steps', 'prefill run'],
      [p1, p8].map((p, i) => [
        `batch ${i === 0 ? 1 : 8}`,
        f(p.stepMs, 2),
        f(p.meanStepMs, 2),
        f(p.runMs, 2),
        f(p.outsideRunMs, 2),
        f(p.feedsMs, 3),
        f(p.sampleMs, 3),
        f(p.sampleFullVocabMs, 3),
        f(p.betweenStepsMs, 2),
        f(p.prefillRunMs, 2),
      ]),
    ),
  );
  if (r.minimal) out.push(`minimal loop session.run: ${f(r.minimal.runMs1, 2)} ms at batch 1, ${f(r.minimal.runMs8, 2)} ms at batch 8 (same weights, no LoRA inputs)`);
  out.push('');
  const u = r.upload;
  const ph = u.phases;
  out.push(`upload (rank ${u.rank}, all projections, ${(u.fileBytes / 1e6).toFixed(1)} MB), client side: transfer ${f(u.transferMs)} ms, receive (multipart → disk) ${f(u.receiveMs)} ms, the same with the stream decode ${f(u.receiveDecodedMs)} ms, ready ${f(u.readyMs)} ms (+${f(u.clientBeyondReadMs)} beyond receive), first token ${f(u.firstTokenAfterReadyMs)} ms after ready, upload→first token ${f(u.uploadToFirstTokenMs)} ms`);
  out.push(`  server side, last byte of the body → response: POST /v1/adapters ${f(u.beyondReadMs)} ms; receive alone ${f(u.receiveAfterLastByteMs)} ms, with the stream decode ${f(u.receiveDecodedAfterLastByteMs)} ms`);
  out.push(`  parts (direct calls): in the stream: decode ${f(ph.decodeInStreamMs)} ms; after it: validate ${f(ph.validateStreamedMs)} · scale ${f(ph.scaleMs)} · engine load ${f(ph.engineLoadMs)} · store ${f(ph.storeMs)} ms`);
  out.push(`  without the stream decode (archives): read ${f(ph.readMs)} · validate ${f(ph.validateMs)} · convert ${f(ph.convertMs)} · sha256 ${f(ph.digestMs)} ms`);
  out.push(
    `  memory (fresh process): ${u.memory.adapters} adapters, RSS +${f(u.memory.perAdapterBytes / 1e6)} MB each vs ${f(u.tensorBytes / 1e6)} MB of tensors (${f(u.memory.ratioToTensorBytes, 2)}×); slope through the per-adapter RSS ${f(u.memory.slopeBytes / 1e6)} MB`,
  );
  out.push('');
  out.push(
    table(
      ['target', 'rule', 'value', 'needs', 'result'],
      r.targets.map((t) => [t.name, t.rule, f(t.value, 2), `${t.kind === 'min' ? '≥' : '≤'} ${t.threshold}`, t.met ? 'met' : 'MISSED']),
    ),
  );
  if (r.peer.available) {
    out.push(`informational (not a target): engine b8 ÷ peer b8 static batch = ${f(r.ratios.engineB8OverPeer, 2)}; api-8-base ÷ peer 8 concurrent = ${f(r.ratios.api8BaseOverPeerConcurrent, 2)}, ÷ peer b8 static batch = ${f(r.ratios.api8BaseOverPeer, 2)}`);
  }
  out.push(`(${f(r.seconds, 0)} s)`);
  return out.join('\n');
}
