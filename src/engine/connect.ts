/**
 * Establishing a connection's backend: resolve the target (host names on every attempt),
 * try its addresses in order, bound each by --connect-timeout=, and with --connect-retry=
 * wait for a backend that is not there yet. forward.ts takes over once one connects.
 *
 * Waiting (--connect-retry=SPAN), the lazy-start case: the first client makes systemd
 * start the proxy and the backend, which is not listening yet. A failure that means "not
 * there yet" (RETRYABLE) puts the client in its route's queue instead of failing it. The
 * client is not read while it waits (nothing is buffered here; its bytes wait in the
 * kernel and arrive in order once connected), and it counts toward --connections-max.
 *
 * Waiters are coalesced per route (one target): while the target is down, one attempt at
 * a time probes it on behalf of the oldest waiter, after a backoff of 50 ms doubling to
 * 200 ms, so the attempts per second are the same for 1 or 1,000 waiting clients, and a
 * backend that comes up is found within a fifth of a second. When the probe connects,
 * every waiter connects at once. A client arriving while the target is down joins the
 * queue without an attempt of its own. Each waiter gives up when its own SPAN (from its
 * accept) has passed, with the last error and the reference's message.
 *
 * A waiting client is not polled by libuv (it is not read), so a reset from it would go
 * unnoticed: a sweep (every WAIT_SWEEP_MS while anybody waits) ends expired waits and,
 * about once a second, the waits of clients that reset (TCP: getpeername fails, the same
 * check as forward.ts's sweep over stalled directions). A client that only half-closed
 * keeps waiting and gets its reply.
 */
import { getSystemErrorName } from 'node:util';
import {
  adoptBackend,
  connectionOf,
  destroyConnection,
  dropBackend,
  established,
  peerReset,
  type Connection,
  type ProxyHandle,
} from './forward.ts';
import { LOG_DEBUG, LOG_ERR } from '../system/log.ts';
import { strerror } from '../system/strerror.ts';
import { uv, type ConnectReq, type StreamHandle } from './uv.ts';

/** How a route establishes backends: the options of this file, and its wait queue. */
export interface BackendPolicy {
  /** --connect-timeout= in ms: abandon one address's attempt after this long; 0: no bound but the kernel's. */
  readonly connectTimeoutMs: number;
  /** --connect-retry= in ms: how long a client may wait for its backend; 0: no retry (the reference). */
  readonly connectRetryMs: number;
  /** --keepalive= in s: SO_KEEPALIVE with this idle time on both TCP sockets; 0: off. */
  readonly keepAliveSec: number;
  /** The route's waiters, with --connect-retry= only (set once, by the engine). */
  wait: WaitQueue | null;
}

/** One route's (one target's) clients waiting for the backend. */
export interface WaitQueue {
  /** Waiting clients, oldest first (a Set keeps insertion order and deletes in O(1)). */
  readonly queue: Set<Connection>;
  /** The connection whose attempt probes the target now, or null. */
  probe: Connection | null;
  /** The last attempt failed in a way that means "not there yet": new clients queue. */
  down: boolean;
  /** Backoff before the next probe (ms). */
  delay: number;
  probeTimer: NodeJS.Timeout | null;
  sweepTimer: NodeJS.Timeout | null;
  sweeps: number;
  /** The last failure (an errno code) and whether it came from name resolution. */
  lastError: string;
  lastErrorDns: boolean;
  /** The route: its log lines carry its name when there are several. */
  readonly owner: { readonly log: (level: number, message: string) => void };
}

/** Errors that mean "the backend is not there yet": worth another attempt with --connect-retry=. */
const RETRYABLE: ReadonlySet<string> = new Set([
  'ECONNREFUSED', // nothing listens on the port (yet)
  'ENOENT', // the UNIX socket file does not exist (yet)
  'EAGAIN', // a UNIX socket's backlog is full (Linux reports EAGAIN, not ECONNREFUSED)
  'ETIMEDOUT', // --connect-timeout= (or the kernel's SYN retries) ran out
  'ENOTFOUND', // the host name does not resolve (yet): a container not started
  'EAI_AGAIN', // the resolver could not answer (yet)
]);

const FIRST_DELAY_MS = 50;
const MAX_DELAY_MS = 200;
const WAIT_SWEEP_MS = 250;
/** Check waiting clients for a reset every this many sweeps (about once a second). */
const RESET_CHECK_EVERY = 4;

export function createWaitQueue(owner: WaitQueue['owner']): WaitQueue {
  return {
    queue: new Set(),
    probe: null,
    down: false,
    delay: FIRST_DELAY_MS,
    probeTimer: null,
    sweepTimer: null,
    sweeps: 0,
    lastError: 'ECONNREFUSED',
    lastErrorDns: false,
    owner,
  };
}

/** Find a backend for a connection just accepted. */
export function establish(conn: Connection): void {
  const owner = conn.owner;
  const wait = owner.wait;
  if (wait !== null) {
    // One clock read per connection, and only with --connect-retry=.
    conn.deadline = performance.now() + owner.connectRetryMs;
    // The target is down: wait with the others rather than add an attempt of our own.
    if (wait.down) {
      enqueue(wait, conn);
      return;
    }
  }
  attempt(conn);
}

/** One attempt: resolve (host names, on every attempt), then try the addresses in order. */
function attempt(conn: Connection): void {
  const owner = conn.owner;
  const target = owner.target;
  if (target.kind === 'name') owner.resolve(conn);
  else if (target.kind === 'unix') connectTo(conn, target.path, 0, 0);
  else connectTo(conn, target.host, target.port, target.family);
}

/** Called by the owner's resolver with the addresses for a host-name target. */
export function resolved(conn: Connection, err: unknown, addresses: string[]): void {
  if (conn.closing) return;
  if (err !== null || addresses.length === 0) {
    const code = (err as { code?: unknown } | null)?.code;
    attemptFailed(conn, typeof code === 'string' ? code : 'ENOTFOUND', true);
    return;
  }
  conn.candidates = addresses;
  conn.candidateIndex = 0;
  tryNextCandidate(conn);
}

function tryNextCandidate(conn: Connection): void {
  const host = conn.candidates[conn.candidateIndex++] as string;
  const target = conn.owner.target as { port: number };
  connectTo(conn, host, target.port, host.includes(':') ? 6 : 4);
}

/** Connect a new backend handle: `family` 0 for a UNIX path, else 4 or 6 (an IP literal, no DNS). */
function connectTo(conn: Connection, address: string, port: number, family: number): void {
  const owner = conn.owner;
  let err: number;
  if (family === 0) {
    const pipe = new uv.Pipe(uv.PIPE_SOCKET);
    adoptBackend(conn, pipe);
    err = pipe.connect(newConnectReq(new uv.PipeConnectWrap()), address);
  } else {
    const tcp = new uv.TCP(uv.TCP_SOCKET);
    // Before connect, libuv only records this and sets it when it creates the socket.
    if (owner.noDelay) tcp.setNoDelay(true);
    adoptBackend(conn, tcp);
    const req = newConnectReq(new uv.TCPConnectWrap());
    err = family === 6 ? tcp.connect6(req, address, port) : tcp.connect(req, address, port);
  }
  const backend = conn.backend as ProxyHandle;
  // A failure to even start (e.g. EMFILE from socket()) is reported like a refused
  // connection, but later: the caller has not finished setting the connection up.
  if (err !== 0) process.nextTick(onConnectComplete, err, backend);
  else if (owner.connectTimeoutMs > 0) conn.connectTimer = setTimeout(onConnectTimeout, owner.connectTimeoutMs, backend);
}

function newConnectReq(req: ConnectReq): ConnectReq {
  req.oncomplete = onConnectComplete;
  return req;
}

/** --connect-timeout= ran out for the attempt on `backend`. */
function onConnectTimeout(backend: ProxyHandle): void {
  const conn = connectionOf(backend);
  conn.connectTimer = null;
  if (conn.closing || backend !== conn.backend) return;
  connectFailed(conn, 'ETIMEDOUT');
}

/** The backend connect finished (`this` is the request; unused). */
function onConnectComplete(status: number, handle: StreamHandle): void {
  const conn = connectionOf(handle);
  // Closing or a timeout cancels a pending connect; the handle is already on its way out.
  if (conn.closing || handle !== conn.backend) return;
  if (conn.connectTimer !== null) {
    clearTimeout(conn.connectTimer);
    conn.connectTimer = null;
  }
  if (status !== 0) {
    connectFailed(conn, getSystemErrorName(status));
    return;
  }
  conn.candidates = [];
  const wait = conn.owner.wait;
  if (wait !== null) backendUp(wait, conn);
  established(conn, handle as ProxyHandle);
}

function connectFailed(conn: Connection, code: string): void {
  dropBackend(conn);
  // A host name may have more addresses: try them in order, like a client would.
  if (conn.candidateIndex < conn.candidates.length) {
    tryNextCandidate(conn);
    return;
  }
  attemptFailed(conn, code, false);
}

/** Every address of one attempt failed with `code` (the last one's). Wait, or fail for good. */
function attemptFailed(conn: Connection, code: string, dns: boolean): void {
  conn.candidates = [];
  const owner = conn.owner;
  const wait = owner.wait;
  if (wait !== null) {
    if (wait.probe === conn) wait.probe = null;
    if (RETRYABLE.has(code)) {
      wait.lastError = code;
      wait.lastErrorDns = dns;
      wait.down = true;
      if (performance.now() < conn.deadline) {
        // Each attempt at debug level; only the final failure is an error.
        owner.log(LOG_DEBUG, `${dns ? 'Failed to resolve host' : 'Failed to connect to remote host'}: ${strerror({ code })}; waiting for the backend.`);
        enqueue(wait, conn);
        return;
      }
      // This client's wait is over; the others' goes on.
      scheduleProbe(wait);
    } else if (wait.queue.size > 0) {
      // Not an error that waiting cures: let every waiter find out for itself now.
      wakeAll(wait);
    }
  }
  giveUp(conn, code, dns);
}

/** The final failure: the reference's message, at error level. */
function giveUp(conn: Connection, code: string, dns: boolean): void {
  const owner = conn.owner;
  owner.log(LOG_ERR, `${dns ? 'Failed to resolve host' : 'Failed to connect to remote host'}: ${strerror({ code })}`);
  owner.stats.backendFailures++;
  destroyConnection(conn);
}

function enqueue(wait: WaitQueue, conn: Connection): void {
  conn.waiting = true;
  wait.queue.add(conn);
  scheduleProbe(wait);
  if (wait.sweepTimer === null) wait.sweepTimer = setInterval(sweepWaiters, WAIT_SWEEP_MS, wait);
}

/** Arm the next probe unless one is in flight or armed; the backoff doubles up to its cap. */
function scheduleProbe(wait: WaitQueue): void {
  if (wait.probe !== null || wait.probeTimer !== null || wait.queue.size === 0) return;
  wait.probeTimer = setTimeout(onProbeTimer, wait.delay, wait);
  wait.delay = Math.min(wait.delay * 2, MAX_DELAY_MS);
}

function onProbeTimer(wait: WaitQueue): void {
  wait.probeTimer = null;
  expireWaiters(wait, performance.now());
  const first = wait.queue.values().next();
  if (first.done === true) {
    settleIfEmpty(wait);
    return;
  }
  const conn = first.value;
  wait.queue.delete(conn);
  conn.waiting = false;
  wait.probe = conn;
  wait.owner.log(LOG_DEBUG, `Trying the backend again (${wait.queue.size + 1} waiting).`);
  attempt(conn);
}

/** A connect succeeded: the target is up, so every waiter connects now rather than sleep out its backoff. */
function backendUp(wait: WaitQueue, conn: Connection): void {
  if (wait.probe === conn) wait.probe = null;
  wait.down = false;
  wait.delay = FIRST_DELAY_MS;
  if (wait.queue.size === 0) return;
  wait.owner.log(LOG_DEBUG, `Backend is up, connecting ${wait.queue.size} waiting client${wait.queue.size === 1 ? '' : 's'}.`);
  wakeAll(wait);
}

function wakeAll(wait: WaitQueue): void {
  if (wait.probeTimer !== null) {
    clearTimeout(wait.probeTimer);
    wait.probeTimer = null;
  }
  const waiters = [...wait.queue];
  wait.queue.clear();
  stopWaitSweep(wait);
  for (const conn of waiters) {
    conn.waiting = false;
    attempt(conn);
  }
}

/** Fail the waiters whose SPAN has passed, with the last error the target gave. */
function expireWaiters(wait: WaitQueue, now: number): void {
  for (const conn of wait.queue) {
    if (now < conn.deadline) continue;
    wait.queue.delete(conn);
    conn.waiting = false;
    giveUp(conn, wait.lastError, wait.lastErrorDns);
  }
}

function sweepWaiters(wait: WaitQueue): void {
  expireWaiters(wait, performance.now());
  if (++wait.sweeps % RESET_CHECK_EVERY === 0) {
    for (const conn of wait.queue) {
      // A half-close is not a reset: that client still wants its reply.
      if (!peerReset(conn.client, false)) continue;
      wait.queue.delete(conn);
      conn.waiting = false;
      wait.owner.log(LOG_DEBUG, 'Client left while waiting for the backend.');
      destroyConnection(conn);
    }
  }
  settleIfEmpty(wait);
}

/**
 * Nobody waits and nothing probes: forget the wait. The next client tries at once (and
 * starts a new wait if the target is still down).
 */
function settleIfEmpty(wait: WaitQueue): void {
  if (wait.queue.size !== 0 || wait.probe !== null) return;
  stopWaitSweep(wait);
  if (wait.probeTimer !== null) {
    clearTimeout(wait.probeTimer);
    wait.probeTimer = null;
  }
  wait.down = false;
  wait.delay = FIRST_DELAY_MS;
}

function stopWaitSweep(wait: WaitQueue): void {
  if (wait.sweepTimer === null) return;
  clearInterval(wait.sweepTimer);
  wait.sweepTimer = null;
}

/**
 * A connection is gone (both handles closed): it must leave no timer and no place in a
 * queue behind, and a probe that ended with it must not stall the others' wait.
 */
export function released(conn: Connection): void {
  if (conn.connectTimer !== null) {
    clearTimeout(conn.connectTimer);
    conn.connectTimer = null;
  }
  const wait = conn.owner.wait;
  if (wait === null) return;
  if (conn.waiting) {
    conn.waiting = false;
    wait.queue.delete(conn);
  }
  if (wait.probe === conn) {
    wait.probe = null;
    scheduleProbe(wait);
  }
  settleIfEmpty(wait);
}

/** How many clients wait for a backend now (STATUS=, metrics). */
export function waitingCount(wait: WaitQueue | null): number {
  return wait === null ? 0 : wait.queue.size + (wait.probe === null ? 0 : 1);
}
