import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { availableParallelism, cpus, loadavg, tmpdir, totalmem } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { buildModel, type BuildResult } from '../src/model/build.js';
import { loadTokenizer } from '../src/tokenizer/index.js';
import { ensurePreset, fileBytes, isPresetName, parameterCount, PRESET_NAMES, streamedWeightBytes, type PresetName } from './presets.js';
import { measureLimit } from './limit.js';
import { openCore, runCore, runEngine, runMinimal, type GenSpec } from './raw.js';
import { measureContextScaling } from './context.js';
import { placementLine, resolvePlacement } from '../src/model/placement.js';
import { ConfigSchema } from '../src/config.js';
import { adapterForm, concurrentStreams, postForm, startServer, streamGenerate } from './api.js';
import { peftAdapter } from './adapters.js';
import { measureUploads, type UploadResult } from './upload.js';
import { peerFolder, runPeer } from './peer.js';
import { formatReport, target, type BenchReport } from './report.js';
import { now, throughput } from './timing.js';
import { alternate, fastest, type PairedRatio } from './paired.js';
import { parseArgsOrReport } from './cli-args.js';
import { llamaCppRatios, measureLlamaCpp } from './llama-cpp.js';
import { measureQuantized } from './quantized.js';
import { kernelCeilingRatios, measureKernelCeiling } from './kernels.js';

/**
 * `npm run bench [-- --preset tiny|llama-60m|qwen2.5-0.5b|llama-3.2-1b | --model <dir>] [--quick] [--json]
 *   [--tokens N] [--adapters N] [--rank N] [--reps N] [--cache <dir>]`
 * Prints a table and then the JSON report (with --json: the JSON only). Progress goes to stderr.
 * Sections run in this order, one session at a time so the 0.5B preset fits, except where api-1
 * takes turns with the raw loop (two sessions of the model: +1 copy of the weights for that
 * section): upload (a child process), limit, raw, minimal, the server (engine, api), peer,
 * llama.cpp (node-llama-cpp on GGUF files of the same weights, then ours with int8/int4 weights
 * for its comparisons).
 */

interface Options {
  preset: PresetName | null;
  model: string | null;
  quick: boolean;
  json: boolean;
  tokens: number | null;
  adapters: number;
  rank: number;
  /** each throughput is measured this many times and the best kept (noise on a shared machine only slows) */
  reps: number | null;
  cache: string;
  /** internal: run only the upload/memory section and print its JSON (a fresh process, see runUploadProbe) */
  probeUpload: boolean;
}

const USAGE = `usage: loraserve-bench [--preset ${PRESET_NAMES.join('|')} | --model <model dir>] [--quick] [--json] [--tokens N] [--adapters N] [--rank N] [--reps N] [--cache <dir>]`;

function parseArgs(argv: readonly string[]): Options {
  const o: Options = { preset: null, model: null, quick: false, json: false, tokens: null, adapters: 8, rank: 16, reps: null, cache: './data/bench-models', probeUpload: false };
  const value = (i: number, flag: string) => {
    const v = argv[i + 1];
    if (v === undefined || v.startsWith('--')) throw new Error(`${flag} needs a value\n${USAGE}`);
    return v;
  };
  const int = (s: string, flag: string) => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 1) throw new Error(`${flag} must be a positive integer, got ${s}`);
    return n;
  };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    switch (a) {
      case '--quick':
        o.quick = true;
        break;
      case '--json':
        o.json = true;
        break;
      case '--preset': {
        const v = value(i++, a);
        if (!isPresetName(v)) throw new Error(`unknown preset ${v}; presets: ${PRESET_NAMES.join(', ')}`);
        o.preset = v;
        break;
      }
      case '--model':
        o.model = value(i++, a);
        break;
      case '--tokens':
        o.tokens = int(value(i++, a), a);
        break;
      case '--adapters':
        o.adapters = int(value(i++, a), a);
        break;
      case '--rank':
        o.rank = int(value(i++, a), a);
        break;
      case '--reps':
        o.reps = int(value(i++, a), a);
        break;
      case '--cache':
        o.cache = value(i++, a);
        break;
      case '--probe-upload':
        o.probeUpload = true;
        break;
      case '--help':
      case '-h':
        throw new Error(USAGE);
      default:
        throw new Error(`unknown argument ${a}\n${USAGE}`);
    }
  }
  if (o.preset && o.model) throw new Error('give --preset or --model, not both');
  if (o.quick) o.adapters = Math.min(o.adapters, 2);
  return o;
}

/** the best of `reps` runs by decode tokens/s */
async function best<T>(reps: number, f: () => Promise<T>, rate: (t: T) => number): Promise<T> {
  let top = await f();
  for (let i = 1; i < reps; i++) {
    const next = await f();
    if (rate(next) > rate(top) || !Number.isFinite(rate(top))) top = next;
  }
  return top;
}

const PROMPT = 'Once upon a time, there was a little girl named Lily. She liked to play in the park with her dog.';

async function packageVersion(name: string): Promise<string | null> {
  try {
    const text = await readFile(new URL(`../node_modules/${name}/package.json`, import.meta.url), 'utf8');
    return (JSON.parse(text) as { version?: string }).version ?? null;
  } catch {
    return null;
  }
}

/**
 * The upload section in a fresh process: the RSS added per adapter is only visible when the
 * allocator holds no memory freed by earlier sections (a process that has opened and released a
 * 2 GB session keeps freed pages that new adapters would silently reuse).
 */
async function runUploadProbe(o: Options, modelPath: string, cache: string, progress: (l: string) => void): Promise<UploadResult> {
  const args = ['--expose-gc', fileURLToPath(new URL('../bin/loraserve-bench.js', import.meta.url)), '--probe-upload', '--model', modelPath, '--cache', cache, '--adapters', String(o.adapters), '--rank', String(o.rank)];
  if (o.quick) args.push('--quick');
  progress(`upload: rank ${o.rank}, all projections, ${o.adapters} adapters, in a fresh process`);
  const child = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'inherit'] });
  let out = '';
  child.stdout.setEncoding('utf8');
  child.stdout.on('data', (c: string) => (out += c));
  const code = await new Promise<number | null>((res) => child.on('close', res));
  if (code !== 0) throw new Error(`the upload probe exited with code ${code}`);
  return JSON.parse(out) as UploadResult;
}

async function uploadProbe(o: Options, modelPath: string, cache: string, progress: (l: string) => void): Promise<number> {
  const ck = await openCheckpoint(modelPath);
  const adapterDir = await mkdtemp(join(tmpdir(), 'loraserve-bench-upload-'));
  try {
    const server = await startServer({ modelPath, cacheDir: join(cache, 'built'), adapterDir, maxBatch: 8 });
    try {
      // enough adapters that their bytes (≥ 150 MB) stand well above the RSS noise of a few MB
      const one = peftAdapter(ck.architecture, { modelId: ck.modelId, rank: o.rank, seed: 1000 });
      const count = o.quick ? o.adapters : Math.min(48, Math.max(o.adapters, Math.ceil(150e6 / one.tensorBytes)));
      const adapters = Array.from({ length: count }, (_, i) => ({ name: `bench-${i}`, files: i === 0 ? one : peftAdapter(ck.architecture, { modelId: ck.modelId, rank: o.rank, seed: 1000 + i }) }));
      const warm = peftAdapter(ck.architecture, { modelId: ck.modelId, rank: o.rank, seed: 999 });
      const result = await measureUploads(server, adapters, { prompt: PROMPT, warm, rank: o.rank, receiveRuns: o.quick ? 1 : 3, progress });
      process.stdout.write(`${JSON.stringify(result)}\n`);
    } finally {
      await server.close();
    }
  } finally {
    await rm(adapterDir, { recursive: true, force: true });
  }
  return 0;
}

export async function main(argv: readonly string[]): Promise<number> {
  const o = parseArgsOrReport(parseArgs, argv);
  if (!o) return 2;
  const t0 = now();
  const loadBefore = loadavg()[0];
  const progress = (line: string) => process.stderr.write(`[bench] ${line}\n`);
  if (typeof (globalThis as { gc?: unknown }).gc !== 'function') progress('warning: no global gc (run through bin/loraserve-bench.js): memory numbers include garbage');
  const cache = resolve(o.cache);
  const presetName: PresetName = o.preset ?? 'tiny';
  const modelPath = o.model ? resolve(o.model) : await ensurePreset(presetName, cache, progress);
  if (o.probeUpload) return uploadProbe(o, modelPath, cache, progress);
  const modelName = o.model ? modelPath : presetName;
  const buildDir = join(cache, 'built');

  // ── model, graphs, tokenizer ──────────────────────────────────────────────────────────────
  const ck = await openCheckpoint(modelPath);
  const a = ck.architecture;
  const big = streamedWeightBytes(a) > 1e9;
  const maxTokens = o.tokens ?? (o.quick ? 24 : big ? 32 : 64);
  const reps = o.reps ?? (o.quick ? 1 : big ? 2 : 3);
  const tp = (t: { decodeTokPerS: number }) => t.decodeTokPerS;
  const coreTp = (t: { throughput: { decodeTokPerS: number } }) => t.throughput.decodeTokPerS;
  // DEVICE / DTYPE from the environment, as the service reads them (default cpu: a bench run on a GPU host asks for it)
  const placement = await resolvePlacement({ device: ConfigSchema.shape.DEVICE.parse(process.env.DEVICE ?? 'cpu'), dtype: ConfigSchema.shape.DTYPE.parse(process.env.DTYPE ?? 'auto') });
  progress(placementLine(placement));
  progress(`model ${modelName}: building graphs (cached after the first run)`);
  // KV as the service reads it: every graph of the run, raw loop and servers, is built with it
  const kv = ConfigSchema.shape.KV.parse(process.env.KV);
  const built = await buildModel(ck, { outDir: buildDir, dtype: placement.dtype, logits: 'last', kv, provider: placement.provider, onProgress: progress });
  let peerBuilt: BuildResult | null = null;
  let peerMissing: string | null = null;
  try {
    peerBuilt = await buildModel(ck, { outDir: buildDir, dtype: 'fp32', logits: 'last', lora: false, peer: true, onProgress: progress });
  } catch (e) {
    peerMissing = `buildModel({ lora: false, peer: true }) failed: ${(e as Error).message}`;
  }
  if (!ck.tokenizer) throw new Error(`${modelPath} has no tokenizer.json`);
  const tokenizer = await loadTokenizer(ck.tokenizer, a);
  const promptIds = tokenizer.encode(PROMPT);
  const spec: GenSpec = { promptIds, maxTokens, vocabLimit: tokenizer.vocabSize, eosIds: tokenizer.eosIds };
  const weightBytes = streamedWeightBytes(a);

  // ── upload and memory per adapter (first, in a fresh process) ─────────────────────────────
  const upload = await runUploadProbe(o, modelPath, cache, progress);

  // ── limit ─────────────────────────────────────────────────────────────────────────────────
  const limit = await measureLimit(cache, weightBytes, { runs: o.quick ? 5 : 15, progress });
  progress(`limit: ${limit.bandwidthGBs.toFixed(1)} GB/s → ${limit.limitTokPerS.toFixed(1)} tokens/s`);

  // ── raw: the worker's loop on this thread ─────────────────────────────────────────────────
  progress('raw: EngineCore loop, batch 1 and 8');
  const provider = placement.provider;
  const core = await openCore(built.dir, built.manifest, provider);
  let raw1;
  let raw8;
  let agreementTokens: number[];
  let context;
  try {
    await runCore(core.session, built.manifest, { ...spec, maxTokens: 2 }, 1, provider);
    raw1 = await best(reps, () => runCore(core.session, built.manifest, spec, 1, provider), coreTp);
    raw8 = await best(reps, () => runCore(core.session, built.manifest, spec, 8, provider), coreTp);
    // greedy over the whole vocabulary without EOS, as the peer decodes
    const agreeSpec = { ...spec, maxTokens: Math.min(16, maxTokens), vocabLimit: a.vocabSize, eosIds: [] };
    agreementTokens = (await runCore(core.session, built.manifest, agreeSpec, 1, provider)).tokens;
    progress('context: decode step time at context 128 vs 2048, batch 8');
    context = await measureContextScaling(core.session, built.manifest, provider, 8, [128, 2048], o.quick ? 4 : 12);
  } finally {
    await core.close();
  }

  let minimal: BenchReport['minimal'] = null;
  if (peerBuilt) {
    progress('minimal: hand-written loop over the peer graph, batch 1 and 8');
    const pb = peerBuilt;
    await runMinimal(pb.dir, pb.manifest, { ...spec, maxTokens: 2 }, 1);
    const m1 = await best(reps, () => runMinimal(pb.dir, pb.manifest, spec, 1), coreTp);
    const m8 = await best(reps, () => runMinimal(pb.dir, pb.manifest, spec, 8), coreTp);
    minimal = { what: 'hand-written decode loop over the peer export (no LoRA inputs), prefill as one batch', b1: m1.throughput, b8: m8.throughput, runMs1: m1.runMs, runMs8: m8.runMs };
  }

  // ── the service: engine without HTTP, then over HTTP ───────────────────────────────────────
  const adapterDir = await mkdtemp(join(tmpdir(), 'loraserve-bench-adapters-'));
  let engine1;
  let engine8;
  let api: BenchReport['api'];
  let apiOverRaw: PairedRatio;
  let mixedOverSame: PairedRatio;
  // the ratios with targets, measured in alternating pairs (paired.ts)
  const pairs = o.reps ?? (o.quick ? 3 : big ? 4 : 5);
  try {
    progress('server: starting on 127.0.0.1');
    const server = await startServer({ modelPath, cacheDir: buildDir, adapterDir, maxBatch: 8, device: provider, dtype: placement.dtype, kv });
    try {
      const runtime = server.app.runtime;
      await runEngine(runtime.engine, { ...spec, maxTokens: 2 }, 1);
      progress('engine: Engine.generate, batch 1 and 8');
      engine1 = await best(reps, () => runEngine(runtime.engine, spec, 1), tp);
      engine8 = await best(reps, () => runEngine(runtime.engine, spec, 8), tp);

      // api-1 against the raw loop in alternating turns, the loop on a second session of the same model
      progress(`api: 1 stream, paired with the raw loop in ${pairs} alternating turns`);
      await streamGenerate(server.base, { prompt: PROMPT, maxTokens: 2, adapter: null });
      const pairedCore = await openCore(built.dir, built.manifest, provider);
      try {
        await runCore(pairedCore.session, built.manifest, { ...spec, maxTokens: 2 }, 1, provider, false);
        apiOverRaw = await alternate(
          'api-1 ÷ raw b1 (the core loop on a second session in this process)',
          pairs,
          async () => (await runCore(pairedCore.session, built.manifest, spec, 1, provider, false)).throughput,
          async () => throughput([await streamGenerate(server.base, { prompt: PROMPT, maxTokens, adapter: null })]),
        );
      } finally {
        await pairedCore.close();
      }
      const api1 = fastest(apiOverRaw.b);
      progress('api: 8 streams on the base model');
      const base8 = await best(reps, () => concurrentStreams(server.base, PROMPT, maxTokens, Array.from({ length: 8 }, () => null)), tp);

      const names = Array.from({ length: 8 }, (_, i) => `bench-${i}`);
      for (const [i, name] of names.entries()) {
        const files = peftAdapter(a, { modelId: ck.modelId, rank: o.rank, seed: 1000 + i });
        const r = await postForm(`${server.base}/v1/adapters`, adapterForm(name, files.config, files.weights));
        if (r.status !== 201) throw new Error(`upload of ${name} → ${r.status}: ${r.body.slice(0, 300)}`);
      }
      progress(`api: 8 streams on one adapter and on 8 different adapters, in ${pairs} alternating turns`);
      await concurrentStreams(server.base, PROMPT, 2, names);
      await concurrentStreams(server.base, PROMPT, 2, Array.from({ length: 8 }, () => names[0]));
      mixedOverSame = await alternate(
        'api-8-mixed ÷ api-8-same',
        pairs,
        () => concurrentStreams(server.base, PROMPT, maxTokens, Array.from({ length: 8 }, () => names[0])),
        () => concurrentStreams(server.base, PROMPT, maxTokens, names),
      );
      const same8 = fastest(mixedOverSame.a);
      const mixed8 = fastest(mixedOverSame.b);
      api = { api1, same8, mixed8, base8 };
    } finally {
      await server.close();
    }
  } finally {
    await rm(adapterDir, { recursive: true, force: true });
  }

  // ── peer ──────────────────────────────────────────────────────────────────────────────────
  let peer: BenchReport['peer'];
  if (!peerBuilt) peer = { available: false, missing: peerMissing ?? 'no peer build' };
  else {
    progress('peer: @huggingface/transformers generate, batch 1, static batch 8, 8 concurrent batch-1 calls');
    try {
      await stat(join(modelPath, 'config.json'));
      const folder = await peerFolder(cache, modelPath, peerBuilt);
      const runs = await runPeer(folder, promptIds, maxTokens, { batches: [1, 8], concurrent: 8 }, reps);
      const [p1, p8] = runs.static;
      const c8 = runs.concurrent;
      if (!p1 || !p8 || !c8) throw new Error('runPeer returned fewer results than asked for');
      const first = p1.tokens[0] ?? [];
      const compared = Math.min(agreementTokens.length, first.length);
      let equal = 0;
      while (equal < compared && agreementTokens[equal] === first[equal]) equal++;
      // the concurrent calls decode the same prompt at batch 1 as p1 did: any difference means they disturbed each other
      const same = (t: readonly number[]) => t.length === first.length && t.every((x, i) => x === first[i]);
      peer = {
        available: true,
        what: 'transformers.js AutoModelForCausalLM.generate on the peer export. b1: one call, batch 1. b8: ONE call with a static batch of 8 identical prompts (the upper bound: all 8 must arrive together with the same length). c8: 8 separate batch-1 calls started together on the one model (what a Node service on transformers.js does with 8 concurrent requests)',
        b1: p1.throughput,
        b8: p8.throughput,
        c8: c8.throughput,
        agreement: { compared, equal },
        concurrentAgreement: { streams: c8.tokens.length, equalToB1: c8.tokens.filter(same).length },
      };
    } catch (e) {
      peer = { available: false, missing: `transformers.js could not run the peer export: ${(e as Error).message}` };
    }
  }

  // ── llama.cpp: node-llama-cpp on GGUF of the same weights; ours with int8/int4 weights ─────
  let llamaCpp: BenchReport['llamaCpp'];
  let quantized: BenchReport['quantized'] = null;
  if (provider !== 'cpu') llamaCpp = { available: false, missing: `the model ran on ${provider}; the llama.cpp comparison is CPU against CPU` };
  else if (ck.tokenizer?.kind !== 'hf') llamaCpp = { available: false, missing: 'the GGUF writer needs the model\'s tokenizer.json' };
  else {
    llamaCpp = await measureLlamaCpp(ck, { tokenizerJson: ck.tokenizer.tokenizerJson, cacheDir: cache, spec: { promptIds, maxTokens, threads: availableParallelism() }, reps, agreementTokens, progress });
    if (llamaCpp.available) quantized = await measureQuantized(ck, { modelPath, buildDir, kv, spec, prompt: PROMPT, rank: o.rank, reps, progress });
    else progress(`llama.cpp: not measured — ${llamaCpp.missing}`);
  }
  // what onnxruntime's quantized kernels alone allow, beside what we serve and what llama.cpp does
  const kernels = provider === 'cpu' ? await measureKernelCeiling(a, { bits: [4, 8], rows: [1, 8], runs: o.quick ? 5 : 15, progress }) : null;

  // ── ratios and targets ────────────────────────────────────────────────────────────────────
  const d = (t: { decodeTokPerS: number }) => t.decodeTokPerS;
  const ratios: Record<string, number> = {
    rawB1OverLimit: d(raw1.throughput) / limit.limitTokPerS,
    rawB8OverB1: d(raw8.throughput) / d(raw1.throughput),
    engineB1OverRaw: d(engine1) / d(raw1.throughput),
    engineB8OverRawB8: d(engine8) / d(raw8.throughput),
    // the medians of the alternating pairs; the unpaired quotients (best run of each section, measured minutes apart) for comparison
    api1OverRaw: apiOverRaw.median,
    api1OverRawUnpaired: d(api.api1) / d(raw1.throughput),
    api1OverEngine: d(api.api1) / d(engine1),
    base8OverApi1: d(api.base8) / d(api.api1),
    same8OverApi1: d(api.same8) / d(api.api1),
    mixed8OverApi1: d(api.mixed8) / d(api.api1),
    mixedOverSame: mixedOverSame.median,
    mixedOverSameOfFastest: d(api.mixed8) / d(api.same8),
    sameOverBase8: d(api.same8) / d(api.base8),
  };
  if (minimal) {
    ratios.rawB1OverMinimal = d(raw1.throughput) / d(minimal.b1);
    ratios.rawB8OverMinimal = d(raw8.throughput) / d(minimal.b8);
  }
  if (peer.available) {
    ratios.engineB1OverPeer = d(engine1) / d(peer.b1);
    ratios.api1OverPeer = d(api.api1) / d(peer.b1);
    // the target compares 8 concurrent requests on both sides: ours batches them, the peer runs 8 generate calls
    ratios.engineB8OverPeerConcurrent = d(engine8) / d(peer.c8);
    ratios.api8BaseOverPeerConcurrent = d(api.base8) / d(peer.c8);
    // informational: against the peer's static batch of 8 (its upper bound, not the target)
    ratios.engineB8OverPeer = d(engine8) / d(peer.b8);
    ratios.api8BaseOverPeer = d(api.base8) / d(peer.b8);
    ratios.peerC8OverB1 = d(peer.c8) / d(peer.b1);
  }
  // ours over llama.cpp's (fp32 against F32 only when the model ran in fp32)
  const oursQuantized = { int8B1: quantized?.int8B1 ?? null, int4B1: quantized?.int4B1 ?? null, int4Mixed8: quantized?.int4Mixed8 ?? null };
  Object.assign(ratios, llamaCppRatios(llamaCpp, { fp32B1: placement.dtype === 'fp32' ? raw1.throughput : null, ...oursQuantized }));
  if (kernels) Object.assign(ratios, kernelCeilingRatios(kernels, oursQuantized, llamaCpp));
  const targets = [
    target('raw decode vs bandwidth', 'raw b1 tok/s ÷ limit tok/s', ratios.rawB1OverLimit, 0.7, 'min'),
    target('HTTP overhead', 'api-1 ÷ raw b1', ratios.api1OverRaw, 0.95, 'min'),
    target('mixed adapters', 'api-8-mixed ÷ api-8-same', ratios.mixedOverSame, 0.9, 'min'),
    target('batching', 'api-8-same aggregate ÷ api-1', ratios.same8OverApi1, 3, 'min'),
    target('peer batch 1', 'engine b1 ÷ peer b1', ratios.engineB1OverPeer ?? Number.NaN, 1, 'min'),
    target('peer 8 concurrent requests', 'engine b8 ÷ peer 8 concurrent', ratios.engineB8OverPeerConcurrent ?? Number.NaN, 2, 'min'),
    target('upload to ready', 'server: ms from the upload\'s last byte to its 201', upload.beyondReadMs, 50, 'max'),
    target('memory per adapter', 'RSS per adapter ÷ tensor bytes', upload.memory.ratioToTensorBytes, 1.2, 'max'),
  ];
  targets.push(
    target('llama.cpp int4 batch 1', 'int4 raw b1 ÷ llama.cpp Q4_0 b1', ratios.int4B1OverLlamaCppQ4_0 ?? Number.NaN, 1.3, 'min'),
    target('llama.cpp int8 batch 1', 'int8 raw b1 ÷ llama.cpp Q8_0 b1', ratios.int8B1OverLlamaCppQ8_0 ?? Number.NaN, 1.3, 'min'),
    target('llama.cpp 8 streams', 'int4 api-8-mixed ÷ llama.cpp Q4_0 8 sequences', ratios.int4Mixed8OverLlamaCppQ4_0Seq8 ?? Number.NaN, 2, 'min'),
  );

  const report: BenchReport = {
    machine: {
      cpus: availableParallelism(),
      cpuModel: cpus()[0]?.model ?? 'unknown',
      memoryGB: totalmem() / 2 ** 30,
      node: process.versions.node,
      onnxruntime: (await packageVersion('onnxruntime-node')) ?? 'unknown',
      transformersJs: await packageVersion('@huggingface/transformers'),
      loadAverage: { before: loadBefore, after: loadavg()[0] },
      reps,
    },
    model: {
      name: modelName,
      path: modelPath,
      parameters: parameterCount(a),
      streamedWeightBytes: weightBytes,
      fileBytes: await fileBytes(join(built.dir, built.manifest.files.weights)),
      dims: `${a.family} hidden ${a.hiddenSize}, ${a.numLayers} layers, ${a.numHeads}/${a.numKvHeads} heads, ffn ${a.intermediateSize}, vocab ${a.vocabSize}`,
      promptTokens: promptIds.length,
      maxTokens,
    },
    limit,
    raw: { what: 'EngineCore (the worker loop: scheduler, FeedBuilder, KV, sampler) on the main thread over createSession; no worker, no HTTP', b1: raw1.throughput, b8: raw8.throughput, profile1: raw1.profile, profile8: raw8.profile },
    engine: { what: 'Engine.generate (worker thread), no HTTP, no detokenizer', b1: engine1, b8: engine8 },
    placement: { provider, dtype: placement.dtype, reason: placement.reason },
    context,
    minimal,
    api,
    paired: { api1OverRaw: apiOverRaw, mixedOverSame },
    upload,
    peer,
    llamaCpp,
    quantized,
    kernels,
    ratios,
    targets,
    seconds: (now() - t0) / 1000,
  };
  const json = JSON.stringify(report, null, 2);
  if (o.json) process.stdout.write(`${json}\n`);
  else process.stdout.write(`${formatReport(report)}\n\n${json}\n`);
  return 0;
}
