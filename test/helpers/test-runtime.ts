import type { RuntimeSetting } from '../../src/model/session.js';

/**
 * LORASERVE_TEST_RUNTIME=node|capi|auto picks the runtime of the engines and apps the helpers
 * start (the RUNTIME setting). Default `auto`, as a user gets it: the C API runner for gqa
 * graphs, onnxruntime-node for resident ones.
 */
export function testRuntime(): RuntimeSetting {
  const r = process.env.LORASERVE_TEST_RUNTIME ?? 'auto';
  if (r !== 'node' && r !== 'capi' && r !== 'auto') throw new Error(`LORASERVE_TEST_RUNTIME must be node, capi or auto, got ${r}`);
  return r;
}
