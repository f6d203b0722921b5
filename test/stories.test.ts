import { mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { encodeSafetensors } from '../src/adapters/safetensors.js';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { PROJECTIONS, projectionDims } from '../src/model/architecture.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { referenceForward } from './reference/forward.js';
import { MemoryCheckpoint, type MemoryTensor } from './helpers/random-checkpoint.js';
import { mergeAdapter, maxAbsDiff, type Adapter } from './helpers/lora-feeds.js';
import { makePeftTensors, peftConfig } from './helpers/adapter-fixtures.js';
import { form } from './helpers/adapter-uploads.js';
import { HAVE_STORIES, STORIES_BIN, TOK512_BIN, warnIfMissing } from './helpers/model-io-files.js';
import { startServer, type ServerProcess } from './helpers/serve-process.js';

/**
 * karpathy's stories260K, a real trained Llama in llama2.c format (../shared/fixtures): the
 * service must reproduce llama2.c's documented greedy output, and an adapter uploaded over HTTP
 * must give exactly the logits of the merged model W + s·B·A, computed by the independent
 * reference forward pass.
 */
warnIfMissing(HAVE_STORIES, 'stories260K tests');

const LILY = 'Once upon a time, there was a little girl named Lily. She loved to play outside in the park.';

describe.skipIf(!HAVE_STORIES)('stories260K through `npm start` (the real CLI, a real listening server)', () => {
  let tmp: string;
  let server: ServerProcess;
  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-stories-'));
    server = await startServer({ MODEL_PATH: STORIES_BIN, TOKENIZER_PATH: TOK512_BIN, CACHE_DIR: path.join(tmp, 'cache'), ADAPTER_DIR: path.join(tmp, 'adapters'), DEVICE: 'cpu' });
  });
  afterAll(async () => {
    await server?.stop();
    await rm(tmp, { recursive: true, force: true });
  });

  it("greedy from an empty prompt gives llama2.c's documented story", async () => {
    const res = await fetch(`${server.url}/v1/generate`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ prompt: '', max_tokens: 64, temperature: 0 }),
    });
    expect(res.status).toBe(200);
    const body = (await res.json()) as { text: string; finish_reason: string; usage: { completion_tokens: number } };
    expect(body.text.startsWith(LILY), body.text).toBe(true);
    expect(body.usage.completion_tokens).toBe(64);
    expect(body.finish_reason).toBe('length');
  });
});

interface Served {
  tokens: number[];
  logprobs: { id: number; logprob: number; top_logprobs: { token: number; logprob: number }[] }[];
  text: string;
}

describe.skipIf(!HAVE_STORIES)('an adapter on stories260K: served logits equal the merged model', () => {
  let tmp: string;
  let app: FastifyInstance;
  const logLines: Record<string, unknown>[] = [];
  beforeAll(async () => {
    tmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-stories-lora-'));
    // the log says where the served weights came from: the upload's stream decode or the file
    const logger = pino({ level: 'info' }, { write: (line: string) => void logLines.push(JSON.parse(line) as Record<string, unknown>) });
    app = await buildApp(
      makeConfig({ MODEL_PATH: STORIES_BIN, TOKENIZER_PATH: TOK512_BIN, CACHE_DIR: path.join(tmp, 'cache'), ADAPTER_DIR: path.join(tmp, 'adapters'), DEVICE: 'cpu', LOG_LEVEL: 'info' }),
      { logger },
    );
  });
  afterAll(async () => {
    await app?.close();
    await rm(tmp, { recursive: true, force: true });
  });

  const PROMPT = 'Once upon a time, there was a big dog';
  const generate = async (adapter: string | null): Promise<Served> => {
    const res = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROMPT, adapter, max_tokens: 12, temperature: 0, logprobs: 20 } });
    expect(res.statusCode, res.body).toBe(200);
    return res.json() as Served;
  };

  it('changes the output, matches W + s·B·A within 1e-4, and removing it restores the base exactly', async () => {
    const arch = app.runtime.manifest.architecture;
    const r = 4;
    const alpha = 12;
    const scale = alpha / r;
    // values like a trained adapter's: a change of the same order as the base weights, not far beyond them
    const peft = makePeftTensors(arch, { r, targets: [...PROJECTIONS], seed: 7, scale: 0.1 });
    const config = peftConfig({ base_model_name_or_path: 'stories260K', r, lora_alpha: alpha, target_modules: [...PROJECTIONS] });

    const base = await generate(null);
    const up = await app.inject({
      method: 'POST',
      url: '/v1/adapters',
      payload: form([
        ['name', 'tale'],
        ['config', Buffer.from(JSON.stringify(config)), 'adapter_config.json'],
        ['weights', encodeSafetensors(peft.map((t) => ({ name: t.name, dtype: 'F32' as const, shape: t.shape, data: t.data }))), 'adapter_model.safetensors'],
      ]),
    });
    expect(up.statusCode, up.body).toBe(201);
    // the weights checked below are the ones decoded while the upload streamed in (ingest.ts)
    expect(logLines.find((l) => l.msg === 'adapter stored and loaded' && l.adapter === 'tale')?.weightsFrom).toBe('stream');

    const tuned = await generate('tale');
    expect(tuned.tokens).not.toEqual(base.tokens);

    // the independent reference: merge the PEFT tensors into the checkpoint and run the plain forward pass
    const ck = await openCheckpoint(STORIES_BIN, TOK512_BIN);
    const tensors = new Map<string, MemoryTensor>();
    for (const name of ck.names()) {
      const t = ck.tensor(name)!;
      tensors.set(name, { shape: [...t.shape], data: t.read() });
    }
    const mem = new MemoryCheckpoint(arch, tensors, 'stories260K');
    const adapter: Adapter = new Map(
      loraTargetsFor(arch).map((t) => {
        const a = peft.find((p) => p.name === `base_model.model.${t.name}.lora_A.weight`)!;
        const b = peft.find((p) => p.name === `base_model.model.${t.name}.lora_B.weight`)!;
        expect(a.shape).toEqual([r, projectionDims(arch, t.module).inFeatures]);
        return [t.name, { rank: r, A: a.data, B: b.data, scale }];
      }),
    );
    const merged = mergeAdapter(mem, loraTargetsFor(arch), adapter);
    const promptIds = app.runtime.tokenizer.encode(PROMPT);
    const logits = referenceForward(merged, [...promptIds, ...tuned.tokens]);
    let worst = 0;
    tuned.tokens.forEach((tok, k) => {
      const row = logits[promptIds.length - 1 + k]!;
      const max = Math.max(...row);
      const lse = max + Math.log(row.reduce((s, v) => s + Math.exp(v - max), 0));
      const ref = (id: number) => row[id]! - lse;
      // greedy: the served token is the reference's argmax
      expect(row.indexOf(max)).toBe(tok);
      const served = tuned.logprobs[k]!;
      expect(served.top_logprobs.length).toBe(20);
      worst = Math.max(worst, maxAbsDiff([served.logprob, ...served.top_logprobs.map((t) => t.logprob)], [ref(tok), ...served.top_logprobs.map((t) => ref(t.token))]));
    });
    console.info(`stories260K + rank-${r} adapter: max |served - merged reference| over ${tuned.tokens.length} steps × 21 logprobs = ${worst.toExponential(2)}`);
    expect(worst).toBeLessThan(1e-4);

    const del = await app.inject({ method: 'DELETE', url: '/v1/adapters/tale' });
    expect(del.statusCode).toBe(204);
    const gone = await app.inject({ method: 'POST', url: '/v1/generate', payload: { prompt: PROMPT, adapter: 'tale', max_tokens: 2 } });
    expect(gone.statusCode).toBe(404);
    const after = await generate(null);
    expect(after.tokens).toEqual(base.tokens);
    expect(after.logprobs).toEqual(base.logprobs);
  });
});
