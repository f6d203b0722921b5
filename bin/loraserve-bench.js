#!/usr/bin/env node
// Runs bench/main.ts through tsx, in a node started with --expose-gc (the memory numbers are
// taken after full collections): without it, this shim starts one that has it.
import { spawn } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { register } from 'tsx/esm/api';

if (typeof globalThis.gc !== 'function') {
  const child = spawn(process.execPath, ['--expose-gc', ...process.execArgv, fileURLToPath(import.meta.url), ...process.argv.slice(2)], { stdio: 'inherit' });
  const forward = (signal) => child.kill(signal);
  process.on('SIGINT', forward);
  process.on('SIGTERM', forward);
  child.on('exit', (code, signal) => {
    process.exitCode = code ?? (signal ? 1 : 0);
  });
} else {
  register();
  const { main } = await import('../bench/main.ts');
  process.exitCode = await main(process.argv.slice(2));
}
