/**
 * Runs a bench's own argument parser. A bad argument is written to stderr and gives null, on which
 * the bench exits with 2 (a usage error) before doing anything.
 */
export function parseArgsOrReport<T>(parse: (argv: readonly string[]) => T, argv: readonly string[]): T | null {
  try {
    return parse(argv);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n`);
    return null;
  }
}
