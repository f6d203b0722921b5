import { mkdtemp, mkdir } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { extractAdapterArchive } from '../src/adapters/archive.js';
const tmp = await mkdtemp(path.join(os.tmpdir(), 'scratch-'));
const out = path.join(tmp, 'out'); await mkdir(out);
const t = setTimeout(() => { console.log('HUNG'); process.exit(1); }, 4000);
try { console.log(await extractAdapterArchive('/tmp/scratch/cut7.tgz', 'tgz', out, 1e6)); } catch (e) { console.log('err', (e as Error).message); }
clearTimeout(t);
