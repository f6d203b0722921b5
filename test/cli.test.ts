import { execFile } from 'node:child_process';
import { copyFile, mkdir, mkdtemp, readFile, readdir, rm, stat, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { BIN } from './helpers/serve-process.js';
import { HAVE_STORIES, STORIES_BIN, TOK512_BIN } from './helpers/model-io-files.js';

/**
 * The command line as users run it (`node bin/loraserve.js …`, what `npx loraserve` runs): bad
 * model input stops `serve` at start with one clear line naming the file and the problem.
 */
const run = async (args: string[], env: Record<string, string> = {}) => {
  try {
    const { stdout, stderr } = await promisify(execFile)(process.execPath, [BIN, ...args], { env: { ...process.env, LOG_LEVEL: 'error', ...env }, timeout: 120_000 });
    return { code: 0, stdout, stderr };
  } catch (e) {
    const err = e as { code: number; stdout: string; stderr: string };
    return { code: err.code, stdout: err.stdout, stderr: err.stderr };
  }
};

let root: string;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'loraserve-cli-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('loraserve CLI', () => {
  it('no command or an unknown one is a usage error (exit 2)', async () => {
    expect((await run([])).code).toBe(2);
    const unknown = await run(['frobnicate']);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toMatch(/unknown command/);
    const badFlag = await run(['serve', '--no-such-setting', '1']);
    expect(badFlag.code).toBe(2);
    expect(badFlag.stderr).toMatch(/--no-such-setting/);
  });

  it('init writes the embedded model; build-model builds it once, then reports it up to date', async () => {
    const dir = join(root, 'init');
    const init = await run(['init', dir]);
    expect(init.code).toBe(0);
    expect((await readdir(dir)).sort()).toEqual(['config.json', 'model.safetensors', 'tokenizer.json', 'tokenizer_config.json']);
    const env = { CACHE_DIR: join(root, 'cache') };
    const first = await run(['build-model', dir], env);
    expect(first.code, first.stderr).toBe(0);
    expect(first.stdout).toMatch(/^built: /);
    expect(first.stderr).toMatch(/layer \d+\/4/);
    const second = await run(['build-model', dir], env);
    expect(second.stdout).toMatch(/^up to date: /);
  });

  it('serve refuses bad model input at start, naming the file and what is wrong (exit 1)', async () => {
    const good = join(root, 'good');
    await run(['init', good]);
    const variant = async (name: string, edit: (dir: string) => Promise<void>) => {
      const dir = join(root, name);
      await mkdir(dir, { recursive: true });
      for (const f of await readdir(good)) await copyFile(join(good, f), join(dir, f));
      await edit(dir);
      return run(['serve'], { MODEL_PATH: dir, CACHE_DIR: join(root, 'cache'), ADAPTER_DIR: join(root, 'adapters'), PORT: '0' });
    };
    const cfg = (patch: Record<string, unknown>, drop: string[] = []) => async (dir: string) => {
      const json = JSON.parse(await readFile(join(dir, 'config.json'), 'utf8')) as Record<string, unknown>;
      for (const k of drop) delete json[k];
      await writeFile(join(dir, 'config.json'), JSON.stringify({ ...json, ...patch }));
    };

    const missingKey = await variant('missing-key', cfg({}, ['hidden_size']));
    expect(missingKey.code).toBe(1);
    expect(missingKey.stderr).toMatch(/config\.json/);
    expect(missingKey.stderr).toMatch(/hidden_size/);

    const arch = await variant('gpt2', cfg({ model_type: 'gpt2', architectures: ['GPT2LMHeadModel'] }));
    expect(arch.code).toBe(1);
    expect(arch.stderr).toMatch(/config\.json/);
    expect(arch.stderr).toMatch(/gpt2|GPT2/);

    const truncated = await variant('truncated', async (dir) => {
      const f = join(dir, 'model.safetensors');
      await truncate(f, (await stat(f)).size - 1000);
    });
    expect(truncated.code).toBe(1);
    expect(truncated.stderr).toMatch(/model\.safetensors/);
    expect(truncated.stderr).toMatch(/truncated/);

    const missing = await run(['serve'], { MODEL_PATH: join(root, 'nowhere'), CACHE_DIR: join(root, 'cache'), ADAPTER_DIR: join(root, 'adapters'), PORT: '0' });
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/nowhere/);
  });

  it.skipIf(!HAVE_STORIES)('a truncated llama2.c checkpoint is refused with its expected and actual size', async () => {
    const bin = join(root, 'short.bin');
    await copyFile(STORIES_BIN, bin);
    await truncate(bin, 500_000);
    const res = await run(['serve'], { MODEL_PATH: bin, TOKENIZER_PATH: TOK512_BIN, CACHE_DIR: join(root, 'cache'), ADAPTER_DIR: join(root, 'adapters'), PORT: '0' });
    expect(res.code).toBe(1);
    expect(res.stderr).toMatch(/short\.bin/);
    expect(res.stderr).toMatch(/500000/);
  });

  it('check exits 0 for an adapter that fits and 1 for one that does not, printing the report', async () => {
    const base = join(root, 'good');
    await run(['init', base]);
    const { writeAdapterFolder, makePeftTensors, peftConfig } = await import('./helpers/adapter-fixtures.js');
    const { readArchitecture } = await import('../src/model/checkpoint/index.js');
    const { architecture } = await readArchitecture(base);
    const fits = join(root, 'fits');
    await writeAdapterFolder(fits, { config: peftConfig({ r: 4, lora_alpha: 8, target_modules: ['q_proj'] }), tensors: makePeftTensors(architecture, { r: 4, targets: ['q_proj'], seed: 1 }) });
    const ok = await run(['check', '--base', base, fits]);
    expect(ok.code, ok.stdout + ok.stderr).toBe(0);
    const wide = join(root, 'wide');
    await writeAdapterFolder(wide, {
      config: peftConfig({ r: 4, lora_alpha: 8, target_modules: ['q_proj'] }),
      tensors: makePeftTensors({ ...architecture, hiddenSize: architecture.hiddenSize * 2 }, { r: 4, targets: ['q_proj'], seed: 1 }),
    });
    const bad = await run(['check', '--base', join(base, 'config.json'), wide, '--json']);
    expect(bad.code).toBe(1);
    const report = JSON.parse(bad.stdout) as { ok: boolean; errors: { code: string }[] };
    expect(report.ok).toBe(false);
    expect(report.errors.some((e) => e.code === 'shape_mismatch')).toBe(true);
  });
});
