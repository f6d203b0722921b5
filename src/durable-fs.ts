import { open, type FileHandle } from 'node:fs/promises';
import { Writable } from 'node:stream';

/**
 * Crash safety on disk is "write, fsync, rename, fsync the folder": these two helpers are the
 * fsync halves, shared by the model cache, the embedded model and the adapter store.
 */
export async function writeFileDurably(path: string, bytes: Uint8Array | string): Promise<void> {
  const fh = await open(path, 'w');
  try {
    await fh.writeFile(bytes);
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/** fsync a file or a folder (a folder's fsync makes renames inside it durable). */
export async function fsyncPath(path: string): Promise<void> {
  const fh = await open(path, 'r');
  try {
    await fh.sync();
  } finally {
    await fh.close();
  }
}

/**
 * A write stream to a new file (fails if it exists) that starts an fdatasync after every
 * `flushEvery` bytes without waiting for it, so that a large upload reaches the disk while it is
 * still arriving and the fsync that makes it durable later finds little left to write.
 * The stream finishes when its last write has returned; the descriptor is closed behind it
 * (FileHandle.close waits for a flush still running, so none runs on a closed or reused
 * descriptor). Nothing is durable until the caller's own fsync, which is also where a write-back
 * error would show.
 */
export function createFlushingWriteStream(path: string, flushEvery = 8 * 1024 * 1024): Writable {
  let fh: FileHandle | null = null;
  let sinceFlush = 0;
  const close = () => {
    const h = fh;
    fh = null;
    return h ? h.close() : Promise.resolve();
  };
  return new Writable({
    construct(cb) {
      open(path, 'wx').then(
        (h) => {
          fh = h;
          cb();
        },
        (e: Error) => cb(e),
      );
    },
    writev(chunks, cb) {
      const h = fh!;
      const buffers = chunks.map((c) => c.chunk as Buffer);
      const total = buffers.reduce((n, b) => n + b.byteLength, 0);
      h.writev(buffers).then(
        ({ bytesWritten }) => {
          if (bytesWritten !== total) return cb(new Error(`short write to ${path}: ${bytesWritten} of ${total} bytes`));
          sinceFlush += bytesWritten;
          if (sinceFlush >= flushEvery) {
            sinceFlush = 0;
            h.datasync().catch(() => undefined);
          }
          cb();
        },
        (e: Error) => cb(e),
      );
    },
    destroy(err, cb) {
      if (err) close().then(() => cb(err), () => cb(err));
      else {
        // finished normally: the data is all written; closing may wait for a flush, nobody needs to
        close().catch(() => undefined);
        cb(null);
      }
    },
  });
}
