import { Worker } from 'node:worker_threads';
import type { Architecture } from '../model/architecture.js';
import type { TokenizerSource } from '../model/checkpoint/types.js';
import type { Tokenizer } from './types.js';

export interface TokenizerWorkerData {
  entry: string;
  source: TokenizerSource;
  architecture: Architecture;
}
export interface EncodeRequest {
  id: number;
  text: string;
  addBos: boolean;
}
export interface EncodeReply {
  id: number;
  ids: number[] | null;
  error: string | null;
}

/** Prompts up to this many UTF-8 bytes are encoded inline: milliseconds at most, no thread hop. */
export const INLINE_PROMPT_BYTES = 16 * 1024;

/**
 * Encodes prompts for the HTTP thread. Encoding is synchronous library code (the llama2.c merges,
 * @huggingface/tokenizers), so a megabyte prompt would hold the event loop for up to seconds;
 * prompts past INLINE_PROMPT_BYTES go to one worker thread that loaded the same tokenizer, started
 * on first use. Short prompts stay inline so ordinary requests pay no hop.
 */
export class PromptEncoder {
  private worker: Worker | null = null;
  private nextId = 1;
  private readonly pending = new Map<number, { resolve: (ids: number[]) => void; reject: (e: Error) => void }>();

  constructor(
    readonly tokenizer: Tokenizer,
    private readonly source: TokenizerSource | null,
    private readonly architecture: Architecture,
    private readonly inlineBytes = INLINE_PROMPT_BYTES,
  ) {}

  /** A lower bound on the encoded length, linear in the text (0/1 when the tokenizer gives none). */
  minTokens(text: string, opts: { addBos?: boolean } = {}): number {
    return this.tokenizer.minTokens?.(text, opts) ?? 0;
  }

  async encode(text: string, opts: { addBos?: boolean } = {}): Promise<number[]> {
    const addBos = opts.addBos ?? true;
    // length in UTF-16 units bounds the UTF-8 length from below (×3 from above): no full scan
    if (this.source === null || text.length <= this.inlineBytes / 3 || Buffer.byteLength(text, 'utf8') <= this.inlineBytes) {
      return this.tokenizer.encode(text, { addBos });
    }
    const worker = this.start();
    const id = this.nextId++;
    return new Promise<number[]>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      worker.postMessage({ id, text, addBos } satisfies EncodeRequest);
    });
  }

  async close(): Promise<void> {
    const w = this.worker;
    this.worker = null;
    this.failAll(new Error('the tokenizer thread was closed'));
    if (w) await w.terminate();
  }

  private start(): Worker {
    if (this.worker) return this.worker;
    const self = import.meta.url;
    const data: TokenizerWorkerData = {
      entry: new URL(self.endsWith('.ts') ? './worker.ts' : './worker.js', self).href,
      source: this.source!,
      architecture: this.architecture,
    };
    // the engine's entry registers the TypeScript loader in the thread (when running from source)
    const worker = new Worker(new URL('../engine/worker-entry.mjs', self), { workerData: data });
    worker.unref();
    worker.on('message', (m: EncodeReply | { ready: true }) => {
      if (!('id' in m)) return;
      const p = this.pending.get(m.id);
      this.pending.delete(m.id);
      if (!p) return;
      if (m.ids) p.resolve(m.ids);
      else p.reject(new Error(`tokenizer thread: ${m.error}`));
    });
    const die = (e: Error) => {
      if (this.worker === worker) this.worker = null;
      this.failAll(e);
    };
    worker.on('error', (e) => die(new Error(`tokenizer thread failed: ${e.message}`)));
    worker.on('exit', (code) => die(new Error(`tokenizer thread exited with code ${code}`)));
    this.worker = worker;
    return worker;
  }

  private failAll(e: Error): void {
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
  }
}
