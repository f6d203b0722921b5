/**
 * Run by capi-session.test.ts inside a worker_thread (through src/engine/worker-entry.mjs): one
 * CapiSession opened, run and released in that thread; replies with the sums.
 */
import { parentPort, workerData } from 'node:worker_threads';
import ort from 'onnxruntime-node';
import { CapiSession } from '../../src/runtime/capi-session.js';

const { model } = workerData as { model: Uint8Array };
const s = await CapiSession.create(model, { provider: 'cpu', intraOpThreads: 1 });
const out = new ort.Tensor('float32', new Float32Array(3), [3]);
await s.run({ a: new ort.Tensor('float32', Float32Array.of(1, 2, 3), [3]), b: new ort.Tensor('float32', Float32Array.of(10, 20, 30), [3]) }, { sum: out });
await s.release();
parentPort!.postMessage(Array.from(out.data as Float32Array));
