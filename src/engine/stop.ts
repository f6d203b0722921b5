/**
 * Stop strings over streamed text. Tokens split text arbitrarily, so a stop string may arrive in
 * pieces: any tail of the text that could still grow into a stop string is held back until it
 * either completes one (the text ends before it) or stops matching (it is released).
 */
export interface StopResult {
  /** text that is safe to emit now */
  text: string;
  /** a stop string was found; `text` ends right before it and nothing more will be emitted */
  stopped: boolean;
  /** which stop string ended the text */
  stop?: string;
}

export class StopMatcher {
  private readonly stops: string[];
  private held = '';
  private done = false;

  constructor(stops: readonly string[]) {
    this.stops = [...new Set(stops.filter((s) => s.length > 0))];
  }

  get stopped(): boolean {
    return this.done;
  }

  push(delta: string): StopResult {
    if (this.done) return { text: '', stopped: true };
    const buf = this.held + delta;
    if (this.stops.length === 0) {
      this.held = '';
      return { text: buf, stopped: false };
    }
    // The generation stops as soon as a stop string is complete, so the winner is the one that
    // ends first (at equal ends, the longer one); this depends only on the text, not on how the
    // tokens split it.
    let at = -1;
    let end = Infinity;
    let which = '';
    for (const s of this.stops) {
      const i = buf.indexOf(s);
      if (i < 0) continue;
      const e = i + s.length;
      if (e < end || (e === end && i < at)) {
        at = i;
        end = e;
        which = s;
      }
    }
    if (at >= 0) {
      this.done = true;
      this.held = '';
      return { text: buf.slice(0, at), stopped: true, stop: which };
    }
    const keep = this.partialTail(buf);
    this.held = buf.slice(buf.length - keep);
    return { text: buf.slice(0, buf.length - keep), stopped: false };
  }

  /** End of generation: whatever was held back was not a stop string after all. */
  flush(): string {
    const out = this.done ? '' : this.held;
    this.held = '';
    return out;
  }

  /** Length of the longest suffix of `buf` that is a proper prefix of some stop string. */
  private partialTail(buf: string): number {
    let best = 0;
    for (const s of this.stops) {
      for (let n = Math.min(s.length - 1, buf.length); n > best; n--) {
        if (buf.endsWith(s.slice(0, n))) {
          best = n;
          break;
        }
      }
    }
    return best;
  }
}
