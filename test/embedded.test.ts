import { createHash } from 'node:crypto';
import { mkdir, readdir, readFile, rm, stat, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { openCheckpoint } from '../src/model/checkpoint/index.js';
import { EMBEDDED_MODEL_FILES, ensureEmbeddedModel, writeEmbeddedModel } from '../src/model/embedded.js';
import { loadTokenizer } from '../src/tokenizer/index.js';
import { tempDir } from './helpers/model-io-files.js';

let root: string;
beforeAll(async () => {
  root = await tempDir('embedded');
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function digests(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of EMBEDDED_MODEL_FILES) out[f] = createHash('sha256').update(await readFile(join(dir, f))).digest('hex');
  return out;
}

describe('embedded default model', () => {
  it('is byte-identical on every write and small', async () => {
    await writeEmbeddedModel(join(root, 'a'));
    await writeEmbeddedModel(join(root, 'b'));
    expect(await digests(join(root, 'a'))).toEqual(await digests(join(root, 'b')));
    let total = 0;
    for (const f of EMBEDDED_MODEL_FILES) total += (await stat(join(root, 'a', f))).size;
    expect(total).toBeLessThan(2 * 1024 * 1024);
    // no temp files left behind
    expect((await readdir(join(root, 'a'))).sort()).toEqual([...EMBEDDED_MODEL_FILES].sort());
  });

  it('opens as a GQA Llama whose vocab is the tokenizer size, with N(0, 0.05) weights and unit norms', async () => {
    const dir = join(root, 'a');
    const ck = await openCheckpoint(dir);
    expect(ck.architecture).toMatchObject({
      family: 'llama',
      hiddenSize: 64,
      intermediateSize: 172,
      numLayers: 4,
      numHeads: 8,
      numKvHeads: 4,
      headDim: 8,
      maxPositions: 512,
      ropeLayout: 'rotate_half',
      attentionBias: false,
    });
    const tok = await loadTokenizer(ck.tokenizer!, ck.architecture);
    expect(ck.architecture.vocabSize).toBe(tok.vocabSize);
    expect(ck.architecture.bosTokenId).toBe(tok.bosId);

    let n = 0;
    let sum = 0;
    let sumSq = 0;
    const firsts = new Set<number>();
    for (const name of ck.names()) {
      const t = ck.tensor(name)!;
      expect(t.dtype).toBe('F32');
      const v = t.read();
      if (name.endsWith('norm.weight')) {
        expect(v.every((x) => x === 1), name).toBe(true);
        continue;
      }
      firsts.add(v[0]!);
      for (const x of v) {
        n++;
        sum += x;
        sumSq += x * x;
      }
    }
    const mean = sum / n;
    const std = Math.sqrt(sumSq / n - mean * mean);
    expect(Math.abs(mean)).toBeLessThan(0.002);
    expect(std).toBeGreaterThan(0.049);
    expect(std).toBeLessThan(0.051);
    // every tensor draws fresh numbers (no tensor repeats another's stream)
    expect(firsts.size).toBe(ck.names().filter((x) => !x.endsWith('norm.weight')).length);
  });

  it('ensureEmbeddedModel writes once, atomically, and leaves an existing model alone', async () => {
    const dir = join(root, 'nested', 'default-model');
    const got = await ensureEmbeddedModel(dir);
    expect(got).toBe(dir);
    expect(await digests(dir)).toEqual(await digests(join(root, 'a')));
    expect((await readdir(join(root, 'nested'))).sort()).toEqual(['default-model']); // the temp folder was renamed away
    const before = (await stat(join(dir, 'model.safetensors'))).mtimeMs;
    await new Promise((r) => setTimeout(r, 20));
    await ensureEmbeddedModel(dir);
    expect((await stat(join(dir, 'model.safetensors'))).mtimeMs).toBe(before);
  });

  it('fills in a folder that exists but lacks model files, keeping what else is there', async () => {
    const dir = join(root, 'with-cache');
    await mkdir(join(dir, '.loraserve'), { recursive: true });
    await writeFile(join(dir, '.loraserve', 'keep.txt'), 'x');
    await writeFile(join(dir, 'config.json'), '{}');
    await ensureEmbeddedModel(dir);
    expect(await digests(dir)).toEqual(await digests(join(root, 'a')));
    expect(await readFile(join(dir, '.loraserve', 'keep.txt'), 'utf8')).toBe('x');
    const empty = join(root, 'empty');
    await mkdir(empty);
    await ensureEmbeddedModel(empty);
    expect(await digests(empty)).toEqual(await digests(join(root, 'a')));
  });

  it('survives two concurrent first starts', async () => {
    const dir = join(root, 'race');
    const [a, b] = await Promise.all([ensureEmbeddedModel(dir), ensureEmbeddedModel(dir)]);
    expect(a).toBe(dir);
    expect(b).toBe(dir);
    expect(await digests(dir)).toEqual(await digests(join(root, 'a')));
    expect((await readdir(root)).filter((f) => f.includes('.tmp'))).toEqual([]);
  });
});
