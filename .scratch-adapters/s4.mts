import { createReadStream, writeFileSync } from 'node:fs';
import { createGunzip } from 'node:zlib';
import { pipeline } from 'node:stream/promises';
import tar from 'tar-stream';
import { packTar, gzip } from '/work/main/test/helpers/adapter-uploads.js';
const f = '/tmp/scratch/cut.tgz';
writeFileSync(f, gzip(await packTar([{ name: 'adapter_config.json', data: Buffer.from('{}') }, { name: 'adapter_model.safetensors', data: (await import('node:crypto')).randomBytes(50000) }])).subarray(0, 200));
const extract = tar.extract();
const feeding = pipeline(createReadStream(f), createGunzip(), extract);
feeding.then(() => console.log('feeding ok'), (e) => { console.log('feeding err', e.message); });
try {
for await (const entry of extract) {
  let n = 0;
  for await (const c of entry) n += c.length;
  console.log('entry', entry.header.name, entry.header.size, n);
}
console.log('loop end');
} catch (e) { console.log('loop err', (e as Error).message); }
