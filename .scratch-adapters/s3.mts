import { mkdtemp, writeFile, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { extractAdapterArchive } from '/work/main/src/adapters/archive.js';
import { packTar, gzip } from '/work/main/test/helpers/adapter-uploads.js';
const tmp = await mkdtemp(path.join(os.tmpdir(), 'scratch-'));
const f = path.join(tmp, 'a.tgz');
await writeFile(f, gzip(await packTar([{ name: 'adapter_config.json', data: Buffer.from('{}') }, { name: 'adapter_model.safetensors', data: (await import('node:crypto')).randomBytes(50000) }])).subarray(0, 200));
const out = path.join(tmp, 'out'); await mkdir(out);
const t = setTimeout(() => { console.log('HUNG'); process.exit(1); }, 5000);
try { console.log(await extractAdapterArchive(f, 'tgz', out, 1e6)); } catch (e) { console.log('err', (e as Error).message); }
clearTimeout(t);
