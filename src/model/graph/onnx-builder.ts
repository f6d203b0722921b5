import type { FileHandle } from 'node:fs/promises';
import pkg from 'onnx-proto';
import type { onnx as OnnxTypes } from 'onnx-proto';

const { onnx } = pkg;

/**
 * A thin typed layer over onnx-proto: value infos, nodes, small inline constants and large
 * initializers whose bytes go to an external data file as they are produced (so a model never
 * has to exist twice in memory). Knows nothing about Llama.
 */

export type ElemType = 'float32' | 'float16' | 'int64' | 'int32' | 'uint8';
/** a fixed size or a symbolic dimension name */
export type Dim = number | string;

const ELEM: Record<ElemType, number> = {
  float32: onnx.TensorProto.DataType.FLOAT,
  float16: onnx.TensorProto.DataType.FLOAT16,
  int64: onnx.TensorProto.DataType.INT64,
  int32: onnx.TensorProto.DataType.INT32,
  uint8: onnx.TensorProto.DataType.UINT8,
};

/** attribute values are tagged so that a float attribute that happens to be integral stays a float */
export type Attr =
  | { kind: 'int'; value: number }
  | { kind: 'ints'; value: readonly number[] }
  | { kind: 'float'; value: number }
  | { kind: 'string'; value: string };

export const int = (value: number): Attr => ({ kind: 'int', value });
export const ints = (value: readonly number[]): Attr => ({ kind: 'ints', value });
export const float = (value: number): Attr => ({ kind: 'float', value });
export const str = (value: string): Attr => ({ kind: 'string', value });

function attributeProto(name: string, a: Attr): OnnxTypes.IAttributeProto {
  const T = onnx.AttributeProto.AttributeType;
  switch (a.kind) {
    case 'int':
      return { name, type: T.INT, i: a.value };
    case 'ints':
      return { name, type: T.INTS, ints: [...a.value] };
    case 'float':
      return { name, type: T.FLOAT, f: a.value };
    case 'string':
      return { name, type: T.STRING, s: new TextEncoder().encode(a.value) };
  }
}

function valueInfo(name: string, elem: ElemType, dims: readonly Dim[]): OnnxTypes.IValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType: ELEM[elem],
        shape: { dim: dims.map((d) => (typeof d === 'number' ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

const F16_SCRATCH = new Float32Array(1);
const F16_SCRATCH_BITS = new Uint32Array(F16_SCRATCH.buffer);

/** IEEE binary16 bits of a float32, round to nearest even; overflow → ±Inf, NaN stays NaN. */
export function float32ToFloat16Bits(value: number): number {
  F16_SCRATCH[0] = value;
  const x = F16_SCRATCH_BITS[0];
  const sign = (x >>> 16) & 0x8000;
  const exp = (x >>> 23) & 0xff;
  const mant = x & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant !== 0 ? 0x200 : 0);
  const e = exp - 127 + 15;
  if (e >= 0x1f) return sign | 0x7c00;
  if (e <= 0) {
    // subnormal half (or zero): shift the implicit-1 mantissa into place with round-to-nearest-even
    if (e < -10) return sign;
    const m = mant | 0x800000;
    const shift = 14 - e;
    const half = m >>> shift;
    const rest = m & ((1 << shift) - 1);
    const mid = 1 << (shift - 1);
    const rounded = rest > mid || (rest === mid && (half & 1) === 1) ? half + 1 : half;
    return sign | rounded;
  }
  const half = (e << 10) | (mant >>> 13);
  const rest = mant & 0x1fff;
  // a carry out of the mantissa correctly bumps the exponent (and reaches Inf at the top)
  const rounded = rest > 0x1000 || (rest === 0x1000 && (half & 1) === 1) ? half + 1 : half;
  return sign | rounded;
}

export function toFloat16Bits(src: Float32Array): Uint16Array {
  const out = new Uint16Array(src.length);
  for (let i = 0; i < src.length; i++) out[i] = float32ToFloat16Bits(src[i]);
  return out;
}

/** float32 values as the little-endian bytes of `elem` (float32 or float16) */
export function floatBytes(values: Float32Array, elem: 'float32' | 'float16'): Uint8Array {
  const typed = elem === 'float32' ? values : toFloat16Bits(values);
  return new Uint8Array(typed.buffer, typed.byteOffset, typed.byteLength);
}

/** Appends tensor bytes to the external data file and remembers where each one went. */
export class ExternalDataWriter {
  private offset = 0;
  constructor(
    private readonly handle: FileHandle,
    /** the location written into the graph: relative to the model file */
    readonly location: string,
  ) {}

  get bytesWritten(): number {
    return this.offset;
  }

  async append(bytes: Uint8Array): Promise<{ offset: number; length: number }> {
    const at = this.offset;
    let done = 0;
    while (done < bytes.byteLength) {
      const { bytesWritten } = await this.handle.write(bytes, done, bytes.byteLength - done);
      done += bytesWritten;
    }
    this.offset += bytes.byteLength;
    return { offset: at, length: bytes.byteLength };
  }
}

export interface NodeOptions {
  attrs?: Record<string, Attr>;
  domain?: string;
  /**
   * explicit output names; otherwise `count` fresh names. Within `outputs`, null asks for a fresh
   * name and '' leaves an optional output out (ONNX's convention).
   */
  outputs?: (string | null)[];
  count?: number;
  name?: string;
}

export class GraphBuilder {
  private readonly nodes: OnnxTypes.INodeProto[] = [];
  private readonly initializers: OnnxTypes.ITensorProto[] = [];
  private readonly inputs: OnnxTypes.IValueInfoProto[] = [];
  private readonly outputs: OnnxTypes.IValueInfoProto[] = [];
  private readonly used = new Set<string>();
  private counter = 0;
  /** prefix for generated names, e.g. `/model/layers.3` */
  scope = '';

  constructor(private readonly data: ExternalDataWriter | null) {}

  private fresh(base: string): string {
    let name: string;
    do name = `${this.scope}/${base}_${this.counter++}`;
    while (this.used.has(name));
    this.used.add(name);
    return name;
  }

  private claim(name: string): string {
    if (this.used.has(name)) throw new Error(`graph name used twice: ${name}`);
    this.used.add(name);
    return name;
  }

  input(name: string, elem: ElemType, dims: readonly Dim[]): string {
    this.inputs.push(valueInfo(this.claim(name), elem, dims));
    return name;
  }

  /** declares `name` (already produced by a node) as a graph output */
  output(name: string, elem: ElemType, dims: readonly Dim[]): void {
    this.outputs.push(valueInfo(name, elem, dims));
  }

  node(opType: string, inputs: readonly string[], opts: NodeOptions = {}): string[] {
    const outs = opts.outputs ? opts.outputs.map((o) => (o === null ? this.fresh(opType) : o === '' ? o : this.claim(o))) : Array.from({ length: opts.count ?? 1 }, () => this.fresh(opType));
    this.nodes.push({
      name: opts.name ?? this.fresh(`${opType}_node`),
      opType,
      domain: opts.domain ?? '',
      input: [...inputs],
      output: outs,
      attribute: Object.entries(opts.attrs ?? {}).map(([k, v]) => attributeProto(k, v)),
    });
    return outs;
  }

  /** single-output convenience */
  op(opType: string, inputs: readonly string[], attrs?: Record<string, Attr>, domain?: string): string {
    return this.node(opType, inputs, { attrs, domain })[0];
  }

  /** a small constant stored inside model.onnx */
  constInt64(values: readonly number[], dims: readonly number[] = [values.length]): string {
    const name = this.fresh('const_i64');
    const bytes = new BigInt64Array(values.map((v) => BigInt(v)));
    this.initializers.push({ name, dataType: ELEM.int64, dims: [...dims], rawData: new Uint8Array(bytes.buffer) });
    return name;
  }

  constFloat(values: Float32Array, dims: readonly number[], elem: 'float32' | 'float16'): string {
    const name = this.fresh('const_f');
    this.initializers.push({ name, dataType: ELEM[elem], dims: [...dims], rawData: floatBytes(values, elem) });
    return name;
  }

  /** a weight whose bytes are appended to the external data file now; only its location stays in memory */
  async weight(name: string, elem: 'float32' | 'float16', dims: readonly number[], values: Float32Array): Promise<string> {
    const expected = dims.reduce((a, b) => a * b, 1);
    if (values.length !== expected) throw new Error(`${name}: ${values.length} values for shape [${dims.join(', ')}]`);
    return this.rawWeight(name, elem, dims, floatBytes(values, elem));
  }

  /** packed uint8 data (quantized weights), stored like `weight` */
  async bytesWeight(name: string, dims: readonly number[], values: Uint8Array): Promise<string> {
    const expected = dims.reduce((a, b) => a * b, 1);
    if (values.length !== expected) throw new Error(`${name}: ${values.length} bytes for shape [${dims.join(', ')}]`);
    return this.rawWeight(name, 'uint8', dims, values);
  }

  private async rawWeight(name: string, elem: ElemType, dims: readonly number[], bytes: Uint8Array): Promise<string> {
    if (!this.data) throw new Error('this graph has no external data file');
    const { offset, length } = await this.data.append(bytes);
    this.initializers.push({
      name: this.claim(name),
      dataType: ELEM[elem],
      dims: [...dims],
      dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
      externalData: [
        { key: 'location', value: this.data.location },
        { key: 'offset', value: String(offset) },
        { key: 'length', value: String(length) },
      ],
    });
    return name;
  }

  encode(graphName: string, opsets: Record<string, number>, producerVersion: string): Uint8Array {
    const model: OnnxTypes.IModelProto = {
      irVersion: 8,
      producerName: 'loraserve',
      producerVersion,
      opsetImport: Object.entries(opsets).map(([domain, version]) => ({ domain, version })),
      graph: {
        name: graphName,
        node: this.nodes,
        initializer: this.initializers,
        input: this.inputs,
        output: this.outputs,
      },
    };
    return onnx.ModelProto.encode(model).finish();
  }
}
