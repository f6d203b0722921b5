import { spawnSync } from 'node:child_process';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildModel } from '../src/model/build.js';
import { CUDA_PROVIDER_FILES, cudaUnavailableReason, ortBinaryDir } from '../src/model/session.js';
import { randomCheckpoint, tinyArchitecture } from './helpers/random-checkpoint.js';

/**
 * DEVICE=auto on a host without onnxruntime's CUDA provider: no red "Failed to load library
 * libonnxruntime_providers_shared.so" from onnxruntime on stderr, only our one line saying why
 * the CPU is used. Checked in a child process, whose stderr is the user's terminal.
 */

let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'loraserve-cuda-probe-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

describe('the CUDA probe', () => {
  it('names the missing provider libraries; none missing → null', async () => {
    const empty = path.join(root, 'empty');
    await import('node:fs/promises').then((fs) => fs.mkdir(empty));
    expect(cudaUnavailableReason(empty)).toMatch(/libonnxruntime_providers_shared\.so, libonnxruntime_providers_cuda\.so not in/);
    for (const f of CUDA_PROVIDER_FILES) await writeFile(path.join(empty, f), '');
    expect(cudaUnavailableReason(empty)).toBeNull();
  });

  it('DEVICE=auto without the provider: onnxruntime prints nothing, our line says why', async (ctx) => {
    if (cudaUnavailableReason() === null) ctx.skip(); // a host with the CUDA provider installed takes the other path
    const built = await buildModel(randomCheckpoint(tinyArchitecture(), 41), { outDir: path.join(root, 'models'), dtype: 'fp32', logits: 'last' });
    const script = `
      import { createSession } from ${JSON.stringify(path.resolve('src/model/session.ts'))};
      import { readFileSync } from 'node:fs';
      const manifest = JSON.parse(readFileSync(process.argv[2] + '/manifest.json', 'utf8'));
      const s = await createSession(process.argv[2], manifest, 'auto', { info: (m) => console.log(m), warn: (m) => console.log(m) });
      console.log('provider=' + s.provider);
    `;
    const file = path.join(root, 'probe.mts');
    await writeFile(file, script);
    const r = spawnSync(process.execPath, ['--import', 'tsx', file, built.dir], { encoding: 'utf8', cwd: process.cwd() });
    expect(r.status, r.stderr).toBe(0);
    expect(r.stdout).toContain('provider=cpu');
    expect(r.stdout).toContain('the CUDA execution provider is not installed');
    expect(r.stdout).toContain(ortBinaryDir());
    expect(r.stderr).not.toMatch(/Failed to load library|onnxruntime/i);
  });
});
