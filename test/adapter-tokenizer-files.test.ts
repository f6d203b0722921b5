import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SharedFolderStore } from '../src/adapters/shared-folder.js';
import { AdapterStore, type AdapterBackend } from '../src/adapters/store.js';
import { classifyPart, MAX_TOKENIZER_FILE_BYTES, tokenizerTooLarge } from '../src/adapters/upload.js';
import { versionMeta, writeStagedFiles } from './helpers/stored-versions.js';

/**
 * The optional tokenizer files of an adapter that adds tokens (issue 18 item 5): recognised in an
 * upload, capped, and kept by each store with the version — digested, moved in with the two adapter
 * files before meta.json, checked on verify like them.
 */

let root: string;
beforeAll(async () => {
  root = await mkdtemp(path.join(os.tmpdir(), 'loraserve-tokfiles-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

const TOK = JSON.stringify({ version: '1.0', added_tokens: [{ id: 7, content: '<|x|>' }] });
const TOK_CONFIG = '{"add_bos_token": true}';

describe('upload parts', () => {
  it('tokenizer.json / tokenizer_config.json by file name or by field name; over the cap is named', () => {
    expect(classifyPart('whatever', 'tokenizer.json')).toBe('tokenizer.json');
    expect(classifyPart('tokenizer', 'tok.json')).toBe('tokenizer.json');
    expect(classifyPart('tokenizer_config', 'x.json')).toBe('tokenizer_config.json');
    expect(classifyPart('special_tokens_map', 'special_tokens_map.json')).toBeNull();
    expect(tokenizerTooLarge({ 'tokenizer.json': 1000 })).toBeNull();
    expect(tokenizerTooLarge({ 'tokenizer.json': MAX_TOKENIZER_FILE_BYTES + 1 })).toMatch(/tokenizer\.json is \d+ bytes/);
  });
});

const stores: [string, (dir: string) => Promise<AdapterBackend>][] = [
  ['AdapterStore', async (dir) => (await AdapterStore.open(dir)).store],
  ['SharedFolderStore', async (dir) => (await SharedFolderStore.open(dir, { leaseMs: 60_000 })).store],
];

describe.each(stores)('%s keeps the tokenizer files with the version', (_label, open) => {
  it('digest, create, read back, verify; a changed tokenizer.json is caught', async () => {
    const dir = path.join(root, `${_label}-store`);
    const store = await open(dir);
    const staged = await writeStagedFiles(await mkdtemp(path.join(root, 'staged-')), '{"r": 4}', Buffer.from('weights'.repeat(100)));
    await writeFile(path.join(staged, 'tokenizer.json'), TOK);
    await writeFile(path.join(staged, 'tokenizer_config.json'), TOK_CONFIG);
    const files = await store.digest(staged);
    expect(files['tokenizer.json']?.bytes).toBe(Buffer.byteLength(TOK));
    expect(files['tokenizer_config.json']?.bytes).toBe(Buffer.byteLength(TOK_CONFIG));
    const meta = { ...versionMeta('added', 1, '{"r": 4}', Buffer.from('weights'.repeat(100))), files };
    const entry = await store.create(meta, staged);
    expect(await readFile(path.join(entry.dir, 'tokenizer.json'), 'utf8')).toBe(TOK);
    expect(await readFile(path.join(entry.dir, 'tokenizer_config.json'), 'utf8')).toBe(TOK_CONFIG);
    const found = (await store.find('added'))!;
    expect(found.meta!.files['tokenizer.json']).toEqual(files['tokenizer.json']);
    expect(await store.verify(found)).toEqual([]);
    await writeFile(path.join(found.dir, 'tokenizer.json'), TOK.replace('<|x|>', '<|y|>'));
    expect((await store.verify(found)).join('\n')).toMatch(/^tokenizer\.json is/);
    await store.close();
  });
});
