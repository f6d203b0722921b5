/**
 * A reader for the subset of YAML 1.2 that openapi.yaml is written in — no YAML package is a
 * dependency, and the contract must be readable by the server (/docs) and the tests.
 *
 * Supported: block mappings and sequences (indented with spaces; a sequence may sit at its key's
 * indentation; `- key: value` items), plain / 'single' / "double" (JSON escapes) scalars with the
 * core schema (null ~ true false, ints, floats, .inf, .nan), one-line flow collections
 * `[a, 'b']` `{ $ref: '#/x' }`, literal `|` and folded `>` block scalars with `-`/`+` chomping,
 * `#` comments, one optional leading `---`.
 * Refused with a YamlError naming the line — rather than read differently from a real YAML
 * parser: anchors, aliases, tags, `?` keys, multi-line plain or quoted scalars, tabs in
 * indentation, duplicate keys, several documents, plain scalars containing ": ".
 */
export class YamlError extends Error {
  override name = 'YamlError';
}

interface Line {
  no: number;
  indent: number;
  /** without indentation; comments not yet removed (block scalars need them verbatim) */
  text: string;
}

export function parseYaml(source: string): unknown {
  return new Parser(source).document();
}

const INDICATORS = new Set(['&', '*', '!', '|', '>', '%', '@', '`', '?']);

/** Removes a trailing comment (a `#` at the start or after whitespace, outside quotes). */
function stripComment(text: string): string {
  let quote: string | null = null;
  for (let i = 0; i < text.length; i++) {
    const c = text[i]!;
    if (quote) {
      if (c === quote) {
        if (quote === "'" && text[i + 1] === "'") i++;
        else quote = null;
      } else if (c === '\\' && quote === '"') i++;
    } else if (c === "'" || c === '"') {
      // a quote only opens a quoted scalar at the start of a token
      if (i === 0 || /[\s[{,:-]/.test(text[i - 1]!)) quote = c;
    } else if (c === '#' && (i === 0 || /\s/.test(text[i - 1]!))) {
      return text.slice(0, i).trimEnd();
    }
  }
  return text.trimEnd();
}

function resolvePlain(s: string, line: number): unknown {
  if (s === '' || s === '~' || s === 'null' || s === 'Null' || s === 'NULL') return null;
  if (s === 'true' || s === 'True' || s === 'TRUE') return true;
  if (s === 'false' || s === 'False' || s === 'FALSE') return false;
  if (/^[-+]?[0-9]+$/.test(s)) return Number.parseInt(s, 10);
  if (/^0x[0-9a-fA-F]+$/.test(s)) return Number.parseInt(s.slice(2), 16);
  if (/^0o[0-7]+$/.test(s)) return Number.parseInt(s.slice(2), 8);
  if (/^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$/.test(s)) return Number.parseFloat(s);
  if (/^[-+]?\.(inf|Inf|INF)$/.test(s)) return s.startsWith('-') ? -Infinity : Infinity;
  if (/^\.(nan|NaN|NAN)$/.test(s)) return Number.NaN;
  if (INDICATORS.has(s[0]!) || (s[0] === '-' && (s.length === 1 || s[1] === ' '))) throw new YamlError(`line ${line}: unsupported YAML: ${JSON.stringify(s)} (quote it)`);
  if (s.includes(': ') || s.endsWith(':')) throw new YamlError(`line ${line}: a plain scalar may not contain ": " — quote ${JSON.stringify(s)}`);
  return s;
}

/** A quoted scalar starting at s[i]; returns the value and the index after the closing quote. */
function readQuoted(s: string, i: number, line: number): [string, number] {
  const q = s[i]!;
  let j = i + 1;
  if (q === "'") {
    let out = '';
    for (;;) {
      if (j >= s.length) throw new YamlError(`line ${line}: unterminated single-quoted string (multi-line scalars are not supported)`);
      if (s[j] === "'") {
        if (s[j + 1] === "'") {
          out += "'";
          j += 2;
          continue;
        }
        return [out, j + 1];
      }
      out += s[j++];
    }
  }
  for (;;) {
    if (j >= s.length) throw new YamlError(`line ${line}: unterminated double-quoted string (multi-line scalars are not supported)`);
    if (s[j] === '\\') {
      j += 2;
      continue;
    }
    if (s[j] === '"') break;
    j++;
  }
  const body = s.slice(i, j + 1);
  try {
    return [JSON.parse(body) as string, j + 1];
  } catch {
    throw new YamlError(`line ${line}: unsupported escape in ${body} (only JSON escapes are read)`);
  }
}

/** One-line flow collections and scalars. */
function readFlow(s: string, i: number, line: number, stops: string): [unknown, number] {
  const ws = () => {
    while (s[i] === ' ') i++;
  };
  ws();
  const c = s[i];
  if (c === '[') {
    i++;
    const out: unknown[] = [];
    ws();
    if (s[i] === ']') return [out, i + 1];
    for (;;) {
      const [v, j] = readFlow(s, i, line, ',]');
      out.push(v);
      i = j;
      ws();
      if (s[i] === ',') {
        i++;
        continue;
      }
      if (s[i] === ']') return [out, i + 1];
      throw new YamlError(`line ${line}: expected , or ] in a flow sequence (flow collections must fit on one line)`);
    }
  }
  if (c === '{') {
    i++;
    const out: Record<string, unknown> = {};
    ws();
    if (s[i] === '}') return [out, i + 1];
    for (;;) {
      ws();
      let key: string;
      if (s[i] === "'" || s[i] === '"') [key, i] = readQuoted(s, i, line);
      else {
        const j = s.indexOf(':', i);
        if (j < 0) throw new YamlError(`line ${line}: expected key: value in a flow mapping`);
        key = s.slice(i, j).trim();
        i = j;
      }
      ws();
      if (s[i] !== ':') throw new YamlError(`line ${line}: expected : after ${JSON.stringify(key)}`);
      i++;
      const [v, j] = readFlow(s, i, line, ',}');
      if (Object.hasOwn(out, key)) throw new YamlError(`line ${line}: duplicate key ${JSON.stringify(key)}`);
      out[key] = v;
      i = j;
      ws();
      if (s[i] === ',') {
        i++;
        continue;
      }
      if (s[i] === '}') return [out, i + 1];
      throw new YamlError(`line ${line}: expected , or } in a flow mapping (flow collections must fit on one line)`);
    }
  }
  if (c === "'" || c === '"') return readQuoted(s, i, line);
  let j = i;
  while (j < s.length && !stops.includes(s[j]!)) j++;
  const plain = s.slice(i, j).trim();
  if (stops && /[[\]{}]/.test(plain)) throw new YamlError(`line ${line}: brackets inside a plain flow scalar: quote ${JSON.stringify(plain)}`);
  return [resolvePlain(plain, line), j];
}

class Parser {
  private readonly lines: Line[];
  private pos = 0;

  constructor(source: string) {
    const raw = source.replace(/^\uFEFF/, '').replace(/\r\n?/g, '\n').split('\n');
    this.lines = raw.map((r, k) => {
      const m = /^( *)(.*)$/.exec(r)!;
      return { no: k + 1, indent: m[1]!.length, text: m[2]! };
    });
  }

  private err(line: Line | undefined, msg: string): YamlError {
    return new YamlError(`line ${line?.no ?? this.lines.length}: ${msg}`);
  }

  /** the next line with content (blank and comment-only lines skipped) */
  private peek(): Line | undefined {
    while (this.pos < this.lines.length) {
      const l = this.lines[this.pos]!;
      if (stripComment(l.text) !== '') {
        if (l.text.startsWith('\t')) throw this.err(l, 'tab in indentation');
        return l;
      }
      this.pos++;
    }
    return undefined;
  }

  document(): unknown {
    let first = this.peek();
    if (first && first.indent === 0 && stripComment(first.text) === '---') {
      this.pos++;
      first = this.peek();
    }
    if (!first) return null;
    if (first.indent !== 0) throw this.err(first, 'the document must start at column 1');
    const value = this.block(0);
    const rest = this.peek();
    if (rest) throw this.err(rest, stripComment(rest.text) === '---' || stripComment(rest.text) === '...' ? 'only one document is supported' : 'bad indentation');
    return value;
  }

  private isDash(l: Line): boolean {
    const t = stripComment(l.text);
    return t === '-' || t.startsWith('- ');
  }

  private block(indent: number): unknown {
    const l = this.peek()!;
    return this.isDash(l) ? this.sequence(indent) : this.mapping(indent);
  }

  /** the value of `key:` / `-` with nothing after it */
  private child(parentIndent: number, sequenceAtSameIndent: boolean): unknown {
    const l = this.peek();
    if (!l) return null;
    if (l.indent > parentIndent) return this.block(l.indent);
    if (sequenceAtSameIndent && l.indent === parentIndent && this.isDash(l)) return this.sequence(parentIndent);
    return null;
  }

  private sequence(indent: number): unknown[] {
    const out: unknown[] = [];
    for (;;) {
      const l = this.peek();
      if (!l || l.indent < indent) break;
      if (l.indent > indent) throw this.err(l, 'bad indentation in a sequence');
      if (!this.isDash(l)) break;
      const after = l.text.slice(1);
      const spaces = /^ */.exec(after)![0].length;
      const rest = stripComment(after).trim();
      if (rest === '') {
        this.pos++;
        out.push(this.child(indent, false));
      } else if (rest === '-' || rest.startsWith('- ')) {
        throw this.err(l, 'nested inline sequences (- - x) are not supported');
      } else if (this.keyOf(rest, l) !== null) {
        // `- key: value`: a mapping whose first entry sits on the dash line
        this.lines[this.pos] = { no: l.no, indent: indent + 1 + spaces, text: after.slice(spaces) };
        out.push(this.mapping(indent + 1 + spaces));
      } else {
        this.pos++;
        out.push(this.inline(rest, l, indent));
      }
    }
    return out;
  }

  /** `key: …` → [key, text after the colon]; null when the text is no mapping entry */
  private keyOf(text: string, l: Line): [string, string] | null {
    if (text[0] === "'" || text[0] === '"') {
      const [key, j] = readQuoted(text, 0, l.no);
      const after = text.slice(j);
      if (after === ':' || after.startsWith(': ')) return [key, after.slice(1)];
      if (after.trim() === '') return null;
      throw this.err(l, 'expected ":" after a quoted key');
    }
    if (text[0] === '[' || text[0] === '{') return null;
    const m = /^(.*?):(?: (.*))?$/.exec(text);
    if (!m) return null;
    const key = m[1]!.trim();
    if (key === '') throw this.err(l, 'empty key');
    if (INDICATORS.has(key[0]!)) throw this.err(l, `unsupported YAML key ${JSON.stringify(key)} (quote it)`);
    return [key, m[2] ?? ''];
  }

  private mapping(indent: number): Record<string, unknown> {
    const out: Record<string, unknown> = {};
    for (;;) {
      const l = this.peek();
      if (!l || l.indent < indent) break;
      if (l.indent > indent) throw this.err(l, 'bad indentation in a mapping');
      if (this.isDash(l)) throw this.err(l, 'a sequence item where a mapping key was expected');
      const text = stripComment(l.text);
      const kv = this.keyOf(text, l);
      if (!kv) throw this.err(l, `expected "key: value", got ${JSON.stringify(text)}`);
      const [key, restRaw] = kv;
      const rest = restRaw.trim();
      if (Object.hasOwn(out, key)) throw this.err(l, `duplicate key ${JSON.stringify(key)}`);
      this.pos++;
      out[key] = rest === '' ? this.child(indent, true) : this.inline(rest, l, indent);
    }
    return out;
  }

  /** a value written after `key:` or `- ` on the same line */
  private inline(rest: string, l: Line, parentIndent: number): unknown {
    if (rest[0] === '|' || rest[0] === '>') return this.blockScalar(rest, l, parentIndent);
    let value: unknown;
    let end: number;
    if (rest[0] === '[' || rest[0] === '{' || rest[0] === "'" || rest[0] === '"') {
      [value, end] = readFlow(rest, 0, l.no, '');
      if (rest.slice(end).trim() !== '') throw this.err(l, `unexpected text after a value: ${JSON.stringify(rest.slice(end))}`);
    } else {
      value = resolvePlain(rest, l.no);
    }
    const next = this.peek();
    if (next && next.indent > parentIndent && !(next.indent === parentIndent && this.isDash(next))) {
      throw this.err(next, 'multi-line plain scalars are not supported: use | or >');
    }
    return value;
  }

  private blockScalar(header: string, l: Line, parentIndent: number): string {
    const m = /^([|>])([-+]?)$/.exec(header);
    if (!m) throw this.err(l, `unsupported block scalar header ${JSON.stringify(header)} (use | |- |+ > >- >+)`);
    const [, style, chomp] = m;
    const body: string[] = [];
    let contentIndent = -1;
    while (this.pos < this.lines.length) {
      const c = this.lines[this.pos]!;
      const blank = c.text.trim() === '';
      if (!blank) {
        if (contentIndent < 0) {
          if (c.indent <= parentIndent) break;
          contentIndent = c.indent;
        } else if (c.indent < contentIndent) break;
        body.push(' '.repeat(c.indent - contentIndent) + c.text);
      } else {
        body.push('');
      }
      this.pos++;
    }
    // trailing blank lines belong to chomping, not to the text
    let trailing = 0;
    while (body.length && body[body.length - 1] === '') {
      body.pop();
      trailing++;
    }
    let text: string;
    if (style === '|') {
      text = body.join('\n');
    } else {
      text = '';
      for (let k = 0; k < body.length; k++) {
        const line = body[k]!;
        if (line.startsWith(' ')) throw this.err(l, 'more-indented lines in a folded (>) scalar are not supported: use |');
        if (k === 0) text = line;
        else if (line === '') text += '\n';
        else text += body[k - 1] === '' ? line : ` ${line}`;
      }
    }
    if (body.length === 0) return '';
    if (chomp === '-') return text;
    if (chomp === '+') return `${text}\n${'\n'.repeat(trailing)}`;
    return `${text}\n`;
  }
}
