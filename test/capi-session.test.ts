import { createRequire } from 'node:module';
import { Worker } from 'node:worker_threads';
import ort from 'onnxruntime-node';
import pkg from 'onnx-proto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { makeConfig } from '../src/config.js';
import { Engine } from '../src/engine/engine.js';
import { cudaUnavailableReason } from '../src/model/session.js';
import { GraphBuilder, int, toFloat16Bits, type ElemType } from '../src/model/graph/onnx-builder.js';
import '../src/model/ort-float16.js';
import { CapiSession, DeviceTensor } from '../src/runtime/capi-session.js';
import { OrtCapi, OrtError } from '../src/runtime/ort-capi.js';
import { ortLibrary } from '../src/runtime/ort-library.js';
import { buildRandomModel, collect, tempRoot, testDevice } from './engine-setup.js';
import { Rng, randomTokens, tinyArchitecture } from './helpers/random-checkpoint.js';

/**
 * The C API runner (RUNTIME=capi) against onnxruntime-node on the same graphs, and the things only
 * IO binding gives: outputs written in place, one buffer bound as input and output
 * (GroupQueryAttention's share-buffer mode), device tensors. All on the CPU provider; the CUDA path
 * is the same code with another memory info and is not run here.
 */

const { onnx } = pkg;
const opsets = { '': 17 };

/** a graph of one node per output, over named inputs */
function graph(inputs: [string, ElemType, (number | string)[]][], nodes: [string, string[], string, ElemType, (number | string)[]][]): Uint8Array {
  const g = new GraphBuilder(null);
  for (const [n, t, d] of inputs) g.input(n, t, d);
  for (const [op, ins, out, t, d] of nodes) {
    g.node(op, ins, { outputs: [out] });
    g.output(out, t, d);
  }
  return g.encode('capi-test', opsets, 'test');
}

type Data = ort.Tensor['data'];
const plain = (d: Data): unknown[] => Array.from(d as ArrayLike<unknown>);

/** onnxruntime-node's outputs and ours for the same feeds, output by output */
async function bothRuntimes(model: Uint8Array, feeds: Record<string, ort.Tensor>) {
  const node = await ort.InferenceSession.create(model, { executionProviders: ['cpu'] });
  const capi = await CapiSession.create(model, { provider: 'cpu', intraOpThreads: 1 });
  try {
    expect(capi.inputNames).toEqual(node.inputNames);
    expect(capi.outputNames).toEqual(node.outputNames);
    const expected = await node.run(feeds);
    const got = await capi.run(feeds);
    expect(Object.keys(got).sort()).toEqual(Object.keys(expected).sort());
    for (const name of Object.keys(expected)) {
      expect(got[name].type, name).toBe(expected[name].type);
      expect(got[name].dims, name).toEqual(expected[name].dims);
      expect(got[name].data.constructor, name).toBe(expected[name].data.constructor);
      expect(plain(got[name].data), name).toEqual(plain(expected[name].data));
    }
    return got;
  } finally {
    await node.release();
    await capi.release();
  }
}

describe('the C API table', () => {
  it('is the library onnxruntime-node ships, at the version the indices were counted for', () => {
    const lib = ortLibrary();
    const nodeVersion = (createRequire(import.meta.url)('onnxruntime-node/package.json') as { version: string }).version;
    expect(lib.version).toBe(nodeVersion);
    expect(lib.path).toMatch(/onnxruntime-node\/bin\/napi-v6\/.*libonnxruntime\.so\.1$/);
  });

  it('calls the entries it names: status functions (0, 1, 2, 93) and the build string (254)', () => {
    const { api } = OrtCapi.get();
    const status = api.CreateStatus(2, 'made by the test');
    expect(status).not.toBeNull();
    expect(api.GetErrorCode(status!)).toBe(2);
    expect(api.GetErrorMessage(status!)).toBe('made by the test');
    api.ReleaseStatus(status!);
    expect(api.GetBuildInfoString()).toMatch(/^ORT Build Info: /);
  });

  it('turns an OrtStatus into a thrown error with its code and message, releasing it', () => {
    const capi = OrtCapi.get();
    expect(() => capi.check(capi.api.CreateStatus(2, 'bad thing'), 'doing it')).toThrow(new OrtError(2, 'doing it: bad thing'));
    expect(() => capi.check(null, 'fine')).not.toThrow();
  });
});

describe('CapiSession.create', () => {
  const identity = () => graph([['x', 'float32', [1]]], [['Identity', ['x'], 'y', 'float32', [1]]]);

  it("rejects a missing model file with onnxruntime's message", async () => {
    await expect(CapiSession.create('/nonexistent/model.onnx')).rejects.toThrow(/CreateSession: .*\/nonexistent\/model\.onnx.*(doesn't exist|No such file)/);
  });

  // where the CUDA provider is not installed, the C API path gets as far as loading it, from the
  // folder of the library it drives, and says which file is missing
  it.runIf(cudaUnavailableReason() !== null)('cuda without the provider libraries: a clear error naming the library', async () => {
    await expect(CapiSession.create(identity(), { provider: 'cuda' })).rejects.toThrow(/libonnxruntime_providers_shared\.so/);
  });
});

describe('CapiSession: same results as onnxruntime-node', () => {
  it('float32', async () => {
    const model = graph(
      [['a', 'float32', [2, 3]], ['b', 'float32', [2, 3]]],
      [['Add', ['a', 'b'], 'sum', 'float32', [2, 3]], ['Mul', ['a', 'b'], 'prod', 'float32', [2, 3]]],
    );
    const a = Float32Array.of(1, 2, 3, 4, 5, 6.5);
    const b = Float32Array.of(0.5, -1, 2, 1e-3, 3, -7);
    const got = await bothRuntimes(model, { a: new ort.Tensor('float32', a, [2, 3]), b: new ort.Tensor('float32', b, [2, 3]) });
    expect(Array.from(got.sum.data as Float32Array)).toEqual(Array.from(a, (x, i) => Math.fround(x + b[i])));
    expect(Array.from(got.prod.data as Float32Array)).toEqual(Array.from(a, (x, i) => Math.fround(x * b[i])));
  });

  it('float16 (as Uint16Array bits)', async () => {
    const model = graph([['a', 'float16', [2, 3]], ['b', 'float16', [3, 2]]], [['MatMul', ['a', 'b'], 'y', 'float16', [2, 2]]]);
    const a = toFloat16Bits(Float32Array.of(1, 2, 3, 4, 5, 6));
    const b = toFloat16Bits(Float32Array.of(1, 0, 0, 1, 1, 1));
    const got = await bothRuntimes(model, { a: new ort.Tensor('float16', a, [2, 3]), b: new ort.Tensor('float16', b, [3, 2]) });
    // rows · [[1,0],[0,1],[1,1]] = [1+3, 2+3], [4+6, 5+6]; small integers are exact in half
    expect(Array.from(got.y.data as Uint16Array)).toEqual(Array.from(toFloat16Bits(Float32Array.of(4, 5, 10, 11))));
  });

  it('int64 and int32', async () => {
    const model = graph(
      [['a', 'int64', [3]], ['b', 'int64', [3]], ['c', 'int32', [3]], ['d', 'int32', [3]]],
      [['Add', ['a', 'b'], 'sum64', 'int64', [3]], ['Mul', ['c', 'd'], 'prod32', 'int32', [3]]],
    );
    const got = await bothRuntimes(model, {
      a: new ort.Tensor('int64', BigInt64Array.of(2n ** 40n, -5n, 7n), [3]),
      b: new ort.Tensor('int64', BigInt64Array.of(1n, 5n, -9n), [3]),
      c: new ort.Tensor('int32', Int32Array.of(3, -4, 1 << 20), [3]),
      d: new ort.Tensor('int32', Int32Array.of(7, 5, 3), [3]),
    });
    expect(Array.from(got.sum64.data as BigInt64Array)).toEqual([2n ** 40n + 1n, 0n, -2n]);
    expect(Array.from(got.prod32.data as Int32Array)).toEqual([21, -20, 3 << 20]);
  });

  it('uint8 and bool', async () => {
    const u8 = graph([['x', 'uint8', [2, 3]]], [['Transpose', ['x'], 'xt', 'uint8', [3, 2]]]);
    const got = await bothRuntimes(u8, { x: new ort.Tensor('uint8', Uint8Array.of(1, 2, 3, 250, 251, 252), [2, 3]) });
    expect(Array.from(got.xt.data as Uint8Array)).toEqual([1, 250, 2, 251, 3, 252]);

    // the repo's builder has no bool type, so this one graph is written with onnx-proto directly
    const T = onnx.TensorProto.DataType;
    const vi = (name: string, elemType: number) => ({ name, type: { tensorType: { elemType, shape: { dim: [{ dimValue: 4 }] } } } });
    const boolModel = onnx.ModelProto.encode({
      irVersion: 8,
      opsetImport: [{ domain: '', version: 17 }],
      graph: {
        name: 'bool',
        node: [
          { opType: 'Cast', input: ['x'], output: ['xb'], attribute: [{ name: 'to', type: onnx.AttributeProto.AttributeType.INT, i: T.BOOL }] },
          { opType: 'And', input: ['xb', 'm'], output: ['both'] },
          { opType: 'Not', input: ['m'], output: ['notm'] },
        ],
        input: [vi('x', T.UINT8), vi('m', T.BOOL)],
        output: [vi('both', T.BOOL), vi('notm', T.BOOL)],
      },
    }).finish();
    const b = await bothRuntimes(boolModel, { x: new ort.Tensor('uint8', Uint8Array.of(0, 3, 0, 1), [4]), m: new ort.Tensor('bool', Uint8Array.of(1, 1, 0, 0), [4]) });
    expect(b.both.type).toBe('bool');
    expect(Array.from(b.both.data as Uint8Array)).toEqual([0, 1, 0, 0]);
    expect(Array.from(b.notm.data as Uint8Array)).toEqual([0, 0, 1, 1]);
  });

  it('empty tensors (rank-0 LoRA inputs are [batch, in, 0])', async () => {
    const model = graph([['a', 'float32', [2, 'r']], ['b', 'float32', ['r', 3]]], [['MatMul', ['a', 'b'], 'y', 'float32', [2, 3]]]);
    const got = await bothRuntimes(model, { a: new ort.Tensor('float32', new Float32Array(0), [2, 0]), b: new ort.Tensor('float32', new Float32Array(0), [0, 3]) });
    expect(Array.from(got.y.data as Float32Array)).toEqual([0, 0, 0, 0, 0, 0]);
  });
});

describe('CapiSession: binding', () => {
  const model = graph(
    [['a', 'float32', ['n']], ['b', 'float32', ['n']]],
    [['Add', ['a', 'b'], 'sum', 'float32', ['n']], ['Mul', ['a', 'b'], 'prod', 'float32', ['n']], ['Sub', ['a', 'b'], 'diff', 'float32', ['n']]],
  );
  let s: CapiSession;
  beforeAll(async () => {
    s = await CapiSession.create(model, { provider: 'cpu', intraOpThreads: 1 });
  });
  afterAll(async () => {
    await s?.release();
  });
  const a = () => new ort.Tensor('float32', Float32Array.of(1, 2, 3), [3]);
  const b = () => new ort.Tensor('float32', Float32Array.of(10, 20, 30), [3]);

  it('writes a pre-allocated output in place and returns that same Tensor', async () => {
    const data = new Float32Array(3).fill(-1);
    const out = new ort.Tensor('float32', data, [3]);
    const r = await s.run({ a: a(), b: b() }, { sum: out, prod: null });
    expect(r.sum).toBe(out);
    expect(r.sum.data).toBe(data);
    expect(Array.from(data)).toEqual([11, 22, 33]);
    expect(Array.from(r.prod.data as Float32Array)).toEqual([10, 40, 90]);
    expect(Object.keys(r).sort()).toEqual(['prod', 'sum']);
  });

  it('writes into a subarray view without touching its neighbours', async () => {
    const whole = new Float32Array(7).fill(9);
    const out = new ort.Tensor('float32', whole.subarray(2, 5), [3]);
    await s.run({ a: a(), b: b() }, { diff: out });
    expect(Array.from(whole)).toEqual([9, 9, -9, -18, -27, 9, 9]);
  });

  it('names a subset of outputs asked in another order by their own names', async () => {
    const r = await s.run({ a: a(), b: b() }, ['diff', 'sum']);
    expect(Object.keys(r).sort()).toEqual(['diff', 'sum']);
    expect(Array.from(r.diff.data as Float32Array)).toEqual([-9, -18, -27]);
    expect(Array.from(r.sum.data as Float32Array)).toEqual([11, 22, 33]);
    const one = await s.run({ a: a(), b: b() }, { prod: null });
    expect(Object.keys(one)).toEqual(['prod']);
    expect(Array.from(one.prod.data as Float32Array)).toEqual([10, 40, 90]);
  });

  it('one Tensor as a feed and a fetch: the output lands in the input buffer', async () => {
    const acc = new ort.Tensor('float32', Float32Array.of(1, 1, 1), [3]);
    const step = new ort.Tensor('float32', Float32Array.of(1, 2, 3), [3]);
    for (let i = 0; i < 3; i++) await s.run({ a: acc, b: step }, { sum: acc });
    expect(Array.from(acc.data as Float32Array)).toEqual([4, 7, 10]);
  });

  it("reports onnxruntime's errors as rejected promises with its message", async () => {
    await expect(s.run({ a: a(), c: b() })).rejects.toThrow(/input c: .*Failed to find input name.*c/);
    await expect(s.run({ a: a(), b: b() }, ['nope'])).rejects.toThrow(/Invalid output name: nope/);
    await expect(s.run({ a: a(), b: new ort.Tensor('float32', Float32Array.of(1, 2), [2]) })).rejects.toThrow(/run: .*(broadcast|dimension)/i);
    await expect(s.run({ a: a() })).rejects.toThrow(/run: .*b/);
    await expect(s.run({ a: a(), b: new ort.Tensor('int32', Int32Array.of(1, 2, 3), [3]) })).rejects.toThrow(/run: .*(type|tensor\(int32\))/i);
    // a Tensor whose data is too short is refused before onnxruntime sees it
    const short = new ort.Tensor('float32', new Float32Array(3), [3]);
    Object.defineProperty(short, 'dims', { value: [4] });
    Object.defineProperty(short, 'size', { value: 4 });
    await expect(s.run({ a: short, b: b() })).rejects.toThrow(/needs 16 bytes, its data has 12/);
    await expect(s.run({ a: a(), b: b() }, ['sum', 'sum'])).rejects.toThrow(/twice/);
    // and the session still works afterwards
    expect(Array.from((await s.run({ a: a(), b: b() }, ['sum'])).sum.data as Float32Array)).toEqual([11, 22, 33]);
  });

  it('device tensors: allocate, copy in, bind as input and output, view a sub-range, copy out, dispose', async () => {
    const d = s.allocate('float32', [3]);
    expect(d).toBeInstanceOf(DeviceTensor);
    expect(d.location).toBe('cpu');
    await s.upload(d, b());
    expect(plain(s.hostView(d))).toEqual([10, 20, 30]);
    const p = s.allocate('float32', [3]);
    const r = await s.run({ a: a(), b: d }, { sum: null, prod: p });
    expect(Array.from(r.sum.data as Float32Array)).toEqual([11, 22, 33]);
    expect(r.prod).toBeUndefined(); // it stayed in the device tensor
    expect(Array.from((await s.download(p)).data as Float32Array)).toEqual([10, 40, 90]);
    // an input bound as an output too: Mul writes d, which Add then reads (one buffer, as GQA needs)
    await s.run({ a: a(), b: d }, { prod: d });
    expect(plain(s.hostView(d))).toEqual([10, 40, 90]);
    p.dispose();

    const tail = s.view(d, 1, [2]);
    expect(plain(s.hostView(tail))).toEqual([40, 90]);
    await s.run({ a: new ort.Tensor('float32', Float32Array.of(1, 1), [2]), b: tail }, { sum: tail });
    expect(plain(s.hostView(d))).toEqual([10, 41, 91]);
    expect(() => s.view(d, 2, [2])).toThrow(/outside/);

    const e = s.allocate('int64', [2]);
    await s.copy(e, new ort.Tensor('int64', BigInt64Array.of(5n, -6n), [2]));
    const f = s.allocate('int64', [1, 2]);
    await s.copy(f, e);
    expect(Array.from((await s.download(f)).data as BigInt64Array)).toEqual([5n, -6n]);
    await expect(s.copy(f, d)).rejects.toThrow(/types or sizes differ/);

    d.dispose();
    expect(tail.disposed).toBe(true);
    expect(() => tail.live()).toThrow(/disposed/);
    await expect(s.run({ a: a(), b: d })).rejects.toThrow(/disposed/);
    d.dispose(); // twice is harmless
    e.dispose();
    // f is left for release() to dispose
  });

  it('keeps the event loop free while a run is in flight', async () => {
    const n = 768;
    const g = new GraphBuilder(null);
    g.input('x', 'float32', [n, n]);
    let y = 'x';
    for (let i = 0; i < 6; i++) y = g.op('MatMul', [y, 'x']);
    g.node('Identity', [y], { outputs: ['y'] });
    g.output('y', 'float32', [n, n]);
    const heavy = await CapiSession.create(g.encode('heavy', opsets, 'test'), { provider: 'cpu', intraOpThreads: 1 });
    try {
      const x = new ort.Tensor('float32', new Float32Array(n * n).fill(1 / n), [n, n]);
      const order: string[] = [];
      // a blocking run would finish (and queue its continuation) before any timer could fire
      const timer = new Promise<void>((resolve) => setTimeout(() => (order.push('timer'), resolve()), 0));
      await heavy.run({ x }).then(() => order.push('run'));
      await timer;
      expect(order).toEqual(['timer', 'run']);
    } finally {
      await heavy.release();
    }
  });

  it('keeps an unchanged input bound from run to run, and reads what was written into it in place', async () => {
    const t = await CapiSession.create(model, { provider: 'cpu', intraOpThreads: 1 });
    try {
      const x = new ort.Tensor('float32', Float32Array.of(1, 2, 3), [3]);
      const y = b();
      const sum = async (feeds: Record<string, ort.Tensor>) => Array.from((await t.run(feeds, ['sum'])).sum.data as Float32Array);
      expect(await sum({ a: x, b: y })).toEqual([11, 22, 33]);
      const first = t.inputsBound;
      (x.data as Float32Array).set([5, 6, 7]);
      expect(await sum({ a: x, b: y })).toEqual([15, 26, 37]);
      // a new Tensor over the same memory, type and shape is the same binding
      expect(await sum({ a: new ort.Tensor('float32', x.data as Float32Array, [3]), b: y })).toEqual([15, 26, 37]);
      expect(t.inputsBound).toBe(first);
      // another array for one name: that one is bound again, the other stays
      expect(await sum({ a: a(), b: y })).toEqual([11, 22, 33]);
      expect(t.inputsBound).toBe(first + 1);
      // the same buffer at another offset is other memory
      const whole = Float32Array.of(0, 100, 200, 300, 0);
      expect(await sum({ a: new ort.Tensor('float32', whole.subarray(0, 3), [3]), b: y })).toEqual([10, 120, 230]);
      expect(await sum({ a: new ort.Tensor('float32', whole.subarray(1, 4), [3]), b: y })).toEqual([110, 220, 330]);
      expect(t.inputsBound).toBe(first + 3);
      // two runs at once: the second binds on its own, both read their own inputs
      const [p, q] = await Promise.all([sum({ a: x, b: y }), sum({ a: a(), b: a() })]);
      expect(p).toEqual([15, 26, 37]);
      expect(q).toEqual([2, 4, 6]);
      // a failed run leaves nothing behind: the next one binds every input afresh
      const before = t.inputsBound;
      await expect(t.run({ a: x, b: new ort.Tensor('int32', Int32Array.of(1, 2, 3), [3]) })).rejects.toThrow(/run: /);
      expect(await sum({ a: x, b: y })).toEqual([15, 26, 37]);
      expect(t.inputsBound).toBe(before + 1 + 2);
    } finally {
      await t.release();
    }
  });

  // LORASERVE_TEST_DEVICE=cuda (scripts/gpu-check.sh): there a bound host input is copied to the device when bound
  it.runIf(testDevice() === 'cuda')('cuda: a host input written in place is read again by the next run', async () => {
    const t = await CapiSession.create(model, { provider: 'cuda' });
    try {
      const x = new ort.Tensor('float32', Float32Array.of(1, 2, 3), [3]);
      const y = b();
      expect(Array.from((await t.run({ a: x, b: y }, ['sum'])).sum.data as Float32Array)).toEqual([11, 22, 33]);
      (x.data as Float32Array).set([5, 6, 7]);
      expect(Array.from((await t.run({ a: x, b: y }, ['sum'])).sum.data as Float32Array)).toEqual([15, 26, 37]);
    } finally {
      await t.release();
    }
  });

  it('2,000 runs do not grow memory (every OrtValue and binding released)', async () => {
    const n = 1 << 18; // 1 MiB per tensor: a leaked value per run would be 2 GB
    const big = graph([['a', 'float32', ['n']], ['b', 'float32', ['n']]], [['Add', ['a', 'b'], 'sum', 'float32', ['n']]]);
    const t = await CapiSession.create(big, { provider: 'cpu', intraOpThreads: 1 });
    try {
      const x = new ort.Tensor('float32', new Float32Array(n).fill(1), [n]);
      const out = new ort.Tensor('float32', new Float32Array(n), [n]);
      const runs = async (k: number) => {
        for (let i = 0; i < k; i++) {
          if (i % 2) await t.run({ a: x, b: x }, { sum: out });
          else await t.run({ a: x, b: x });
        }
      };
      await runs(200);
      const before = process.memoryUsage().rss;
      await runs(2000);
      const grown = process.memoryUsage().rss - before;
      expect(grown).toBeLessThan(256 * 1024 * 1024);
      expect((out.data as Float32Array)[n - 1]).toBe(2);
    } finally {
      await t.release();
    }
  }, 120_000);

  it('refuses to run after release, and release is idempotent', async () => {
    const t = await CapiSession.create(model, { provider: 'cpu' });
    const pending = t.run({ a: a(), b: b() }, ['sum']);
    await t.release(); // waits for the run in flight
    expect(Array.from((await pending).sum.data as Float32Array)).toEqual([11, 22, 33]);
    await t.release();
    await expect(t.run({ a: a(), b: b() })).rejects.toThrow(/released/);
    expect(() => t.allocate('float32', [1])).toThrow(/released/);
  });
});

describe('CapiSession: GroupQueryAttention with past and present in one buffer', () => {
  // 2 query heads sharing 1 KV head; head size 8 (the CPU kernel needs head_size % 8 == 0)
  const [B, Hq, Hkv, D, MAX] = [2, 2, 1, 8, 8];
  const lens = [3, 5];
  type Float = 'float32' | 'float16';

  function gqaModel(T: Float): Uint8Array {
    const g = new GraphBuilder(null);
    g.input('query', T, [B, 1, Hq * D]);
    g.input('key', T, [B, 1, Hkv * D]);
    g.input('value', T, [B, 1, Hkv * D]);
    g.input('past_key', T, [B, Hkv, MAX, D]);
    g.input('past_value', T, [B, Hkv, MAX, D]);
    g.input('seqlens_k', 'int32', [B]);
    g.input('total_sequence_length', 'int32', []);
    g.node('GroupQueryAttention', ['query', 'key', 'value', 'past_key', 'past_value', 'seqlens_k', 'total_sequence_length'], {
      domain: 'com.microsoft',
      attrs: { num_heads: int(Hq), kv_num_heads: int(Hkv) },
      outputs: ['output', 'present_key', 'present_value'],
    });
    g.output('output', T, [B, 1, Hq * D]);
    g.output('present_key', T, [B, Hkv, MAX, D]);
    g.output('present_value', T, [B, Hkv, MAX, D]);
    return g.encode('gqa', { '': 17, 'com.microsoft': 1 }, 'test');
  }

  /** IEEE half bits → number */
  function halfToFloat(h: number): number {
    const sign = h & 0x8000 ? -1 : 1;
    const exp = (h >> 10) & 0x1f;
    const mant = h & 0x3ff;
    if (exp === 0) return sign * mant * 2 ** -24;
    if (exp === 31) return mant ? NaN : sign * Infinity;
    return sign * (1 + mant / 1024) * 2 ** (exp - 15);
  }

  /** random values as the graph's type: the tensor data, and the values it holds as numbers */
  function values(rng: Rng, n: number, T: Float): { data: Float32Array | Uint16Array; f: Float32Array } {
    const x = Float32Array.from({ length: n }, () => rng.next() * 2 - 1);
    if (T === 'float32') return { data: x, f: x };
    const bits = toFloat16Bits(x);
    return { data: bits, f: Float32Array.from(bits, halfToFloat) };
  }

  /** attention written from the operator's definition: row b sees positions [0, lens[b]] */
  function reference(q: Float32Array, k: Float32Array, v: Float32Array, pastK: Float32Array, pastV: Float32Array): Float32Array {
    const out = new Float32Array(B * Hq * D);
    for (let b = 0; b < B; b++) {
      for (let h = 0; h < Hq; h++) {
        const kv = Math.floor(h / (Hq / Hkv));
        const keyAt = (p: number, i: number) => (p < lens[b] ? pastK[((b * Hkv + kv) * MAX + p) * D + i] : k[(b * Hkv + kv) * D + i]);
        const valAt = (p: number, i: number) => (p < lens[b] ? pastV[((b * Hkv + kv) * MAX + p) * D + i] : v[(b * Hkv + kv) * D + i]);
        const scores = Array.from({ length: lens[b] + 1 }, (_, p) => {
          let dot = 0;
          for (let i = 0; i < D; i++) dot += q[(b * Hq + h) * D + i] * keyAt(p, i);
          return dot / Math.sqrt(D);
        });
        const m = Math.max(...scores);
        const e = scores.map((x) => Math.exp(x - m));
        const sum = e.reduce((x, y) => x + y, 0);
        for (let i = 0; i < D; i++) out[(b * Hq + h) * D + i] = e.reduce((acc, w, p) => acc + (w / sum) * valAt(p, i), 0);
      }
    }
    return out;
  }

  /**
   * One decode step for rows at lengths 3 and 5: the cache must gain each row's new key/value at its
   * own position and nothing else, and the output must be attention over [0, len].
   */
  async function step(provider: 'cpu' | 'cuda', T: Float, cache: 'tensor' | 'device', seed: number) {
    const rng = new Rng(seed);
    const [q, k, v] = [values(rng, B * Hq * D, T), values(rng, B * Hkv * D, T), values(rng, B * Hkv * D, T)];
    const [pastK, pastV] = [values(rng, B * Hkv * MAX * D, T), values(rng, B * Hkv * MAX * D, T)];
    const dims = [B, Hkv, MAX, D];
    const s = await CapiSession.create(gqaModel(T), { provider, intraOpThreads: 1 });
    try {
      let cacheK: ort.Tensor | DeviceTensor;
      let cacheV: ort.Tensor | DeviceTensor;
      if (cache === 'tensor') {
        cacheK = new ort.Tensor(T, pastK.data.slice(), dims);
        cacheV = new ort.Tensor(T, pastV.data.slice(), dims);
      } else {
        cacheK = s.allocate(T, dims);
        cacheV = s.allocate(T, dims);
        expect(OrtCapi.get().memoryName(cacheK.handle)).toBe(provider === 'cuda' ? 'Cuda' : 'Cpu');
        await s.upload(cacheK, new ort.Tensor(T, pastK.data, dims));
        await s.upload(cacheV, new ort.Tensor(T, pastV.data, dims));
      }
      const r = await s.run(
        {
          query: new ort.Tensor(T, q.data, [B, 1, Hq * D]),
          key: new ort.Tensor(T, k.data, [B, 1, Hkv * D]),
          value: new ort.Tensor(T, v.data, [B, 1, Hkv * D]),
          past_key: cacheK,
          past_value: cacheV,
          seqlens_k: new ort.Tensor('int32', Int32Array.from(lens), [B]),
          total_sequence_length: new ort.Tensor('int32', Int32Array.of(Math.max(...lens) + 1), []),
        },
        { output: null, present_key: cacheK, present_value: cacheV },
      );
      if (cache === 'tensor') expect(r.present_key).toBe(cacheK);
      else expect(Object.keys(r)).toEqual(['output']);
      const read = async (c: ort.Tensor | DeviceTensor) => (c instanceof DeviceTensor ? (await s.download(c)).data : c.data) as Float32Array | Uint16Array;
      const [ck, cv] = [await read(cacheK), await read(cacheV)];
      for (let b = 0; b < B; b++)
        for (let p = 0; p < MAX; p++)
          for (let i = 0; i < D; i++) {
            const at = (b * MAX + p) * D + i;
            expect(ck[at]).toBe(p === lens[b] ? k.data[b * D + i] : pastK.data[at]);
            expect(cv[at]).toBe(p === lens[b] ? v.data[b * D + i] : pastV.data[at]);
          }
      const want = reference(q.f, k.f, v.f, pastK.f, pastV.f);
      const got = r.output.data as Float32Array | Uint16Array;
      const tolerance = T === 'float32' ? 1e-5 : 2e-3;
      for (let i = 0; i < want.length; i++) expect(Math.abs((T === 'float32' ? got[i] : halfToFloat(got[i])) - want[i])).toBeLessThan(tolerance);
    } finally {
      await s.release();
    }
  }

  it('float32, the cache in a Tensor fed and fetched', () => step('cpu', 'float32', 'tensor', 14));
  it('float32, the cache in a DeviceTensor', () => step('cpu', 'float32', 'device', 15));
  it('float16, the cache in a DeviceTensor', () => step('cpu', 'float16', 'device', 16));
  // CUDA's GroupQueryAttention is float16/bfloat16 only; LORASERVE_TEST_DEVICE=cuda (scripts/gpu-check.sh)
  it.runIf(testDevice() === 'cuda')('cuda: float16, the cache in CUDA memory', () => step('cuda', 'float16', 'device', 17));
});

describe('CapiSession in a worker thread and in the engine', () => {
  it('runs inside a worker_thread next to a session on the main thread, and the thread exits cleanly', async () => {
    const model = graph([['a', 'float32', [3]], ['b', 'float32', [3]]], [['Add', ['a', 'b'], 'sum', 'float32', [3]]]);
    const here = await CapiSession.create(model, { provider: 'cpu', intraOpThreads: 1 });
    try {
      const worker = new Worker(new URL('../src/engine/worker-entry.mjs', import.meta.url), {
        workerData: { entry: new URL('./helpers/capi-worker-job.ts', import.meta.url).href, model },
      });
      const reply = new Promise<number[]>((resolve, reject) => {
        worker.once('message', (m: number[]) => resolve(m));
        worker.once('error', reject);
      });
      const exit = new Promise<number>((resolve) => worker.once('exit', resolve));
      const mine = await here.run({ a: new ort.Tensor('float32', Float32Array.of(1, 2, 3), [3]), b: new ort.Tensor('float32', Float32Array.of(1, 1, 1), [3]) });
      expect(await reply).toEqual([11, 22, 33]);
      expect(Array.from(mine.sum.data as Float32Array)).toEqual([2, 3, 4]);
      expect(await exit).toBe(0);
    } finally {
      await here.release();
    }
  });

  it('RUNTIME=capi: the engine generates exactly what it generates on RUNTIME=node', async () => {
    const root = await tempRoot('capi-engine');
    try {
      const arch = tinyArchitecture({ tieWordEmbeddings: false, maxPositions: 64, eosTokenIds: [] });
      const model = await buildRandomModel(root.dir, arch, 23);
      const prompt = randomTokens(new Rng(3), 9, arch.vocabSize);
      const run = async (runtime: 'node' | 'capi') => {
        const lines: string[] = [];
        const log = { debug: () => {}, info: (_data: unknown, msg?: unknown) => void lines.push(String(msg)), warn: () => {}, error: () => {} };
        const engine = await Engine.start({ modelDir: model.dir, manifest: model.manifest, config: makeConfig({ DEVICE: 'cpu', RUNTIME: runtime, MAX_BATCH: 2, PREFILL_CHUNK: 4 }), log });
        try {
          const rows = await Promise.all([0, 1].map((j) => collect(engine.generate({ promptIds: prompt, adapterVersion: null, maxTokens: 6, temperature: 1, seed: 5 + j }))));
          return { rows: rows.map((r) => r.events.map((e) => [e.token, e.logprob])), lines };
        } finally {
          await engine.close();
        }
      };
      const node = await run('node');
      const capi = await run('capi');
      expect(capi.lines.some((l) => l.includes('RUNTIME=capi'))).toBe(true);
      expect(node.lines.some((l) => l.includes('RUNTIME=capi'))).toBe(false);
      expect(capi.rows).toEqual(node.rows);
    } finally {
      await root.remove();
    }
  }, 120_000);
});
