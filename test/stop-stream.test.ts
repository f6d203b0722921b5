import { describe, expect, it } from 'vitest';
import { seededRng } from '../src/engine/sampler.js';
import { StopMatcher } from '../src/engine/stop.js';
import { IncrementalDecoder } from '../src/engine/stream.js';

/** runs pieces through a matcher; returns each push's output and the total */
function feed(stops: string[], pieces: string[]): { outs: string[]; text: string; stopped: boolean; stop?: string } {
  const m = new StopMatcher(stops);
  const outs: string[] = [];
  let stop: string | undefined;
  for (const p of pieces) {
    const r = m.push(p);
    outs.push(r.text);
    if (r.stopped) {
      stop = r.stop;
      return { outs, text: outs.join(''), stopped: true, stop };
    }
  }
  outs.push(m.flush());
  return { outs, text: outs.join(''), stopped: false };
}

/** char by char: the text before the first stop string to be complete (at equal ends, the longer) */
function cutAtStop(text: string, stops: string[]): string {
  for (let e = 1; e <= text.length; e++) {
    const done = stops.filter((s) => s && text.slice(0, e).endsWith(s));
    if (done.length > 0) return text.slice(0, e - Math.max(...done.map((s) => s.length)));
  }
  return text;
}

describe('stop strings', () => {
  it('finds a stop string split across tokens and ends the text right before it', () => {
    const r = feed(['o W'], ['Hel', 'lo', ' ', 'World']);
    expect(r.stopped).toBe(true);
    expect(r.stop).toBe('o W');
    expect(r.text).toBe('Hell');
    // "lo" could have started the stop string: it was held back, never emitted early
    expect(r.outs).toEqual(['Hel', 'l', '', '']);
  });

  it('releases held text once it can no longer be a stop string, and at the end', () => {
    expect(feed(['\n\n'], ['a\n', 'b\n']).outs).toEqual(['a', '\nb', '\n']);
    expect(feed(['END'], ['xx', 'EN']).text).toBe('xxEN');
  });

  it('takes the stop string completed first, whatever the token split', () => {
    const r = feed(['cd', 'b'], ['abcd']);
    expect(r.text).toBe('a');
    expect(r.stop).toBe('b');
    expect(feed(['bcd', 'cx'], ['ab', 'cd']).text).toBe('a');
    // "c" completes before "abcd" could: generation would have stopped there
    expect(feed(['abcd', 'c'], ['abcd']).text).toBe('ab');
    expect(feed(['abcd', 'c'], ['a', 'b', 'c', 'd']).text).toBe('ab');
    // at the same end the longer one wins
    expect(feed(['bc', 'abc'], ['abc']).text).toBe('');
  });

  it('ignores empty stop strings and emits everything without stops', () => {
    expect(feed(['', ''], ['a', 'b']).outs).toEqual(['a', 'b', '']);
  });

  it('matches the obvious cut on random texts split at random places', () => {
    const rng = seededRng(3);
    const alphabet = 'ab \n';
    for (let trial = 0; trial < 2000; trial++) {
      const text = Array.from({ length: 1 + Math.floor(rng() * 30) }, () => alphabet[Math.floor(rng() * alphabet.length)]).join('');
      const stops = Array.from({ length: 1 + Math.floor(rng() * 3) }, () =>
        Array.from({ length: 1 + Math.floor(rng() * 4) }, () => alphabet[Math.floor(rng() * alphabet.length)]).join(''),
      );
      const pieces: string[] = [];
      for (let i = 0; i < text.length; ) {
        const n = Math.floor(rng() * 4);
        pieces.push(text.slice(i, i + n));
        i += n;
      }
      const expected = cutAtStop(text, stops);
      const r = feed(stops, pieces);
      expect(r.text, JSON.stringify({ text, stops, pieces })).toBe(expected);
      expect(r.stopped).toBe(expected.length < text.length);
    }
  });
});

/** bytes as tokens: id = byte value; decoding replaces an incomplete UTF-8 tail with U+FFFD */
const byteTokenizer = {
  decode: (ids: readonly number[]) => new TextDecoder('utf-8', { fatal: false }).decode(Uint8Array.from(ids)),
};

/** SentencePiece-like: pieces with ▁ for spaces; a decode drops the leading space of its first piece */
const PIECES = ['▁Hello', '▁world', ',', '▁how', '▁are', '▁you', '?'];
const pieceTokenizer = {
  decode: (ids: readonly number[]) => ids.map((i) => PIECES[i]).join('').replace(/▁/g, ' ').replace(/^ /, ''),
};

describe('incremental detokenizer', () => {
  it('never emits half a character: multi-byte characters split across tokens come out whole', () => {
    const text = 'Grüße 🌍! 日本語 — ok';
    const bytes = [...new TextEncoder().encode(text)];
    const d = new IncrementalDecoder(byteTokenizer);
    const pieces = bytes.map((b) => d.push(b));
    pieces.push(d.flush());
    expect(pieces.join('')).toBe(text);
    for (const p of pieces) expect(p).not.toContain('\uFFFD');
    // the 4-byte globe arrives in one piece, after its last byte
    expect(pieces).toContain('🌍');
  });

  it('keeps the leading space of the first generated token given the prompt as context', () => {
    const prompt = [0]; // "Hello"
    const generated = [1, 2, 3, 4, 5, 6];
    const d = new IncrementalDecoder(pieceTokenizer, prompt);
    const out = generated.map((t) => d.push(t)).join('') + d.flush();
    expect(out).toBe(' world, how are you?');
    // without context the first piece's space is dropped, as a plain decode does
    const bare = new IncrementalDecoder(pieceTokenizer);
    expect(generated.map((t) => bare.push(t)).join('') + bare.flush()).toBe(pieceTokenizer.decode(generated));
  });

  it('flush emits a trailing incomplete character rather than losing it', () => {
    const d = new IncrementalDecoder(byteTokenizer);
    expect(d.push(0x41)).toBe('A');
    expect(d.push(0xe6)).toBe('');
    expect(d.flush()).toBe('\uFFFD');
  });
});
