import { fusedMismatch, type Architecture } from '../model/architecture.js';
import type { LoraTarget, ModelDtype } from '../model/manifest.js';
import { assessEffect, peftGrams, type TensorGram } from './effect.js';
import { layerPrefix, parseTensorKey, type ParsedKey } from './keys.js';
import { maxAbsFinite, scaleOverflowProblems, type ScaledModule } from './overflow.js';
import { unservedModulesToSave, validateEmbeddingParts, type AdapterTokenizerFacts, type EmbeddingPartsResult } from './embedding-parts.js';
import { CONFIG_FILE, foreignPeftType, jsonExcerpt, parsePeftConfig, type PeftConfig } from './peft-config.js';
import { boundProblems, error, warning, type ModuleReport, type Problem, type ValidationReport } from './report.js';
import { resolveModules, type ResolvedModule } from './resolve.js';
import { isFloatDtype, type SafetensorsHeader, type TensorHeader } from './safetensors.js';
import { checkLoraVectors, variantConfigProblems, type VectorTensor } from './variants.js';

/**
 * The validator: one pure function from (adapter files, model facts, limits) to a report that
 * lists every problem at once. DESIGN.md "Adapters: format, resolution, validation".
 */

export const WEIGHTS_FILE = 'adapter_model.safetensors';
export const PICKLE_FILE = 'adapter_model.bin';

export interface AdapterInput {
  /** adapter_config.json text; null when the file is absent */
  configText: string | null;
  /** the weights file's name, for messages */
  weightsFile: string;
  /** null with no headerProblems = the weights file is absent */
  header: SafetensorsHeader | null;
  headerProblems: Problem[];
  /** tensor key → values, when they were read (enables the NaN/Inf check) */
  values?: Map<string, Float32Array>;
  /** NaN/±Inf counts per tensor key, counted while the file streamed in (instead of `values`) */
  nonFinite?: ReadonlyMap<string, NonFiniteCount>;
  /** largest |value| per lora_B key, measured while the file streamed in (instead of `values`) */
  maxAbs?: ReadonlyMap<string, number>;
  /** names of the other files that came with the adapter */
  otherFiles?: string[];
  /** the upload's own tokenizer.json, when it has one (an adapter that adds tokens needs it) */
  tokenizer?: AdapterTokenizerFacts | null;
  /** r×r Gram matrices per tensor key (effect.ts), when the values were decoded elsewhere; else taken from `values` */
  grams?: ReadonlyMap<string, TensorGram>;
}

export interface NonFiniteCount {
  nan: number;
  inf: number;
}

export function countNonFinite(v: Float32Array): NonFiniteCount {
  let nan = 0;
  let inf = 0;
  for (let i = 0; i < v.length; i++) {
    const x = v[i]!;
    if (x !== x) nan++;
    else if (x === Infinity || x === -Infinity) inf++;
  }
  return { nan, inf };
}

export interface ModelFacts {
  architecture: Architecture;
  loraTargets: LoraTarget[];
  modelId: string;
  /** the dtype the graph holds adapter weights in (default fp32): what scale × lora_B must fit */
  dtype?: ModelDtype;
}

export interface ValidationLimits {
  maxLoraRank: number;
  strictBaseModel: boolean;
  /** accept an adapter whose every module's delta is zero (no_effect becomes a warning) */
  allowNoEffect?: boolean;
  /** ADAPTER_MEMORY_BUDGET_MB in bytes: the most one adapter's served weights may take; absent = no limit */
  maxAdapterBytes?: number;
}

const fmt = (shape: readonly number[]) => `[${shape.join(', ')}]`;
const countOf = (shape: readonly number[]) => shape.reduce((a, b) => a * b, 1);

/** What to say about each feature we cannot serve; keyed so config and tensor evidence merge into one problem. */
type Feature = 'peft_type' | 'modules_to_save' | 'bias' | 'target_parameters' | 'embedding' | 'lm_head' | 'non_linear' | 'fan_in_fan_out' | 'layer_replication' | 'trainable_tokens' | 'alora' | 'qalora';

const MERGE = 'merge it into the base model with PEFT merge_and_unload() and serve the merged model';

const FEATURE_HINTS: Record<Feature, string> = {
  peft_type: `Only plain LoRA adapters (peft_type "LORA") are served: ${MERGE}, or retrain with LoraConfig.`,
  modules_to_save: `modules_to_save is served for embed_tokens and lm_head only; other modules (e.g. a classification head) are not part of a causal LM's generation: ${MERGE}, or retrain without them in modules_to_save.`,
  bias: `Trained biases change the base model's own bias terms: ${MERGE}, or retrain with bias="none".`,
  target_parameters: `LoRA on raw nn.Parameters (target_parameters, e.g. MoE experts) is not a Linear projection: ${MERGE}, or retrain with target_modules only.`,
  embedding: `LoRA is served on this model's embed_tokens and its attention and MLP projections only: ${MERGE}, or retrain without this module in target_modules.`,
  lm_head: `LoRA on lm_head is not served (only the attention and MLP projections are): ${MERGE}, or retrain without lm_head in target_modules.`,
  non_linear: 'PEFT itself cannot put LoRA on these modules (they are not Linear layers); name the projections instead, e.g. ["q_proj", "v_proj"].',
  fan_in_fan_out: 'fan_in_fan_out=true is meant for Conv1D models such as GPT-2; Llama-family projections are nn.Linear (PEFT itself would force it to false). Check that lora_A is [r, in_features] and lora_B is [out_features, r], then re-save the config with fan_in_fan_out=false.',
  layer_replication: `layer_replication builds extra decoder layers the served model does not have: ${MERGE}.`,
  trainable_tokens: `trainable tokens are served for embed_tokens (and lm_head) only: ${MERGE}, or retrain with trainable_token_indices on embed_tokens.`,
  alora: 'Activated LoRA (alora_invocation_tokens) only applies after its invocation tokens, which the engine does not track; retrain as plain LoRA.',
  qalora: `QA-LoRA pools its input for a quantised base: ${MERGE}, or retrain with use_qalora=False.`,
};

class FeatureBag {
  private readonly seen = new Map<Feature, Problem>();
  add(f: Feature, p: Omit<Problem, 'severity' | 'code'>): void {
    if (!this.seen.has(f)) this.seen.set(f, error({ code: 'unsupported_feature', hint: FEATURE_HINTS[f], ...p }));
  }
  has(f: Feature): boolean {
    return this.seen.has(f);
  }
  problems(): Problem[] {
    return [...this.seen.values()];
  }
}

function configFeatures(c: PeftConfig, bag: FeatureBag): void {
  const cfg = (key: string, actual: unknown, message: string) => ({ file: CONFIG_FILE, key, actual, message });
  if (c.peftType.toUpperCase() !== 'LORA') {
    const { message, hint } = foreignPeftType(c.peftType);
    bag.add('peft_type', { ...cfg('peft_type', c.peftType.slice(0, 40), message), hint });
  }
  const unserved = unservedModulesToSave(c.modulesToSave ?? []);
  if (unserved.length > 0) bag.add('modules_to_save', cfg('modules_to_save', unserved, `modules_to_save lists ${JSON.stringify(unserved)}: the adapter replaces whole base modules other than embed_tokens and lm_head.`));
  if (c.bias !== 'none') bag.add('bias', cfg('bias', c.bias, `bias is "${c.bias}": the adapter trained bias terms of the base model.`));
  if (c.targetParameters && c.targetParameters.length > 0) bag.add('target_parameters', cfg('target_parameters', c.targetParameters, `target_parameters is ${JSON.stringify(c.targetParameters)}: LoRA on raw parameters.`));
  if (c.fanInFanOut) bag.add('fan_in_fan_out', cfg('fan_in_fan_out', true, 'fan_in_fan_out is true, which describes Conv1D (transposed) weights, not the nn.Linear projections of this model.'));
  const r = c.raw;
  if (Array.isArray(r.layer_replication) && r.layer_replication.length > 0) bag.add('layer_replication', cfg('layer_replication', r.layer_replication, 'layer_replication is set: the adapter was trained on a model with duplicated layers.'));
  if (r.alora_invocation_tokens !== null && r.alora_invocation_tokens !== undefined) bag.add('alora', cfg('alora_invocation_tokens', r.alora_invocation_tokens, 'alora_invocation_tokens is set: this is an activated LoRA.'));
  if (r.use_qalora === true) bag.add('qalora', cfg('use_qalora', true, 'use_qalora is true: QA-LoRA, trained against a quantised base.'));
}

/**
 * init_lora_weights values whose initialisation rewrote the base weights (peft/tuners/lora/layer.py,
 * `LoraLayer.update_layer`: pissa*, corda*, olora and lora_ga subtract B·A from the base; loftq
 * replaces it with a quantised copy).
 */
export function baseModifyingInit(init: boolean | string): string | null {
  if (typeof init !== 'string') return null;
  const l = init.toLowerCase();
  if (l.startsWith('pissa')) return 'PiSSA';
  if (l.startsWith('corda')) return 'CorDA';
  if (l === 'olora') return 'OLoRA';
  if (l === 'lora_ga') return 'LoRA-GA';
  if (l === 'loftq') return 'LoftQ';
  return null;
}

function initProblem(c: PeftConfig): Problem | null {
  const name = baseModifyingInit(c.initLoraWeights);
  if (name === null) return null;
  if (name === 'LoftQ') {
    return error({
      code: 'base_modifying_init',
      file: CONFIG_FILE,
      key: 'init_lora_weights',
      actual: c.initLoraWeights,
      message: 'init_lora_weights is "loftq": the adapter was trained on a quantised copy of the base model that LoftQ initialised together with it, so on the original base weights it is not the model that was trained.',
      hint: 'Serve the LoftQ backbone the adapter was trained with (merge_and_unload into it and serve the merged model), or retrain with init_lora_weights=true.',
    });
  }
  return error({
    code: 'base_modifying_init',
    file: CONFIG_FILE,
    key: 'init_lora_weights',
    actual: c.initLoraWeights,
    message: `init_lora_weights is "${c.initLoraWeights}": ${name} initialisation subtracted the initial adapter from the base weights before training, so on the original base this adapter is not the model that was trained.`,
    hint: `Convert it to plain LoRA when saving: save the adapter once before training, then call model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=<that folder>) (for PiSSA, see convert_pissa_to_lora in the PEFT docs). PEFT then writes an adapter of rank 2r with init_lora_weights=true that applies to the original base.`,
  });
}

function basename(p: string): string {
  const parts = p.replace(/[\\/]+$/, '').split(/[\\/]/);
  return parts[parts.length - 1] ?? p;
}

const loose = (s: string) => basename(s).toLowerCase().replace(/[^a-z0-9]/g, '');

/** base_model_name_or_path vs the served model's id, by basename, ignoring case and punctuation. */
export function sameBaseModel(declared: string, modelId: string): boolean {
  const a = loose(declared);
  const b = loose(modelId);
  if (a === '' || b === '') return true;
  return a === b || a.includes(b) || b.includes(a);
}

interface ModuleTensors {
  A: { parsed: ParsedKey; header: TensorHeader } | null;
  B: { parsed: ParsedKey; header: TensorHeader } | null;
}

function emptySummary(): ValidationReport['summary'] {
  return { peftType: null, baseModel: null, r: null, loraAlpha: null, useRslora: null, targetedModules: 0, tensors: 0, parameters: 0 };
}

/** Pure: config × tensor headers × model facts × limits → every problem, plus the per-module resolution. */
export function validateAdapter(input: AdapterInput, model: ModelFacts, limits: ValidationLimits): ValidationReport {
  const problems: Problem[] = [];
  const bag = new FeatureBag();
  const file = input.weightsFile;
  const summary = emptySummary();

  // ---- files
  let config: PeftConfig | null = null;
  if (input.configText === null) {
    problems.push(error({ code: 'missing_file', file: CONFIG_FILE, message: `${CONFIG_FILE} is missing; it says which modules the adapter targets and with which rank and alpha.`, hint: 'Upload the adapter_config.json written by PEFT save_pretrained next to the weights.' }));
  } else {
    const parsed = parsePeftConfig(input.configText);
    problems.push(...parsed.problems);
    config = parsed.config;
  }
  const header = input.header;
  if (header === null && input.headerProblems.length === 0) {
    const pickle = (input.otherFiles ?? []).some((f) => basename(f) === PICKLE_FILE);
    problems.push(
      pickle
        ? error({
            code: 'missing_file',
            file,
            actual: PICKLE_FILE,
            message: `Only ${PICKLE_FILE} was given: it is a Python pickle, and pickles can run arbitrary code when loaded, so it is never loaded here; ${file} is required.`,
            hint: 'Re-save with model.save_pretrained(out_dir, safe_serialization=True) (the default in current PEFT), or convert: safetensors.torch.save_file(torch.load("adapter_model.bin"), "adapter_model.safetensors", metadata={"format": "pt"}).',
          })
        : error({ code: 'missing_file', file, message: `${file} is missing.`, hint: 'Upload the adapter_model.safetensors written by PEFT save_pretrained.' }),
    );
  }
  problems.push(...input.headerProblems);

  // ---- config-level facts
  let resolved: ResolvedModule[] = [];
  let otherTargeted: string[] = [];
  if (config) {
    summary.peftType = config.peftType;
    summary.baseModel = config.baseModel;
    summary.r = config.r;
    summary.loraAlpha = config.loraAlpha;
    summary.useRslora = config.useRslora;
    configFeatures(config, bag);
    problems.push(...variantConfigProblems(config));
    const init = initProblem(config);
    if (init) problems.push(init);
    if (config.baseModel && model.modelId && !sameBaseModel(config.baseModel, model.modelId)) {
      const p = {
        code: 'base_model_mismatch' as const,
        file: CONFIG_FILE,
        key: 'base_model_name_or_path',
        expected: model.modelId,
        actual: config.baseModel,
        message: `The adapter was trained on ${config.baseModel}, but the served model is ${model.modelId}.${limits.strictBaseModel ? '' : ' Its tensor shapes are checked below; if they fit, it is accepted, but its output may still be poor.'}`,
        hint: limits.strictBaseModel ? 'Serve the base model the adapter was trained on, or turn off STRICT_BASE_MODEL.' : undefined,
      };
      problems.push(limits.strictBaseModel ? error(p) : warning(p));
    }
    if (!bag.has('peft_type')) {
      const res = resolveModules(config, model.loraTargets);
      problems.push(...res.problems);
      resolved = res.modules;
      otherTargeted = res.otherTargeted;
    }
  }
  const targeted = resolved.filter((m) => m.targeted);
  summary.targetedModules = targeted.length;

  const parts = embeddingPartsOf(config, header?.tensors ?? [], model, otherTargeted, limits, file, bag.has('peft_type'), input.tokenizer ?? null);
  problems.push(...parts.problems);
  otherTargeted = otherTargeted.filter((n) => n !== 'model.embed_tokens');
  const otherFeature = (n: string): Feature => (n === 'lm_head' ? 'lm_head' : n === 'model.embed_tokens' ? 'embedding' : 'non_linear');
  for (const feature of new Set(otherTargeted.map(otherFeature))) {
    const names = otherTargeted.filter((n) => otherFeature(n) === feature);
    const first = names[0]!;
    bag.add(feature, { file: CONFIG_FILE, key: 'target_modules', module: first, actual: names.slice(0, 8), message: `target_modules selects ${names.length === 1 ? first : `${names.length} modules such as ${first}`}, which ${feature === 'non_linear' ? 'are not Linear layers' : 'is not an attention or MLP projection'}.` });
  }

  if (config && resolved.length > 0 && targeted.length === 0 && !bag.has('peft_type')) {
    const tm = config.targetModules;
    problems.push(
      error({
        code: 'no_modules_matched',
        file: CONFIG_FILE,
        key: 'target_modules',
        actual: typeof tm === 'string' ? tm.slice(0, 200) : (tm ?? []).slice(0, 8),
        expected: `names such as ${model.loraTargets[0]?.name ?? 'model.layers.0.self_attn.q_proj'}`,
        message: `target_modules ${jsonExcerpt(tm, 120)} selects no projection of this model (its modules are named model.layers.{0..${model.architecture.numLayers - 1}}.self_attn.{q,k,v,o}_proj and .mlp.{gate,up,down}_proj), so the adapter would change nothing.`,
        hint: 'The adapter was probably trained for another architecture or a model whose modules are named differently.',
      }),
    );
  }

  // rank_too_large: one problem per key that decided a too-large rank
  const tooLarge = new Map<string, ResolvedModule[]>();
  for (const m of targeted) if (m.rank > limits.maxLoraRank) tooLarge.set(m.rankKey, [...(tooLarge.get(m.rankKey) ?? []), m]);
  for (const [key, ms] of tooLarge) {
    const first = ms[0]!;
    problems.push(
      error({
        code: 'rank_too_large',
        file: CONFIG_FILE,
        key,
        module: first.target.name,
        expected: `<= ${limits.maxLoraRank}`,
        actual: first.rank,
        message: `${key === 'r' ? `r = ${first.rank}` : `rank_pattern key "${key}" gives rank ${first.rank}`} for ${ms.length} module${ms.length === 1 ? '' : 's'} (e.g. ${first.target.name}), over this server's MAX_LORA_RANK of ${limits.maxLoraRank}.`,
        hint: 'Retrain with a smaller rank, or raise MAX_LORA_RANK (memory and compute per request grow with the rank).',
      }),
    );
  }

  // ---- tensors
  const byModule = new Map<string, ModuleTensors>();
  const tableByName = new Map(model.loraTargets.map((t) => [t.name, t]));
  const resolvedByName = new Map(resolved.map((m) => [m.target.name, m]));
  const unmatched: ParsedKey[] = [];
  const corruptTensors = new Set(input.headerProblems.map((p) => p.tensor).filter((t): t is string => t !== undefined));
  let loraTensors = 0;
  const tensorProblems: Problem[] = [];
  const nonLinear = new Set(['model.embed_tokens', 'lm_head']);
  /** DoRA magnitudes and lora_A/lora_B biases, checked by checkLoraVectors (variants.ts) */
  const vectorKeys: VectorTensor[] = [];

  // another PEFT method's tensors (AdaLoRA's lora_E) are not LoRA tensors gone wrong: the method is the answer
  const foreign = bag.has('peft_type');
  for (const t of header?.tensors ?? []) {
    summary.tensors++;
    summary.parameters += countOf(t.shape);
    if (foreign) continue;
    if (!isFloatDtype(t.dtype)) {
      tensorProblems.push(error({ code: 'bad_dtype', file, tensor: t.name, expected: ['F32', 'F16', 'BF16'], actual: t.dtype, message: `${t.name} is ${t.dtype}; adapter weights must be F32, F16 or BF16.`, hint: 'Save the adapter from an unquantised model in float32, float16 or bfloat16.' }));
    }
    if (parts.claimed.has(t.name)) continue;
    const pk = parseTensorKey(t.name);
    const where = { file, tensor: t.name, module: pk.module ?? undefined };
    switch (pk.kind) {
      case 'dora_magnitude':
        vectorKeys.push({ parsed: pk, header: t });
        continue;
      case 'lora_embedding':
        bag.add('embedding', { ...where, message: `${pk.normalized} is LoRA on an embedding layer.` });
        continue;
      case 'full_weight':
        bag.add('modules_to_save', { ...where, message: `${pk.normalized} is a full copy of a base weight (modules_to_save or saved embedding layers).` });
        continue;
      case 'trainable_tokens':
        bag.add('trainable_tokens', { ...where, message: `${pk.normalized} holds trained embedding rows (trainable_token_indices).` });
        continue;
      case 'bias':
        if (pk.part === null) bag.add('bias', { ...where, message: `${pk.normalized} is a trained bias.` });
        else vectorKeys.push({ parsed: pk, header: t });
        continue;
      case 'other':
        tensorProblems.push(error({ code: 'unexpected_tensor', ...where, message: `${t.name} is not a LoRA tensor (expected keys like base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight).` }));
        continue;
      case 'lora':
        break;
    }
    loraTensors++;
    const mod = pk.module!;
    if (nonLinear.has(mod)) {
      bag.add(mod === 'lm_head' ? 'lm_head' : 'embedding', { ...where, message: `${pk.normalized} is LoRA on ${mod}.` });
      continue;
    }
    const target = tableByName.get(mod);
    if (!target) {
      unmatched.push(pk);
      continue;
    }
    const res = resolvedByName.get(mod);
    if (res && !res.targeted) {
      tensorProblems.push(error({ code: 'unexpected_tensor', ...where, message: `${pk.normalized} is for ${mod}, which adapter_config.json does not target (target_modules ${jsonExcerpt(config?.targetModules, 120)}); PEFT would ignore it.`, hint: 'Add the module to target_modules, or drop the tensor.' }));
      continue;
    }
    const slot = byModule.get(mod) ?? { A: null, B: null };
    const part = pk.part!;
    const prev = slot[part];
    if (prev) {
      tensorProblems.push(error({ code: 'unexpected_tensor', ...where, message: `${t.name} is a second lora_${part} for ${mod} (also ${prev.parsed.key}); the file holds more than one adapter.`, hint: 'Save one adapter per folder (save_pretrained(selected_adapters=[name])).' }));
      continue;
    }
    slot[part] = { parsed: pk, header: t };
    byModule.set(mod, slot);
  }

  // adapter keys that name no module of this model: a different layout, or a different model
  const matchedAny = byModule.size > 0;
  if (unmatched.length > 0 && !matchedAny) {
    const seen = [...new Set(unmatched.map((u) => layerPrefix(u.module!)))];
    const have = [...new Set(model.loraTargets.map((t) => layerPrefix(t.name)))];
    tensorProblems.push(
      error({
        code: 'no_modules_matched',
        file,
        tensor: unmatched[0]!.key,
        module: unmatched[0]!.module!,
        expected: have,
        actual: seen,
        message: `None of the ${unmatched.length} LoRA tensors names a module of this model: the adapter's modules live under ${seen.map((s) => `"${s}"`).join(', ')} (e.g. ${unmatched[0]!.module}), this model's under ${have.map((s) => `"${s}"`).join(', ')}; loaded as-is the adapter would change nothing.`,
        hint: 'The adapter was trained on a differently wrapped model (e.g. the language model inside a vision-language model); rename the keys to the plain model layout, or serve the model it was trained on.',
      }),
    );
  } else {
    for (const u of unmatched) {
      tensorProblems.push(error({ code: 'unexpected_tensor', file, tensor: u.key, module: u.module!, message: `${u.normalized} is for ${u.module}, which this model does not have (it has ${model.architecture.numLayers} layers with q/k/v/o_proj and gate/up/down_proj).`, hint: 'The adapter was probably trained on a model with more layers or other module names.' }));
    }
  }
  if (header && loraTensors === 0 && parts.claimed.size === 0 && input.headerProblems.length === 0 && !foreign) {
    tensorProblems.push(error({ code: 'no_modules_matched', file, message: `${file} holds no LoRA tensors (lora_A / lora_B), so the adapter would change nothing.` }));
  }

  const vectors = checkLoraVectors(vectorKeys, config, targeted, tableByName, (name) => byModule.has(name), file);
  tensorProblems.push(...vectors.problems);

  // per targeted module: shapes, ranks, presence
  const modules: ModuleReport[] = [];
  const checkPresence = header !== null && (matchedAny || unmatched.length === 0) && loraTensors > 0;
  for (const m of targeted) {
    const slot = byModule.get(m.target.name) ?? { A: null, B: null };
    const { inFeatures, outFeatures, module: proj, name } = m.target;
    const decided = m.rankKey === 'r' ? `r = ${m.rank}` : `rank_pattern key "${m.rankKey}" = ${m.rank}`;
    const expectA = [m.rank, inFeatures];
    const expectB = [outFeatures, m.rank];
    const isCorrupt = (part: 'A' | 'B') => corruptTensors.has(`base_model.model.${name}.lora_${part}.weight`) || corruptTensors.has(`${name}.lora_${part}.weight`);
    if (checkPresence && !slot.A && !slot.B && !isCorrupt('A') && !isCorrupt('B')) {
      tensorProblems.push(error({ code: 'missing_tensor', file, module: name, expected: { lora_A: expectA, lora_B: expectB }, message: `${name} has no tensors: adapter_config.json targets it, so ${name}.lora_A.weight ${fmt(expectA)} and ${name}.lora_B.weight ${fmt(expectB)} were expected.`, hint: 'Save the adapter again from the trained model, or narrow target_modules / layers_to_transform to the modules that were trained.' }));
    }
    for (const part of ['A', 'B'] as const) {
      const got = slot[part];
      const expected = part === 'A' ? expectA : expectB;
      const keyName = `${name}.lora_${part}.weight`;
      if (!got) {
        if (checkPresence && (slot.A || slot.B) && !isCorrupt(part)) {
          tensorProblems.push(error({ code: 'missing_tensor', file, module: name, tensor: keyName, expected, message: `${keyName} is missing while its lora_${part === 'A' ? 'B' : 'A'} is present; ${fmt(expected)} was expected.`, hint: 'A LoRA module needs both lora_A and lora_B.' }));
        }
        continue;
      }
      const shape = got.header.shape;
      const tensor = got.parsed.key;
      const shown = got.parsed.normalized;
      if (shape.length !== 2) {
        // DeepSpeed ZeRO-3 partitions every parameter; a save without gathering them writes empty placeholders
        const empty = countOf(shape) === 0 ? ' It holds no values: most likely an unconsolidated DeepSpeed ZeRO-3 save (each rank kept only its shard).' : '';
        tensorProblems.push(error({ code: 'shape_mismatch', file, tensor, module: name, expected, actual: shape, message: `${shown} has shape ${fmt(shape)}; a LoRA ${part} matrix is 2-D, and for this model's ${proj} ${fmt(expected)} was expected.${empty}`, hint: empty ? 'Save with the parameters gathered: under ZeRO-3 set stage3_gather_16bit_weights_on_model_save=true (or call save_pretrained inside deepspeed.zero.GatheredParameters), or run zero_to_fp32.py on the checkpoint and re-save the adapter.' : undefined }));
        continue;
      }
      const [d0, d1] = shape as [number, number];
      const feat = part === 'A' ? d1 : d0;
      const rank = part === 'A' ? d0 : d1;
      const want = part === 'A' ? inFeatures : outFeatures;
      if (feat !== want) {
        const which = part === 'A' ? 'in_features' : 'out_features';
        tensorProblems.push(
          error({
            code: 'shape_mismatch',
            file,
            tensor,
            module: name,
            expected,
            actual: shape,
            message: `${shown} has shape ${fmt(shape)}; this model's ${proj} has ${which} ${want}, so ${fmt(expected)} was expected.${(part === 'B' && fusedMismatch(model.architecture, proj, feat)) || ''} The adapter was probably trained on a model of another size or a pruned variant.`,
          }),
        );
      }
      if (rank !== m.rank) {
        tensorProblems.push(
          error({
            code: 'rank_mismatch',
            file,
            tensor,
            module: name,
            key: m.rankKey,
            expected: m.rank,
            actual: rank,
            message: `${shown} has rank ${rank} (shape ${fmt(shape)}), but adapter_config.json gives ${name} rank ${m.rank} (${decided}).`,
            hint: m.rankKey === 'r' ? 'Fix r (or add a rank_pattern entry for this module) to match the tensors that were trained.' : `Fix rank_pattern["${m.rankKey}"] to match the tensors that were trained.`,
          }),
        );
      }
    }
    modules.push({
      module: name,
      layer: m.target.layer,
      projection: proj,
      rank: m.rank,
      alpha: m.alpha,
      scale: m.scale,
      rankKey: m.rankKey,
      alphaKey: m.alphaKey,
      tensorA: slot.A?.parsed.key ?? null,
      tensorB: slot.B?.parsed.key ?? null,
      ...vectors.keysOf(name),
    });
  }

  // Without a usable config nothing is targeted, but the feature dimensions can still be checked:
  // the report should say at once whether the weights fit, not only that the config is broken.
  if (!config) {
    for (const [name, slot] of byModule) {
      const t = tableByName.get(name)!;
      for (const part of ['A', 'B'] as const) {
        const got = slot[part];
        if (!got || got.header.shape.length !== 2) continue;
        const [d0, d1] = got.header.shape as [number, number];
        const feat = part === 'A' ? d1 : d0;
        const want = part === 'A' ? t.inFeatures : t.outFeatures;
        if (feat === want) continue;
        const expected = part === 'A' ? [d0, want] : [want, d1];
        tensorProblems.push(error({ code: 'shape_mismatch', file, tensor: got.parsed.key, module: name, expected, actual: got.header.shape, message: `${got.parsed.normalized} has shape ${fmt(got.header.shape)}; this model's ${t.module} has ${part === 'A' ? 'in_features' : 'out_features'} ${want}, so ${fmt(expected)} was expected. The adapter was probably trained on a model of another size or a pruned variant.` }));
      }
    }
  }

  // NaN / Inf, when the values were read or counted as they streamed in
  const counted: Iterable<[string, NonFiniteCount]> | null = input.values
    ? [...input.values].map(([key, v]): [string, NonFiniteCount] => [key, countNonFinite(v)])
    : input.nonFinite && input.header
      ? input.header.tensors.map((t): [string, NonFiniteCount] => [t.name, input.nonFinite!.get(t.name) ?? { nan: 0, inf: 0 }])
      : null;
  for (const [key, { nan, inf }] of counted ?? []) {
    if (nan + inf > 0) {
      const length = input.values?.get(key)?.length ?? (input.header?.tensors.find((t) => t.name === key)?.shape ?? []).reduce((a, b) => a * b, 1);
      tensorProblems.push(error({ code: 'non_finite', file, tensor: key, module: parseTensorKey(key).module ?? undefined, expected: 0, actual: nan + inf, message: `${key} holds ${nan + inf} non-finite value${nan + inf === 1 ? '' : 's'} (${nan} NaN, ${inf} ±Inf) of ${length}; training diverged or the file was written from a broken state.`, hint: 'Retrain (lower the learning rate, or use bf16 instead of fp16) and save again.' }));
    }
  }

  // scale × lora_B in the dtype the engine holds it in (overflow.ts)
  if (config) {
    const scaled: ScaledModule[] = [];
    for (const m of targeted) {
      const tensorB = byModule.get(m.target.name)?.B?.parsed.key;
      const v = tensorB === undefined ? undefined : input.values?.get(tensorB);
      const maxAbsB = v ? maxAbsFinite(v) : tensorB === undefined ? undefined : input.maxAbs?.get(tensorB);
      if (tensorB !== undefined && maxAbsB !== undefined) scaled.push({ module: m, tensorB, maxAbsB });
    }
    tensorProblems.push(...scaleOverflowProblems(scaled, model.dtype ?? 'fp32', config.useRslora));
  }

  // the delta each module adds: no_effect / no_effect_modules / large_delta, deltaNorm, relativeNorm
  const shapes = new Map((header?.tensors ?? []).map((t) => [t.name, t.shape]));
  const grams = input.grams ?? (input.values ? peftGrams(modules, input.values, (key) => shapes.get(key)) : undefined);
  let measuredModules = modules;
  if (grams) {
    const weightNorms = new Map(model.loraTargets.flatMap((t) => (t.weightNorm === undefined ? [] : [[t.name, t.weightNorm] as const])));
    const zeroVectors = new Set(modules.flatMap((m) => (m.tensorBias && input.values?.get(m.tensorBias)?.every((v) => v === 0) ? [m.tensorBias] : [])));
    const effect = assessEffect({ modules, grams, weightNorms, allowNoEffect: limits.allowNoEffect ?? false, file, useRslora: config?.useRslora ?? null, zeroVectors });
    measuredModules = effect.modules;
    tensorProblems.push(...effect.problems);
  }

  const memoryBytes = modules.reduce((n, m) => n + 4 * m.rank * (projectionIn(model, m.module) + projectionOut(model, m.module)), 0) + parts.bytes;
  const budget = memoryBudgetProblem(memoryBytes, parts.bytes, limits);
  if (budget) tensorProblems.push(budget);

  problems.push(...bag.problems(), ...tensorProblems);
  // a hostile file can hold 100 000 broken entries: the report quotes a bounded number of each kind
  const errors = boundProblems(problems.filter((p) => p.severity === 'error'));
  const warnings = boundProblems(problems.filter((p) => p.severity === 'warning'));
  return { ok: errors.length === 0, errors, warnings, modules: measuredModules, summary, memoryBytes, ...(parts.parts && { embedding: parts.parts }) };
}

const projectionIn = (model: ModelFacts, name: string) => model.loraTargets.find((t) => t.name === name)?.inFeatures ?? 0;
const projectionOut = (model: ModelFacts, name: string) => model.loraTargets.find((t) => t.name === name)?.outFeatures ?? 0;

/** embedding-parts.ts for a config PEFT can load as LoRA; nothing for another PEFT method (that is the answer) */
function embeddingPartsOf(config: PeftConfig | null, tensors: readonly TensorHeader[], model: ModelFacts, otherTargeted: readonly string[], limits: ValidationLimits, file: string, foreign: boolean, tokenizer: AdapterTokenizerFacts | null): EmbeddingPartsResult {
  if (foreign) return { problems: [], parts: null, claimed: new Set(), otherModulesToSave: [], bytes: 0 };
  return validateEmbeddingParts(config, tensors, model.architecture, otherTargeted, limits.maxLoraRank, file, tokenizer);
}

/** ADAPTER_MEMORY_BUDGET_MB: an adapter whose served weights would take more is refused, saying how much */
function memoryBudgetProblem(bytes: number, partsBytes: number, limits: ValidationLimits): Problem | null {
  if (limits.maxAdapterBytes === undefined || bytes <= limits.maxAdapterBytes) return null;
  const mb = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
  return error({
    code: 'over_memory_budget',
    expected: `<= ${limits.maxAdapterBytes} bytes`,
    actual: bytes,
    message: `Loaded, the adapter would take ${mb(bytes)} (${partsBytes > 0 ? `${mb(partsBytes)} of it saved embedding/lm_head rows` : 'LoRA matrices'}), over this server's ADAPTER_MEMORY_BUDGET_MB of ${mb(limits.maxAdapterBytes)}.`,
    hint: 'Raise ADAPTER_MEMORY_BUDGET_MB, or retrain without full copies of embed_tokens / lm_head (trainable_token_indices changes only the rows that were trained).',
  });
}
