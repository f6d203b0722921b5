import { RE2JS } from 're2js';

/**
 * PEFT's module patterns (Python `re` syntax) evaluated in bounded time. They come from uploaded
 * adapter_config.json files, and JavaScript's backtracking engine takes exponential time on some
 * of them (`.*.*.*.*.*.*.*.*X` ran 35 s on the event loop), so they run on RE2 (re2js: the RE2
 * automaton, linear in the name's length) and never on RegExp. What RE2 cannot run in linear time
 * (backreferences, lookaround, atomic groups, possessive quantifiers) is refused with a reason,
 * as is a pattern longer than any real one, so no config can buy unbounded work.
 *
 * The syntax the two dialects share is the whole of what module patterns use; the rest:
 *   - `\Z` (Python: end of string) is RE2's `\z`;
 *   - a leading global flag group: `i`, `s`, `m` carry over, `a`/`u` change nothing for ASCII
 *     module names and are dropped, `x` (verbose) and `L` are refused;
 *   - `x{,n}` (Python: at most n) is `x{0,n}`;
 *   - `(?P<name>…)` is RE2 syntax as well.
 * Where PEFT pastes a pattern into a larger one without a group (layers_pattern,
 * modules_to_save), so does this module, so that a `|` binds as it does in Python.
 */

/** Longer patterns are refused: real ones are under 200 characters (Qwen2.5-VL's is 94). */
export const MAX_PATTERN_LENGTH = 1024;

/**
 * Regular-expression source (everything but plain names) one config may hold in all. Matching
 * costs about (pattern length × module names); at this budget a config costs tens of
 * milliseconds on an 80-layer model, and real configs use a few hundred characters at most.
 */
export const MAX_REGEX_SOURCE = 2048;

export class PatternError extends Error {}

/** Python `re` source → RE2 source; throws PatternError for what RE2 cannot evaluate. */
export function toRe2Source(source: string): string {
  if (source.length > MAX_PATTERN_LENGTH) {
    throw new PatternError(`it is ${source.length} characters long, over the ${MAX_PATTERN_LENGTH} a module pattern may have`);
  }
  let src = source;
  let flags = '';
  const inline = /^\(\?([aiLmsux]+)\)/.exec(src);
  if (inline) {
    const f = inline[1]!;
    if (f.includes('x') || f.includes('L')) throw new PatternError(`the flag group ${inline[0]} (verbose / locale mode) is not supported`);
    for (const c of 'ism') if (f.includes(c)) flags += c;
    src = src.slice(inline[0].length);
  }
  let out = '';
  for (let i = 0; i < src.length; i++) {
    const c = src[i]!;
    if (c === '\\' && i + 1 < src.length) {
      const next = src[i + 1]!;
      out += next === 'Z' ? '\\z' : c + next;
      i++;
    } else if (c === '{' && /^\{,\d+\}/.test(src.slice(i, i + 12))) {
      // Python reads x{,n} as x{0,n}; RE2 would read it as literal text
      out += '{0';
    } else {
      out += c;
    }
  }
  return flags ? `(?${flags})${out}` : out;
}

function compile(source: string, anchor: (src: string) => string): RE2JS {
  const re2 = toRe2Source(source);
  try {
    return RE2JS.compile(anchor(re2));
  } catch (e) {
    // re2js says e.g. "invalid escape sequence: `\1`" or "invalid or unsupported Perl syntax: `(?=`"
    const why = (e as Error).message.replace(/^error parsing regexp: /, '');
    throw new PatternError(`${why.length > 200 ? `${why.slice(0, 200)}…` : why} (backreferences, lookaround and atomic groups cannot be matched in linear time and are not supported)`);
  }
}

/**
 * Patterns made of word characters and dots only: the common case (`q_proj`,
 * `layers.1.self_attn.q_proj`, a full module name), matched without an automaton. A dot is still
 * the regex wildcard (any one character), so the result is exactly the regex's.
 */
const PLAIN = /^[A-Za-z0-9_.]*$/;
export const isPlainPattern = (p: string): boolean => PLAIN.test(p);

function sameWithWildcards(name: string, at: number, key: string): boolean {
  for (let i = 0; i < key.length; i++) {
    const k = key.charCodeAt(i);
    if (k !== 0x2e && name.charCodeAt(at + i) !== k) return false;
  }
  return true;
}

export type NameTest = (name: string) => boolean;

/** `re.fullmatch(pattern, name)`: a string target_modules / exclude_modules. */
export function fullMatch(pattern: string): NameTest {
  if (PLAIN.test(pattern)) return (name) => name.length === pattern.length && sameWithWildcards(name, 0, pattern);
  const re = compile(pattern, (s) => `(?:${s})`);
  return (name) => re.testExact(name);
}

/**
 * `re.match(rf"(.*\.)?({key})$", name)`: get_pattern_key's rule for rank_pattern / alpha_pattern
 * keys: the key matches the whole name or a part of it that starts after a dot.
 */
export function patternKeyMatch(key: string): NameTest {
  if (PLAIN.test(key)) {
    return (name) => {
      // with only single-character atoms the key matches exactly key.length characters at the end
      const at = name.length - key.length;
      return at >= 0 && (at === 0 || name.charCodeAt(at - 1) === 0x2e) && sameWithWildcards(name, at, key);
    };
  }
  const re = compile(key, (s) => `(?:.*\\.)?(?:${s})`);
  return (name) => re.testExact(name);
}

/** A modules_to_save entry: the module itself or anything below it, at a dot boundary. */
export function moduleOrChildMatch(entry: string): NameTest {
  const re = compile(entry, (s) => `(?:|.*\\.)${s}(?:|\\..*)`);
  return (name) => re.testExact(name);
}

/**
 * The layer index of a module name, as `_get_layer_index`-style matching reads it:
 * `re.match(rf".*\.{pattern}\.(\d+)\.", name)`; null when the pattern does not match.
 */
export function layerIndexOf(pattern: string | null): (name: string) => number | null {
  const re = pattern === null ? RE2JS.compile('^.*?\\.[^.]*\\.(\\d+)\\.') : compile(pattern, (s) => `^.*?\\.${s}\\.(\\d+)\\.`);
  return (name) => {
    const m = re.exec(name);
    return m ? Number(m[1]) : null;
  };
}
