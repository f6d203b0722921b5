/**
 * The llama2.c merge loop exactly as loraserve ran it before the heap (and as run.c's encode()
 * does): the same byte grouping, then scan every adjacent pair, merge the best-scoring one (leftmost on ties, only scores above
 * -1e10), repeat. O(n²): for equality tests on texts of a few kilobytes only.
 */
export function quadraticEncode(text: string, pieces: readonly string[], scores: Float32Array, addBos = true): number[] {
  const lookup = new Map<string, number>();
  pieces.forEach((p, i) => {
    if (!lookup.has(p)) lookup.set(p, i);
  });
  const out: number[] = addBos ? [1] : [];
  const bytes = Buffer.from(text, 'utf8');
  if (bytes.length) out.push(lookup.get(' ') ?? 0x20 + 3);
  for (let i = 0; i < bytes.length; ) {
    let j = i + 1;
    while (j < bytes.length && (bytes[j]! & 0xc0) === 0x80 && j - i < 4) j++;
    const id = lookup.get(bytes.subarray(i, j).toString('latin1'));
    if (id !== undefined) out.push(id);
    else for (let k = i; k < j; k++) out.push(bytes[k]! + 3);
    i = j;
  }
  for (;;) {
    let bestScore = -1e10;
    let bestId = -1;
    let bestIdx = -1;
    for (let i = 0; i < out.length - 1; i++) {
      const id = lookup.get(pieces[out[i]!]! + pieces[out[i + 1]!]!) ?? -1;
      if (id !== -1 && scores[id]! > bestScore) {
        bestScore = scores[id]!;
        bestId = id;
        bestIdx = i;
      }
    }
    if (bestIdx === -1) break;
    out.splice(bestIdx, 2, bestId);
  }
  return out;
}
