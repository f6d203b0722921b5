import { parentPort, workerData } from 'node:worker_threads';
import type { SessionLog } from '../model/session.js';
import { EngineCore } from './core.js';
import { openEngineSession } from './engine-session.js';
import { ProbeRun } from './probe.js';
import type { FromWorker, LogLevel, ToWorker, WorkerData } from './protocol.js';

/**
 * The inference worker: owns the onnxruntime session and the decode loop. `session.run()` blocks
 * its thread for a whole forward pass, so it lives here, never on the HTTP thread. Between steps
 * the loop yields once to the event loop so that new requests, cancellations and adapter loads
 * are taken in before the next step.
 */
const port = parentPort;
if (!port) throw new Error('worker.ts runs only as a worker thread (see engine.ts)');
const data = workerData as WorkerData;
const post = (msg: FromWorker) => port.postMessage(msg);

const log = (level: LogLevel) => (msg: string) => post({ type: 'log', level, msg, data: null });
const sessionLog: SessionLog = { info: log('info'), warn: log('warn') };

const errorMessage = (e: unknown) => (e instanceof Error ? e.message : String(e));

async function main(): Promise<void> {
  let parts;
  try {
    parts = await openEngineSession(data.modelDir, data.manifest, data.device, data.runtime, sessionLog);
  } catch (e) {
    post({ type: 'startupError', message: errorMessage(e) });
    port!.close();
    return;
  }
  const { session, kvBuffers } = parts;
  const core = new EngineCore(session, data.manifest, data.limits, post, { provider: parts.provider, boundOutputs: parts.boundOutputs, ...(kvBuffers && { kvBuffers }) });
  let closing = false;
  let wake: (() => void) | null = null;
  // probes wait for the step under way (one session never runs two forwards at once), and take
  // turns with decode steps, one probe token each, so a running stream never waits for a whole probe
  const probes: Extract<ToWorker, { type: 'probe' }>[] = [];
  let probing: { callId: number; run: ProbeRun } | null = null;
  const probeStep = async (): Promise<void> => {
    const next = probing ? undefined : probes.shift();
    const callId = probing?.callId ?? next?.callId;
    if (callId === undefined) return;
    try {
      if (next) {
        const adapter = core.residentAdapter(next.versionId);
        if (!adapter) throw new Error(`adapter version ${next.versionId} is not loaded`);
        probing = { callId, run: new ProbeRun(session, data.manifest, adapter, next.ids, kvBuffers) };
      }
      const run = probing!.run;
      if (await run.step()) {
        probing = null;
        post({ type: 'reply', callId, error: null, probe: run.result() });
      }
    } catch (e) {
      dropProbe();
      post({ type: 'reply', callId, error: errorMessage(e) });
    }
  };

  const dropProbe = (): void => {
    probing?.run.dispose();
    probing = null;
  };

  port!.on('message', (msg: ToWorker) => {
    switch (msg.type) {
      case 'generate':
        core.submit(msg.id, msg.req);
        for (const f of msg.followers ?? []) core.submit(f.id, { ...msg.req, seed: f.seed, prefixOf: msg.id });
        break;
      case 'cancel':
        core.cancel(msg.id);
        break;
      case 'shedWaiting':
        core.shedWaiting();
        break;
      case 'loadAdapter':
      case 'unloadAdapter': {
        let error: string | null = null;
        try {
          if (msg.type === 'loadAdapter') core.loadAdapter(msg.versionId, msg.modules, msg.embedding);
          else core.unloadAdapter(msg.versionId);
        } catch (e) {
          error = errorMessage(e);
        }
        // stats first: when the caller's promise settles, engine.stats() already shows the change
        core.flush();
        post({ type: 'reply', callId: msg.callId, error });
        break;
      }
      case 'probe':
        probes.push(msg);
        break;
      case 'close':
        closing = true;
        break;
    }
    core.flush();
    wake?.();
  });
  post({ type: 'ready', provider: parts.provider, reason: parts.reason });

  while (!closing) {
    const probeWaiting = probing !== null || probes.length > 0;
    if (!core.hasWork() && !probeWaiting) {
      await new Promise<void>((resolve) => (wake = resolve));
      wake = null;
      continue;
    }
    if (probeWaiting) await probeStep();
    if (core.hasWork()) {
      await core.step();
      core.flush();
    }
    // let queued messages (new requests, cancellations, adapters) in before the next step
    await new Promise<void>((resolve) => setImmediate(resolve));
  }
  core.cancelAll();
  core.flush();
  dropProbe();
  core.close();
  await session.release();
  port!.close();
}

main().catch((e: unknown) => {
  post({ type: 'fatal', message: errorMessage(e) });
  port.close();
});
