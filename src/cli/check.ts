import { stat } from 'node:fs/promises';
import { resolve } from 'node:path';
import { ConfigSchema } from '../config.js';
import { splitArgv } from './argv.js';
import { readAdapterFolder } from '../adapters/folder.js';
import type { Problem, ValidationReport } from '../adapters/report.js';
import { frobeniusNorm } from '../adapters/effect.js';
import { openCheckpoint, readArchitecture } from '../model/checkpoint/index.js';
import { loraTargetsFor, type LoraTarget } from '../model/manifest.js';

/**
 * `loraserve check --base <model folder | config.json | llama2.c .bin> <adapter folder> [--json]`:
 * the validator offline, for training pipelines. Needs no base weights. Exit 0 = fits,
 * 1 = does not fit, 2 = usage error (bad arguments, unreadable base or adapter path).
 * Each module's deltaNorm comes from the adapter alone; relativeNorm needs the base weights (a
 * model folder with its safetensors, or a llama2.c .bin), and the probe effect needs the served
 * graph, which only the server has.
 */

export interface CheckIo {
  stdout: (s: string) => void;
  stderr: (s: string) => void;
  /** where MAX_LORA_RANK / STRICT_BASE_MODEL come from when no flag sets them; default process.env */
  env?: Record<string, string | undefined>;
}

export const CHECK_USAGE = `usage: loraserve check --base <model folder | config.json | llama2.c .bin> <adapter folder> [--json]
  [--max-lora-rank N] [--strict-base-model] [--allow-no-effect]
  --allow-no-effect: accept an adapter whose every module changes nothing (a deliberate no-op)
  exit 0: the adapter fits the model; 1: it does not; 2: usage error`;

interface CheckArgs {
  base: string;
  adapter: string;
  json: boolean;
  maxLoraRank?: string;
  strict?: string;
  allowNoEffect: boolean;
}

/** `--base` and `--max-lora-rank` take a value; `--json` and `--strict-base-model` are switches. */
const normalName = (name: string) => name.replace(/_/g, '-').toLowerCase();
const TAKES_VALUE = new Set(['base', 'max-lora-rank']);

function parseArgs(argv: readonly string[]): CheckArgs | string {
  const { options, positionals } = splitArgv(argv, (name) => TAKES_VALUE.has(normalName(name)));
  let base: string | undefined;
  let json = false;
  let maxLoraRank: string | undefined;
  let strict: string | undefined;
  let allowNoEffect = false;
  for (const o of options) {
    switch (normalName(o.name)) {
      case 'base':
        if (!o.value) return '--base needs a path';
        base = o.value;
        break;
      case 'json':
        json = !o.inline || o.value === 'true' || o.value === '1';
        break;
      case 'max-lora-rank':
        if (!o.value) return '--max-lora-rank needs a number';
        maxLoraRank = o.value;
        break;
      case 'strict-base-model':
        strict = o.value ?? 'true';
        break;
      case 'allow-no-effect':
        allowNoEffect = !o.inline || o.value === 'true' || o.value === '1';
        break;
      default:
        return `unknown option ${o.arg}`;
    }
  }
  if (!base) return 'missing --base <model folder | config.json | llama2.c .bin>';
  if (positionals.length !== 1) return positionals.length === 0 ? 'missing <adapter folder>' : `expected one adapter folder, got ${positionals.length} paths`;
  return { base, adapter: positionals[0]!, json, maxLoraRank, strict, allowNoEffect };
}

const show = (v: unknown): string => {
  if (typeof v === 'string') return v;
  if (Array.isArray(v) && v.every((x) => typeof x === 'number')) return `[${v.join(', ')}]`;
  return JSON.stringify(v);
};

/** One line per problem: severity, code, what it is about, expected vs actual, the sentence and the hint. */
export function formatProblem(p: Problem): string {
  const about = p.tensor ?? p.module ?? p.key ?? p.file;
  const ea = [p.expected !== undefined ? `expected ${show(p.expected)}` : null, p.actual !== undefined ? `actual ${show(p.actual)}` : null].filter(Boolean).join(', ');
  return `${p.severity === 'error' ? 'error  ' : 'warning'} ${p.code}${about ? ` ${about}` : ''}${ea ? ` (${ea})` : ''}: ${p.message}${p.hint ? ` Hint: ${p.hint}` : ''}`;
}

const num = (x: number) => x.toPrecision(4);

/** One line on the measured deltas, and what an offline check cannot measure. */
function effectLine(report: ValidationReport): string | null {
  const measured = report.modules.filter((m) => typeof m.deltaNorm === 'number');
  if (measured.length === 0) return null;
  const norms = measured.map((m) => m.deltaNorm!);
  const relative = measured.filter((m) => typeof m.relativeNorm === 'number').map((m) => m.relativeNorm!);
  const rel = relative.length > 0 ? `; relativeNorm (÷ ‖W‖_F of the base weight) ${num(Math.min(...relative))} … ${num(Math.max(...relative))}` : '; relativeNorm not measured: --base has no weights (give the model folder with its safetensors, or the llama2.c .bin)';
  return `  deltaNorm ‖scale·B·A‖_F over ${measured.length} modules: ${num(Math.min(...norms))} … ${num(Math.max(...norms))}${rel}. The probe effect (KL, max Δlog p) needs the served graph: POST /v1/adapters/validate measures it.`;
}

export function formatReport(report: ValidationReport, adapter: string, modelId: string): string {
  const s = report.summary;
  const lines: string[] = [];
  lines.push(`adapter ${adapter} vs model ${modelId}`);
  if (s.peftType !== null) {
    const ranks = [...new Set(report.modules.map((m) => m.rank))].sort((a, b) => a - b);
    lines.push(
      `  ${s.peftType}, r=${s.r}, lora_alpha=${s.loraAlpha}${s.useRslora ? ' (rslora)' : ''}, base ${s.baseModel ?? '(not stated)'}; ${s.targetedModules} modules targeted${ranks.length > 1 ? ` (ranks ${ranks.join(', ')})` : ''}; ${s.tensors} tensors, ${s.parameters} parameters`,
    );
  }
  const effect = effectLine(report);
  if (effect) lines.push(effect);
  for (const p of [...report.errors, ...report.warnings]) lines.push(formatProblem(p));
  const counts = `${report.errors.length} error${report.errors.length === 1 ? '' : 's'}, ${report.warnings.length} warning${report.warnings.length === 1 ? '' : 's'}`;
  lines.push(report.ok ? `FITS: the adapter can be served on this model (${counts}).` : `DOES NOT FIT: the adapter cannot be served on this model (${counts}).`);
  return `${lines.join('\n')}\n`;
}

export async function runCheck(argv: string[], io: CheckIo): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    io.stdout(`${CHECK_USAGE}\n`);
    return 0;
  }
  const args = parseArgs(argv);
  if (typeof args === 'string') {
    io.stderr(`loraserve check: ${args}\n${CHECK_USAGE}\n`);
    return 2;
  }
  const env = io.env ?? process.env;
  const limits = ConfigSchema.pick({ MAX_LORA_RANK: true, STRICT_BASE_MODEL: true }).safeParse({
    MAX_LORA_RANK: args.maxLoraRank ?? env.MAX_LORA_RANK,
    STRICT_BASE_MODEL: args.strict ?? env.STRICT_BASE_MODEL,
  });
  if (!limits.success) {
    io.stderr(`loraserve check: ${limits.error.issues.map((i) => `${i.path.join('.')}: ${i.message}`).join('; ')}\n`);
    return 2;
  }

  let base: Awaited<ReturnType<typeof readArchitecture>>;
  try {
    base = await readArchitecture(args.base);
  } catch (e) {
    io.stderr(`loraserve check: cannot read the base model: ${(e as Error).message}\n`);
    return 2;
  }
  const adapterDir = resolve(args.adapter);
  const isDir = await stat(adapterDir).then((s) => s.isDirectory(), () => false);
  if (!isDir) {
    io.stderr(`loraserve check: ${args.adapter} is not a folder; give the folder PEFT save_pretrained wrote (adapter_config.json + adapter_model.safetensors).\n`);
    return 2;
  }

  const model = { architecture: base.architecture, loraTargets: await withWeightNorms(args.base, loraTargetsFor(base.architecture)), modelId: base.modelId };
  const { report } = await readAdapterFolder(adapterDir, model, { maxLoraRank: limits.data.MAX_LORA_RANK, strictBaseModel: limits.data.STRICT_BASE_MODEL, allowNoEffect: args.allowNoEffect }, { readValues: true });
  io.stdout(args.json ? `${JSON.stringify(report, null, 2)}\n` : formatReport(report, args.adapter, base.modelId));
  return report.ok ? 0 : 1;
}

/**
 * The targets with ‖W‖_F of each base projection when `base` holds the weights (relativeNorm,
 * large_delta); as they are when it is a config.json alone or its weights cannot be read: the
 * checker needs no weights.
 */
async function withWeightNorms(base: string, targets: LoraTarget[]): Promise<LoraTarget[]> {
  let ck;
  try {
    ck = await openCheckpoint(base);
  } catch {
    return targets;
  }
  try {
    return targets.map((t) => {
      const w = ck.tensor(`${t.name}.weight`);
      return w ? { ...t, weightNorm: frobeniusNorm(w.read()) } : t;
    });
  } catch {
    return targets;
  }
}
