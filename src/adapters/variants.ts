import type { ParsedKey } from './keys.js';
import { CONFIG_FILE, type PeftConfig } from './peft-config.js';
import { error, type Problem } from './report.js';
import type { ResolvedModule } from './resolve.js';
import type { TensorHeader } from './safetensors.js';

/**
 * The vectors PEFT's LoRA variants add to a module, checked against the config and the model:
 * DoRA's `lora_magnitude_vector` (use_dora; saved without `.weight`, see PEFT
 * tuners/lora/model.py, which strips it since DoRA became a module) and lora_B's bias
 * (lora_bias; lora_B is then nn.Linear(r, out, bias=True), tuners/lora/layer.py). Both are
 * [out_features] per targeted module.
 */

export interface VectorTensor {
  parsed: ParsedKey;
  header: TensorHeader;
}

export interface ModuleVectorKeys {
  tensorMagnitude?: string;
  tensorBias?: string;
}

export interface VectorCheck {
  problems: Problem[];
  /** the keys a targeted module uses (absent: none) */
  keysOf(module: string): ModuleVectorKeys;
}

const fmt = (shape: readonly number[]) => `[${shape.join(', ')}]`;

/** PEFT refuses the combination (LoraConfig.__post_init__: "lora_bias=True is not supported for DoRA"). */
export function variantConfigProblems(c: PeftConfig): Problem[] {
  if (!(c.useDora && c.loraBias)) return [];
  return [
    error({
      code: 'invalid_config',
      file: CONFIG_FILE,
      key: 'lora_bias',
      expected: false,
      actual: true,
      message: 'use_dora and lora_bias are both true, a combination PEFT itself refuses (LoraConfig raises "lora_bias=True is not supported for DoRA"), so no PEFT training run wrote this adapter as configured.',
      hint: 'Re-save the config the adapter was trained with; DoRA adapters have lora_bias=false.',
    }),
  ];
}

/**
 * @param hasLoraTensors whether a module has lora_A or lora_B in the file (a targeted module with
 *   neither already gets missing_tensor; its vectors are not asked for again)
 */
export function checkLoraVectors(tensors: readonly VectorTensor[], config: PeftConfig | null, targeted: readonly ResolvedModule[], allTargets: ReadonlyMap<string, { outFeatures: number; module: string }>, hasLoraTensors: (module: string) => boolean, file: string): VectorCheck {
  const problems: Problem[] = [];
  const found = new Map<string, ModuleVectorKeys>();
  const targetedNames = new Set(targeted.map((m) => m.target.name));
  for (const { parsed: pk, header } of tensors) {
    const module = pk.module!;
    const isMagnitude = pk.kind === 'dora_magnitude';
    const what = isMagnitude ? 'DoRA magnitude vector' : `lora_${pk.part} bias`;
    const where = { file, tensor: pk.key, module };
    if (module === 'model.embed_tokens' || module === 'lm_head') {
      problems.push(error({ code: 'unsupported_feature', ...where, message: `${pk.normalized} is a ${what} on ${module}; ${isMagnitude ? 'DoRA' : 'a LoRA bias'} is served on the attention and MLP projections only.`, hint: 'Merge the adapter into the base model with PEFT merge_and_unload() and serve the merged model, or retrain without it on that module.' }));
      continue;
    }
    if (pk.kind === 'bias' && pk.part === 'A') {
      problems.push(error({ code: 'unexpected_tensor', ...where, message: `${pk.normalized} is a bias on lora_A, which PEFT never creates (lora_A is nn.Linear(in, r, bias=False) even with lora_bias=true).`, hint: 'Drop the tensor; it was not written by PEFT save_pretrained.' }));
      continue;
    }
    const target = allTargets.get(module);
    if (!target) {
      problems.push(error({ code: 'unexpected_tensor', ...where, message: `${pk.normalized} is for ${module}, which this model does not have.`, hint: 'The adapter was probably trained on a model with more layers or other module names.' }));
      continue;
    }
    if (config && !targetedNames.has(module)) {
      problems.push(error({ code: 'unexpected_tensor', ...where, message: `${pk.normalized} is for ${module}, which adapter_config.json does not target; PEFT would ignore it.`, hint: 'Add the module to target_modules, or drop the tensor.' }));
      continue;
    }
    const enabled = config === null || (isMagnitude ? config.useDora : config.loraBias);
    if (!enabled) {
      const key = isMagnitude ? 'use_dora' : 'lora_bias';
      problems.push(
        error({
          code: 'unexpected_tensor',
          ...where,
          key,
          message: `${pk.normalized} is a ${what}, but adapter_config.json has ${key} false: PEFT would load the adapter without it and serve something other than what was trained.`,
          hint: `If the adapter was trained with ${isMagnitude ? 'DoRA' : 'lora_bias'}, set "${key}": true in adapter_config.json; otherwise drop the tensor.`,
        }),
      );
      continue;
    }
    const slot = found.get(module) ?? {};
    const field = isMagnitude ? 'tensorMagnitude' : 'tensorBias';
    if (slot[field] !== undefined) {
      problems.push(error({ code: 'unexpected_tensor', ...where, message: `${pk.key} is a second ${what} for ${module} (also ${slot[field]}); the file holds more than one adapter.`, hint: 'Save one adapter per folder (save_pretrained(selected_adapters=[name])).' }));
      continue;
    }
    const expected = [target.outFeatures];
    const shape = header.shape;
    if (shape.length !== 1 || shape[0] !== target.outFeatures) {
      const cause =
        shape.length === 2 && shape.includes(target.outFeatures)
          ? ` It is 2-D: ${isMagnitude ? 'DoRA on a convolution, or a file written by another tool' : 'probably a weight saved under a bias name'}.`
          : ' The adapter was probably trained on a model of another size or a pruned variant.';
      problems.push(
        error({
          code: 'shape_mismatch',
          ...where,
          expected,
          actual: shape,
          message: `${pk.normalized} has shape ${fmt(shape)}; this model's ${target.module} has out_features ${target.outFeatures}, so the ${what} must be ${fmt(expected)}.${cause}`,
        }),
      );
      continue;
    }
    slot[field] = pk.key;
    found.set(module, slot);
  }

  // every targeted module of a DoRA / lora_bias adapter carries its vector
  if (config && (config.useDora || config.loraBias)) {
    const shapeErrors = new Set(problems.filter((p) => p.code === 'shape_mismatch').map((p) => p.module));
    for (const m of targeted) {
      const name = m.target.name;
      if (!hasLoraTensors(name) || shapeErrors.has(name)) continue;
      const slot = found.get(name) ?? {};
      const expected = [m.target.outFeatures];
      if (config.useDora && slot.tensorMagnitude === undefined) {
        problems.push(error({ code: 'missing_tensor', file, module: name, tensor: `${name}.lora_magnitude_vector`, key: 'use_dora', expected, message: `${name}.lora_magnitude_vector is missing: adapter_config.json has use_dora true, so every targeted module needs its magnitude vector ${fmt(expected)}.`, hint: 'Save the adapter again with PEFT save_pretrained (it writes the magnitude vectors), or set use_dora to false if it was trained as plain LoRA.' }));
      }
      if (config.loraBias && slot.tensorBias === undefined) {
        problems.push(error({ code: 'missing_tensor', file, module: name, tensor: `${name}.lora_B.bias`, key: 'lora_bias', expected, message: `${name}.lora_B.bias is missing: adapter_config.json has lora_bias true, so every targeted module's lora_B has a bias ${fmt(expected)}.`, hint: 'Save the adapter again with PEFT save_pretrained, or set lora_bias to false if it was trained without.' }));
      }
    }
  }
  return { problems, keysOf: (module) => found.get(module) ?? {} };
}
