import type { LoraTarget } from '../model/manifest.js';
import type { PeftConfig } from './peft-config.js';
import { CONFIG_FILE, jsonExcerpt } from './peft-config.js';
import { fullMatch, isPlainPattern, layerIndexOf, MAX_REGEX_SOURCE, moduleOrChildMatch, PatternError, patternKeyMatch, type NameTest } from './pattern.js';
import { error, warning, type Problem } from './report.js';

/**
 * Which modules of the model an adapter targets, and each one's rank, alpha and scale — decided
 * exactly as PEFT decides them when it loads the adapter. Sources (huggingface/peft, main branch,
 * read at commit 5d602fdb):
 *   - `get_pattern_key` in src/peft/utils/other.py: for each key of rank_pattern / alpha_pattern in
 *     dict order, `re.match(rf"(.*\.)?({key})$", current_key)`; the first match wins, otherwise
 *     the module name itself is returned and `rank_pattern.get(name, r)` falls back to `r`.
 *   - `LoraModel._create_and_replace` in src/peft/tuners/lora/model.py: `current_key` is the
 *     module's name in the base model (`model.layers.0.self_attn.q_proj`), and
 *     `r = rank_pattern.get(r_key, r)`, `alpha = alpha_pattern.get(alpha_key, lora_alpha)`.
 *   - `LoraLayer.update_layer` in src/peft/tuners/lora/layer.py: scaling = alpha / r, or
 *     alpha / sqrt(r) with use_rslora.
 *   - `check_target_module_exists` in src/peft/tuners/tuners_utils.py: exclude_modules first (a
 *     string is re.fullmatch, a list entry matches the whole name or a ".entry" suffix); modules
 *     in modules_to_save are never adapted; a string target_modules goes through
 *     `match_target_against_key` (src/peft/utils/other.py) = re.fullmatch; a list entry matches
 *     the whole name or a ".entry" suffix, and only then do layers_to_transform/layers_pattern
 *     apply (layer index from `.*?\.{pattern}\.(\d+)\.`, or `.*?\.[^.]*\.(\d+)\.` without a
 *     pattern).
 *   - `_maybe_include_all_linear_layers` in src/peft/tuners/tuners_utils.py: "all-linear" (case
 *     insensitive) = every nn.Linear except the output embedding (lm_head).
 *   - `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING` in src/peft/utils/constants.py:
 *     target_modules=None means ["q_proj", "v_proj"] for llama, mistral and qwen2.
 * Patterns are Python regular expressions, evaluated on RE2 in linear time (pattern.ts).
 * Dict order: JSON.parse keeps file order except for integer-like keys ("3"), which JavaScript
 * moves first; such a key cannot match a module name ending in `_proj`, so no result changes.
 */

export const DEFAULT_TARGET_MODULES = ['q_proj', 'v_proj'] as const;

export interface ResolvedModule {
  target: LoraTarget;
  targeted: boolean;
  rank: number;
  alpha: number;
  scale: number;
  /** the rank_pattern key that decided the rank, or 'r' */
  rankKey: string;
  /** the alpha_pattern key that decided alpha, or 'lora_alpha' */
  alphaKey: string;
}

export interface Resolution {
  /** one entry per module of the model's LoRA target table, in table order */
  modules: ResolvedModule[];
  /** modules of the model outside the LoRA target table that the config targets (lm_head, embeddings, norms…) */
  otherTargeted: string[];
  problems: Problem[];
}

/** get_pattern_key (peft/utils/other.py): the first key, in dict order, whose pattern matches. */
export function getPatternKey(keys: readonly { key: string; test: NameTest }[], name: string): string | null {
  for (const k of keys) if (k.test(name)) return k.key;
  return null;
}

const listMatches = (entries: readonly string[], name: string) => entries.some((e) => name === e || name.endsWith(`.${e}`));

/**
 * Compiles each pattern of one config field; a pattern RE2 cannot evaluate in linear time (or at
 * all) is an `invalid_config` naming the field (and, for rank/alpha_pattern, the key).
 */
function compileAll<T>(keys: readonly string[], make: (k: string) => T, field: string, problems: Problem[], budget: { left: number }): { key: string; test: T }[] {
  const out: { key: string; test: T }[] = [];
  const perKey = field === 'rank_pattern' || field === 'alpha_pattern';
  for (const key of keys) {
    try {
      if (!isPlainPattern(key)) {
        budget.left -= key.length;
        if (budget.left < 0) throw new PatternError(`the config's regular expressions together pass ${MAX_REGEX_SOURCE} characters, which no real adapter needs`);
      }
      out.push({ key, test: make(key) });
    } catch (e) {
      if (!(e instanceof PatternError)) throw e;
      problems.push(
        error({
          code: 'invalid_config',
          file: CONFIG_FILE,
          key: perKey ? key.slice(0, 200) : field,
          actual: key.length > 200 ? `${key.slice(0, 200)}…` : key,
          message: `${perKey ? `${field} key ${jsonExcerpt(key)}` : `${field} ${jsonExcerpt(key)}`} is not a pattern that can be matched in bounded time: ${e.message}.`,
          hint: 'Use plain module names such as "q_proj" or "layers.1.self_attn.q_proj", or a simple regular expression such as ".*\\.(q|v)_proj".',
        }),
      );
    }
  }
  return out;
}

type TargetMatcher = NameTest;

/** check_target_module_exists (peft/tuners/tuners_utils.py), for one config. Null when the config itself is unusable. */
function targetMatcher(config: PeftConfig, modelLinear: readonly string[], problems: Problem[], budget: { left: number }): TargetMatcher | null {
  let excluded: (name: string) => boolean = () => false;
  const ex = config.excludeModules;
  if (typeof ex === 'string' && ex !== '') {
    const [c] = compileAll([ex], fullMatch, 'exclude_modules', problems, budget);
    if (!c) return null;
    excluded = c.test;
  } else if (Array.isArray(ex) && ex.length > 0) {
    excluded = (name) => listMatches(ex, name);
  }
  const mts = config.modulesToSave;
  if (mts && mts.length > 0) {
    const res = compileAll(mts, moduleOrChildMatch, 'modules_to_save', problems, budget);
    const prev = excluded;
    excluded = (name) => prev(name) || res.some((r) => r.test(name));
  }

  let tm = config.targetModules;
  if (tm === null) {
    if (config.targetParameters !== null) return () => false;
    tm = [...DEFAULT_TARGET_MODULES];
  }
  if (typeof tm === 'string' && (config.layersToTransform !== null || config.layersPattern !== null)) {
    // LoraConfig.__post_init__ raises for this combination: PEFT would refuse to load the config.
    problems.push(error({ code: 'invalid_config', file: CONFIG_FILE, key: 'layers_to_transform', message: 'layers_to_transform / layers_pattern cannot be used when target_modules is a string (a regular expression or "all-linear"); PEFT refuses this config.' }));
    return null;
  }
  if (typeof tm === 'string' && tm.toLowerCase() === 'all-linear') {
    const linear = new Set(modelLinear);
    return (name) => !excluded(name) && linear.has(name);
  }
  if (typeof tm === 'string') {
    const [c] = compileAll([tm], fullMatch, 'target_modules', problems, budget);
    if (!c) return null;
    return (name) => !excluded(name) && c.test(name);
  }
  const list = tm;
  const lt = config.layersToTransform;
  const usingLayers = lt !== null && (Array.isArray(lt) ? lt.length !== 0 : true);
  const lp = config.layersPattern;
  const patterns = lp === null || lp.length === 0 ? null : typeof lp === 'string' ? [lp] : lp;
  if (patterns !== null && lt === null) {
    problems.push(error({ code: 'invalid_config', file: CONFIG_FILE, key: 'layers_pattern', message: 'layers_pattern is set but layers_to_transform is not; PEFT refuses this config.' }));
    return null;
  }
  const layerIndex = patterns === null ? [layerIndexOf(null)] : compileAll(patterns, layerIndexOf, 'layers_pattern', problems, budget).map((c) => c.test);
  return (name) => {
    if (excluded(name)) return false;
    if (!listMatches(list, name)) return false;
    if (!usingLayers) return true;
    let index: number | null = null;
    for (const indexIn of layerIndex) {
      index = indexIn(name);
      if (index !== null) break;
    }
    if (index === null) return false;
    return typeof lt === 'number' ? index === lt : (lt as number[]).includes(index);
  };
}

/**
 * Modules of a Llama-family model that are not LoRA targets here but that a config may still
 * name: PEFT would either adapt them (lm_head, embeddings) or refuse them (norms, containers).
 */
export function otherModuleNames(numLayers: number): string[] {
  const out = ['model', 'model.embed_tokens', 'model.layers', 'model.norm', 'model.rotary_emb', 'lm_head'];
  for (let i = 0; i < numLayers; i++) {
    const l = `model.layers.${i}`;
    out.push(l, `${l}.self_attn`, `${l}.mlp`, `${l}.mlp.act_fn`, `${l}.input_layernorm`, `${l}.post_attention_layernorm`);
  }
  return out;
}

/** Pure: config × the model's LoRA target table → per-module targeting, rank, alpha, scale. */
export function resolveModules(config: PeftConfig, targets: readonly LoraTarget[]): Resolution {
  const problems: Problem[] = [];
  const numLayers = targets.reduce((n, t) => Math.max(n, t.layer + 1), 0);
  const others = otherModuleNames(numLayers);
  // all-linear: every nn.Linear but the output head, i.e. exactly the projections of the target table
  // one budget for every pattern of the config: what matching may cost is bounded per config
  const budget = { left: MAX_REGEX_SOURCE };
  const isTargeted = targetMatcher(config, targets.map((t) => t.name), problems, budget);
  const rankKeys = compileAll(Object.keys(config.rankPattern), patternKeyMatch, 'rank_pattern', problems, budget);
  const alphaKeys = compileAll(Object.keys(config.alphaPattern), patternKeyMatch, 'alpha_pattern', problems, budget);

  const modules: ResolvedModule[] = targets.map((target) => {
    const rk = getPatternKey(rankKeys, target.name);
    const ak = getPatternKey(alphaKeys, target.name);
    const rank = rk === null ? config.r : config.rankPattern[rk]!;
    const alpha = ak === null ? config.loraAlpha : config.alphaPattern[ak]!;
    return {
      target,
      targeted: isTargeted ? isTargeted(target.name) : false,
      rank,
      alpha,
      scale: config.useRslora ? alpha / Math.sqrt(rank) : alpha / rank,
      rankKey: rk ?? 'r',
      alphaKey: ak ?? 'lora_alpha',
    };
  });
  const otherTargeted = isTargeted ? others.filter((n) => isTargeted(n)) : [];

  // PEFT applies a pattern key that matches nothing silently; a typo there changes nothing and
  // nobody notices. Only modules PEFT would adapt count.
  // LoRA on embed_tokens is served (embedding-parts.ts): a pattern key for it is not unmatched
  const adapted = [...modules.filter((m) => m.targeted).map((m) => m.target.name), ...otherTargeted.filter((n) => n === 'model.embed_tokens')];
  for (const [keys, code, field] of [
    [rankKeys, 'rank_pattern_unmatched', 'rank_pattern'],
    [alphaKeys, 'alpha_pattern_unmatched', 'alpha_pattern'],
  ] as const) {
    for (const k of keys) {
      if (adapted.some((name) => k.test(name))) continue;
      const why = k.key.startsWith('base_model.model.')
        ? ' Keys are matched against module names relative to the base model (model.layers.0.self_attn.q_proj), so a key starting with base_model.model. never matches.'
        : '';
      problems.push(
        warning({
          code,
          file: CONFIG_FILE,
          key: k.key.slice(0, 200),
          message: `${field} key ${jsonExcerpt(k.key)} matches no adapted module of this model, so it has no effect.${why}`,
          hint: `A key matches a module when it matches a dot-separated suffix of its name, e.g. "q_proj" or "layers.1.self_attn.q_proj".`,
        }),
      );
    }
  }
  return { modules, otherTargeted, problems };
}
