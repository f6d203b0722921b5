import type { RecoveryAction } from './store.js';

/**
 * The background work of a store that replicas share: this process's leases are renewed every
 * lease/3, so that other replicas' clean-up leaves its writes alone, and what crashed writers left
 * is collected every lease. Both timers are unref'd so that they never keep the process alive.
 */
export class LeaseTimers {
  private renewTimer: NodeJS.Timeout | null;
  private cleanTimer: NodeJS.Timeout | null;

  constructor(
    leaseMs: number,
    renew: () => Promise<void>,
    collect: () => Promise<RecoveryAction[]>,
    log?: (action: RecoveryAction) => void,
  ) {
    this.renewTimer = setInterval(() => void renew(), Math.max(50, Math.floor(leaseMs / 3)));
    this.cleanTimer = setInterval(() => {
      void collect().then(
        (actions) => actions.forEach((a) => log?.(a)),
        () => undefined,
      );
    }, Math.max(100, leaseMs));
    this.renewTimer.unref();
    this.cleanTimer.unref();
  }

  stop(): void {
    if (this.renewTimer) clearInterval(this.renewTimer);
    if (this.cleanTimer) clearInterval(this.cleanTimer);
    this.renewTimer = this.cleanTimer = null;
  }
}
