/**
 * The proxy engine: listening sockets, accept, the connection limit, idle exit
 * and shutdown. One connection's forwarding lives in forward.ts.
 *
 * Accepting: Node's net.Server would wrap every accepted handle in a net.Socket,
 * which we do not use (forward.ts works on the handles themselves, see uv.ts).
 * So once a server is listening we take its handle's `onconnection` callback and
 * receive the accepted handles directly. This is the same callback Node's own
 * lib/net.js installs; it has been stable since Node 0.x, and `engines` pins the
 * versions we test on.
 */
import { lookup, type LookupAddress } from 'node:dns';
import { statSync } from 'node:fs';
import { Server } from 'node:net';
import { dirname } from 'node:path';
import { getSystemErrorName } from 'node:util';
import { formatAddress, formatPeer, type Address } from '../config/address.ts';
import { MSG_NOT_STREAM } from '../system/activation.ts';
import { EINVAL, ENOTSOCK, ProxyError } from '../errors.ts';
import { createWaitQueue, establish, released, resolved } from './connect.ts';
import { destroyConnection, startConnection, type Connection, type StreamHandle } from './forward.ts';
import { loadHeaderAddon } from './proxy-protocol.ts';
import { createSweep, startSweep, stopSweep, type Sweep } from './sweep.ts';
import { LOG_DEBUG, LOG_WARNING, type Logger } from '../system/log.ts';
import { MAX_KEEPIDLE_SEC } from '../config/args.ts';
import { DEFAULT_ROUTE_LABEL, type Route, type RouteSpec } from '../config/route.ts';
import { createStats, type Stats } from '../ops/stats.ts';
import { strerror } from '../system/strerror.ts';
import { checkBindings, uv, type TcpHandle } from './uv.ts';

export interface ProxyOptions {
  /** The default route: where connections on sockets without a route of their own go. */
  readonly target?: Address | null;
  /** Named routes: sockets with this name (LISTEN_FDNAMES, --listen=NAME=) go to this target. */
  readonly routes?: readonly { readonly name: string; readonly target: Address }[];
  /** Hard cap on connections open at once across all routes, counting those still connecting. */
  readonly connectionsMax: number;
  /** Exit after this long without connections (microseconds); null: never. */
  readonly exitIdleTimeUsec: bigint | null;
  /**
   * TCP_NODELAY on both TCP sockets of every connection (default true). A proxy that
   * leaves Nagle on delays the second of two small writes (a response's headers, then
   * its body) until the client ACKs the first, which a client with delayed ACKs does
   * only after ~40 ms. The bytes are the same either way; false restores Nagle.
   */
  readonly noDelay?: boolean;
  /**
   * --idle-timeout=: end what has carried no data for this long (microseconds); null:
   * never; undefined: not given (datagram flows then end after 60 s, as UDP has no close).
   */
  readonly idleTimeoutUsec?: bigint | null;
  /**
   * --connect-timeout=: abandon an attempt to connect to one address of the target after
   * this long (microseconds), and try the next; null, 0 or undefined: the kernel's bound.
   */
  readonly connectTimeoutUsec?: bigint | null;
  /**
   * --connect-retry=: while the backend is not there yet (refused, no socket file, a full
   * backlog, a connect timeout, a name that does not resolve), keep the client waiting and
   * try again until this long after its accept; null (no limit) or 0/undefined: no retry.
   */
  readonly connectRetryUsec?: bigint | null;
  /** --keepalive=: SO_KEEPALIVE on both TCP sockets, first probe after this long idle; 0/null/undefined: off. */
  readonly keepAliveUsec?: bigint | null;
  readonly logger: Logger;
  /** Called when the idle timer expires (the CLI exits 0). */
  readonly onIdle?: () => void;
  /**
   * Resolver for host-name targets, called on every connection (default: dns.lookup,
   * i.e. getaddrinfo). Embedders may plug in their own, e.g. for service discovery.
   */
  readonly lookup?: LookupFunction;
  /**
   * Send each backend a PROXY protocol header (haproxy's spec) naming the client,
   * before any of the client's bytes: 'v1' (text) or 'v2' (binary). Default: none.
   */
  readonly proxyProtocol?: 'v1' | 'v2' | null;
}

/** The dns.lookup shape we use: all addresses, in the resolver's order. */
export type LookupFunction = (
  host: string,
  options: { all: true; order: 'verbatim' },
  callback: (err: NodeJS.ErrnoException | null, addresses: LookupAddress[]) => void,
) => void;

export interface Proxy {
  readonly options: ProxyOptions;
  /** The default route (if any) first, then the named ones in the order given. */
  readonly routes: Route[];
  /** Lines about the process rather than one route's connection (datagram.ts logs here). */
  readonly log: (level: number, message: string) => void;
  /** Counters not kept per route (none today: datagram flows count per route too); totalStats() adds the routes'. */
  readonly stats: Stats;
  readonly servers: Server[];
  readonly connections: Set<Connection>;
  /** Open datagram flows (datagram.ts): they count toward connectionsMax and keep the proxy from idling. */
  flows: number;
  /** Closes the datagram sockets and their flows; set by datagram.ts once it serves one. */
  closeDatagrams: ((this: Proxy) => void) | null;
  /** Stops reading the datagram sockets (a drain: new datagrams wait in the kernel for the next start). */
  stopDatagrams: ((this: Proxy) => void) | null;
  /** Adds the counters the native datagram path keeps to the routes' stats; called before they are read. */
  collectDatagramStats: ((this: Proxy) => void) | null;
  idleTimer: NodeJS.Timeout | null;
  /** When the idle period ends, in ms of performance.now(), for timers longer than setTimeout allows. */
  idleDeadline: number;
  /** No longer accepting (stopped or draining). */
  closed: boolean;
  /** While draining: called once, when the last connection has been released. */
  onDrained: (() => void) | null;
  /** The periodic sweep over open connections (sweep.ts: --idle-timeout=, --keepalive=); null without either. */
  readonly sweep: Sweep | null;
}

const kRoute = Symbol('socket-proxyd.route');
const kNoDelay = Symbol('socket-proxyd.noDelay');
const kKeepAliveEach = Symbol('socket-proxyd.keepAliveEach');

interface ServerHandle {
  onconnection: (err: number, handle?: StreamHandle) => void;
  /** The route this listening socket's connections take (its proxy is route.proxy). */
  [kRoute]?: Route;
  /** Set TCP_NODELAY on each accepted handle: noDelay is on and this is a TCP listener. */
  [kNoDelay]?: boolean;
  /**
   * --keepalive= seconds to set on each accepted handle, only until the backlog that was
   * queued before the listener got the option has been accepted; then 0 (see startServer).
   */
  [kKeepAliveEach]?: number;
}

/** setTimeout() cannot wait longer than this (2^31-1 ms, ~24.8 days). */
const MAX_TIMER_MS = 0x7fffffff;

/** Microseconds to whole milliseconds, rounded up; null (infinity) is 0 where 0 means "no bound". */
function usecToMs(usec: bigint | null | undefined): number {
  if (usec === null || usec === undefined) return 0;
  return Number((usec + 999n) / 1000n);
}

/** A backlog Node passes to listen(2) again on an inherited socket: the kernel caps it at somaxconn. */
const INHERITED_BACKLOG = 0x7fffffff;

export function createProxy(options: ProxyOptions): Proxy {
  // One clear error now rather than a crash on the first connection.
  checkBindings();
  const specs: RouteSpec[] = [];
  if (options.target !== undefined && options.target !== null) specs.push({ name: null, target: options.target });
  for (const r of options.routes ?? []) {
    if (specs.some((s) => s.name === r.name)) throw new ProxyError('ERR_ROUTE', `Route '${r.name}' is given twice.`, EINVAL);
    specs.push(r);
  }
  if (specs.length === 0) throw new ProxyError('ERR_ROUTE', 'No target given.', EINVAL);
  const connections = new Set<Connection>();
  const keepAliveSec = keepAliveSeconds(options.keepAliveUsec);
  const proxy: Proxy = {
    options,
    routes: [],
    log: options.logger.log.bind(options.logger),
    stats: createStats(),
    servers: [],
    connections,
    flows: 0,
    closeDatagrams: null,
    stopDatagrams: null,
    collectDatagramStats: null,
    idleTimer: null,
    idleDeadline: 0,
    closed: false,
    onDrained: null,
    sweep: createSweep(options.idleTimeoutUsec, keepAliveSec, connections),
  };
  const logger = options.logger;
  const noDelay = options.noDelay ?? true;
  const proxyProtocol = options.proxyProtocol === 'v1' ? 1 : options.proxyProtocol === 'v2' ? 2 : 0;
  if (proxyProtocol !== 0) {
    // Without the addon the header is the same, made in TypeScript at ~2 µs more per connection.
    const why = loadHeaderAddon();
    if (why !== null) logger.log(LOG_DEBUG, `PROXY protocol headers are encoded without the native addon: ${why}`);
  }
  const connectTimeoutMs = usecToMs(options.connectTimeoutUsec);
  // No limit: wait as long as the client does (its reset still ends the wait).
  const connectRetryMs = options.connectRetryUsec === null ? Infinity : usecToMs(options.connectRetryUsec);
  // With one route every line is the reference's; with several, each says its route.
  const several = specs.length > 1;
  for (const spec of specs) {
    const prefix = several ? `${spec.name ?? DEFAULT_ROUTE_LABEL}: ` : '';
    const log = several ? routeLog : logger.log.bind(logger);
    const route: Route = {
      name: spec.name,
      target: spec.target,
      proxy,
      prefix,
      noDelay,
      log,
      release: releaseConnection,
      resolve: resolveTarget,
      proxyProtocol,
      stats: createStats(),
      open: 0,
      connectTimeoutMs,
      connectRetryMs,
      keepAliveSec,
      wait: null,
    };
    if (connectRetryMs > 0) route.wait = createWaitQueue(route);
    proxy.routes.push(route);
  }
  return proxy;
}

/**
 * --keepalive= in whole seconds (TCP_KEEPIDLE's unit), at least 1; 0 for off. Beyond
 * Linux's limit is an error here (args.ts refuses it first, with the option's message).
 */
function keepAliveSeconds(usec: bigint | null | undefined): number {
  if (usec === null || usec === undefined || usec === 0n) return 0;
  const sec = Number((usec + 999_999n) / 1_000_000n);
  if (sec > MAX_KEEPIDLE_SEC) {
    throw new ProxyError('ERR_USAGE', `Keepalive idle time is too long (at most ${MAX_KEEPIDLE_SEC} s).`, EINVAL);
  }
  return sec;
}

/** A route's log line, prefixed with its name (only used with several routes). */
function routeLog(this: Route, level: number, message: string): void {
  const logger = this.proxy.options.logger;
  if (level <= logger.maxLevel) logger.log(level, this.prefix + message);
}

/**
 * The route for a socket with this name (undefined or "": unnamed): its name's, else the
 * default. Throws ProxyError('ERR_ROUTE') when there is none (main.ts checks every socket
 * with assignRoutes() first, with a message naming the socket).
 */
export function routeFor(proxy: Proxy, name: string | null | undefined): Route {
  const named = name === undefined || name === null || name === '' ? undefined : proxy.routes.find((r) => r.name === name);
  const route = named ?? proxy.routes.find((r) => r.name === null);
  if (route === undefined) {
    throw new ProxyError('ERR_ROUTE', `No route for socket '${name ?? ''}', and no default route.`, EINVAL);
  }
  return route;
}

/**
 * The counters of the whole process: the routes' plus the process-level ones (datagram
 * flows), summed into a fresh object only when somebody asks (STATUS=, SIGUSR1, a scrape).
 */
export function totalStats(proxy: Proxy): Stats {
  proxy.collectDatagramStats?.();
  const total = { ...proxy.stats };
  for (const r of proxy.routes) {
    total.accepted += r.stats.accepted;
    total.refused += r.stats.refused;
    total.backendFailures += r.stats.backendFailures;
    total.flows += r.stats.flows;
    total.bytesToBackend += r.stats.bytesToBackend;
    total.bytesToClient += r.stats.bytesToClient;
  }
  return total;
}

/**
 * Start accepting on an inherited listening socket (socket activation). `name` is the
 * socket's name (LISTEN_FDNAMES) and picks its route; unnamed takes the default route.
 */
export function listenOnFd(proxy: Proxy, fd: number, name?: string | null): Promise<Server> {
  const route = routeFor(proxy, name);
  const server = new Server();
  // Positional backlog: the `{fd, backlog}` option is ignored by Node, which would
  // re-listen with 511 and silently shrink systemd's Backlog=.
  return startServer(route, server, () => server.listen({ fd }, INHERITED_BACKLOG), (err) => {
    // Datagram, seqpacket and connected sockets all fail in listen(): same words as the reference.
    return new ProxyError('ERR_NOT_STREAM', `${MSG_NOT_STREAM}`, errnoOf(err) ?? ENOTSOCK);
  });
}

/**
 * Bind and listen ourselves (--listen=, for use without systemd). Resolves to the listening
 * server. `name` (--listen=NAME=ADDRESS) picks the route, as for listenOnFd().
 */
export function listenOnAddress(proxy: Proxy, address: Address, backlog = 4096, name?: string | null): Promise<Server> {
  const route = routeFor(proxy, name);
  const server = new Server();
  const start =
    address.kind === 'unix'
      ? () => server.listen({ path: address.path, backlog })
      : address.kind === 'ip' && address.anyAddress === true
        ? // No host: Node binds [::] dual-stack, or 0.0.0.0 where IPv6 is unavailable (as systemd).
          () => server.listen({ port: address.port, backlog, ipv6Only: false })
        : () => server.listen({ host: address.host, port: address.port, backlog, ipv6Only: false });
  return startServer(route, server, start, (err) => {
    const cause = address.kind === 'unix' ? realBindError(err, address.path) : err;
    return new ProxyError('ERR_LISTEN', `Failed to listen on ${formatAddress(address)}: ${strerror(cause)}`, errnoOf(cause) ?? EINVAL);
  });
}

/**
 * libuv's uv_pipe_bind() reports ENOENT as EACCES (for Windows' sake), so a missing
 * directory would read "Permission denied". When the directory the socket goes in is
 * missing (or not a directory), that is the real cause; a real EACCES stays EACCES.
 */
function realBindError(err: Error, path: string): unknown {
  if ((err as NodeJS.ErrnoException).code !== 'EACCES' || path.startsWith('\0')) return err;
  try {
    statSync(dirname(path));
  } catch (probe) {
    const code = (probe as NodeJS.ErrnoException).code;
    if (code === 'ENOENT' || code === 'ENOTDIR') return probe;
  }
  return err;
}

function errnoOf(err: unknown): number | undefined {
  const errno = (err as { errno?: unknown }).errno;
  return typeof errno === 'number' ? Math.abs(errno) : undefined;
}

function startServer(
  route: Route,
  server: Server,
  start: () => void,
  describe: (err: Error) => ProxyError,
): Promise<Server> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => {
      server.removeListener('listening', onListening);
      reject(describe(err));
    };
    const onListening = (): void => {
      server.removeListener('error', onError);
      // 'listening' is emitted on the next tick after listen(2), before the loop can
      // poll the socket, so no connection reaches Node's own accept callback.
      const handle = (server as unknown as { _handle: ServerHandle | null })._handle as ServerHandle;
      handle[kRoute] = route;
      // Decided once per listener: accepted handles are of the listener's type.
      handle[kNoDelay] = route.noDelay && handle instanceof uv.TCP;
      // --keepalive= on the listening socket: Linux copies SO_KEEPALIVE and TCP_KEEPIDLE/
      // INTVL/CNT into every socket it accepts (as nginx's `listen ... so_keepalive`), which
      // saves the four setsockopt() calls per connection that setting it on each would cost
      // (measured: ~9% of the CPU of a short connection). On a socket systemd passed in, the
      // setting stays on systemd's copy until the socket unit restarts, like KeepAlive=.
      // Connections the kernel queued before this (the client whose arrival made systemd
      // start us) were copied without it: they get it one by one, until the backlog queued
      // so far has been accepted, which happens in the next poll phase at the latest; two
      // setImmediate() turns make sure that poll phase is behind us.
      if (route.keepAliveSec > 0 && handle instanceof uv.TCP) {
        (handle as unknown as TcpHandle).setKeepAlive(true, route.keepAliveSec);
        handle[kKeepAliveEach] = route.keepAliveSec;
        setImmediate(afterNextPoll, handle);
      }
      handle.onconnection = onConnection;
      // Accept errors after start-up are logged, never fatal.
      server.on('error', onServerError);
      route.proxy.servers.push(server);
      resolve(server);
    };
    server.once('error', onError);
    server.once('listening', onListening);
    start();
  });
}

function afterNextPoll(handle: ServerHandle): void {
  setImmediate(stopKeepAliveEach, handle);
}

function stopKeepAliveEach(handle: ServerHandle): void {
  handle[kKeepAliveEach] = 0;
}

/** Unreachable in practice (we own onconnection); present so an 'error' can never crash us. */
function onServerError(): void {}

/** Accept callback, with `this` the listening handle (see the module comment). */
function onConnection(this: ServerHandle, err: number, handle?: StreamHandle): void {
  const route = this[kRoute] as Route;
  const proxy = route.proxy;
  if (err !== 0 || handle === undefined) {
    // libuv already survives EMFILE by accepting and closing what it cannot serve
    // (its reserve-fd trick), so this is no busy loop: one line per failed batch.
    route.log(LOG_WARNING, `Failed to accept() socket: ${strerror({ code: getSystemErrorName(err) })}`);
    return;
  }
  if (proxy.closed) {
    handle.close();
    return;
  }
  if (proxy.options.logger.maxLevel >= LOG_DEBUG) route.log(LOG_DEBUG, `New connection from ${peerName(handle)}`);
  // One limit for the whole process, whatever the route (datagram flows too): a hard cap on fds and memory.
  if (proxy.connections.size + proxy.flows >= proxy.options.connectionsMax) {
    // Accept-then-close, as the reference: the client sees EOF (or RST if it already sent data).
    handle.close();
    route.stats.refused++;
    route.log(LOG_WARNING, 'Hit connection limit, refusing connection.');
    return;
  }
  route.stats.accepted++;
  route.open++;
  disarmIdleTimer(proxy);
  // One setsockopt per accepted socket. A failure (the peer already reset) costs only
  // timing, and the connection's first read or write reports the real error.
  if (this[kNoDelay] === true) (handle as TcpHandle).setNoDelay(true);
  const keepAlive = this[kKeepAliveEach];
  if (keepAlive !== undefined && keepAlive > 0) (handle as TcpHandle).setKeepAlive(true, keepAlive);
  if (proxy.sweep !== null) startSweep(proxy.sweep);
  const conn = startConnection(route, handle);
  proxy.connections.add(conn);
  establish(conn);
}

function peerName(handle: StreamHandle): string {
  const out: Record<string, unknown> = {};
  if (handle.getpeername !== undefined && handle.getpeername(out) === 0 && typeof out.address === 'string') {
    return formatPeer(out.address, out.port as number);
  }
  return 'a UNIX socket';
}

function resolveTarget(this: Route, conn: Connection): void {
  const target = this.target;
  if (target.kind !== 'name') return;
  const options = this.proxy.options;
  if (options.logger.maxLevel >= LOG_DEBUG) {
    this.log(LOG_DEBUG, `Looking up address info for ${target.host}:${target.port}`);
  }
  (options.lookup ?? lookup)(target.host, LOOKUP_OPTIONS, (err, addresses: LookupAddress[]) => {
    resolved(conn, err, err === null ? addresses.map(addressOf) : []);
  });
}

/** getaddrinfo(AF_UNSPEC) order, all addresses: we try each until one connects. */
const LOOKUP_OPTIONS = { all: true, order: 'verbatim' } as const;

function addressOf(a: LookupAddress): string {
  return a.address;
}

function releaseConnection(this: Route, conn: Connection): void {
  this.open--;
  released(conn);
  const proxy = this.proxy;
  proxy.connections.delete(conn);
  if (proxy.connections.size !== 0) return;
  if (proxy.sweep !== null) stopSweep(proxy.sweep);
  const drained = proxy.onDrained;
  if (drained === null) {
    armIdleTimer(proxy);
    return;
  }
  proxy.onDrained = null;
  drained();
}

/**
 * (Re)start the idle timer: from start-up and whenever the last connection or flow
 * closes. An accepted connection or a new flow stops it. Spans beyond setTimeout's limit are waited for
 * in steps.
 */
export function armIdleTimer(proxy: Proxy): void {
  const usec = proxy.options.exitIdleTimeUsec;
  if (usec === null || proxy.closed || proxy.connections.size > 0 || proxy.flows > 0) return;
  if (proxy.idleTimer !== null) clearTimeout(proxy.idleTimer);
  const ms = Number((usec + 999n) / 1000n);
  proxy.idleDeadline = performance.now() + ms;
  proxy.idleTimer = setTimeout(onIdleTimer, Math.min(ms, MAX_TIMER_MS), proxy);
}

/** A new connection or flow: the proxy is not idle any more. */
export function disarmIdleTimer(proxy: Proxy): void {
  if (proxy.idleTimer === null) return;
  clearTimeout(proxy.idleTimer);
  proxy.idleTimer = null;
}

function onIdleTimer(proxy: Proxy): void {
  proxy.idleTimer = null;
  if (proxy.connections.size > 0 || proxy.flows > 0 || proxy.closed) return;
  const left = proxy.idleDeadline - performance.now();
  if (left > 1) {
    proxy.idleTimer = setTimeout(onIdleTimer, Math.min(Math.ceil(left), MAX_TIMER_MS), proxy);
    return;
  }
  proxy.options.onIdle?.();
}

/**
 * Stop accepting: close our listening sockets. Under socket activation that closes
 * only our copy; systemd keeps its own, so new clients wait in the kernel's backlog
 * for the next start instead of being refused (sd_listen_fds(3): never shutdown()).
 */
function stopAccepting(proxy: Proxy): void {
  if (proxy.closed) return;
  proxy.closed = true;
  disarmIdleTimer(proxy);
  for (const server of proxy.servers) server.close();
  proxy.stopDatagrams?.();
}

/**
 * Graceful stop: stop accepting, let the open connections run to their end, and
 * call `onDrained` once the last one is released (on the next turn if none is open).
 * The caller bounds the wait: closeProxy() ends whatever is left.
 */
export function drainProxy(proxy: Proxy, onDrained: () => void): void {
  stopAccepting(proxy);
  if (proxy.connections.size === 0) {
    setImmediate(onDrained);
    return;
  }
  proxy.onDrained = onDrained;
}

/** Stop accepting and tear down every connection (also ends a drain: its callback is dropped). */
export function closeProxy(proxy: Proxy): void {
  stopAccepting(proxy);
  proxy.onDrained = null;
  for (const conn of proxy.connections) destroyConnection(conn);
  proxy.closeDatagrams?.();
}
