import { pino, type Logger } from 'pino';
import type { Config } from './config.js';

/** Request headers that carry a credential (ours: Bearer; others a proxy or client may add). */
const CREDENTIAL_HEADERS = ['authorization', 'proxy-authorization', 'x-api-key', 'api-key', 'cookie', 'set-cookie'] as const;

/**
 * Every log path where a credential can appear. Headers are logged by Fastify's serialisers
 * (`req.headers`), by plugins at debug/trace (@fastify/multipart logs `busboyOptions.headers`,
 * the whole request's headers, at trace) and by our own code; pino's `*` matches one level, so
 * headers objects up to three levels deep are covered, plus settings that hold keys.
 */
export const REDACT_PATHS: readonly string[] = [
  ...CREDENTIAL_HEADERS.flatMap((h) => [`headers["${h}"]`, `*.headers["${h}"]`, `*.*.headers["${h}"]`, `*.*.*.headers["${h}"]`, `["${h}"]`]),
  ...['API_KEYS', 'ADMIN_API_KEYS', 'apiKeys', 'adminKeys'].flatMap((k) => [k, `*.${k}`]),
];

/** Credentials never reach the log, whatever level. */
export function createLogger(config: Pick<Config, 'LOG_LEVEL'>): Logger {
  return pino({
    level: config.LOG_LEVEL,
    redact: { paths: [...REDACT_PATHS], censor: '[redacted]' },
  });
}
