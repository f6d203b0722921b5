import { mkdtemp, readFile, readdir, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { Readable, Transform } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { createFlushingWriteStream } from '../src/durable-fs.js';
import { seededRandom } from './helpers/adapter-fixtures.js';

/** The number of open descriptors of this process (Linux), to see that none is left behind. */
async function openFds(): Promise<number> {
  return (await readdir('/proc/self/fd')).length;
}

/** Waits up to a second for the descriptor count to come back to `before`. */
async function settled(before: number): Promise<void> {
  for (let i = 0; i < 100 && (await openFds()) > before; i++) await new Promise((r) => setTimeout(r, 10));
  expect(await openFds()).toBe(before);
}

describe('createFlushingWriteStream', () => {
  let dir: string;
  beforeAll(async () => {
    dir = await mkdtemp(path.join(os.tmpdir(), 'loraserve-flushing-'));
  });
  afterAll(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  function chunks(total: number, seed: number): Buffer[] {
    const rand = seededRandom(seed);
    const out: Buffer[] = [];
    for (let n = 0; n < total; ) {
      const size = Math.min(total - n, 1 + Math.floor(rand() * 70_000));
      out.push(Buffer.from(Array.from({ length: size }, () => Math.floor(rand() * 256))));
      n += size;
    }
    return out;
  }

  it('writes exactly the bytes it is given, flushing on the way, and closes its file', async () => {
    const parts = chunks(3_000_000, 1);
    const file = path.join(dir, 'a.bin');
    const before = await openFds();
    // a flush every 100 kB: about thirty flushes run while the data is still arriving
    await pipeline(Readable.from(parts), createFlushingWriteStream(file, 100_000));
    expect(Buffer.compare(await readFile(file), Buffer.concat(parts))).toBe(0);
    // the descriptor is closed behind the stream, after any flush still running
    await settled(before);
  });

  it('refuses to overwrite a file (wx), leaving it as it was', async () => {
    const file = path.join(dir, 'taken.bin');
    await writeFile(file, 'kept');
    await expect(pipeline(Readable.from([Buffer.from('new')]), createFlushingWriteStream(file))).rejects.toMatchObject({ code: 'EEXIST' });
    expect(await readFile(file, 'utf8')).toBe('kept');
  });

  it('a failing source closes the file and reports the source error', async () => {
    const file = path.join(dir, 'broken.bin');
    const before = await openFds();
    let sent = 0;
    const failing = new Transform({
      transform(chunk: Buffer, _enc, cb) {
        sent += chunk.byteLength;
        cb(sent > 200_000 ? new Error('the client went away') : null, chunk);
      },
    });
    await expect(pipeline(Readable.from(chunks(1_000_000, 2)), failing, createFlushingWriteStream(file, 50_000))).rejects.toThrow(/went away/);
    // pipeline rejects at once; the descriptor closes when the flush it may be waiting for ends
    await settled(before);
  });
});
