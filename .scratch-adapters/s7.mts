import { mkdtemp, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { extractAdapterArchive } from '../src/adapters/archive.js';
import { makeConfig } from '../src/config.js';
import { adapterBytes, adapterEntries, gzip, packTar } from '../test/helpers/adapter-uploads.js';
import { smallArch } from '../test/helpers/adapter-fixtures.js';
const arch = { ...smallArch(), hiddenSize: 64, intermediateSize: 172, numLayers: 4, numHeads: 8, numKvHeads: 4, headDim: 8 };
const good = adapterBytes(arch, { modelId: 'model', seed: 7 });
const tmp = await mkdtemp(path.join(os.tmpdir(), 'scratch-'));
const f = path.join(tmp, 'a.tgz');
await writeFile(f, gzip(await packTar(adapterEntries(good))).subarray(0, Number(process.env.CUT ?? 200)));
const out = path.join(tmp, 'out'); await mkdir(out);
const t = setTimeout(() => { console.log('HUNG'); process.exit(1); }, 4000);
try { console.log(await extractAdapterArchive(f, 'tgz', out, 1e6)); } catch (e) { console.log('err', (e as Error).message); }
clearTimeout(t);
