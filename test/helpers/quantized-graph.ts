import { readFile } from 'node:fs/promises';
import path from 'node:path';
import pkg from 'onnx-proto';
import { expect } from 'vitest';
import { MemoryCheckpoint, type MemoryTensor } from './random-checkpoint.js';
import { f16ToF32 } from '../../src/adapters/safetensors.js';
import { dequantizeMatMulNBits } from '../reference/matmulnbits.js';

const { onnx } = pkg;

/**
 * Reads a built graph's MatMulNBits weights back from model.onnx and its external data, and
 * dequantizes them with the reference decoder (test/reference/matmulnbits.ts): the weights the
 * session actually multiplies by, keyed by checkpoint tensor name ([out, in]).
 */
export async function dequantizedProjections(modelDir: string): Promise<Map<string, Float32Array>> {
  const model = onnx.ModelProto.decode(await readFile(path.join(modelDir, 'model.onnx')));
  const graph = model.graph!;
  const inits = new Map(graph.initializer!.map((t) => [t.name!, t]));
  const dataFiles = new Map<string, Buffer>();
  const bytesOf = async (name: string): Promise<Uint8Array> => {
    const t = inits.get(name)!;
    const ext = new Map(t.externalData!.map((e) => [e.key!, e.value!]));
    const file = ext.get('location')!;
    if (!dataFiles.has(file)) dataFiles.set(file, await readFile(path.join(modelDir, file)));
    const buf = dataFiles.get(file)!;
    const offset = Number(ext.get('offset'));
    return new Uint8Array(buf.buffer, buf.byteOffset + offset, Number(ext.get('length')));
  };
  const out = new Map<string, Float32Array>();
  for (const node of graph.node!) {
    if (node.opType !== 'MatMulNBits') continue;
    expect(node.domain).toBe('com.microsoft');
    const attr = (n: string) => Number(node.attribute!.find((a) => a.name === n)!.i);
    const [, bName, sName, zName] = node.input!;
    const scaleBytes = await bytesOf(sName!);
    // scales are stored in the graph's float type: float32, or float16 (TensorProto FLOAT16 = 10)
    const fp16 = inits.get(sName!)!.dataType === onnx.TensorProto.DataType.FLOAT16;
    const scales = fp16 ? Float32Array.from(new Uint16Array(scaleBytes.slice().buffer), f16ToF32) : new Float32Array(scaleBytes.slice().buffer);
    const w = dequantizeMatMulNBits(await bytesOf(bName!), scales, zName ? await bytesOf(zName) : null, { N: attr('N'), K: attr('K'), bits: attr('bits'), blockSize: attr('block_size') });
    // the packed weight is named after the checkpoint tensor it came from
    out.set(bName!.replace(/\.q[48]$/, ''), w);
  }
  return out;
}

export interface MatMulNBitsNode {
  /** the checkpoint tensor its packed weight came from */
  name: string;
  n: number;
  k: number;
  bits: number;
  blockSize: number;
  accuracyLevel: number;
}

/** every MatMulNBits of a built graph, in graph order, with its attributes */
export async function matMulNBitsNodes(graphFile: string): Promise<MatMulNBitsNode[]> {
  const graph = onnx.ModelProto.decode(await readFile(graphFile)).graph!;
  return graph.node!
    .filter((node) => node.opType === 'MatMulNBits')
    .map((node) => {
      const attr = (n: string) => Number(node.attribute!.find((a) => a.name === n)!.i);
      return { name: node.input![1]!.replace(/\.q[48]$/, ''), n: attr('N'), k: attr('K'), bits: attr('bits'), blockSize: attr('block_size'), accuracyLevel: attr('accuracy_level') };
    });
}

/** each MatMulNBits weight of a built graph (checkpoint tensor name) and its `bits` attribute */
export async function quantizedWidths(modelDir: string): Promise<Map<string, number>> {
  return new Map((await matMulNBitsNodes(path.join(modelDir, 'model.onnx'))).map((m) => [m.name, m.bits]));
}


/**
 * The checkpoint the quantized graph computes: projections and LM head replaced by their
 * dequantized weights. A tied model becomes untied, since its Gather still reads the float
 * table while the head multiplies by the quantized copy.
 */
export function dequantizedCheckpoint(ck: MemoryCheckpoint, deq: ReadonlyMap<string, Float32Array>): { reference: MemoryCheckpoint; tensors: Map<string, MemoryTensor> } {
  const a = ck.architecture;
  const tensors = new Map<string, MemoryTensor>(ck.tensors);
  for (const [name, w] of deq) {
    const shape = name === 'lm_head.weight' ? [a.vocabSize, a.hiddenSize] : ck.tensors.get(name)!.shape;
    tensors.set(name, { shape, data: w });
  }
  return { reference: new MemoryCheckpoint({ ...a, tieWordEmbeddings: false }, tensors, 'dequantized'), tensors };
}
