/**
 * --metrics=ADDRESS: the Prometheus text exposition format (version 0.0.4) at
 * GET /metrics, on TCP or a UNIX socket. Loaded with a dynamic import only when the
 * option is given, so it imports nothing but builtins (scripts/bundle-cli.ts: our
 * other modules would be loaded twice) and types.
 *
 * Written by hand rather than with prom-client (15.1.3), on measurement and correctness:
 * - cost per scrape: rendering our families plus process_* took 80-180 µs here against
 *   560-620 µs for prom-client's registry with the same counters and its default metrics
 *   (same machine, same minute; shared 2 cores), and a scrape runs on the thread that
 *   forwards. prom-client's process_* come with its collectDefaultMetrics(), which
 *   also brings the nodejs_* families (31 in all, 7.9 KB of text against our 2.5 KB).
 * - it would be our first runtime dependency (4 packages, 4.6 MB), and every counter
 *   would live twice (ours on the data path, its copy filled at collect time).
 * - correctness is the format's, which is small: HELP/TYPE per family, `_total`
 *   counters, label escaping; `promtool check metrics` passes (test/ops.test.ts), and
 *   process_* follow client_golang's definitions (names, units, types).
 *
 * Nothing happens between scrapes: the text is built from the live counters when a
 * request arrives. The endpoint is for a scraper on loopback or a UNIX socket, not
 * for the world; it answers GET and HEAD on /metrics, 404 elsewhere, 405 for other
 * methods, and bounds what a client can hold (connections, header and request time).
 */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Address } from '../config/address.ts';
import type { Stats } from './stats.ts';

/** One set of counters; `route` labels it once the proxy has several routes (null: none). */
export interface MetricsSample {
  readonly route: string | null;
  readonly stats: Stats;
  readonly open: number;
  /** Datagram flows open now. */
  readonly flows?: number;
  /** Client connections waiting for their backend now (--connect-retry=), counted in `open` too. */
  readonly waiting?: number;
}

export interface MetricsSource {
  readonly connectionsMax: number;
  readonly collect: () => MetricsSample[];
}

const CONTENT_TYPE = 'text/plain; version=0.0.4; charset=utf-8';
/** A scraper needs one connection; this bounds what anything else can take. */
const MAX_CONNECTIONS = 16;
const TIMEOUT_MS = 10_000;

const kSource = Symbol('socket-proxyd.metrics-source');

interface MetricsServer extends Server {
  [kSource]: MetricsSource;
}

/** process_start_time_seconds: fixed at start (as prom-client: now minus uptime). */
const START_TIME_SECONDS = Date.now() / 1000 - process.uptime();

/**
 * Listen on `address` and serve until the process exits. Resolves with the address
 * actually bound (port 0 picks one), rejects with the listen error.
 */
export function startMetricsServer(address: Address, source: MetricsSource): Promise<string> {
  const server = createServer(onRequest) as MetricsServer;
  server[kSource] = source;
  server.maxConnections = MAX_CONNECTIONS;
  server.headersTimeout = TIMEOUT_MS;
  server.requestTimeout = TIMEOUT_MS;
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.once('listening', () => {
      server.removeListener('error', reject);
      // After start-up a failing client connection must never take the proxy down.
      server.on('error', ignore);
      server.on('clientError', onClientError);
      const bound = server.address();
      resolve(
        typeof bound === 'string' || bound === null
          ? address.text
          : bound.family === 'IPv6'
            ? `[${bound.address}]:${bound.port}`
            : `${bound.address}:${bound.port}`,
      );
    });
    if (address.kind === 'unix') server.listen({ path: address.path });
    else server.listen({ host: address.host, port: address.port, ipv6Only: false });
  });
}

function ignore(): void {}

function onClientError(_err: Error, socket: { destroy(): void }): void {
  socket.destroy();
}

function onRequest(this: MetricsServer, req: IncomingMessage, res: ServerResponse): void {
  const url = req.url ?? '';
  const q = url.indexOf('?');
  const path = q === -1 ? url : url.slice(0, q);
  if (path !== '/metrics') {
    reply(res, 404, 'text/plain; charset=utf-8', 'Not Found. Metrics are at /metrics.\n');
    return;
  }
  if (req.method !== 'GET' && req.method !== 'HEAD') {
    res.setHeader('Allow', 'GET, HEAD');
    reply(res, 405, 'text/plain; charset=utf-8', 'Method Not Allowed.\n');
    return;
  }
  const body = renderMetrics(this[kSource]);
  if (req.method === 'HEAD') {
    res.writeHead(200, { 'Content-Type': CONTENT_TYPE, 'Content-Length': Buffer.byteLength(body) });
    res.end();
    return;
  }
  reply(res, 200, CONTENT_TYPE, body);
}

function reply(res: ServerResponse, status: number, type: string, body: string): void {
  res.writeHead(status, { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) });
  res.end(body);
}

/** One metric family: HELP, TYPE and its samples. */
function family(name: string, type: 'counter' | 'gauge', help: string, samples: string[]): string {
  return `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${samples.join('')}`;
}

function labels(route: string | null, extra = ''): string {
  const parts: string[] = [];
  if (route !== null) parts.push(`route="${escapeLabel(route)}"`);
  if (extra !== '') parts.push(extra);
  return parts.length === 0 ? '' : `{${parts.join(',')}}`;
}

/** Label values escape backslash, double quote and newline (exposition format). */
function escapeLabel(value: string): string {
  return value.replace(/[\\"\n]/g, (c) => (c === '\n' ? '\\n' : `\\${c}`));
}

/** The whole exposition, built from the live counters. */
export function renderMetrics(source: MetricsSource): string {
  const samples = source.collect();
  const per = (name: string, value: (s: MetricsSample) => number, extra = ''): string[] =>
    samples.map((s) => `${name}${labels(s.route, extra)} ${value(s)}\n`);
  const P = 'socket_proxyd_';
  return [
    family(`${P}connections_open`, 'gauge', 'Client connections open now (backend connecting or connected).', per(`${P}connections_open`, (s) => s.open)),
    family(
      `${P}connections_waiting`,
      'gauge',
      'Client connections waiting for the backend to listen (--connect-retry=), included in connections_open.',
      per(`${P}connections_waiting`, (s) => s.waiting ?? 0),
    ),
    family(`${P}connections_max`, 'gauge', 'Connections allowed open at once (--connections-max=).', [`${P}connections_max ${source.connectionsMax}\n`]),
    family(`${P}connections_accepted_total`, 'counter', 'Client connections accepted and forwarded.', per(`${P}connections_accepted_total`, (s) => s.stats.accepted)),
    family(
      `${P}connections_refused_total`,
      'counter',
      'Client connections closed at once because --connections-max= connections were open.',
      per(`${P}connections_refused_total`, (s) => s.stats.refused),
    ),
    family(
      `${P}backend_connect_failures_total`,
      'counter',
      'Client connections closed because the backend could not be resolved or connected to.',
      per(`${P}backend_connect_failures_total`, (s) => s.stats.backendFailures),
    ),
    family(`${P}datagram_flows_open`, 'gauge', 'Datagram flows open now (one per client address).', per(`${P}datagram_flows_open`, (s) => s.flows ?? 0)),
    family(`${P}datagram_flows_total`, 'counter', 'Datagram flows opened.', per(`${P}datagram_flows_total`, (s) => s.stats.flows)),
    family(`${P}forwarded_bytes_total`, 'counter', 'Bytes forwarded, by direction (datagram payloads included).', [
      ...per(`${P}forwarded_bytes_total`, (s) => s.stats.bytesToBackend, 'direction="client_to_backend"'),
      ...per(`${P}forwarded_bytes_total`, (s) => s.stats.bytesToClient, 'direction="backend_to_client"'),
    ]),
    processMetrics(),
  ].join('');
}

/**
 * The process_* metrics every Prometheus client library exports, with their names,
 * types and units (client_golang's process collector, prom-client's defaults).
 */
function processMetrics(): string {
  const cpu = process.cpuUsage();
  const user = cpu.user / 1e6;
  const system = cpu.system / 1e6;
  const out = [
    family('process_cpu_user_seconds_total', 'counter', 'Total user CPU time spent in seconds.', [`process_cpu_user_seconds_total ${user}\n`]),
    family('process_cpu_system_seconds_total', 'counter', 'Total system CPU time spent in seconds.', [`process_cpu_system_seconds_total ${system}\n`]),
    family('process_cpu_seconds_total', 'counter', 'Total user and system CPU time spent in seconds.', [`process_cpu_seconds_total ${user + system}\n`]),
    family('process_start_time_seconds', 'gauge', 'Start time of the process since unix epoch in seconds.', [
      `process_start_time_seconds ${Math.round(START_TIME_SECONDS)}\n`,
    ]),
    family('process_resident_memory_bytes', 'gauge', 'Resident memory size in bytes.', [`process_resident_memory_bytes ${process.memoryUsage.rss()}\n`]),
  ];
  // Linux only, as in the client libraries: /proc. Each is read as cheaply as it can be,
  // since a scrape runs on the thread that forwards (bench/RESULTS.md: the cost of scrapes).
  const vm = virtualMemoryBytes();
  if (vm !== null) {
    out.push(family('process_virtual_memory_bytes', 'gauge', 'Virtual memory size in bytes.', [`process_virtual_memory_bytes ${vm}\n`]));
  }
  const fds = openFds();
  if (fds !== null) out.push(family('process_open_fds', 'gauge', 'Number of open file descriptors.', [`process_open_fds ${fds}\n`]));
  const maxFds = maxOpenFiles();
  if (maxFds !== null) {
    out.push(family('process_max_fds', 'gauge', 'Maximum number of open file descriptors.', [`process_max_fds ${maxFds}\n`]));
  }
  return out.join('');
}

/** vsize, field 23 of /proc/self/stat (bytes), as client_golang reads it. */
function virtualMemoryBytes(): number | null {
  try {
    const stat = readFileSync('/proc/self/stat', 'latin1');
    // Fields after the command name, which may itself hold spaces and parentheses.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const vsize = Number(fields[20]);
    return Number.isFinite(vsize) ? vsize : null;
  } catch {
    return null;
  }
}

/**
 * Since Linux 6.2 the size of /proc/self/fd is the number of open descriptors: one
 * stat() instead of listing the directory, which costs time in proportion to the
 * descriptors (two per connection). Older kernels report 0: list it then, as the
 * client libraries do (that count includes the descriptor the listing itself holds).
 */
function openFds(): number | null {
  try {
    const size = statSync('/proc/self/fd').size;
    return size > 0 ? size : readdirSync('/proc/self/fd').length;
  } catch {
    return null;
  }
}

/** The soft RLIMIT_NOFILE. It rarely changes (prlimit), so it is read at most every 10 s. */
let maxFdsValue: number | null = null;
let maxFdsReadAt = -Infinity;
const MAX_FDS_TTL_MS = 10_000;

function maxOpenFiles(): number | null {
  const now = performance.now();
  if (now - maxFdsReadAt < MAX_FDS_TTL_MS) return maxFdsValue;
  maxFdsReadAt = now;
  try {
    const m = /^Max open files\s+([0-9]+|unlimited)/m.exec(readFileSync('/proc/self/limits', 'latin1'));
    maxFdsValue = m === null || m[1] === 'unlimited' ? null : Number(m[1]);
  } catch {
    maxFdsValue = null;
  }
  return maxFdsValue;
}
