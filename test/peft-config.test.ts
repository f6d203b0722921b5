import { describe, expect, it } from 'vitest';
import { parsePeftConfig } from '../src/adapters/peft-config.js';
import { parseTensorKey, layerPrefix } from '../src/adapters/keys.js';
import { FIXTURE_CONFIGS, peftConfig, peftFixturesExist, readFixtureConfig } from './helpers/adapter-fixtures.js';

const parse = (obj: unknown) => parsePeftConfig(JSON.stringify(obj));

describe.skipIf(!peftFixturesExist)('real adapter_config.json files (../shared/fixtures/peft-configs)', () => {
  it.each(FIXTURE_CONFIGS)('%s parses without problems and keeps its values', async (name) => {
    const { text, json } = await readFixtureConfig(name);
    const res = parsePeftConfig(text);
    expect(res.problems).toEqual([]);
    const c = res.config!;
    expect(c.r).toBe(json.r);
    expect(c.loraAlpha).toBe(json.lora_alpha);
    expect(c.targetModules).toEqual(json.target_modules);
    expect(c.baseModel).toBe(json.base_model_name_or_path);
    expect(c.peftType).toBe('LORA');
    // every original key survives, including ones this schema does not know
    for (const k of Object.keys(json)) expect(c.raw).toHaveProperty(k);
  });

  it('the old config with missing / null patterns gets PEFT defaults', async () => {
    const { text } = await readFixtureConfig('mistral-7b-old-nulls.adapter_config.json');
    const c = parsePeftConfig(text).config!;
    expect(c.rankPattern).toEqual({});
    expect(c.alphaPattern).toEqual({});
    expect(c.useRslora).toBe(false);
    expect(c.useDora).toBe(false);
    expect(c.loraBias).toBe(false);
    expect(c.targetParameters).toBeNull();
  });

  it('the Qwen2.5-VL config keeps target_modules as a regex string', async () => {
    const { text } = await readFixtureConfig('qwen2.5-vl-regex-targets.adapter_config.json');
    expect(typeof parsePeftConfig(text).config!.targetModules).toBe('string');
  });
});

describe('parsePeftConfig shapes', () => {
  it('accepts null for every optional key', () => {
    const nulls = Object.fromEntries(
      ['rank_pattern', 'alpha_pattern', 'use_rslora', 'use_dora', 'layers_to_transform', 'layers_pattern', 'exclude_modules', 'modules_to_save', 'target_modules', 'lora_bias', 'fan_in_fan_out', 'init_lora_weights', 'target_parameters', 'bias', 'base_model_name_or_path', 'layer_replication', 'trainable_token_indices'].map((k) => [k, null]),
    );
    const res = parse({ peft_type: 'LORA', r: 4, lora_alpha: 8, ...nulls });
    expect(res.problems).toEqual([]);
    const c = res.config!;
    expect(c).toMatchObject({ r: 4, loraAlpha: 8, targetModules: null, rankPattern: {}, alphaPattern: {}, useRslora: false, useDora: false, layersToTransform: null, layersPattern: null, excludeModules: null, modulesToSave: null, bias: 'none', initLoraWeights: true });
  });

  it("applies PEFT's LoraConfig defaults when keys are absent (r=8, lora_alpha=8)", () => {
    const c = parse({ target_modules: ['q_proj'] }).config!;
    expect(c.r).toBe(8);
    expect(c.loraAlpha).toBe(8);
    expect(c.peftType).toBe('LORA');
  });

  it('accepts target_modules as a list, a regex string or "all-linear"', () => {
    expect(parse(peftConfig({ target_modules: ['q_proj'] })).config!.targetModules).toEqual(['q_proj']);
    expect(parse(peftConfig({ target_modules: '.*\\.q_proj' })).config!.targetModules).toBe('.*\\.q_proj');
    expect(parse(peftConfig({ target_modules: 'all-linear' })).config!.targetModules).toBe('all-linear');
  });

  it('accepts layers_to_transform as int or list, layers_pattern as string or list', () => {
    expect(parse(peftConfig({ layers_to_transform: 3, layers_pattern: 'layers' })).config).toMatchObject({ layersToTransform: 3, layersPattern: 'layers' });
    expect(parse(peftConfig({ layers_to_transform: [0, 2], layers_pattern: ['h', 'layers'] })).config).toMatchObject({ layersToTransform: [0, 2], layersPattern: ['h', 'layers'] });
  });

  it('keeps unknown keys (newer PEFT versions add them)', () => {
    const c = parse(peftConfig({ some_future_option: { a: 1 }, use_bdlora: null })).config!;
    expect((c.raw as Record<string, unknown>).some_future_option).toEqual({ a: 1 });
  });

  it('accepts a float lora_alpha (PEFT multiplies it by sqrt(2) when converting rslora adapters)', () => {
    expect(parse(peftConfig({ lora_alpha: 16 * Math.SQRT2 })).config!.loraAlpha).toBeCloseTo(22.627, 3);
  });
});

describe('parsePeftConfig problems (never throws)', () => {
  it('invalid JSON → one invalid_config', () => {
    const res = parsePeftConfig('{"r": 8, ');
    expect(res.config).toBeNull();
    expect(res.problems).toHaveLength(1);
    expect(res.problems[0]).toMatchObject({ code: 'invalid_config', severity: 'error', file: 'adapter_config.json' });
    expect(res.problems[0]!.message).toMatch(/not valid JSON/);
  });

  it('a JSON array or string is not a config', () => {
    expect(parsePeftConfig('[1,2]').problems[0]).toMatchObject({ code: 'invalid_config', actual: 'array' });
    expect(parsePeftConfig('"x"').problems[0]).toMatchObject({ code: 'invalid_config', actual: 'string' });
  });

  it('reports every wrong type, naming the key', () => {
    const res = parse(peftConfig({ r: '8', lora_alpha: 'sixteen', target_modules: 5, rank_pattern: { q_proj: 'x' }, layers_to_transform: [1.5] }));
    expect(res.config).toBeNull();
    const keys = res.problems.map((p) => p.key);
    expect(res.problems.every((p) => p.code === 'invalid_config')).toBe(true);
    expect(keys).toEqual(expect.arrayContaining(['r', 'lora_alpha', 'target_modules', 'rank_pattern.q_proj', 'layers_to_transform']));
    expect(res.problems.find((p) => p.key === 'target_modules')!.message).toMatch(/must be a list of module names, a regular expression string, or "all-linear", not 5/);
    expect(res.problems.find((p) => p.key === 'r')!.actual).toBe('8');
  });

  it('peft_type is read first: an AdaLoRA config (rank_pattern of boolean masks) parses as AdaLoRA, its other keys unread', () => {
    const masks = Object.fromEntries(Array.from({ length: 196 }, (_, i) => [`base_model.model.model.layers.${i}.self_attn.q_proj.lora_E`, new Array(64).fill(false)]));
    const res = parse({ peft_type: 'ADALORA', r: 8, init_r: 12, target_r: 8, rank_pattern: masks, base_model_name_or_path: 'meta-llama/Llama-2-7b-hf' });
    expect(res.problems).toEqual([]);
    expect(res.config).toMatchObject({ peftType: 'ADALORA', baseModel: 'meta-llama/Llama-2-7b-hf', rankPattern: {} });
  });

  it('wrong values are quoted as short excerpts, and at most 20 are listed', () => {
    const res = parse(peftConfig({ target_modules: { nested: 'x'.repeat(100_000) }, rank_pattern: Object.fromEntries(Array.from({ length: 100 }, (_, i) => [`k${i}`, 'x'.repeat(1000)])) }));
    expect(res.problems).toHaveLength(21);
    expect(res.problems.at(-1)!.message).toMatch(/81 more values/);
    const tm = res.problems.find((p) => p.key === 'target_modules')!;
    expect(tm.message.length).toBeLessThan(400);
    expect(JSON.stringify(tm.actual).length).toBeLessThan(300);
    // the value at the path, not the whole rank_pattern
    expect(JSON.stringify(res.problems.find((p) => p.key === 'rank_pattern.k0')!.actual).length).toBeLessThan(300);
  });

  it('r = 0 is refused (a rank is positive)', () => {
    expect(parse(peftConfig({ r: 0 })).problems[0]).toMatchObject({ code: 'invalid_config', key: 'r' });
  });
});

describe('tensor keys', () => {
  it('strips base_model.model. and reads module and part', () => {
    expect(parseTensorKey('base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight')).toMatchObject({ kind: 'lora', module: 'model.layers.0.self_attn.q_proj', part: 'A', adapterName: null, normalized: 'model.layers.0.self_attn.q_proj.lora_A.weight' });
    expect(parseTensorKey('model.layers.3.mlp.down_proj.lora_B.weight')).toMatchObject({ kind: 'lora', module: 'model.layers.3.mlp.down_proj', part: 'B' });
  });

  it('strips an adapter-name segment', () => {
    expect(parseTensorKey('base_model.model.model.layers.1.mlp.up_proj.lora_B.default.weight')).toMatchObject({ module: 'model.layers.1.mlp.up_proj', part: 'B', adapterName: 'default' });
    expect(parseTensorKey('base_model.model.model.layers.1.mlp.up_proj.lora_A.my-task.weight')).toMatchObject({ module: 'model.layers.1.mlp.up_proj', part: 'A', adapterName: 'my-task' });
  });

  it('classifies what is not plain LoRA', () => {
    expect(parseTensorKey('base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector').kind).toBe('dora_magnitude');
    expect(parseTensorKey('base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector.weight')).toMatchObject({ kind: 'dora_magnitude', adapterName: null });
    expect(parseTensorKey('base_model.model.model.embed_tokens.lora_embedding_A')).toMatchObject({ kind: 'lora_embedding', module: 'model.embed_tokens', part: 'A' });
    expect(parseTensorKey('base_model.model.lm_head.modules_to_save.default.weight')).toMatchObject({ kind: 'full_weight', module: 'lm_head' });
    expect(parseTensorKey('base_model.model.lm_head.weight')).toMatchObject({ kind: 'full_weight', module: 'lm_head' });
    expect(parseTensorKey('base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias')).toMatchObject({ kind: 'bias', part: 'B' });
    expect(parseTensorKey('base_model.model.model.layers.0.self_attn.q_proj.bias')).toMatchObject({ kind: 'bias', part: null });
    expect(parseTensorKey('base_model.model.model.embed_tokens.trainable_tokens_delta').kind).toBe('trainable_tokens');
    expect(parseTensorKey('something_else').kind).toBe('other');
  });

  it('layerPrefix shows the part before the layer index', () => {
    expect(layerPrefix('model.language_model.layers.3.self_attn.q_proj')).toBe('model.language_model.layers');
    expect(layerPrefix('model.layers.0.mlp.up_proj')).toBe('model.layers');
    expect(layerPrefix('lm_head')).toBe('lm_head');
  });
});
