import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { PROBE_TEXT, probeIds } from '../src/engine/probe.js';
import { peftAdapter } from './adapters.js';
import { ensurePreset, isPresetName } from './presets.js';
import { median, now } from './timing.js';

/**
 * What the effect probe (issue 17) adds to an upload: `npx tsx bench/probe.ts [--preset NAME]
 * [--rank N] [--reps N] [--cache DIR]`. Starts the service on a preset (CPU), uploads one adapter on
 * every projection of every layer (its 201 includes the probe), then times the probe alone through
 * the engine, as the registry calls it, alternating with a greedy generation of as many tokens with
 * the same adapter (the yardstick: both see the same machine load). Prints one JSON line.
 */

async function main(argv: string[]): Promise<void> {
  const opt = (name: string, fallback: string) => {
    const i = argv.indexOf(`--${name}`);
    return i >= 0 && argv[i + 1] ? argv[i + 1]! : fallback;
  };
  const preset = opt('preset', 'qwen2.5-0.5b');
  if (!isPresetName(preset)) throw new Error(`unknown preset ${preset}`);
  const rank = Number(opt('rank', '16'));
  const reps = Number(opt('reps', '3'));
  const cache = resolve(opt('cache', './data/bench-models'));
  const model = await ensurePreset(preset, cache, (l) => process.stderr.write(`${l}\n`));
  const adapters = await mkdtemp(join(tmpdir(), 'loraserve-probe-bench-'));
  const app = await buildApp(makeConfig({ MODEL_PATH: model, ADAPTER_DIR: adapters, CACHE_DIR: join(cache, 'graphs'), DEVICE: 'cpu', LOG_LEVEL: 'silent', MAX_LORA_RANK: Math.max(64, rank) }));
  try {
    const { manifest, tokenizer, engine, registry } = app.runtime;
    const ids = probeIds(tokenizer.encode(PROBE_TEXT), manifest, engine.limits.contextLength);
    const files = peftAdapter(manifest.architecture, { modelId: manifest.modelId, rank, seed: 1 });
    const fd = new FormData();
    fd.append('name', 'probe');
    fd.append('config', new Blob([files.config]), 'adapter_config.json');
    fd.append('weights', new Blob([files.weights]), 'adapter_model.safetensors');
    const t0 = now();
    const res = await app.inject({ method: 'POST', url: '/v1/adapters', payload: fd });
    const uploadMs = now() - t0;
    if (res.statusCode !== 201) throw new Error(`upload: ${res.statusCode} ${res.body.slice(0, 400)}`);
    const versionId = registry.resolveForGeneration('probe');
    const probeMs: number[] = [];
    // the yardstick, timed between the probes so that both see the same machine load: generating as
    // many tokens as the probe compares, with the same adapter, after the same prompt
    const generateMs: number[] = [];
    for (let i = 0; i < reps; i++) {
      const t = now();
      const g = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROBE_TEXT, adapter: 'probe', max_tokens: ids.length, temperature: 0 } });
      if (g.statusCode !== 200) throw new Error(`generate: ${g.statusCode} ${g.body.slice(0, 400)}`);
      generateMs.push(now() - t);
      const p = now();
      await engine.probeAdapter(versionId, ids);
      probeMs.push(now() - p);
    }
    const effect = (res.json() as { effect: unknown }).effect;
    const round = (xs: number[]) => xs.map(Math.round);
    process.stdout.write(`${JSON.stringify({ preset, rank, probeTokens: ids.length, uploadMs: Math.round(uploadMs), probeMs: Math.round(median(probeMs)), probeRunsMs: round(probeMs), generateMs: Math.round(median(generateMs)), generateRunsMs: round(generateMs), effect })}\n`);
  } finally {
    await app.close();
    await rm(adapters, { recursive: true, force: true });
  }
}

await main(process.argv.slice(2));
