import { mkdtemp, readdir, rm } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import type { FastifyInstance } from 'fastify';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { Architecture } from '../src/model/architecture.js';
import { entrySegments, sniffArchive } from '../src/adapters/archive.js';
import { classifyPart } from '../src/adapters/upload.js';
import { adapterBytes, adapterEntries, filesForm, form, gzip, listing, packTar, packZip, type AdapterBytes, type FormPart } from './helpers/adapter-uploads.js';
import { startEmbeddedApp, type EmbeddedApp } from './helpers/embedded-app.js';

/**
 * The hostile corpus over a real listening server: every upload gets a clean 4xx
 * application/problem+json, the server stays alive (/healthz), and ADAPTER_DIR is byte-for-byte
 * what it was before (no stored adapter, no temp folder left).
 */

const MAX_UPLOAD = 256 * 1024;
let server: EmbeddedApp;
let adapterDir: string;
let app: FastifyInstance;
let url: string;
let arch: Architecture;
let modelId: string;
let good: AdapterBytes;

beforeAll(async () => {
  server = await startEmbeddedApp('adapters-hostile', { MAX_UPLOAD_BYTES: MAX_UPLOAD });
  ({ app, url, adapterDir } = server);
  arch = app.runtime.manifest.architecture;
  modelId = app.runtime.manifest.modelId;
  good = adapterBytes(arch, { modelId, seed: 7 });
  // one adapter already stored, so "unchanged" covers an existing adapter as well as the absence of new ones
  const res = await fetch(`${url}/v1/adapters`, { method: 'POST', body: filesForm('resident', good) });
  expect(res.status).toBe(201);
});

afterAll(async () => {
  await server?.close();
});

// ---- safetensors surgery ----

interface Header {
  [name: string]: { dtype: string; shape: number[]; data_offsets: [number, number] } | Record<string, string>;
}

function splitSafetensors(file: Buffer): { header: Header; data: Buffer } {
  const n = Number(file.readBigUInt64LE(0));
  return { header: JSON.parse(file.subarray(8, 8 + n).toString()) as Header, data: file.subarray(8 + n) };
}

function joinSafetensors(header: Header | string, data: Buffer, declaredLength?: bigint): Buffer {
  const json = Buffer.from(typeof header === 'string' ? header : JSON.stringify(header));
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(declaredLength ?? BigInt(json.byteLength));
  return Buffer.concat([prefix, json, data]);
}

type TensorEntry = { dtype: string; shape: number[]; data_offsets: [number, number] };
const tensorsOf = (h: Header) => Object.entries(h).filter(([k]) => k !== '__metadata__') as [string, TensorEntry][];

function editWeights(edit: (h: Header, data: Buffer) => { header: Header | string; data: Buffer; declared?: bigint }): Buffer {
  const { header, data } = splitSafetensors(good.weights);
  const out = edit(header, Buffer.from(data));
  return joinSafetensors(out.header, out.data, out.declared);
}

const withWeights = (weights: Uint8Array): FormPart[] => [
  ['name', 'hostile'],
  ['config', good.config, 'adapter_config.json'],
  ['weights', weights, 'adapter_model.safetensors'],
];

/** Patches a zip's declared uncompressed size (central directory and local header) of one entry: a lying zip bomb. */
function lieAboutSize(zip: Buffer, entry: string, size: number): Buffer {
  const out = Buffer.from(zip);
  for (let i = 0; i + 46 < out.length; i++) {
    if (out.readUInt32LE(i) === 0x02014b50 && out.subarray(i + 46, i + 46 + out.readUInt16LE(i + 28)).toString() === entry) {
      out.writeUInt32LE(size, i + 24);
      out.writeUInt32LE(size, out.readUInt32LE(i + 42) + 22);
    }
  }
  return out;
}

// ---- the corpus: [label, parts or raw request, expected status, expected problem code (422) or detail pattern] ----

type Case = {
  label: string;
  parts: () => Promise<FormPart[]> | FormPart[];
  status: number;
  code?: string;
  detail?: RegExp;
  method?: 'POST' | 'PUT';
  path?: string;
};

const cases: Case[] = [
  { label: 'truncated safetensors', parts: () => withWeights(good.weights.subarray(0, good.weights.length - 100)), status: 422, code: 'corrupt_file' },
  { label: 'header length larger than the file', parts: () => withWeights(editWeights((h, d) => ({ header: h, data: d, declared: BigInt(good.weights.length + 100) }))), status: 422, code: 'corrupt_file' },
  { label: 'header claiming 10 GB', parts: () => withWeights(editWeights((h, d) => ({ header: h, data: d, declared: 10_000_000_000n }))), status: 422, code: 'corrupt_file' },
  {
    label: 'overlapping offsets',
    parts: () =>
      withWeights(
        editWeights((h, d) => {
          const [[, a], [, b]] = tensorsOf(h).filter(([k]) => /layers\.0\..*lora_A/.test(k)) as [string, TensorEntry][];
          b!.data_offsets = [...a!.data_offsets];
          return { header: h, data: d };
        }),
      ),
    status: 422,
    code: 'corrupt_file',
  },
  {
    label: 'out-of-range offsets',
    parts: () =>
      withWeights(
        editWeights((h, d) => {
          const last = tensorsOf(h).at(-1)![1];
          last.data_offsets = [d.length + 16, d.length + 16 + (last.data_offsets[1] - last.data_offsets[0])];
          return { header: h, data: d };
        }),
      ),
    status: 422,
    code: 'corrupt_file',
  },
  {
    label: 'dtype × shape ≠ byte count',
    parts: () =>
      withWeights(
        editWeights((h, d) => {
          const t = tensorsOf(h)[0]![1];
          t.shape = [t.shape[0]!, t.shape[1]! + 1];
          return { header: h, data: d };
        }),
      ),
    status: 422,
    code: 'corrupt_file',
  },
  { label: 'invalid JSON config', parts: () => [['name', 'hostile'], ['config', Buffer.from('{"r": 8, "lora_alpha":'), 'adapter_config.json'], ['weights', good.weights, 'adapter_model.safetensors']], status: 422, code: 'invalid_config' },
  { label: 'invalid JSON header', parts: () => withWeights(editWeights((_h, d) => ({ header: '{"tensor": {"dtype": "F32", ', data: d }))), status: 422, code: 'corrupt_file' },
  { label: 'zero-byte weights file', parts: () => withWeights(new Uint8Array(0)), status: 422, code: 'corrupt_file' },
  { label: 'zero-byte config file', parts: () => [['name', 'hostile'], ['config', new Uint8Array(0), 'adapter_config.json'], ['weights', good.weights, 'adapter_model.safetensors']], status: 422, code: 'invalid_config' },
  {
    label: 'NaN weights',
    parts: () =>
      withWeights(
        editWeights((h, d) => {
          const t = tensorsOf(h)[0]![1];
          d.writeFloatLE(Number.NaN, t.data_offsets[0] + 4);
          return { header: h, data: d };
        }),
      ),
    status: 422,
    code: 'non_finite',
  },
  {
    label: 'unknown dtype',
    parts: () =>
      withWeights(
        editWeights((h, d) => {
          tensorsOf(h)[0]![1].dtype = 'Q4_K';
          return { header: h, data: d };
        }),
      ),
    status: 422,
    code: 'bad_dtype',
  },
  { label: 'pickle adapter_model.bin', parts: () => [['name', 'hostile'], ['config', good.config, 'adapter_config.json'], ['weights', Buffer.from('\x80\x02}q\x00.'), 'adapter_model.bin']], status: 422, code: 'missing_file', detail: /pickle/ },
  { label: 'name with ../', parts: () => parts('../escape'), status: 400, detail: /adapter name/ },
  { label: 'absolute name', parts: () => parts('/etc/passwd'), status: 400, detail: /adapter name/ },
  { label: 'name over 64 characters', parts: () => parts('a'.repeat(65)), status: 400, detail: /65 characters/ },
  { label: 'name with a leading dot', parts: () => parts('.tmp-x'), status: 400, detail: /dot/ },
  { label: 'missing weights part', parts: () => [['name', 'hostile'], ['config', good.config, 'adapter_config.json']], status: 400, detail: /missing part.*adapter_model\.safetensors/ },
  { label: 'missing both files', parts: () => [['name', 'hostile']], status: 400, detail: /missing part.*adapter_config\.json.*adapter_model\.safetensors/ },
  { label: 'extra unknown parts', parts: () => [...parts('hostile'), ['comment', 'hi'], ['notes', Buffer.from('x'), 'notes.txt']], status: 400, detail: /unexpected part.*`comment`.*`notes`/ },
  { label: 'a file part sent twice', parts: () => [...parts('hostile'), ['weights', good.weights, 'adapter_model.safetensors']], status: 400, detail: /more than once/ },
  { label: 'files and an archive together', parts: async () => [...parts('hostile'), ['archive', await packTar(adapterEntries(good)), 'a.tar']], status: 400, detail: /not both/ },
  { label: 'zip with ../ entries', parts: () => [['name', 'hostile'], ['archive', packZip([...adapterEntries(good), { name: '../../evil.sh', data: Buffer.from('rm -rf /') }]), 'a.zip']], status: 400, detail: /evil\.sh.*\.\./ },
  { label: 'zip with a ../ adapter file', parts: () => [['name', 'hostile'], ['archive', packZip(adapterEntries(good, '..')), 'a.zip']], status: 400, detail: /\.\./ },
  { label: 'zip with a symlink entry', parts: () => [['name', 'hostile'], ['archive', packZip([{ name: 'adapter_config.json', data: good.config }, { name: 'adapter_model.safetensors', data: Buffer.from('/etc/shadow'), mode: 0o120777 }]), 'a.zip']], status: 400, detail: /symlink/ },
  { label: 'tar with ../ entries', parts: async () => [['name', 'hostile'], ['archive', await packTar([...adapterEntries(good), { name: '../outside', data: Buffer.from('x') }]), 'a.tar']], status: 400, detail: /outside.*\.\./ },
  { label: 'tar with an absolute entry', parts: async () => [['name', 'hostile'], ['archive', await packTar([...adapterEntries(good), { name: '/etc/cron.d/x', data: Buffer.from('x') }]), 'a.tar']], status: 400, detail: /absolute/ },
  { label: 'tar with a symlink entry', parts: async () => [['name', 'hostile'], ['archive', gzip(await packTar([{ name: 'adapter_config.json', data: good.config }, { name: 'adapter_model.safetensors', type: 'symlink', linkname: '/etc/passwd' }])), 'a.tgz']], status: 400, detail: /symlink/ },
  { label: 'tar with a hard link entry', parts: async () => [['name', 'hostile'], ['archive', await packTar([...adapterEntries(good), { name: 'x', type: 'link', linkname: '/etc/passwd' }]), 'a.tar']], status: 400, detail: /link/ },
  { label: 'tar with a device entry', parts: async () => [['name', 'hostile'], ['archive', await packTar([...adapterEntries(good), { name: 'null', type: 'character-device' }]), 'a.tar']], status: 400, detail: /character-device/ },
  { label: 'an archive that is not one', parts: () => [['name', 'hostile'], ['archive', Buffer.from('this is not an archive at all'), 'a.tar.gz']], status: 400 },
  { label: 'a gzip stream cut short', parts: async () => [['name', 'hostile'], ['archive', gzip(await packTar(adapterEntries(good))).subarray(0, 200), 'a.tgz']], status: 400 },
  {
    label: 'a zip whose CRC does not match',
    parts: () => {
      const z = packZip(adapterEntries(good));
      // flip one byte of the CRC-32 that the central directory records for the first entry
      const first = z.indexOf(Buffer.from([0x50, 0x4b, 0x01, 0x02]));
      z[first + 16] ^= 0xff;
      return [['name', 'hostile'], ['archive', z, 'a.zip']];
    },
    status: 400,
    detail: /CRC/,
  },
  { label: 'upload over MAX_UPLOAD_BYTES, streamed (file.truncated)', parts: () => withWeights(new Uint8Array(MAX_UPLOAD + 40 * 1024)), status: 413 },
  { label: 'upload over MAX_UPLOAD_BYTES, declared by Content-Length', parts: () => withWeights(new Uint8Array(4 * MAX_UPLOAD)), status: 413 },
  { label: 'two files that together pass MAX_UPLOAD_BYTES', parts: () => [['name', 'hostile'], ['config', new Uint8Array(MAX_UPLOAD / 2 + 1024), 'adapter_config.json'], ['weights', new Uint8Array(MAX_UPLOAD / 2 + 1024), 'adapter_model.safetensors']], status: 413 },
  { label: 'zip bomb (declared size over the cap)', parts: () => [['name', 'hostile'], ['archive', packZip([{ name: 'adapter_config.json', data: good.config }, { name: 'adapter_model.safetensors', data: new Uint8Array(8 * MAX_UPLOAD) }]), 'bomb.zip']], status: 413 },
  {
    label: 'zip bomb lying about its size',
    parts: () => [['name', 'hostile'], ['archive', lieAboutSize(packZip([{ name: 'adapter_config.json', data: good.config }, { name: 'adapter_model.safetensors', data: new Uint8Array(MAX_UPLOAD / 2) }]), 'adapter_model.safetensors', 1000), 'bomb.zip']],
    status: 400,
    detail: /expands past the 1000 bytes/,
  },
  {
    label: 'zip bomb lying about its size, past the cap',
    parts: () => [['name', 'hostile'], ['archive', lieAboutSize(packZip([{ name: 'adapter_config.json', data: good.config }, { name: 'adapter_model.safetensors', data: new Uint8Array(64 * MAX_UPLOAD) }]), 'adapter_model.safetensors', 1000), 'bomb.zip']],
    status: 413,
  },
  { label: 'gzip bomb (tar of a file over the cap)', parts: async () => [['name', 'hostile'], ['archive', gzip(await packTar([{ name: 'adapter_config.json', data: good.config }, { name: 'adapter_model.safetensors', data: new Uint8Array(8 * MAX_UPLOAD) }])), 'bomb.tgz']], status: 413 },
  { label: 'PUT with a name of ..', parts: () => filesFormParts(), status: 400, method: 'PUT', path: '/v1/adapters/..%2F..%2Fetc' },
];

function parts(name: string): FormPart[] {
  return [
    ['name', name],
    ['config', good.config, 'adapter_config.json'],
    ['weights', good.weights, 'adapter_model.safetensors'],
  ];
}
function filesFormParts(): FormPart[] {
  return parts('x').slice(1);
}

async function hidden(): Promise<string[]> {
  return (await readdir(adapterDir)).filter((e) => e.startsWith('.'));
}

describe('hostile uploads: a clean 4xx problem, the server alive, the store unchanged', () => {
  for (const c of cases) {
    it(`${c.label} → ${c.status}${c.code ? ` ${c.code}` : ''}`, async () => {
      const before = await listing(adapterDir);
      const listBefore = await (await fetch(`${url}/v1/adapters`)).text();
      const res = await fetch(url + (c.path ?? '/v1/adapters'), { method: c.method ?? 'POST', body: form(await c.parts()) });
      const text = await res.text();
      expect(res.status, text).toBe(c.status);
      expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
      const body = JSON.parse(text) as { status: number; title: string; detail: string; errors?: { code: string; severity: string }[] };
      expect(body.status).toBe(c.status);
      expect(body.detail.length).toBeGreaterThan(10);
      if (c.code) expect(body.errors?.map((e) => e.code)).toContain(c.code);
      if (c.status === 422) expect(body).toHaveProperty('warnings');
      if (c.detail) expect(body.detail).toMatch(c.detail);
      expect((await fetch(`${url}/healthz`)).status).toBe(200);
      expect(await listing(adapterDir)).toEqual(before);
      expect(await hidden()).toEqual([]);
      expect(await (await fetch(`${url}/v1/adapters`)).text()).toBe(listBefore);
    });
  }

  it('a body that is not multipart → 415', async () => {
    const res = await fetch(`${url}/v1/adapters`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ name: 'x' }) });
    expect(res.status).toBe(415);
    expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
  });

  it('a client that disconnects mid-upload leaves no temp folder behind', async () => {
    const big = new Uint8Array(MAX_UPLOAD - 8 * 1024);
    const fd = form(withWeights(big));
    const body = new Uint8Array(await new Response(fd).arrayBuffer());
    const type = new Response(fd).headers.get('content-type')!;
    const { request } = await import('node:http');
    await new Promise<void>((resolve) => {
      const req = request(`${url}/v1/adapters`, { method: 'POST', headers: { 'content-type': type, 'content-length': body.length } });
      req.on('error', () => resolve());
      req.write(body.subarray(0, body.length / 2), () => setTimeout(() => (req.destroy(), resolve()), 100));
    });
    for (let i = 0; i < 50 && (await hidden()).length; i++) await new Promise((r) => setTimeout(r, 20));
    expect(await hidden()).toEqual([]);
    expect((await fetch(`${url}/healthz`)).status).toBe(200);
  });
});

describe('pure pieces of the upload path', () => {
  it('entrySegments: safe names split, unsafe ones say why', () => {
    expect(entrySegments('./a/adapter_config.json')).toEqual({ segments: ['a', 'adapter_config.json'] });
    expect(entrySegments('a//b/')).toEqual({ segments: ['a', 'b'] });
    for (const [n, why] of [['../x', /\.\./], ['a/../../x', /\.\./], ['/etc/x', /absolute/], ['C:\\x', /absolute/], ['a\\..\\x', /\.\./], ['a\0b', /NUL/]] as const) {
      const r = entrySegments(n);
      expect('unsafe' in r && r.unsafe, n).toMatch(why);
    }
  });

  it('sniffArchive trusts magic bytes over the file name', () => {
    expect(sniffArchive(Buffer.from([0x50, 0x4b, 3, 4]), 'x.tar')).toBe('zip');
    expect(sniffArchive(Buffer.from([0x1f, 0x8b, 8, 0]), 'x.zip')).toBe('tgz');
    const tarHead = Buffer.alloc(512);
    tarHead.write('ustar', 257, 'latin1');
    expect(sniffArchive(tarHead, 'x')).toBe('tar');
    expect(sniffArchive(Buffer.from('hello'), 'x.bin')).toBeNull();
  });

  it('classifyPart: file names first, field names second, pickles recognised', () => {
    expect(classifyPart('file', 'adapter_config.json')).toBe('config');
    expect(classifyPart('weights', 'adapter_config.json')).toBe('config');
    expect(classifyPart('weights', 'w.safetensors')).toBe('weights');
    expect(classifyPart('x', 'C:\\Users\\me\\adapter_model.safetensors')).toBe('weights');
    expect(classifyPart('upload', 'adapter.tar.gz')).toBe('archive');
    expect(classifyPart('archive', 'blob')).toBe('archive');
    expect(classifyPart('weights', 'adapter_model.bin')).toBe('pickle');
    expect(classifyPart('weights', 'model.pt')).toBe('pickle');
    expect(classifyPart('notes', 'notes.txt')).toBeNull();
  });
});

// ---- issue 11: requests that stalled the server or were answered with unbounded or wrong reports ----

/**
 * /healthz must keep answering, within a generous bound (not a timing), for as long as a hostile
 * request is in flight: probed every 20 ms until its response arrives, no gap between two answers
 * may reach 5 s. (The server shares this process's event loop, so a stall shows as such a gap.)
 */
async function whileHealthy<T>(base: string, work: Promise<T>): Promise<T> {
  let done = false;
  const result = work.finally(() => {
    done = true;
  });
  let last = performance.now();
  do {
    const res = await fetch(`${base}/healthz`, { signal: AbortSignal.timeout(5000) });
    expect(res.status).toBe(200);
    const now = performance.now();
    expect(now - last, 'ms since /healthz last answered').toBeLessThan(5000);
    last = now;
    if (!done) await new Promise((r) => setTimeout(r, 20));
  } while (!done);
  return result;
}

function withConfig(edit: Record<string, unknown>, opts: { weights?: Uint8Array; weightsFirst?: boolean } = {}): FormPart[] {
  const cfg: FormPart = ['config', Buffer.from(JSON.stringify({ ...(JSON.parse(good.config.toString()) as Record<string, unknown>), ...edit })), 'adapter_config.json'];
  const w: FormPart = ['weights', opts.weights ?? good.weights, 'adapter_model.safetensors'];
  return [['name', 'hostile'], ...(opts.weightsFirst ? [w, cfg] : [cfg, w])];
}

// the pattern of the report: 35 s on the event loop with JavaScript's backtracking RegExp
const DOS = `${'.*'.repeat(8)}X`;

type Issue11Case = { label: string; parts: () => FormPart[]; path?: string; status: number; code?: string; check?: (body: Record<string, unknown>, text: string) => void };

const issue11Cases: Issue11Case[] = [
  { label: 'target_modules of catastrophic backtracking (validate)', path: '/v1/adapters/validate', parts: () => withConfig({ target_modules: DOS }), status: 422, code: 'no_modules_matched' },
  { label: 'target_modules of catastrophic backtracking (upload)', parts: () => withConfig({ target_modules: DOS }), status: 422, code: 'no_modules_matched' },
  {
    label: 'rank_pattern and exclude_modules of catastrophic backtracking (validate: fits, with a warning)',
    path: '/v1/adapters/validate',
    parts: () => withConfig({ rank_pattern: { [DOS]: 4 }, exclude_modules: DOS }),
    status: 200,
    // the fixture's random B outweighs the embedded model's small random weights: large_delta is right there too
    check: (body) => expect((body.warnings as { code: string }[]).map((w) => w.code).filter((c) => c !== 'large_delta')).toEqual(['rank_pattern_unmatched']),
  },
  {
    label: 'a backreference in target_modules',
    parts: () => withConfig({ target_modules: '.*(q)_proj\\1' }),
    status: 422,
    code: 'invalid_config',
    check: (body) => expect((body.errors as { code: string; key?: string }[]).find((e) => e.code === 'invalid_config')!.key).toBe('target_modules'),
  },
  { label: 'a lookahead in a rank_pattern key', parts: () => withConfig({ rank_pattern: { '^(?!.*vision).*q_proj': 4 } }), status: 422, code: 'invalid_config' },
  {
    label: 'lora_alpha 1e30 (config first: B scaled in the stream)',
    parts: () => withConfig({ lora_alpha: 1e30 }),
    status: 422,
    code: 'non_finite',
    check: (body) => expect((body.errors as { code: string; key?: string; module?: string }[]).find((e) => e.code === 'non_finite')).toMatchObject({ key: 'lora_alpha', module: expect.stringMatching(/^model\.layers\.\d+\.self_attn\.[qv]_proj$/) }),
  },
  { label: 'lora_alpha 1e308 (weights first)', parts: () => withConfig({ lora_alpha: 1e308 }, { weightsFirst: true }), status: 422, code: 'non_finite' },
  {
    label: 'one alpha_pattern key of 1e35',
    parts: () => withConfig({ alpha_pattern: { 'layers.1.self_attn.v_proj': 1e35 } }),
    status: 422,
    code: 'non_finite',
    check: (body) => expect((body.errors as { code: string; key?: string }[])[0]).toMatchObject({ code: 'non_finite', key: 'layers.1.self_attn.v_proj' }),
  },
  {
    label: 'a shape of 30 000 dimensions',
    parts: () =>
      withWeights(
        editWeights((h, d) => {
          tensorsOf(h)[0]![1].shape = new Array(30_000).fill(1);
          return { header: h, data: d };
        }),
      ),
    status: 422,
    code: 'corrupt_file',
    check: (_b, text) => expect(text.length).toBeLessThan(8_000),
  },
  {
    label: 'a tensor named twice in the header',
    parts: () =>
      withWeights(
        editWeights((h, d) => {
          const [name, entry] = tensorsOf(h)[0]!;
          const json = JSON.stringify(h);
          return { header: `{${JSON.stringify(name)}:${JSON.stringify(entry)},${json.slice(1)}`, data: d };
        }),
      ),
    status: 422,
    code: 'corrupt_file',
    check: (body) => expect((body.errors as { message: string }[])[0]!.message).toContain('twice'),
  },
  {
    label: 'an AdaLoRA adapter_config.json (rank_pattern of boolean masks)',
    parts: () => {
      const masks = Object.fromEntries(Array.from({ length: 196 }, (_, i) => [`base_model.model.model.layers.${i}.self_attn.q_proj.lora_E`, new Array(12).fill(true)]));
      return withConfig({ peft_type: 'ADALORA', init_r: 12, target_r: 8, tinit: 200, tfinal: 1000, deltaT: 10, beta1: 0.85, beta2: 0.85, orth_reg_weight: 0.5, rank_pattern: masks });
    },
    status: 422,
    code: 'unsupported_feature',
    check: (body, text) => {
      expect((body.errors as unknown[]).length).toBe(1);
      expect(body.detail).toContain('AdaLoRA');
      expect(text.length).toBeLessThan(6_000);
    },
  },
  {
    label: 'unexpected tensors under a 196-entry target_modules',
    parts: () => withConfig({ target_modules: Array.from({ length: 196 }, (_, i) => `model.layers.${i}.self_attn.q_proj`) }),
    status: 422,
    code: 'unexpected_tensor',
    check: (body) => {
      for (const e of body.errors as { code: string; message: string }[]) if (e.code === 'unexpected_tensor') expect(e.message.length).toBeLessThan(400);
    },
  },
];

describe('issue 11: no hostile config or header stalls the server or earns an unbounded answer', () => {
  for (const c of issue11Cases) {
    it(`${c.label} → ${c.status}${c.code ? ` ${c.code}` : ''}, /healthz answering meanwhile`, async () => {
      const before = await listing(adapterDir);
      const res = await whileHealthy(url, fetch(url + (c.path ?? '/v1/adapters'), { method: 'POST', body: form(c.parts()) }));
      const text = await res.text();
      expect(res.status, text.slice(0, 2000)).toBe(c.status);
      const body = JSON.parse(text) as Record<string, unknown>;
      if (c.status === 422) {
        expect(res.headers.get('content-type')).toMatch(/^application\/problem\+json/);
        expect((body.errors as { code: string }[]).map((e) => e.code)).toContain(c.code);
      }
      c.check?.(body, text);
      expect((await fetch(`${url}/healthz`)).status).toBe(200);
      expect(await listing(adapterDir)).toEqual(before);
      expect(await hidden()).toEqual([]);
    });
  }
});

describe('issue 11 on a server that takes 8 MiB uploads', () => {
  let big: EmbeddedApp | null = null;
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'loraserve-hostile-store-'));
    big = await startEmbeddedApp('adapters-hostile-big', { MAX_UPLOAD_BYTES: 8 * 1024 * 1024, ADAPTER_DIR: dir });
  });
  afterAll(async () => {
    await big?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('a 3 MiB header (over the 2 MiB cap) → 422 corrupt_file, /healthz answering meanwhile', async () => {
    const names = Array.from({ length: 27_000 }, (_, i) => `"base_model.model.model.layers.${i}.self_attn.q_proj.lora_A.weight":{"dtype":"F32","shape":[0,64],"data_offsets":[0,0]}`);
    const weights = joinSafetensors(`{${names.join(',')}}`, Buffer.alloc(0));
    expect(weights.length).toBeGreaterThan(3 * 1024 * 1024);
    const res = await whileHealthy(big!.url, fetch(`${big!.url}/v1/adapters/validate`, { method: 'POST', body: form(withConfig({}, { weights })) }));
    const text = await res.text();
    expect(res.status).toBe(422);
    const body = JSON.parse(text) as { errors: { code: string; message: string }[] };
    expect(body.errors.map((e) => e.code)).toContain('corrupt_file');
    expect(body.errors.find((e) => e.code === 'corrupt_file')!.message).toMatch(/over the 2097152-byte cap/);
    expect(text.length).toBeLessThan(8_000);
  });

  it('a stored adapter whose patterns backtrack catastrophically does not hold up the next start', async () => {
    const patterned = withConfig({ target_modules: `${'.*'.repeat(8)}\\.(q|v)_proj`, rank_pattern: { [DOS]: 4 } }).slice(1);
    const res = await fetch(`${big!.url}/v1/adapters`, { method: 'POST', body: form([['name', 'patterned'], ...patterned]) });
    expect(res.status, await res.clone().text()).toBe(201);
    await big!.close();
    big = null;
    // the same store, re-validated at start: with a backtracking engine this start would never end
    big = await startEmbeddedApp('adapters-hostile-restart', { MAX_UPLOAD_BYTES: 8 * 1024 * 1024, ADAPTER_DIR: dir });
    expect((await fetch(`${big.url}/readyz`)).status).toBe(200);
    const detail = (await (await fetch(`${big.url}/v1/adapters/patterned`)).json()) as { state: string; warnings: { code: string }[] };
    expect(detail.state).toBe('ready');
    expect(detail.warnings.map((w) => w.code).filter((c) => c !== 'large_delta')).toEqual(['rank_pattern_unmatched']);
  });
});

describe('issue 11: every echoed value is bounded, in the 422 body and in the log (trace level)', () => {
  let logged: string[] = [];
  let logServer: FastifyInstance;
  let logUrl: string;
  let logTmp: string;
  beforeAll(async () => {
    const { buildApp } = await import('../src/app.js');
    const { makeConfig } = await import('../src/config.js');
    const { ensureEmbeddedModel } = await import('../src/model/embedded.js');
    const { pino } = await import('pino');
    logTmp = await mkdtemp(path.join(os.tmpdir(), 'loraserve-hostile-log-'));
    const model = await ensureEmbeddedModel(path.join(logTmp, 'model'));
    const logger = pino({ level: 'trace' }, { write: (line: string) => void logged.push(line) });
    logServer = await buildApp(makeConfig({ MODEL_PATH: model, ADAPTER_DIR: path.join(logTmp, 'adapters'), CACHE_DIR: path.join(logTmp, 'cache'), DEVICE: 'cpu', LOG_LEVEL: 'trace', MAX_UPLOAD_BYTES: MAX_UPLOAD }), { logger });
    logUrl = await logServer.listen({ port: 0, host: '127.0.0.1' });
  });
  afterAll(async () => {
    await logServer?.close();
    if (logTmp) await rm(logTmp, { recursive: true, force: true });
  });

  const longName = `base_model.model.model.layers.0.self_attn.q_proj${'.x'.repeat(60_000)}.lora_A.weight`;
  const bounded: [string, () => FormPart[]][] = [
    ['a tensor name of 120 000 characters', () => withWeights(editWeights((h, d) => {
      const [name, entry] = tensorsOf(h)[0]!;
      delete h[name];
      h[longName] = entry;
      return { header: h, data: d };
    }))],
    ['a shape of 30 000 dimensions', () => withWeights(editWeights((h, d) => {
      tensorsOf(h)[0]![1].shape = new Array(30_000).fill(7);
      return { header: h, data: d };
    }))],
    ['a target_modules regex of 100 000 characters', () => withConfig({ target_modules: `(${'q_proj|'.repeat(14_000)}v_proj)` })],
    ['a target_modules list of 5 000 names that match nothing', () => withConfig({ target_modules: Array.from({ length: 5000 }, (_, i) => `transformer.h.${i}.attn.c_attn`) })],
    ['a dtype of 100 000 characters', () => withWeights(editWeights((h, d) => {
      tensorsOf(h)[0]![1].dtype = 'F'.repeat(100_000);
      return { header: h, data: d };
    }))],
  ];
  for (const [label, parts] of bounded) {
    it(`${label}: 422, the body and every log line short`, async () => {
      logged = [];
      const res = await fetch(`${logUrl}/v1/adapters`, { method: 'POST', body: form(parts()) });
      const text = await res.text();
      expect(res.status, text.slice(0, 500)).toBe(422);
      // at most a few hundred characters per problem (16 tensors here, each listed in errors and in report.errors)
      expect(text.length).toBeLessThan(64_000);
      for (const e of (JSON.parse(text) as { errors: { message: string }[] }).errors) expect(e.message.length).toBeLessThan(1000);
      await new Promise((r) => setTimeout(r, 50));
      expect(logged.length).toBeGreaterThan(0);
      expect(Math.max(...logged.map((l) => l.length))).toBeLessThan(16_000);
    });
  }
});
