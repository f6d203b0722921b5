/**
 * The command line's shape, shared by the settings flags and `loraserve check`: `--name=value`,
 * `--name value` (when the option takes a value and the next argument is not an option), a bare
 * `--name`, and positionals. What the names mean is the caller's.
 */

export interface ArgvOption {
  /** the argument as given, e.g. `--max-lora-rank=8` */
  arg: string;
  /** between `--` and `=`, as given */
  name: string;
  /** after `=`, or the next argument when `takesValue(name)`; undefined for a bare `--name` */
  value: string | undefined;
  /** true when the value came after `=` */
  inline: boolean;
}

export function splitArgv(argv: readonly string[], takesValue: (name: string) => boolean): { options: ArgvOption[]; positionals: string[] } {
  const options: ArgvOption[] = [];
  const positionals: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith('--')) {
      positionals.push(arg);
      continue;
    }
    const eq = arg.indexOf('=');
    const name = eq >= 0 ? arg.slice(2, eq) : arg.slice(2);
    let value = eq >= 0 ? arg.slice(eq + 1) : undefined;
    if (value === undefined && takesValue(name)) {
      const next = argv[i + 1];
      if (next !== undefined && !next.startsWith('--')) {
        value = next;
        i++;
      }
    }
    options.push({ arg, name, value, inline: eq >= 0 });
  }
  return { options, positionals };
}
