import path from 'node:path';
import { ConfigError, loadConfig, parseFlags } from './config.js';
import { createLogger } from './logger.js';

const USAGE = `usage: loraserve <command> [options]
  serve                         start the HTTP service (settings: env vars or --flags, see README)
  init [dir]                    write the embedded default model (default ./data/default-model)
  build-model <MODEL_PATH>      build (or refresh) the ONNX graph for a model folder or llama2.c .bin
  check --base <model folder | config.json | llama2.c .bin> <adapter folder> [--json]
                                validate a PEFT adapter against a model; exit 0 fits, 1 does not, 2 usage`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  try {
    switch (command) {
      case 'serve':
        return await serve(rest);
      case 'init':
        return await init(rest);
      case 'build-model':
        return await buildModelCommand(rest);
      case 'check': {
        const { runCheck } = await import('./cli/check.js');
        return await runCheck(rest, { stdout: (s) => process.stdout.write(s), stderr: (s) => process.stderr.write(s) });
      }
      case undefined:
      case '--help':
      case '-h':
      case 'help':
        process.stdout.write(`${USAGE}\n`);
        return command === undefined ? 2 : 0;
      default:
        process.stderr.write(`unknown command ${JSON.stringify(command)}\n${USAGE}\n`);
        return 2;
    }
  } catch (e) {
    if (e instanceof ConfigError) {
      process.stderr.write(`loraserve: ${e.message}\n`);
      return 2;
    }
    // bad model input and the like: one clear line, not a stack trace
    process.stderr.write(`loraserve: ${(e as Error).message}\n`);
    return 1;
  }
}

function configFrom(argv: string[]) {
  const { flags, positionals, unknown } = parseFlags(argv);
  if (unknown.length) throw new ConfigError(`unknown option(s) ${unknown.join(', ')}`);
  return { config: loadConfig(process.env, flags), positionals };
}

async function serve(argv: string[]): Promise<number> {
  const { config } = configFrom(argv);
  const log = createLogger(config);
  const { buildApp } = await import('./app.js');
  const { installShutdown } = await import('./lifecycle.js');
  const app = await buildApp(config, { logger: log });
  installShutdown(app, config, log);
  await app.listen({ port: config.PORT, host: config.HOST });
  return await new Promise<number>(() => {
    /* runs until a signal handler exits the process */
  });
}

async function init(argv: string[]): Promise<number> {
  const { config, positionals } = configFrom(argv);
  const { writeEmbeddedModel } = await import('./model/embedded.js');
  const dir = path.resolve(positionals[0] ?? config.DEFAULT_MODEL_DIR);
  await writeEmbeddedModel(dir);
  process.stdout.write(`wrote the embedded default model to ${dir}\n`);
  return 0;
}

async function buildModelCommand(argv: string[]): Promise<number> {
  const { config, positionals } = configFrom(argv);
  const modelPath = positionals[0] ?? config.MODEL_PATH;
  if (!modelPath) {
    process.stderr.write(`build-model needs a MODEL_PATH\n${USAGE}\n`);
    return 2;
  }
  const { openCheckpoint } = await import('./model/checkpoint/index.js');
  const { buildModel } = await import('./model/build.js');
  const { placementLine, resolvePlacement } = await import('./model/placement.js');
  const { servedBuildOptions } = await import('./runtime.js');
  const checkpoint = await openCheckpoint(path.resolve(modelPath), config.TOKENIZER_PATH);
  const placement = await resolvePlacement({ device: config.DEVICE, dtype: config.DTYPE, weights: config.WEIGHTS });
  process.stderr.write(`${placementLine(placement)}\n`);
  const built = await buildModel(checkpoint, { ...servedBuildOptions(config, placement), onProgress: (line) => process.stderr.write(`\r${line}\x1b[K`) });
  process.stderr.write('\n');
  process.stdout.write(`${built.cached ? 'up to date' : 'built'}: ${built.dir}\n`);
  return 0;
}
