// Worker threads load neither .ts files nor `--import tsx` from execArgv, so the worker starts
// here: register tsx's loader in this thread, then import the real entry (worker.ts, or its
// compiled .js) named in workerData.
import { workerData } from 'node:worker_threads';
import { register } from 'tsx/esm/api';

register();
await import(workerData.entry);
