/**
 * The CLI shell: parse the command line, collect the listening sockets, start the
 * engine, and speak to the service manager (sd_notify, signals, exit codes).
 * Everything it prints is one line; every failure exits 1.
 */
import module from 'node:module';
import { lstatSync, unlinkSync } from 'node:fs';
import { connect } from 'node:net';
import { basename } from 'node:path';
import { takeListenFds, MSG_NO_SOCKETS } from './system/activation.ts';
import { formatAddress, parseAddress, parseListenAddress, type Address } from './config/address.ts';
import { helpText, parseArgv, type Options } from './config/args.ts';
import { EINVAL, ProxyError } from './errors.ts';
import { createLogger, LOG_DEBUG, LOG_ERR, LOG_INFO, LOG_WARNING, type Logger } from './system/log.ts';
import { armIdleTimer, closeProxy, createProxy, drainProxy, listenOnAddress, listenOnFd, routeFor, totalStats, type Proxy } from './engine/proxy.ts';
import { assignRoutes, checkRouteName, DEFAULT_ROUTE_LABEL, splitRouteArg, type SocketSpec } from './config/route.ts';
import { statisticsLine, statusSummary, type Stats } from './ops/stats.ts';
import { strerror } from './system/strerror.ts';
import { formatTimespan } from './config/timespan.ts';
import { isUdpFd, listenDatagramOnAddress, listenDatagramOnFd, openFlows } from './engine/datagram.ts';
import { waitingCount } from './engine/connect.ts';

type NotifyModule = typeof import('./system/notify.ts');
type MetricsModule = typeof import('./ops/metrics.ts');

/** Loaded only when NOTIFY_SOCKET is set: nothing native or extra otherwise. */
let notifier: NotifyModule | null = null;

function notify(state: string): void {
  notifier?.notify(state);
}

function programName(): string {
  const script = process.argv[1] ?? '';
  // Run as `node dist/cli.js` the script name says nothing; through the bin link it is ours.
  return script === '' || /\.[cm]?[jt]s$/.test(script) ? 'socket-proxyd' : script;
}

/**
 * Messages quote what the user typed, and an argument may hold a newline or an escape
 * sequence: C-escape control characters (as systemd's cescape() would) so that a failure
 * is always exactly one line.
 */
function oneLine(message: string): string {
  return message.replace(/[\x00-\x1f\x7f]/g, (c) => {
    if (c === '\n') return '\\n';
    if (c === '\t') return '\\t';
    if (c === '\r') return '\\r';
    return `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`;
  });
}

function fail(logger: Logger, err: unknown): never {
  if (err instanceof ProxyError) {
    logger.log(LOG_ERR, oneLine(err.message));
    notify(`ERRNO=${err.errno}`);
  } else {
    logger.log(LOG_ERR, oneLine(`Unexpected failure: ${err instanceof Error ? err.message : String(err)}`));
    notify(`ERRNO=${EINVAL}`);
  }
  process.exit(1);
}

function printVersion(): void {
  // Read lazily: only --version needs package.json.
  const require = module.createRequire(import.meta.url);
  const pkg = require('../package.json') as { name: string; version: string };
  process.stdout.write(`${pkg.name} ${pkg.version}\n`);
}

async function loadNotifier(logger: Logger): Promise<void> {
  if (!process.env.NOTIFY_SOCKET) return;
  try {
    notifier = await import('./system/notify.ts');
    notifier.setNotifyErrorHandler((message) => logger.log(LOG_ERR, `Failed to notify the service manager: ${message}`));
  } catch (err) {
    logger.log(LOG_ERR, `Failed to load sd_notify support: ${err instanceof Error ? err.message : String(err)}`);
  }
}

let proxy: Proxy | null = null;
let logger: Logger | null = null;
/** UNIX socket paths we bound ourselves (--listen=/path): removed when we stop accepting. */
const boundPaths: string[] = [];
/** The --metrics=/path socket: removed on exit (metrics are served until then, drain included). */
let metricsPath: string | null = null;

/** --drain-timeout=: 0n no drain (the reference's behaviour), null no limit. */
let drainTimeoutUsec: bigint | null = 0n;
let draining = false;
/** When the drain must end, in performance.now() ms (Infinity: no limit). */
let drainDeadline = 0;

/** setTimeout() cannot wait longer than this (2^31-1 ms, ~24.8 days). */
const MAX_TIMER_MS = 0x7fffffff;

/**
 * SIGTERM/SIGINT and idle expiry. With --drain-timeout= and connections open, the
 * first request starts a drain; otherwise, and on a second request during a drain,
 * stop at once: close everything, exit 0.
 */
function stop(): void {
  if (draining || proxy === null || drainTimeoutUsec === 0n || proxy.connections.size === 0) {
    finish();
    return;
  }
  startDrain(proxy);
}

function finish(): void {
  if (proxy !== null) closeProxy(proxy);
  removeBoundPaths();
  if (metricsPath !== null) removePath(metricsPath);
  // A drain has told the manager already (STOPPING=1 with its STATUS=).
  if (!draining) notify('STOPPING=1\nSTATUS=Shutting down...');
  process.exit(0);
}

function removePath(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}

/** libuv unlinks a path socket when its server closes; we may exit first, so do it ourselves. */
function removeBoundPaths(): void {
  for (const path of boundPaths.splice(0)) removePath(path);
}

/**
 * Graceful stop: close our listening sockets now (under socket activation only our
 * copies: new clients queue in systemd's for the next start), keep forwarding what
 * is open until it ends or the drain timeout passes, then exit 0.
 */
function startDrain(p: Proxy): void {
  draining = true;
  drainProxy(p, finish);
  removeBoundPaths();
  const open = p.connections.size;
  const usec = drainTimeoutUsec;
  logger?.log(LOG_INFO, `Draining ${open} connection${open === 1 ? '' : 's'}${usec === null ? '' : ` for up to ${formatTimespan(usec)}`}...`);
  if (usec === null) {
    drainDeadline = Infinity;
  } else {
    const ms = Number((usec + 999n) / 1000n);
    drainDeadline = performance.now() + ms;
    setTimeout(onDrainTimer, Math.min(ms, MAX_TIMER_MS));
  }
  if (notifier !== null) {
    lastStatus = drainingStatus(open);
    lastStatusAt = lastExtendAt = performance.now();
    notify(`STOPPING=1\nSTATUS=${lastStatus}\n${extendTimeout()}`);
  }
}

function onDrainTimer(): void {
  const left = drainDeadline - performance.now();
  if (left > 1) {
    setTimeout(onDrainTimer, Math.min(Math.ceil(left), MAX_TIMER_MS));
    return;
  }
  const open = proxy?.connections.size ?? 0;
  logger?.log(LOG_WARNING, `Drain timeout reached, closing ${open} connection${open === 1 ? '' : 's'}.`);
  finish();
}

// ---------------------------------------------------------------------------------------------
// Live status for `systemctl status` (only with NOTIFY_SOCKET). A coarse tick compares the
// text with what was sent last: no datagram while nothing changes, at most one a second.

const STATUS_TICK_MS = 250;
const STATUS_MIN_INTERVAL_MS = 1000;
/** While draining, EXTEND_TIMEOUT_USEC= is repeated this often, each time granting EXTEND_GRANT_USEC more. */
const EXTEND_EVERY_MS = 10_000;
const EXTEND_GRANT_USEC = 30_000_000;
/** Time to close what is left and exit after the drain timeout, granted on top of it. */
const EXIT_SLACK_USEC = 5_000_000;
let lastStatus = '';
let lastStatusAt = 0;
let lastExtendAt = 0;

function runningStatus(p: Proxy): string {
  return `Processing requests: ${statusSummary(totalStats(p), p.connections.size, p.flows, waitingTotal(p))}`;
}

function drainingStatus(open: number): string {
  return `Draining ${open} connection${open === 1 ? '' : 's'}...`;
}

/**
 * How long the manager must wait for our next message: until the drain deadline
 * (plus time to exit), or, without a limit, until the next repetition (with room).
 */
function extendTimeout(): string {
  const usec =
    drainDeadline === Infinity
      ? EXTEND_GRANT_USEC
      : Math.max(0, Math.ceil((drainDeadline - performance.now()) * 1000)) + EXIT_SLACK_USEC;
  return `EXTEND_TIMEOUT_USEC=${usec}`;
}

function statusTick(): void {
  const p = proxy;
  if (p === null) return;
  const now = performance.now();
  let message = '';
  if (now - lastStatusAt >= STATUS_MIN_INTERVAL_MS) {
    const text = draining ? drainingStatus(p.connections.size) : runningStatus(p);
    if (text !== lastStatus) {
      lastStatus = text;
      lastStatusAt = now;
      message = `STATUS=${text}`;
    }
  }
  if (draining && now - lastExtendAt >= EXTEND_EVERY_MS) {
    lastExtendAt = now;
    message += `${message === '' ? '' : '\n'}${extendTimeout()}`;
  }
  if (message !== '') notify(message);
}

/**
 * SIGUSR1: the counters and bytes each way, one line at info level (systemd's daemons
 * use SIGUSR1 to dump state to the journal). Never stops the proxy. Having a listener
 * of our own is also what keeps Node's default away: that starts the inspector on
 * 127.0.0.1:9229, which lets any local user who can reach it run code as the proxy's
 * user (often root under systemd).
 */
function logStatistics(): void {
  if (proxy === null || logger === null) return;
  logger.log(LOG_INFO, statisticsLine(totalStats(proxy), proxy.connections.size, proxy.flows, waitingTotal(proxy)));
}

/**
 * A socket file left behind by a process that died (SIGKILL, crash) makes bind()
 * fail with EADDRINUSE. Remove it only if nobody accepts on it any more.
 */
async function removeStaleSocket(path: string): Promise<void> {
  try {
    if (!lstatSync(path).isSocket()) return;
  } catch {
    return;
  }
  const live = await new Promise<boolean>((resolve) => {
    const probe = connect({ path });
    probe.once('connect', () => {
      probe.destroy();
      resolve(true);
    });
    probe.once('error', (err: NodeJS.ErrnoException) => resolve(err.code !== 'ECONNREFUSED'));
  });
  if (!live) unlinkSync(path);
}

/**
 * --metrics=ADDRESS: metrics.ts (and node:http) are loaded only here, so without the
 * option nothing of it costs start-up time or memory.
 */
async function serveMetrics(p: Proxy, address: Address, log: Logger): Promise<void> {
  const path = address.kind === 'unix' && !address.path.startsWith('\0') ? address.path : null;
  if (path !== null) await removeStaleSocket(path);
  const metrics: MetricsModule = await import('./ops/metrics.ts');
  let where: string;
  try {
    where = await metrics.startMetricsServer(address, { connectionsMax: p.options.connectionsMax, collect: () => metricsSamples(p) });
  } catch (err) {
    throw new ProxyError('ERR_LISTEN', `Failed to serve metrics on ${formatAddress(address)}: ${strerror(err)}`, errnoOf(err));
  }
  if (path !== null) metricsPath = path;
  log.log(LOG_DEBUG, `Serving metrics on ${where}`);
}

/**
 * One sample per route, labelled by route name ("(default)" for the default) once there
 * are several. A route's datagram flows count in its own sample, as its connections do.
 */
/** Clients waiting for their backend now; undefined without --connect-retry= (then nobody can). */
function waitingTotal(p: Proxy): number | undefined {
  let total: number | undefined;
  for (const r of p.routes) if (r.wait !== null) total = (total ?? 0) + waitingCount(r.wait);
  return total;
}

function metricsSamples(p: Proxy): { route: string | null; stats: Stats; open: number; flows: number; waiting: number }[] {
  p.collectDatagramStats?.();
  if (p.routes.length === 1) return [{ route: null, stats: totalStats(p), open: p.connections.size, flows: p.flows, waiting: waitingTotal(p) ?? 0 }];
  return p.routes.map((r) => ({ route: r.name ?? DEFAULT_ROUTE_LABEL, stats: r.stats, open: r.open, flows: openFlows(p, r), waiting: waitingCount(r.wait) }));
}

/**
 * Parse a route's target. With several routes an error names the route ("web: Invalid
 * address ..."); with one it is exactly today's line.
 */
function parseTarget(text: string, name: string | null, several: boolean): Address {
  try {
    return parseAddress(text);
  } catch (err) {
    if (!several || !(err instanceof ProxyError)) throw err;
    throw new ProxyError(err.code, `${name ?? DEFAULT_ROUTE_LABEL}: ${err.message}`, err.errno);
  }
}

/** One --listen=[NAME=]ADDRESS or --listen-datagram=[NAME=]ADDRESS. */
interface ListenArg {
  readonly name: string | null;
  readonly address: Address;
  readonly text: string;
}

function parseListenAs(option: string, text: string): ListenArg {
  const { name, value } = splitRouteArg(text);
  if (name !== null) checkRouteName(name, `${option}=${text}`);
  return { name, address: parseListenAddress(value), text };
}

function parseListen(text: string): ListenArg {
  return parseListenAs('--listen', text);
}

function parseListenDatagram(text: string): ListenArg {
  return parseListenAs('--listen-datagram', text);
}

function errnoOf(err: unknown): number {
  const errno = (err as { errno?: unknown }).errno;
  return typeof errno === 'number' ? Math.abs(errno) : EINVAL;
}

export async function main(argv: string[]): Promise<void> {
  // Handlers first: a stop request during start-up is a clean stop too, and SIGUSR1
  // must never reach Node's default (the inspector), not even during start-up.
  process.on('SIGUSR1', logStatistics);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const env = process.env;
  const log = (logger = createLogger(env));
  await loadNotifier(log);

  let options: Options;
  let target: Address | null;
  let routes: { name: string; target: Address }[];
  let listen: ListenArg[];
  let metricsAddress: Address | null;
  let listenDatagram: ListenArg[];
  try {
    const parsed = parseArgv(argv, programName(), env);
    if (parsed.action === 'help') {
      process.stdout.write(helpText(basename(programName())));
      process.exit(0);
    }
    if (parsed.action === 'version') {
      printVersion();
      process.exit(0);
    }
    options = parsed.options;
    const several = options.routes.length + (options.target === null ? 0 : 1) > 1;
    target = options.target === null ? null : parseTarget(options.target, null, several);
    routes = options.routes.map((r) => ({ name: r.name, target: parseTarget(r.target, r.name, several) }));
    listen = options.listen.map(parseListen);
    metricsAddress = options.metrics === null ? null : parseListenAddress(options.metrics);
    drainTimeoutUsec = options.drainTimeoutUsec;
    listenDatagram = (options.listenDatagram ?? []).map(parseListenDatagram);
  } catch (err) {
    fail(log, err);
  }

  let started: Proxy;
  try {
    const fds = takeListenFds(env, process.pid);
    if (fds.length === 0 && listen.length === 0 && listenDatagram.length === 0) throw new ProxyError('ERR_LISTEN_FDS', MSG_NO_SOCKETS, EINVAL);
    // Every socket has a route and every named route a socket, before anything is bound.
    const sockets: SocketSpec[] = [
      ...fds.map((f) => ({ name: f.name, where: `fd ${f.fd}` })),
      ...listen.map((l) => ({ name: l.name ?? undefined, where: `--listen=${l.text}` })),
      ...listenDatagram.map((l) => ({ name: l.name ?? undefined, where: `--listen-datagram=${l.text}` })),
    ];
    assignRoutes([...(target === null ? [] : [{ name: null }]), ...routes], sockets);
    started = proxy = createProxy({
      target,
      routes,
      connectionsMax: options.connectionsMax,
      exitIdleTimeUsec: options.exitIdleTimeUsec,
      proxyProtocol: options.proxyProtocol,
      noDelay: options.noDelay,
      ...(options.idleTimeoutUsec !== undefined ? { idleTimeoutUsec: options.idleTimeoutUsec } : {}),
      ...(options.connectTimeoutUsec !== undefined ? { connectTimeoutUsec: options.connectTimeoutUsec } : {}),
      ...(options.connectRetryUsec !== undefined ? { connectRetryUsec: options.connectRetryUsec } : {}),
      ...(options.keepAliveUsec !== undefined ? { keepAliveUsec: options.keepAliveUsec } : {}),
      logger: log,
      onIdle: stop,
    });
    for (const { fd, name } of fds) {
      try {
        await listenOnFd(started, fd, name);
      } catch (err) {
        // Not a listening stream socket: serve it if it is a UDP one (ListenDatagram=),
        // otherwise keep the reference's refusal. Its name picks its target, as for streams.
        if (!(err instanceof ProxyError && err.code === 'ERR_NOT_STREAM' && isUdpFd(fd))) throw err;
        listenDatagramOnFd(started, fd, routeFor(started, name));
      }
    }
    for (const { address, name } of listen) {
      const path = address.kind === 'unix' && !address.path.startsWith('\0') ? address.path : null;
      if (path !== null) await removeStaleSocket(path);
      await listenOnAddress(started, address, undefined, name);
      if (path !== null) boundPaths.push(path);
    }
    for (const { address, name } of listenDatagram) await listenDatagramOnAddress(started, address, routeFor(started, name));
    if (metricsAddress !== null) await serveMetrics(started, metricsAddress, log);
  } catch (err) {
    fail(log, err);
  }

  // Connections already waiting in the backlog (the one that made systemd start us)
  // are accepted in the first poll phase; arm the idle timer only after it, so that
  // --exit-idle-time=0 does not exit before serving them.
  setImmediate(armIdleTimer, started);

  if (notifier !== null) {
    notify('READY=1\nSTATUS=Processing requests...');
    // What a change is measured against: the counters as they are now.
    lastStatus = runningStatus(started);
    lastStatusAt = performance.now();
    setInterval(statusTick, STATUS_TICK_MS).unref();
    const period = notifier.watchdogPeriodMs(env, process.pid);
    if (period !== null) {
      notify('WATCHDOG=1');
      setInterval(notify, period, 'WATCHDOG=1').unref();
    }
  }
}
