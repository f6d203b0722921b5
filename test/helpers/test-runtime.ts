/**
 * LORASERVE_TEST_RUNTIME=capi runs the engines and apps the helpers start on the C API runner
 * (RUNTIME=capi) instead of onnxruntime-node's API; default node.
 */
export function testRuntime(): 'node' | 'capi' {
  const r = process.env.LORASERVE_TEST_RUNTIME ?? 'node';
  if (r !== 'node' && r !== 'capi') throw new Error(`LORASERVE_TEST_RUNTIME must be node or capi, got ${r}`);
  return r;
}
