/** Polls `test` every 50 ms until it holds; throws `timed out waiting for <what>` after `ms`. */
export async function waitFor(what: string, test: () => Promise<boolean> | boolean, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!(await test())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}
