import type { Tokenizer } from '../tokenizer/types.js';
import type { Engine, FinishReason, GenerateRequest, Generation, TokenEvent } from './engine.js';
import { StopMatcher } from './stop.js';
import { IncrementalDecoder } from './stream.js';

/**
 * Text in, text out: tokenizer + Engine. The engine deals in token ids; here they become UTF-8
 * safe text deltas, stop strings end the text exactly (never including the stop string), and the
 * usage is counted.
 */
export interface TextRequest extends Omit<GenerateRequest, 'promptIds'> {
  /** text to tokenize (with BOS unless addBos is false); or give promptIds */
  prompt?: string;
  promptIds?: readonly number[];
  /** default true; false for text that already carries its special tokens (a rendered chat template) */
  addBos?: boolean;
  stop?: readonly string[];
}

export interface TextDelta {
  text: string;
  /** the tokens whose text this delta completes (text held back waits with its tokens) */
  tokens: TokenEvent[];
}

export interface TextResult {
  text: string;
  /** `stop`: EOS or a stop string; `length`: max tokens or the context; `cancelled`: abort, timeout or close */
  finishReason: FinishReason;
  /** the stop string that ended the text, if one did */
  stopString: string | null;
  /** cancelled by REQUEST_TIMEOUT_MS */
  timedOut: boolean;
  usage: { promptTokens: number; completionTokens: number };
}

export interface TextDeps {
  engine: Engine;
  tokenizer: Tokenizer;
}

/**
 * Iterate for deltas, then await `result`; or call `complete()` to skip the deltas. Leaving the
 * loop early cancels the request. The last delta may carry tokens with empty text.
 */
export class TextGeneration implements AsyncIterable<TextDelta> {
  readonly result: Promise<TextResult>;
  private iterated = false;

  constructor(
    private readonly deltas: AsyncGenerator<TextDelta, void>,
    result: Promise<TextResult>,
    /** what its ids are decoded with (an adapter that adds tokens has its own) */
    readonly tokenizer: Tokenizer,
  ) {
    this.result = result;
    this.result.catch(() => undefined);
  }

  [Symbol.asyncIterator](): AsyncIterator<TextDelta> {
    if (this.iterated) throw new Error('a TextGeneration can be iterated only once');
    this.iterated = true;
    return this.deltas;
  }

  /** Runs to the end without looking at the deltas. */
  async complete(): Promise<TextResult> {
    if (!this.iterated) for await (const _ of this) void _;
    return this.result;
  }
}

/**
 * Starts a generation. Throws at once what `Engine.generate` throws (InvalidRequestError,
 * ContextLengthError, UnknownAdapterError, QueueFullError, EngineClosedError).
 */
export function generateText(deps: TextDeps, req: TextRequest, signal?: AbortSignal): TextGeneration {
  return generateTextChoices(deps, req, 1, signal)[0]!;
}

/**
 * `n` generations of one prompt (OpenAI's `n`): tokenized once, prefilled once by the engine
 * (Engine.generateGroup), choice j sampling with `seed + j` when a seed is given.
 */
export function generateTextChoices(deps: TextDeps, req: TextRequest, n: number, signal?: AbortSignal): TextGeneration[] {
  const { engine, tokenizer } = deps;
  const promptIds = req.promptIds ?? tokenizer.encode(req.prompt ?? '', { addBos: req.addBos ?? true });
  const engineReq: GenerateRequest = {
    promptIds,
    adapterVersion: req.adapterVersion,
    maxTokens: req.maxTokens,
    temperature: req.temperature,
    topP: req.topP,
    topK: req.topK,
    seed: req.seed,
    logprobs: req.logprobs,
    eosIds: req.eosIds ?? tokenizer.eosIds,
    vocabLimit: req.vocabLimit ?? tokenizer.vocabSize,
  };
  const gens = n === 1 ? [engine.generate(engineReq, signal)] : engine.generateGroup(engineReq, n, signal);
  return gens.map((gen) => textOf(tokenizer, promptIds, req.stop ?? [], gen));
}

/** token events → UTF-8 safe text deltas, stop strings applied, usage counted */
function textOf(tokenizer: Tokenizer, promptIds: readonly number[], stop: readonly string[], gen: Generation): TextGeneration {

  let settle!: { resolve: (r: TextResult) => void; reject: (e: unknown) => void };
  const result = new Promise<TextResult>((resolve, reject) => (settle = { resolve, reject }));

  async function* deltas(): AsyncGenerator<TextDelta, void> {
    const decoder = new IncrementalDecoder(tokenizer, promptIds);
    const stopper = new StopMatcher(stop);
    let text = '';
    let consumed = 0;
    let held: TokenEvent[] = [];
    let stopString: string | null = null;
    let settled = false;
    const take = (piece: string): TextDelta | null => {
      const r = stopper.push(piece);
      if (r.stopped) stopString = r.stop ?? null;
      if (r.text === '' && !r.stopped) return null;
      text += r.text;
      const d = { text: r.text, tokens: held };
      held = [];
      return d;
    };
    try {
      for await (const ev of gen) {
        consumed++;
        held.push(ev);
        const d = take(decoder.push(ev.token));
        if (d) yield d;
        if (stopper.stopped) break;
      }
      if (!stopper.stopped) {
        const tail = take(decoder.flush());
        const rest = stopper.stopped ? '' : stopper.flush();
        const last = { text: (tail?.text ?? '') + rest, tokens: [...(tail?.tokens ?? []), ...held] };
        text += rest;
        held = [];
        if (last.text !== '' || last.tokens.length > 0) yield last;
      }
      if (stopper.stopped) {
        // the engine row is cancelled by leaving its loop; tokens it made after the stop are not ours
        settle.resolve({ text, finishReason: 'stop', stopString, timedOut: false, usage: { promptTokens: promptIds.length, completionTokens: consumed } });
      } else {
        const r = await gen.result;
        settle.resolve({ text, finishReason: r.finishReason, stopString: null, timedOut: r.timedOut, usage: { promptTokens: r.promptTokens, completionTokens: r.completionTokens } });
      }
      settled = true;
    } catch (e) {
      settle.reject(e);
      settled = true;
      throw e;
    } finally {
      if (!settled) {
        // the consumer left early: the engine request is cancelled with our loop
        gen.cancel();
        settle.resolve({ text, finishReason: 'cancelled', stopString: null, timedOut: false, usage: { promptTokens: promptIds.length, completionTokens: consumed } });
      }
    }
  }

  return new TextGeneration(deltas(), result, tokenizer);
}
