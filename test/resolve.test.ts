import { describe, expect, it } from 'vitest';
import { parsePeftConfig } from '../src/adapters/peft-config.js';
import { resolveModules, type Resolution } from '../src/adapters/resolve.js';
import { loraTargetsFor } from '../src/model/manifest.js';
import { peftConfig, peftFixturesExist, readFixtureConfig, smallArch } from './helpers/adapter-fixtures.js';

const ARCH = smallArch({ numLayers: 12 });
const TARGETS = loraTargetsFor(ARCH);

function resolve(overrides: Record<string, unknown>, targets = TARGETS): Resolution {
  const parsed = parsePeftConfig(JSON.stringify(peftConfig(overrides)));
  expect(parsed.problems).toEqual([]);
  return resolveModules(parsed.config!, targets);
}
const byName = (r: Resolution, name: string) => r.modules.find((m) => m.target.name === name)!;
const targetedNames = (r: Resolution) => r.modules.filter((m) => m.targeted).map((m) => m.target.name);

describe('rank / alpha / scale per module (get_pattern_key)', () => {
  const res = resolve({ r: 8, lora_alpha: 16, use_rslora: true, target_modules: ['q_proj', 'v_proj'], rank_pattern: { 'layers.1.self_attn.q_proj': 4 }, alpha_pattern: { v_proj: 32 } });

  it('rank_pattern full suffix picks layer 1 only — not 11, not 10', () => {
    expect(byName(res, 'model.layers.1.self_attn.q_proj')).toMatchObject({ rank: 4, rankKey: 'layers.1.self_attn.q_proj', alpha: 16, alphaKey: 'lora_alpha' });
    expect(byName(res, 'model.layers.11.self_attn.q_proj')).toMatchObject({ rank: 8, rankKey: 'r' });
    expect(byName(res, 'model.layers.10.self_attn.q_proj')).toMatchObject({ rank: 8, rankKey: 'r' });
  });

  it('rslora scales are alpha / sqrt(rank)', () => {
    expect(byName(res, 'model.layers.1.self_attn.q_proj').scale).toBeCloseTo(16 / 2, 12);
    expect(byName(res, 'model.layers.11.self_attn.q_proj').scale).toBeCloseTo(16 / Math.sqrt(8), 12);
    expect(byName(res, 'model.layers.3.self_attn.v_proj')).toMatchObject({ alpha: 32, alphaKey: 'v_proj', rank: 8 });
    expect(byName(res, 'model.layers.3.self_attn.v_proj').scale).toBeCloseTo(32 / Math.sqrt(8), 12);
  });

  it('plain LoRA scales are alpha / rank', () => {
    const plain = resolve({ r: 8, lora_alpha: 16, target_modules: ['q_proj', 'v_proj'], rank_pattern: { 'layers.1.self_attn.q_proj': 4 }, alpha_pattern: { v_proj: 32 } });
    expect(byName(plain, 'model.layers.1.self_attn.q_proj').scale).toBe(4);
    expect(byName(plain, 'model.layers.0.self_attn.q_proj').scale).toBe(2);
    expect(byName(plain, 'model.layers.0.self_attn.v_proj').scale).toBe(4);
  });

  it('targets only what target_modules names', () => {
    expect(targetedNames(res)).toHaveLength(24);
    expect(byName(res, 'model.layers.0.mlp.up_proj').targeted).toBe(false);
    expect(res.problems).toEqual([]);
  });

  it('full-path keys match exactly one module', () => {
    const r = resolve({ target_modules: 'all-linear', rank_pattern: { 'model.layers.2.mlp.down_proj': 2 } });
    const hits = r.modules.filter((m) => m.rankKey !== 'r').map((m) => m.target.name);
    expect(hits).toEqual(['model.layers.2.mlp.down_proj']);
  });

  it('regex keys are regular expressions over a dot-separated suffix', () => {
    const r = resolve({ target_modules: 'all-linear', rank_pattern: { 'layers\\.[0-1]\\.self_attn\\.(q|k)_proj': 2 } });
    expect(r.modules.filter((m) => m.rank === 2).map((m) => m.target.name)).toEqual([
      'model.layers.0.self_attn.q_proj',
      'model.layers.0.self_attn.k_proj',
      'model.layers.1.self_attn.q_proj',
      'model.layers.1.self_attn.k_proj',
    ]);
  });

  it('a key must match from a dot: "proj" matches no module, "_proj" neither', () => {
    const r = resolve({ target_modules: 'all-linear', rank_pattern: { proj: 2, _proj: 3 } });
    expect(r.modules.every((m) => m.rank === 8)).toBe(true);
    expect(r.problems.map((p) => [p.code, p.key])).toEqual([
      ['rank_pattern_unmatched', 'proj'],
      ['rank_pattern_unmatched', '_proj'],
    ]);
  });

  it('the first matching key in dict order wins', () => {
    const r = resolve({ target_modules: ['q_proj'], rank_pattern: { q_proj: 2, 'layers.0.self_attn.q_proj': 6 } });
    expect(byName(r, 'model.layers.0.self_attn.q_proj')).toMatchObject({ rank: 2, rankKey: 'q_proj' });
    const swapped = resolve({ target_modules: ['q_proj'], rank_pattern: { 'layers.0.self_attn.q_proj': 6, q_proj: 2 } });
    expect(byName(swapped, 'model.layers.0.self_attn.q_proj')).toMatchObject({ rank: 6, rankKey: 'layers.0.self_attn.q_proj' });
    expect(byName(swapped, 'model.layers.1.self_attn.q_proj')).toMatchObject({ rank: 2, rankKey: 'q_proj' });
    // a key that is always shadowed still matched a module, so PEFT would not call it unmatched either
    expect(r.problems).toEqual([]);
  });

  it('keys starting with base_model.model. never match, and say why', () => {
    const r = resolve({ target_modules: ['q_proj'], rank_pattern: { 'base_model.model.model.layers.0.self_attn.q_proj': 4 }, alpha_pattern: { 'base_model.model.model.layers.0.self_attn.q_proj': 4 } });
    expect(byName(r, 'model.layers.0.self_attn.q_proj')).toMatchObject({ rank: 8, alpha: 16 });
    expect(r.problems.map((p) => [p.code, p.severity])).toEqual([
      ['rank_pattern_unmatched', 'warning'],
      ['alpha_pattern_unmatched', 'warning'],
    ]);
    expect(r.problems[0]!.message).toMatch(/base_model\.model\. never matches/);
  });

  it('a key that matches only modules the config does not target is unmatched', () => {
    const r = resolve({ target_modules: ['q_proj'], rank_pattern: { v_proj: 4 } });
    expect(r.problems).toHaveLength(1);
    expect(r.problems[0]).toMatchObject({ code: 'rank_pattern_unmatched', key: 'v_proj', severity: 'warning' });
  });

  it('Python named groups in keys work', () => {
    const r = resolve({ target_modules: ['q_proj'], rank_pattern: { '(?P<proj>q)_proj': 4 } });
    expect(r.modules.filter((m) => m.targeted).every((m) => m.rank === 4)).toBe(true);
  });

  it('a key that is not a valid regular expression is an invalid_config problem', () => {
    const r = resolve({ target_modules: ['q_proj'], rank_pattern: { 'q_proj(': 4 } });
    expect(r.problems[0]).toMatchObject({ code: 'invalid_config', key: 'q_proj(' });
    expect(byName(r, 'model.layers.0.self_attn.q_proj').rank).toBe(8);
  });
});

describe('targeting (check_target_module_exists)', () => {
  it('list entries match the whole name or a suffix after a dot', () => {
    expect(targetedNames(resolve({ target_modules: ['self_attn.q_proj'] }))).toHaveLength(12);
    expect(targetedNames(resolve({ target_modules: ['attn.q_proj'] }))).toHaveLength(0);
    expect(targetedNames(resolve({ target_modules: ['model.layers.3.mlp.up_proj'] }))).toEqual(['model.layers.3.mlp.up_proj']);
  });

  it('a string is a full-match regex: "q_proj" alone matches nothing, ".*q_proj" every q_proj', () => {
    expect(targetedNames(resolve({ target_modules: 'q_proj' }))).toEqual([]);
    const all = targetedNames(resolve({ target_modules: '.*q_proj' }));
    expect(all).toHaveLength(12);
    expect(all.every((n) => n.endsWith('.q_proj'))).toBe(true);
    expect(targetedNames(resolve({ target_modules: 'model\\.layers\\.1\\..*' }))).toHaveLength(7);
  });

  it('"all-linear" targets every projection (case-insensitive) but not lm_head', () => {
    const r = resolve({ target_modules: 'ALL-LINEAR' });
    expect(targetedNames(r)).toHaveLength(12 * 7);
    expect(r.otherTargeted).toEqual([]);
  });

  it('target_modules null means PEFT’s default for Llama: q_proj and v_proj', () => {
    const names = targetedNames(resolve({ target_modules: null }));
    expect(names).toHaveLength(24);
    expect(names.every((n) => /\.(q|v)_proj$/.test(n))).toBe(true);
  });

  it('layers_to_transform as int and list, with and without layers_pattern', () => {
    expect(targetedNames(resolve({ target_modules: ['q_proj'], layers_to_transform: 1 }))).toEqual(['model.layers.1.self_attn.q_proj']);
    expect(targetedNames(resolve({ target_modules: ['q_proj'], layers_to_transform: [0, 11], layers_pattern: 'layers' }))).toEqual(['model.layers.0.self_attn.q_proj', 'model.layers.11.self_attn.q_proj']);
    expect(targetedNames(resolve({ target_modules: ['q_proj'], layers_to_transform: [2], layers_pattern: ['h', 'layers'] }))).toEqual(['model.layers.2.self_attn.q_proj']);
    expect(targetedNames(resolve({ target_modules: ['q_proj'], layers_to_transform: [2], layers_pattern: 'blocks' }))).toEqual([]);
    // an empty list means "all layers"
    expect(targetedNames(resolve({ target_modules: ['q_proj'], layers_to_transform: [] }))).toHaveLength(12);
  });

  it('layers_to_transform with a string target_modules is refused, as PEFT refuses it', () => {
    const r = resolve({ target_modules: '.*q_proj', layers_to_transform: [1] });
    expect(r.problems[0]).toMatchObject({ code: 'invalid_config' });
    expect(targetedNames(r)).toEqual([]);
  });

  it('exclude_modules as list and as regex', () => {
    const list = targetedNames(resolve({ target_modules: ['q_proj', 'v_proj'], exclude_modules: ['v_proj', 'model.layers.0.self_attn.q_proj'] }));
    expect(list).toHaveLength(11);
    expect(list).not.toContain('model.layers.0.self_attn.q_proj');
    const re = targetedNames(resolve({ target_modules: 'all-linear', exclude_modules: '.*\\.mlp\\..*' }));
    expect(re).toHaveLength(12 * 4);
  });

  it('reports modules outside the projection table that the config targets', () => {
    expect(resolve({ target_modules: ['q_proj', 'lm_head', 'embed_tokens'] }).otherTargeted).toEqual(['model.embed_tokens', 'lm_head']);
    expect(resolve({ target_modules: '.*' }).otherTargeted.length).toBeGreaterThan(10);
  });
});

describe.skipIf(!peftFixturesExist)('real configs', () => {
  it('the Qwen2.5-VL regex targets all seven projections of every layer of a qwen2 model', async () => {
    const { text } = await readFixtureConfig('qwen2.5-vl-regex-targets.adapter_config.json');
    const arch = smallArch({ family: 'qwen2', numLayers: 4, attentionBias: true });
    const r = resolveModules(parsePeftConfig(text).config!, loraTargetsFor(arch));
    expect(r.problems).toEqual([]);
    expect(targetedNames(r)).toHaveLength(4 * 7);
    expect(r.modules.every((m) => m.rank === 8 && m.scale === 2)).toBe(true);
  });

  it('the old Mistral config targets the four attention projections with scale 1', async () => {
    const { text } = await readFixtureConfig('mistral-7b-old-nulls.adapter_config.json');
    const r = resolveModules(parsePeftConfig(text).config!, loraTargetsFor(smallArch({ family: 'mistral', numLayers: 2 })));
    const t = r.modules.filter((m) => m.targeted);
    expect(t.map((m) => m.target.module).sort()).toEqual(['k_proj', 'k_proj', 'o_proj', 'o_proj', 'q_proj', 'q_proj', 'v_proj', 'v_proj']);
    expect(t.every((m) => m.scale === 1 && m.rank === 16)).toBe(true);
  });
});

describe('patterns are evaluated in bounded time, with Python re semantics (RE2)', () => {
  // With JavaScript's backtracking RegExp, each extra ".*" multiplied the time by ~5: 8 of them
  // took 35 s on the event loop. 30 of them would take longer than this test run; on RE2 it is linear.
  const dos = `${'.*'.repeat(30)}X`;
  const invalid = (r: Resolution) => r.problems.filter((p) => p.code === 'invalid_config');

  it('a catastrophic-backtracking target_modules resolves at once, as re.fullmatch would: nothing matches', () => {
    const r = resolve({ target_modules: dos });
    expect(invalid(r)).toEqual([]);
    expect(targetedNames(r)).toEqual([]);
    // and the same shape of pattern that does match: ".*.*…q_proj"
    expect(targetedNames(resolve({ target_modules: `${'.*'.repeat(30)}q_proj` }))).toHaveLength(12);
  });

  it('the same pattern as a rank_pattern / alpha_pattern key or exclude_modules is bounded too', () => {
    const r = resolve({ target_modules: ['q_proj'], rank_pattern: { [dos]: 4 }, alpha_pattern: { [`${'(.*)*'.repeat(20)}q_proj`]: 3 }, exclude_modules: dos });
    expect(invalid(r)).toEqual([]);
    expect(byName(r, 'model.layers.0.self_attn.q_proj')).toMatchObject({ rank: 8, alpha: 3 });
    expect(r.problems.map((p) => p.code)).toEqual(['rank_pattern_unmatched']);
  });

  it.each([
    ['a backreference', '(q)_proj\\1'],
    ['a named backreference', '(?P<p>q)_(?P=p)proj'],
    ['a lookahead', '^(?!.*vision).*q_proj'],
    ['a lookbehind', '.*(?<=self_attn\\.)q_proj'],
    ['an atomic group', '(?>.*)q_proj'],
    ['a possessive quantifier', '.*+q_proj'],
    ['verbose mode', '(?x) .* q_proj'],
    ['a syntax error', 'q_proj('],
  ])('%s in target_modules is an invalid_config naming target_modules', (_label, pattern) => {
    const parsed = parsePeftConfig(JSON.stringify(peftConfig({ target_modules: pattern })));
    const r = resolveModules(parsed.config!, TARGETS);
    expect(invalid(r)).toHaveLength(1);
    expect(invalid(r)[0]).toMatchObject({ code: 'invalid_config', key: 'target_modules' });
    expect(invalid(r)[0]!.message).toContain('bounded time');
    expect(targetedNames(r)).toEqual([]);
  });

  it('an unsupported rank_pattern key is an invalid_config naming that key; the other keys still apply', () => {
    const r = resolve({ target_modules: ['q_proj', 'v_proj'], rank_pattern: { '(?<=attn\\.)q_proj': 4, v_proj: 2 } });
    expect(invalid(r)).toHaveLength(1);
    expect(invalid(r)[0]).toMatchObject({ key: '(?<=attn\\.)q_proj' });
    expect(byName(r, 'model.layers.3.self_attn.v_proj').rank).toBe(2);
    expect(byName(r, 'model.layers.3.self_attn.q_proj').rank).toBe(8);
  });

  it('Python syntax that differs from RE2: \\Z, x{,n}, (?i), (?P<name>…)', () => {
    // re.fullmatch(r".*q_proj\Z", name), re.fullmatch(r"(?i).*Q_PROJ", name), …
    expect(targetedNames(resolve({ target_modules: '.*q_proj\\Z' }))).toHaveLength(12);
    expect(targetedNames(resolve({ target_modules: '(?i).*\\.Q_PROJ' }))).toHaveLength(12);
    expect(targetedNames(resolve({ target_modules: '.*\\.(?P<which>q|v)_proj' }))).toHaveLength(24);
    // Python: 1{,1} is at most one "1": layer 1, not 11 (RegExp read "{,1}" as literal text and matched nothing)
    const r = resolve({ target_modules: 'model\\.layers\\.1{,1}\\.self_attn\\.q_proj' });
    expect(targetedNames(r)).toEqual(['model.layers.1.self_attn.q_proj']);
  });

  it('plain keys (a shortcut without an automaton) match exactly as the regular expression does', () => {
    // the reference: JavaScript's RegExp, harmless on these patterns, with get_pattern_key's rule
    const names = [...TARGETS.map((t) => t.name), 'lm_head', 'model.embed_tokens', 'model.layers.1', 'model.layers.11.self_attn'];
    const keys = ['q_proj', 'self.attn.q_proj', 'layers.1.self_attn.q_proj', 'model.layers.0.mlp.up_proj', 'proj', '', '.q_proj', 'layers.1', 'layers.1.', 'lm.head', 'model.layers.1.self_attn.q_proj.x', '1.self_attn.q_proj'];
    for (const key of keys) {
      const reference = new RegExp(`^(.*\\.)?(${key})$`);
      const r = resolve({ target_modules: ['q_proj', 'v_proj', 'up_proj'], rank_pattern: { [key]: 4 } });
      for (const m of r.modules) expect(m.rank === 4, `${key} on ${m.target.name}`).toBe(reference.test(m.target.name));
      const fullRef = new RegExp(`^(?:${key})$`);
      const full = resolve({ target_modules: key === '' ? 'x' : key });
      for (const n of names.filter((x) => TARGETS.some((t) => t.name === x))) expect(targetedNames(full).includes(n), `fullmatch ${key} on ${n}`).toBe(key !== '' && fullRef.test(n));
    }
  });

  it('a pattern longer than any real one, or past the per-config budget, is refused with a bounded excerpt', () => {
    const long = `(q|k)${'_?'.repeat(600)}proj`;
    const r = resolve({ target_modules: long });
    expect(invalid(r)[0]).toMatchObject({ key: 'target_modules' });
    expect(invalid(r)[0]!.message).toMatch(/characters long/);
    expect(invalid(r)[0]!.message.length).toBeLessThan(600);
    // 40 regular expressions of 100 characters: the budget (2048) is spent by the 21st
    const many = Object.fromEntries(Array.from({ length: 40 }, (_, i) => [`(layers\\.${i}\\.)?${'[a-z_]*'.repeat(12)}q_proj`, 4]));
    const r2 = resolve({ target_modules: ['q_proj'], rank_pattern: many });
    expect(invalid(r2).length).toBeGreaterThan(15);
    expect(invalid(r2)[0]!.message).toMatch(/together pass 2048 characters/);
  });
});
