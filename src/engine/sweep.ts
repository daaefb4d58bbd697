/**
 * The sweep: one interval timer per proxy, running only while connections exist, that
 * does the periodic work over open connections. Two options use it.
 *
 * --idle-timeout=: a connection that has moved no data either way for SPAN is closed on
 * both sides. That also ends a half-closed connection whose other side never finishes,
 * and one whose peers vanished without FIN or RST. No timer per connection and no clock
 * read per read: the data path stores the coarse clock (clock.ts) in conn.lastActive,
 * and the sweep advances the clock and closes what has been quiet too long. Bounds: with
 * P the period, lastActive is at most P older than the activity it marks, so closing
 * when `now - lastActive >= SPAN + P` never closes before SPAN, and the sweep after that
 * closes it by SPAN + 2P. P = max(400 ms, SPAN / 25) keeps that within SPAN + max(1 s,
 * 10% of SPAN), the promise the man page makes.
 *
 * --keepalive= on the backend side: libuv sets it with four setsockopt() calls, which
 * cost ~10% of the CPU of a short proxied connection. Keepalive only matters to a
 * connection that stays quiet for its idle time (a second or more); one that ends sooner
 * would never send a probe. So established() only marks the connection, and the next
 * sweep (within a second) sets the option on those still open: short connections do not
 * pay, a long one gets its first probe at most a second later (the kernel counts idle
 * time from the last segment or from when the option was set, whichever is later).
 * Nothing outlives its connection here (the sweep walks the open set), so no closed
 * connection is kept from the garbage collector. The client side needs none of this: the
 * listening socket carries the option and the kernel copies it (proxy.ts).
 */
import { advanceTick } from './clock.ts';
import { destroyConnection, type Connection } from './forward.ts';
import { LOG_DEBUG } from '../system/log.ts';
import { formatTimespan } from '../config/timespan.ts';
import type { TcpHandle } from './uv.ts';

export interface Sweep {
  /** --idle-timeout= in ms; 0: none. */
  readonly idleMs: number;
  /** "1h", for the log line. */
  readonly idleText: string;
  /** --keepalive= in s for backends marked keepAlivePending; 0: none. */
  readonly keepAliveSec: number;
  readonly periodMs: number;
  readonly connections: ReadonlySet<Connection>;
  timer: NodeJS.Timeout | null;
}

const MIN_PERIOD_MS = 400;
/** Backends get keepalive within this long of connecting. */
const KEEPALIVE_PERIOD_MS = 1000;

/** A sweep over `connections`, or null when neither option needs one. */
export function createSweep(idleUsec: bigint | null | undefined, keepAliveSec: number, connections: ReadonlySet<Connection>): Sweep | null {
  const idle = idleUsec !== null && idleUsec !== undefined && idleUsec !== 0n;
  if (!idle && keepAliveSec === 0) return null;
  const idleMs = idle ? Number(idleUsec) / 1000 : 0;
  let periodMs = idle ? Math.max(MIN_PERIOD_MS, Math.floor(idleMs / 25)) : KEEPALIVE_PERIOD_MS;
  if (keepAliveSec > 0) periodMs = Math.min(periodMs, KEEPALIVE_PERIOD_MS);
  return { idleMs, idleText: idle ? formatTimespan(idleUsec) : '', keepAliveSec, periodMs, connections, timer: null };
}

/** A connection was accepted: make sure the sweep (and so the clock) runs. */
export function startSweep(sweep: Sweep): void {
  if (sweep.timer !== null) return;
  // The clock may be stale from an earlier busy period: fresh before anybody stores it.
  advanceTick();
  sweep.timer = setInterval(runSweep, sweep.periodMs, sweep);
  // Connections keep the process alive by their handles; the sweep must not.
  sweep.timer.unref();
}

/** The last connection is gone: no sweep while there is nothing to watch. */
export function stopSweep(sweep: Sweep): void {
  if (sweep.timer === null) return;
  clearInterval(sweep.timer);
  sweep.timer = null;
}

function runSweep(sweep: Sweep): void {
  const now = advanceTick();
  const limit = sweep.idleMs === 0 ? Infinity : sweep.idleMs + sweep.periodMs;
  for (const conn of sweep.connections) {
    // -1: still establishing its backend (bounded by --connect-timeout=/--connect-retry=).
    if (conn.lastActive < 0 || conn.closing) continue;
    if (now - conn.lastActive >= limit) {
      conn.owner.log(LOG_DEBUG, `No data for ${sweep.idleText}, closing idle connection.`);
      destroyConnection(conn);
      continue;
    }
    if (conn.keepAlivePending) {
      conn.keepAlivePending = false;
      (conn.backend as unknown as TcpHandle).setKeepAlive(true, sweep.keepAliveSec);
    }
  }
}
