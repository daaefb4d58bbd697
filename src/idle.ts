/**
 * --idle-timeout= for stream connections: a connection that has moved no data either
 * way for SPAN is closed on both sides. That also ends a half-closed connection whose
 * other side never finishes, and a connection whose peers vanished without FIN or RST.
 *
 * No timer per connection and no clock read per read: the data path stores the coarse
 * clock (clock.ts) in conn.lastActive, and one interval per proxy, running only while
 * connections exist, advances the clock and closes what has been quiet too long.
 *
 * Bounds: with P the sweep period, lastActive is at most P older than the activity it
 * marks, so closing when `now - lastActive >= SPAN + P` never closes before SPAN; and
 * the sweep after that closes it by SPAN + 2P. P = max(400 ms, SPAN / 25) keeps that
 * within SPAN + max(1 s, 10% of SPAN), the promise the man page makes.
 */
import { advanceTick } from './clock.ts';
import { destroyConnection, type Connection } from './forward.ts';
import { LOG_DEBUG } from './log.ts';
import { formatTimespan } from './timespan.ts';

export interface IdleWatch {
  readonly spanMs: number;
  readonly periodMs: number;
  /** "1h", for the log line. */
  readonly spanText: string;
  readonly connections: ReadonlySet<Connection>;
  timer: NodeJS.Timeout | null;
}

const MIN_PERIOD_MS = 400;

/** An idle watch over `connections`, or null when `usec` is null or 0 (no idle timeout). */
export function createIdleWatch(usec: bigint | null | undefined, connections: ReadonlySet<Connection>): IdleWatch | null {
  if (usec === null || usec === undefined || usec === 0n) return null;
  const spanMs = Number(usec) / 1000;
  return {
    spanMs,
    periodMs: Math.max(MIN_PERIOD_MS, Math.floor(spanMs / 25)),
    spanText: formatTimespan(usec),
    connections,
    timer: null,
  };
}

/** A connection was accepted: make sure the sweep (and so the clock) runs. */
export function watchIdle(watch: IdleWatch): void {
  if (watch.timer !== null) return;
  // The clock may be stale from an earlier busy period: fresh before anybody stores it.
  advanceTick();
  watch.timer = setInterval(sweepIdle, watch.periodMs, watch);
  // Connections keep the process alive by their handles; the sweep must not.
  watch.timer.unref();
}

/** The last connection is gone: no sweep while there is nothing to watch. */
export function unwatchIdle(watch: IdleWatch): void {
  if (watch.timer === null) return;
  clearInterval(watch.timer);
  watch.timer = null;
}

function sweepIdle(watch: IdleWatch): void {
  const now = advanceTick();
  const limit = watch.spanMs + watch.periodMs;
  for (const conn of watch.connections) {
    // -1: still establishing its backend (bounded by --connect-timeout=/--connect-retry=).
    if (conn.lastActive < 0 || conn.closing || now - conn.lastActive < limit) continue;
    conn.owner.log(LOG_DEBUG, `No data for ${watch.spanText}, closing idle connection.`);
    destroyConnection(conn);
  }
}
