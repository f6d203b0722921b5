import { describe, expect, it } from 'vitest';
import { splitArgv } from '../src/cli/argv.js';
import { parseFlags } from '../src/config.js';

describe('command-line parsing', () => {
  it('splitArgv: inline values, values taken from the next argument only where the option takes one, positionals', () => {
    const takes = (name: string) => name === 'base';
    expect(splitArgv(['--base', 'm', 'a', '--json', 'b', '--json=0', '--base=x', '--base', '--json'], takes)).toEqual({
      options: [
        { arg: '--base', name: 'base', value: 'm', inline: false },
        { arg: '--json', name: 'json', value: undefined, inline: false },
        { arg: '--json=0', name: 'json', value: '0', inline: true },
        { arg: '--base=x', name: 'base', value: 'x', inline: true },
        // the next argument is an option: no value
        { arg: '--base', name: 'base', value: undefined, inline: false },
        { arg: '--json', name: 'json', value: undefined, inline: false },
      ],
      positionals: ['a', 'b'],
    });
  });

  it('parseFlags: settings by either spelling, a bare flag means true, unknown names reported', () => {
    expect(parseFlags(['serve', '--max-lora-rank', '8', '--STRICT_BASE_MODEL', '--port=9000', '--nope', 'x', '--log-level'])).toEqual({
      flags: { MAX_LORA_RANK: '8', STRICT_BASE_MODEL: 'true', PORT: '9000', LOG_LEVEL: 'true' },
      positionals: ['serve'],
      unknown: ['--nope'],
    });
  });
});
