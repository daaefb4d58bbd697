// The proxies under test. Ours and the reference are started by socket activation (the bench binds
// the listening socket and passes it as fd 3); socat, haproxy and nginx-stream bind their own
// loopback port from their own config. "direct" is no proxy at all: clients talk to the backend.
import { existsSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { execFileSync } from 'node:child_process';
import { start, startActivated, sampleUsage, freePort, waitTcpListening, which } from './procs.ts';
import type { Spawned, Usage } from './procs.ts';

export const PROXY_NAMES = ['ours', 'ours-nagle', 'ours-routes', 'ours-pp2', 'ours-resilience', 'ref', 'socat', 'haproxy', 'nginx-stream', 'direct'] as const;
export type ProxyName = (typeof PROXY_NAMES)[number];

/** Flavours of ours that measure what one feature costs against plain `ours`: run on request only. */
export const FLAVOURS: readonly ProxyName[] = ['ours-nagle', 'ours-routes', 'ours-pp2', 'ours-resilience'];

/**
 * What runs when --proxies is not given. The flavours (ours-nagle: --nodelay=no, what
 * TCP_NODELAY costs and saves; ours-routes: three routes, what routing by name costs;
 * ours-pp2: --proxy-protocol=v2, what the header costs; ours-resilience: issue 11's
 * options, what they cost) only when named.
 */
export const DEFAULT_PROXIES: readonly ProxyName[] = PROXY_NAMES.filter((n) => !FLAVOURS.includes(n));

/**
 * The options of `ours-resilience`, as issue 11's performance point sets them: every
 * connection gets a connect timer (cleared when the connect completes), SO_KEEPALIVE with
 * TCP_KEEPIDLE on each TCP socket, and the idle sweep's coarse clock stored on each read;
 * none of them fires during a benchmark.
 */
export const RESILIENCE_OPTIONS: readonly string[] = ['--idle-timeout=1h', '--keepalive=1min', '--connect-timeout=5s'];
let resilienceOptions: readonly string[] = RESILIENCE_OPTIONS;
/** bench/pairs.ts --options: start ours-resilience with some of them only, to see which one costs. */
export function setResilienceOptions(options: readonly string[]): void {
  resilienceOptions = options;
}

/**
 * Where a proxy forwards to. `ppPort`/`ppPath`: the same backend listening where it expects a
 * PROXY protocol header (nginx `listen ... proxy_protocol`), for the proxies that send one; a
 * target without it cannot be measured with them (a plain backend would take the header for
 * the request).
 */
export type Target = { kind: 'tcp'; port: number; ppPort?: number } | { kind: 'unix'; path: string; ppPath?: string };

export const REPO = path.resolve(import.meta.dirname, '..');
export const OURS_CLI = path.join(REPO, 'dist', 'cli.js');
export const REF_BIN = '/lib/systemd/systemd-socket-proxyd';
const NGINX_STREAM_MODULE = '/usr/lib/nginx/modules/ngx_stream_module.so';

export interface RunningProxy {
  name: ProxyName;
  /** where clients connect: 127.0.0.1:port (for "direct" with a UNIX backend, see unixPath) */
  port: number;
  unixPath?: string;
  pid: number;
  usage: () => Usage;
  alive: () => boolean;
  log: () => string;
  stop: () => Promise<void>;
}

export interface ProxyDef {
  name: ProxyName;
  activated: boolean;
  /** sends a PROXY protocol header first: needs a Target with ppPort/ppPath */
  proxyProtocol?: boolean;
  /** why it cannot run here, or null */
  unavailable: () => string | null;
  start: (target: Target, dir: string, connMax: number) => Promise<RunningProxy>;
}

function targetArg(t: Target): string {
  return t.kind === 'tcp' ? `127.0.0.1:${t.port}` : t.path;
}

function wrap(name: ProxyName, s: Spawned, port: number, tree: boolean): RunningProxy {
  return {
    name,
    port,
    pid: s.pid,
    usage: () => sampleUsage(s.pid, tree),
    alive: () => s.child.exitCode === null && s.child.signalCode === null,
    log: () => {
      const how = s.child.signalCode !== null ? `[killed by ${s.child.signalCode}] ` : s.child.exitCode !== null ? `[exit status ${s.child.exitCode}] ` : '';
      return how + (s.stdout() + s.stderr()).slice(-2000);
    },
    stop: () => s.stop(1000),
  };
}

async function started(name: ProxyName, s: Spawned, port: number, tree: boolean): Promise<RunningProxy> {
  if (!(await waitTcpListening(port, 5000))) {
    await s.stop(100);
    throw new Error(`${name} did not listen on 127.0.0.1:${port}: ${(s.stdout() + s.stderr()).slice(-500)}`);
  }
  return wrap(name, s, port, tree);
}

// With `--profile`, ours (and its flavours) run under `node --cpu-prof`; its SIGTERM handler
// exits through process.exit(), which writes the profile.
let profileDir: string | null = null;
export function setProfileDir(dir: string | null): void {
  profileDir = dir;
}

/** Ours (or a flavour of it: `options` before the target arguments `args`), socket-activated. */
async function startOurs(name: ProxyName, connMax: number, options: readonly string[], args: readonly string[], env: NodeJS.ProcessEnv = {}): Promise<RunningProxy> {
  const prof = profileDir === null ? [] : ['--cpu-prof', `--cpu-prof-dir=${profileDir}`];
  const s = await startActivated([process.execPath, ...prof, OURS_CLI, '-c', String(connMax), ...options, ...args], env);
  const p = wrap(name, s, s.port, false);
  // writing a profile takes a while
  return profileDir === null ? p : { ...p, stop: () => s.stop(10000) };
}

const ours: ProxyDef = {
  name: 'ours',
  activated: true,
  unavailable: () => (existsSync(OURS_CLI) ? null : `${path.relative(REPO, OURS_CLI)} not built (npm run build)`),
  start: (t, _dir, connMax) => startOurs('ours', connMax, [], [targetArg(t)]),
};

/** Ours with TCP_NODELAY off, as the reference runs: what the option costs and what it saves. */
const oursNagle: ProxyDef = {
  name: 'ours-nagle',
  activated: true,
  unavailable: ours.unavailable,
  start: (t, _dir, connMax) => startOurs('ours-nagle', connMax, ['--nodelay=no'], [targetArg(t)]),
};

/**
 * Ours with three routes (issue 12): the activated socket is named "web" (LISTEN_FDNAMES) and
 * takes route web=TARGET; routes db= and cache= have sockets of their own (--listen=NAME=,
 * idle). Every connection then goes through a route of a multi-route proxy (prefixed log
 * functions, per-route counters): against "ours" (one route), what routing costs.
 */
const oursRoutes: ProxyDef = {
  name: 'ours-routes',
  activated: true,
  unavailable: ours.unavailable,
  start: (t, _dir, connMax) => {
    const target = targetArg(t);
    const options = ['--listen=db=127.0.0.1:0', '--listen=cache=127.0.0.1:0'];
    return startOurs('ours-routes', connMax, options, [`web=${target}`, `db=${target}`, `cache=${target}`], { LISTEN_FDNAMES: 'web' });
  },
};

/** The Target's PROXY-protocol address, or null when the backend has none. */
export function ppTargetArg(t: Target): string | null {
  if (t.kind === 'tcp') return t.ppPort === undefined ? null : `127.0.0.1:${t.ppPort}`;
  return t.ppPath === undefined ? null : t.ppPath;
}

/**
 * Ours with --proxy-protocol=v2 (issue 10), in front of the same nginx listening with
 * `proxy_protocol`: against "ours" to the plain listener, what one header per connection costs.
 */
const oursPp2: ProxyDef = {
  name: 'ours-pp2',
  activated: true,
  proxyProtocol: true,
  unavailable: ours.unavailable,
  start: (t, _dir, connMax) => {
    const target = ppTargetArg(t);
    if (target === null) throw new Error('needs a backend that expects the PROXY protocol');
    return startOurs('ours-pp2', connMax, ['--proxy-protocol=v2'], [target]);
  },
};

/** Ours with --idle-timeout=1h --keepalive=1min --connect-timeout=5s (issue 11): what they cost. */
const oursResilience: ProxyDef = {
  name: 'ours-resilience',
  activated: true,
  unavailable: ours.unavailable,
  start: (t, _dir, connMax) => startOurs('ours-resilience', connMax, resilienceOptions, [targetArg(t)]),
};

const ref: ProxyDef = {
  name: 'ref',
  activated: true,
  unavailable: () => (existsSync(REF_BIN) ? null : `${REF_BIN} not installed`),
  start: async (t, _dir, connMax) => {
    const s = await startActivated([REF_BIN, '-c', String(connMax), targetArg(t)]);
    return wrap('ref', s, s.port, false);
  },
};

const socat: ProxyDef = {
  name: 'socat',
  activated: false,
  unavailable: () => (which('socat') ? null : 'socat not installed (bench/setup.sh)'),
  start: async (t) => {
    const port = await freePort();
    const to = t.kind === 'tcp' ? `TCP:127.0.0.1:${t.port}` : `UNIX-CONNECT:${t.path}`;
    // -b: socat's default 8 KiB transfer buffer would make it a strawman in the bulk tests.
    const s = start('socat', ['-b', '131072', `TCP-LISTEN:${port},bind=127.0.0.1,reuseaddr,fork,backlog=4096`, to]);
    // per-connection children: measure the whole tree (reaped children via cutime/cstime)
    return started('socat', s, port, true);
  },
};

const haproxy: ProxyDef = {
  name: 'haproxy',
  activated: false,
  unavailable: () => (which('haproxy') ? null : 'haproxy not installed (bench/setup.sh)'),
  start: async (t, dir) => {
    const port = await freePort();
    const cfg = path.join(dir, `haproxy-${port}.cfg`);
    const server = t.kind === 'tcp' ? `127.0.0.1:${t.port}` : t.path;
    writeFileSync(
      cfg,
      [
        'global',
        '  maxconn 9000', // 2 fds per connection: fits the 20,000 hard fd limit
        '  nbthread 1', // single-threaded like the reference and ours
        'defaults',
        '  mode tcp',
        '  timeout connect 5s',
        '  timeout client 600s',
        '  timeout server 600s',
        'listen bench',
        `  bind 127.0.0.1:${port}`,
        '  maxconn 9000',
        `  server s1 ${server} maxconn 9000`,
        '',
      ].join('\n'),
    );
    const s = start(which('haproxy') ?? 'haproxy', ['-db', '-q', '-f', cfg]);
    return started('haproxy', s, port, true);
  },
};

const nginxStream: ProxyDef = {
  name: 'nginx-stream',
  activated: false,
  unavailable: () => {
    if (!which('nginx')) return 'nginx not installed (bench/setup.sh)';
    if (!existsSync(NGINX_STREAM_MODULE)) return 'libnginx-mod-stream not installed (bench/setup.sh)';
    return null;
  },
  start: async (t, dir) => {
    const port = await freePort();
    const cfg = path.join(dir, `nginx-stream-${port}.conf`);
    const upstream = t.kind === 'tcp' ? `127.0.0.1:${t.port}` : `unix:${t.path}`;
    writeFileSync(
      cfg,
      [
        `load_module ${NGINX_STREAM_MODULE};`,
        'daemon off;',
        'master_process off;', // one process: the worker is the one measured
        'worker_processes 1;',
        'worker_rlimit_nofile 20000;',
        `pid ${dir}/nginx-stream-${port}.pid;`,
        `error_log ${dir}/nginx-stream-${port}.log warn;`,
        'events { worker_connections 19000; }',
        'stream {',
        '  server {',
        `    listen 127.0.0.1:${port} backlog=4096;`,
        `    proxy_pass ${upstream};`,
        '    proxy_connect_timeout 5s;',
        '    proxy_timeout 600s;',
        '  }',
        '}',
        '',
      ].join('\n'),
    );
    const s = start(which('nginx') ?? 'nginx', ['-p', dir, '-e', `${dir}/nginx-stream-${port}.log`, '-c', cfg]);
    return started('nginx-stream', s, port, true);
  },
};

/** No proxy: the client talks to the backend itself. A baseline for what the machine can do. */
const direct: ProxyDef = {
  name: 'direct',
  activated: false,
  unavailable: () => null,
  start: async (t) => ({
    name: 'direct',
    port: t.kind === 'tcp' ? t.port : 0,
    ...(t.kind === 'unix' ? { unixPath: t.path } : {}),
    pid: 0,
    usage: () => ({ cpuSec: 0, minflt: 0, rssKiB: 0, procs: 0 }),
    alive: () => true,
    log: () => '',
    stop: async () => {},
  }),
};

export const PROXIES: Record<ProxyName, ProxyDef> = {
  ours,
  'ours-nagle': oursNagle,
  'ours-routes': oursRoutes,
  'ours-pp2': oursPp2,
  'ours-resilience': oursResilience,
  ref,
  socat,
  haproxy,
  'nginx-stream': nginxStream,
  direct,
};

export function refVersion(): string {
  try {
    return execFileSync(REF_BIN, ['--version']).toString().split('\n')[0]?.trim() ?? '?';
  } catch {
    return 'not installed';
  }
}
