import { parentPort, workerData } from 'node:worker_threads';
import { loadTokenizer } from './index.js';
import type { EncodeReply, EncodeRequest, TokenizerWorkerData } from './off-thread.js';

/**
 * The tokenizer thread: the same tokenizer the HTTP thread holds, loaded again here, so that long
 * prompts are encoded without stalling health checks and running streams (see off-thread.ts).
 */
const port = parentPort;
if (!port) throw new Error('tokenizer/worker.ts runs only as a worker thread (see off-thread.ts)');
const data = workerData as TokenizerWorkerData;
const tokenizer = await loadTokenizer(data.source, data.architecture);

port.on('message', (m: EncodeRequest) => {
  let reply: EncodeReply;
  try {
    reply = { id: m.id, ids: tokenizer.encode(m.text, { addBos: m.addBos }), error: null };
  } catch (e) {
    reply = { id: m.id, ids: null, error: e instanceof Error ? e.message : String(e) };
  }
  port.postMessage(reply);
});
port.postMessage({ ready: true });
