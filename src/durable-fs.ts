import { open } from 'node:fs/promises';

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
