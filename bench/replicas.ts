import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { loadavg, tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { peftAdapter } from './adapters.js';
import { adapterForm, postForm, streamGenerate } from './api.js';
import { ensurePreset, isPresetName, PRESET_NAMES, type PresetName } from './presets.js';
import { median, now } from './timing.js';
import { parseArgsOrReport } from './cli-args.js';

/**
 * Two replicas, one shared adapter store: `npm run bench:replicas [-- --preset tiny|llama-60m|qwen2.5-0.5b
 * | --model <dir>] [--rank 16] [--reps 3] [--json]`.
 *
 * Two real server processes (`bin/loraserve.js serve`, ADAPTER_STORE=shared on one temp folder)
 * on this machine. Per repetition, a fresh rank-r adapter on every projection of every layer:
 *   - upload: POST to replica A until its 201;
 *   - A→B first token: from the start of that upload to the first token of a stream on replica B
 *     (B has never seen the adapter: it looks it up, verifies, validates, loads, then decodes);
 *   - cold first token on B: the same stream's first token, counted from the moment A answered;
 *   - loaded first token on B: a second stream on B with the same adapter, now loaded;
 *   - base first token on B: no adapter, for reference.
 * Medians over the repetitions; both replicas share the machine's cores, so absolute numbers on a
 * loaded machine are upper bounds.
 */

interface Options {
  preset: PresetName;
  model: string | null;
  rank: number;
  reps: number;
  json: boolean;
  cache: string;
}

function parseArgs(argv: readonly string[]): Options {
  const o: Options = { preset: 'tiny', model: null, rank: 16, reps: 3, json: false, cache: './data/bench-models' };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    const v = () => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${a} needs a value`);
      return x;
    };
    if (a === '--preset') {
      const p = v();
      if (!isPresetName(p)) throw new Error(`unknown preset ${p}; presets: ${PRESET_NAMES.join(', ')}`);
      o.preset = p;
    } else if (a === '--model') o.model = v();
    else if (a === '--rank') o.rank = Number(v());
    else if (a === '--reps') o.reps = Number(v());
    else if (a === '--cache') o.cache = v();
    else if (a === '--json') o.json = true;
    else throw new Error(`unknown argument ${a}`);
  }
  return o;
}

interface Replica {
  url: string;
  child: ChildProcess;
}

async function startReplica(env: Record<string, string>, port: number): Promise<Replica> {
  const bin = fileURLToPath(new URL('../bin/loraserve.js', import.meta.url));
  const child = spawn(process.execPath, [bin, 'serve'], { env: { ...process.env, HOST: '127.0.0.1', PORT: String(port), LOG_LEVEL: 'warn', ...env }, stdio: ['ignore', 'ignore', 'inherit'] });
  const url = `http://127.0.0.1:${port}`;
  const deadline = Date.now() + 30 * 60_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`replica on ${port} exited with ${child.exitCode}`);
    if (Date.now() > deadline) throw new Error(`replica on ${port} not ready`);
    try {
      if ((await fetch(`${url}/readyz`)).status === 200) return { url, child };
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 250));
  }
}

export async function main(argv: readonly string[]): Promise<number> {
  const o = parseArgsOrReport(parseArgs, argv);
  if (!o) return 2;
  const progress = (line: string) => process.stderr.write(`[bench:replicas] ${line}\n`);
  const cache = resolve(o.cache);
  const modelPath = o.model ? resolve(o.model) : await ensurePreset(o.preset, cache, progress);
  const ck = await openCheckpoint(modelPath);
  const work = await mkdtemp(join(tmpdir(), 'loraserve-bench-replicas-'));
  const env = { MODEL_PATH: modelPath, CACHE_DIR: join(cache, 'built-serve'), ADAPTER_STORE: 'shared', ADAPTER_DIR: join(work, 'adapters'), MAX_ADAPTERS: '0', DEVICE: 'cpu' };
  const replicas: Replica[] = [];
  const loadBefore = loadavg()[0];
  try {
    progress(`model ${o.model ?? o.preset}: starting replica A (builds the graph on the first run)`);
    const A = await startReplica(env, 18180 + Math.floor(Math.random() * 1000));
    replicas.push(A);
    progress('starting replica B');
    const B = await startReplica(env, 19180 + Math.floor(Math.random() * 1000));
    replicas.push(B);
    const prompt = 'Once upon a time';
    const ttft = async (adapter: string | null) => {
      const t = await streamGenerate(B.url, { prompt, maxTokens: 2, adapter });
      return t.tokens[0]! - t.start;
    };
    await ttft(null); // warm-up
    const rows: { uploadMs: number; aToBFirstTokenMs: number; coldMs: number; loadedMs: number; baseMs: number }[] = [];
    let adapterBytes = 0;
    for (let rep = 0; rep < o.reps; rep++) {
      const files = peftAdapter(ck.architecture, { modelId: ck.modelId, rank: o.rank, seed: 1000 + rep });
      adapterBytes = files.weights.byteLength;
      const name = `bench-${rep}`;
      const t0 = now();
      const res = await postForm(`${A.url}/v1/adapters`, adapterForm(name, files.config, files.weights));
      if (res.status !== 201) throw new Error(`upload → ${res.status}: ${res.body.slice(0, 300)}`);
      const t1 = now();
      const cold = await streamGenerate(B.url, { prompt, maxTokens: 2, adapter: name }, t1);
      const firstOnB = cold.tokens[0]!;
      rows.push({ uploadMs: t1 - t0, aToBFirstTokenMs: firstOnB - t0, coldMs: firstOnB - t1, loadedMs: await ttft(name), baseMs: await ttft(null) });
      progress(`rep ${rep + 1}/${o.reps}: ${JSON.stringify(rows[rows.length - 1])}`);
    }
    const med = (k: keyof (typeof rows)[number]) => median(rows.map((r) => r[k]));
    const result = {
      model: o.model ?? o.preset,
      rank: o.rank,
      adapterBytes,
      reps: o.reps,
      loadavgBefore: loadBefore,
      medianMs: { upload: med('uploadMs'), uploadOnAToFirstTokenOnB: med('aToBFirstTokenMs'), coldFirstTokenOnB: med('coldMs'), loadedFirstTokenOnB: med('loadedMs'), baseFirstTokenOnB: med('baseMs') },
      runs: rows,
    };
    if (o.json) process.stdout.write(`${JSON.stringify(result, null, 2)}\n`);
    else {
      const m = result.medianMs;
      process.stdout.write(
        [
          `two replicas, shared store — ${result.model}, rank ${o.rank} on every projection (${(adapterBytes / 1e6).toFixed(1)} MB), median of ${o.reps}; load average before ${loadBefore.toFixed(2)}`,
          `  upload on A (POST → 201)                 ${m.upload.toFixed(1)} ms`,
          `  upload start on A → first token on B     ${m.uploadOnAToFirstTokenOnB.toFixed(1)} ms`,
          `  first token on B, cold adapter           ${m.coldFirstTokenOnB.toFixed(1)} ms`,
          `  first token on B, loaded adapter         ${m.loadedFirstTokenOnB.toFixed(1)} ms`,
          `  first token on B, base model             ${m.baseFirstTokenOnB.toFixed(1)} ms`,
          '',
        ].join('\n'),
      );
    }
    return 0;
  } finally {
    for (const r of replicas) r.child.kill('SIGKILL');
    await rm(work, { recursive: true, force: true });
  }
}

if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main(process.argv.slice(2)).then(
    (code) => (process.exitCode = code),
    (e: unknown) => {
      process.stderr.write(`${(e as Error).stack ?? String(e)}\n`);
      process.exitCode = 1;
    },
  );
}
