/**
 * The CLI shell: parse the command line, collect the listening sockets, start the
 * engine, and speak to the service manager (sd_notify, signals, exit codes).
 * Everything it prints is one line; every failure exits 1.
 */
import module from 'node:module';
import { lstatSync, unlinkSync } from 'node:fs';
import { connect } from 'node:net';
import { basename } from 'node:path';
import { takeListenFds, MSG_NO_SOCKETS } from './activation.ts';
import { parseAddress, parseListenAddress, type Address } from './address.ts';
import { helpText, parseArgv, type Options } from './args.ts';
import { EINVAL, ProxyError } from './errors.ts';
import { createLogger, LOG_DEBUG, LOG_ERR, type Logger } from './log.ts';
import { armIdleTimer, closeProxy, createProxy, listenOnAddress, listenOnFd, type Proxy } from './proxy.ts';

type NotifyModule = typeof import('./notify.ts');

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
    notifier = await import('./notify.ts');
    notifier.setNotifyErrorHandler((message) => logger.log(LOG_ERR, `Failed to notify the service manager: ${message}`));
  } catch (err) {
    logger.log(LOG_ERR, `Failed to load sd_notify support: ${err instanceof Error ? err.message : String(err)}`);
  }
}

let proxy: Proxy | null = null;
/** UNIX socket paths we bound ourselves (--listen=/path): removed again on exit. */
const boundPaths: string[] = [];

/** SIGTERM/SIGINT and idle expiry: stop accepting, close everything, exit 0. */
function stop(): void {
  if (proxy !== null) closeProxy(proxy);
  // libuv would unlink these when the servers finish closing, but we exit first.
  for (const path of boundPaths) {
    try {
      unlinkSync(path);
    } catch {
      // already gone
    }
  }
  notify('STOPPING=1\nSTATUS=Shutting down...');
  process.exit(0);
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
 * SIGUSR1. Node's default action for it is to start the inspector on 127.0.0.1:9229,
 * which lets any local user who can reach that port run code as the proxy's user
 * (often root under systemd). Having a listener of our own is what stops that.
 * For now it only says that it was received (at debug level).
 */
function onUsr1(): void {
  if (mainLogger !== null && mainLogger.maxLevel >= LOG_DEBUG) mainLogger.log(LOG_DEBUG, 'Received SIGUSR1.');
}

/** The logger main() made, for the signal handlers. */
let mainLogger: Logger | null = null;

export async function main(argv: string[]): Promise<void> {
  // Handlers first: a stop request during start-up is a clean stop too, and SIGUSR1
  // must never reach Node's default (the inspector), not even during start-up.
  process.on('SIGUSR1', onUsr1);
  process.on('SIGTERM', stop);
  process.on('SIGINT', stop);
  const env = process.env;
  const logger = createLogger(env);
  mainLogger = logger;
  await loadNotifier(logger);

  let options: Options;
  let target: Address;
  let listen: Address[];
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
    target = parseAddress(options.target);
    listen = options.listen.map(parseListenAddress);
  } catch (err) {
    fail(logger, err);
  }

  let started: Proxy;
  try {
    const fds = takeListenFds(env, process.pid);
    if (fds.length === 0 && listen.length === 0) throw new ProxyError('ERR_LISTEN_FDS', MSG_NO_SOCKETS, EINVAL);
    started = proxy = createProxy({
      target,
      connectionsMax: options.connectionsMax,
      exitIdleTimeUsec: options.exitIdleTimeUsec,
      proxyProtocol: options.proxyProtocol,
      logger,
      onIdle: stop,
    });
    for (const { fd } of fds) await listenOnFd(started, fd);
    for (const address of listen) {
      const path = address.kind === 'unix' && !address.path.startsWith('\0') ? address.path : null;
      if (path !== null) await removeStaleSocket(path);
      await listenOnAddress(started, address);
      if (path !== null) boundPaths.push(path);
    }
  } catch (err) {
    fail(logger, err);
  }

  // Connections already waiting in the backlog (the one that made systemd start us)
  // are accepted in the first poll phase; arm the idle timer only after it, so that
  // --exit-idle-time=0 does not exit before serving them.
  setImmediate(armIdleTimer, started);

  if (notifier !== null) {
    notify('READY=1\nSTATUS=Processing requests...');
    const period = notifier.watchdogPeriodMs(env, process.pid);
    if (period !== null) {
      notify('WATCHDOG=1');
      setInterval(notify, period, 'WATCHDOG=1').unref();
    }
  }
}
