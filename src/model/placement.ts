import ort from 'onnxruntime-node';
import { GraphBuilder } from './graph/onnx-builder.js';
import type { QuantizedWeights } from './graph/llama.js';
import type { ModelDtype } from './manifest.js';
import { cudaUnavailableReason, type Device, type Provider } from './session.js';

/**
 * Device and dtype, decided together and before the graph is built: the dtype is baked into the
 * graph (and its cache key), so building first and probing CUDA afterwards gave a GPU host an
 * fp32 graph. fp16 on CUDA by default (a bf16 checkpoint's weights are read as float32 and written
 * as fp16, since onnxruntime has no bf16 MatMul on CPU and the graph must also open there), fp32
 * on CPU, unless DTYPE says otherwise.
 */
export interface Placement {
  provider: Provider;
  dtype: ModelDtype;
  /** block-quantized projections (MatMulNBits); absent = plain weights at `dtype` */
  weights?: QuantizedWeights;
  /** one sentence: why this device and this dtype */
  reason: string;
}

export type WeightsSetting = 'auto' | 'fp32' | 'fp16' | 'int8' | 'int4';

export type CudaProbe = () => Promise<{ ok: true } | { ok: false; reason: string }>;

/**
 * A one-node graph opened with the CUDA provider alone: it fails exactly when a real session would.
 * Without the provider's libraries it is not even tried (onnxruntime would print a red load error).
 */
export const probeCuda: CudaProbe = async () => {
  const missing = cudaUnavailableReason();
  if (missing) return { ok: false, reason: missing };
  const g = new GraphBuilder(null);
  g.input('x', 'float32', [1]);
  g.node('Identity', ['x'], { outputs: ['y'] });
  g.output('y', 'float32', [1]);
  try {
    const session = await ort.InferenceSession.create(g.encode('cuda-probe', { '': 17 }, 'probe'), { executionProviders: ['cuda'] });
    await session.release();
    return { ok: true };
  } catch (e) {
    return { ok: false, reason: (e instanceof Error ? e.message : String(e)).split('\n')[0] };
  }
};

/**
 * WEIGHTS: fp32/fp16 are plain weights and pick the graph dtype (DTYPE must agree when set);
 * int8/int4 quantize the projections and leave the compute dtype (activations, norms, LoRA
 * branches) to DTYPE. auto is plain weights: see README "Quantized weights" for why.
 */
export function resolveWeights(setting: WeightsSetting, dtypeSetting: ModelDtype | 'auto'): { dtype?: ModelDtype; weights?: QuantizedWeights; why: string } {
  if (setting === 'int8' || setting === 'int4') return { weights: setting, why: `WEIGHTS=${setting} (MatMulNBits projections, LoRA branches unquantized)` };
  if (setting === 'auto') return { why: 'WEIGHTS=auto: unquantized' };
  if (dtypeSetting !== 'auto' && dtypeSetting !== setting) throw new Error(`WEIGHTS=${setting} contradicts DTYPE=${dtypeSetting}: plain weights are stored in the graph's dtype`);
  return { dtype: setting, why: `WEIGHTS=${setting}` };
}

export async function resolvePlacement(opts: { device: Device; dtype: ModelDtype | 'auto'; weights?: WeightsSetting }, probe: CudaProbe = probeCuda): Promise<Placement> {
  const w = resolveWeights(opts.weights ?? 'auto', opts.dtype);
  const dtypeFor = (provider: Provider): { dtype: ModelDtype; why: string } =>
    opts.dtype !== 'auto'
      ? { dtype: opts.dtype, why: `DTYPE=${opts.dtype}` }
      : w.dtype
        ? { dtype: w.dtype, why: `DTYPE=auto: ${w.dtype} from WEIGHTS` }
        : provider === 'cuda'
          ? { dtype: 'fp16', why: 'DTYPE=auto: fp16 on cuda (bf16 weights converted)' }
          : { dtype: 'fp32', why: 'DTYPE=auto: fp32 on cpu' };
  const place = (provider: Provider, deviceWhy: string): Placement => {
    const d = dtypeFor(provider);
    const reason = `${deviceWhy}; ${d.why}${opts.weights && opts.weights !== 'auto' ? `; ${w.why}` : ''}`;
    return w.weights ? { provider, dtype: d.dtype, weights: w.weights, reason } : { provider, dtype: d.dtype, reason };
  };
  if (opts.device === 'cpu') return place('cpu', 'DEVICE=cpu');
  const probed = await probe();
  if (opts.device === 'cuda') {
    if (!probed.ok) throw new Error(`DEVICE=cuda but the CUDA execution provider does not load: ${probed.reason}`);
    return place('cuda', 'DEVICE=cuda and the CUDA execution provider loaded');
  }
  return probed.ok ? place('cuda', 'DEVICE=auto and the CUDA execution provider loaded') : place('cpu', `DEVICE=auto and CUDA is unavailable (${probed.reason})`);
}

/** The start-up line: device, provider, dtype and why. */
export const placementLine = (p: Placement): string =>
  `device ${p.provider}, provider ${p.provider === 'cuda' ? 'CUDAExecutionProvider' : 'CPUExecutionProvider'}, dtype ${p.dtype}${p.weights ? `, weights ${p.weights}` : ''}: ${p.reason}`;
