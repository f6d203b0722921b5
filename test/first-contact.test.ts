import { existsSync } from 'node:fs';
import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildApp } from '../src/app.js';
import { makeConfig } from '../src/config.js';
import { HAVE_STORIES, STORIES_BIN } from './helpers/model-io-files.js';

/**
 * A first start that goes wrong should go wrong at once: a llama2.c checkpoint whose tokenizer is
 * not where TOKENIZER_PATH says is refused before the ONNX graph is built (nothing lands in
 * CACHE_DIR), with the setting named.
 */
if (!HAVE_STORIES) console.warn(`[first-contact] ${STORIES_BIN} is absent: the TOKENIZER_PATH test is skipped`);

let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'loraserve-first-contact-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('first contact', () => {
  it.skipIf(!HAVE_STORIES)('a missing TOKENIZER_PATH is reported before the graph build', async () => {
    const cache = path.join(root, 'cache');
    const config = makeConfig({ MODEL_PATH: STORIES_BIN, TOKENIZER_PATH: path.join(root, 'no-such-tok.bin'), CACHE_DIR: cache, ADAPTER_DIR: path.join(root, 'adapters'), DEVICE: 'cpu', LOG_LEVEL: 'silent' });
    await expect(buildApp(config)).rejects.toThrow(/no-such-tok\.bin: cannot read the llama2\.c tokenizer.*TOKENIZER_PATH/);
    // no graph was built (or even started)
    const built = existsSync(cache) ? await readdir(cache) : [];
    expect(built).toEqual([]);
  });
});
