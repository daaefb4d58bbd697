// UDP forwarding (issue 14): request/response round trips per second and latency over 1 and 64
// flows, the proxy's CPU per datagram, and RSS per idle flow at 10,000 flows, for ours against
// nginx's stream module (`listen ... udp`, one worker) and socat in the same run, all in front of
// the same UDP echo backend. `direct` (no proxy) is the baseline of what the machine can do. The
// reference refuses datagram sockets ("Passed in socket is not a stream socket."), so it has no row.
//
//   node bench/udp.ts [--runs N] [--seconds S] [--idle-flows N] [--node-path] [--no-write]   (npm run build first)
//
// Ours forwards established flows with its native addon (native/udp_flows.c). --node-path adds a
// column `ours-node`: ours with SOCKET_PROXYD_NATIVE_UDP=0, Node's UDP handles (the fallback where
// the addon does not load), so that what the addon buys is measured in the same run.
//
// The load side is bench/udptool.c (compiled here with cc into bench/out/), so that it stays cheap
// on the 2 shared cores: FLOWS connected client sockets, each a closed loop of one 64-byte datagram
// and its echo; a datagram not answered in 200 ms is lost and sent again with a new sequence number.
// Ours is started by socket activation with a UDP socket as fd 3 (as ListenDatagram= does); nginx
// and socat bind their own 127.0.0.1 port. The proxies alternate in each run (the order rotates),
// so slow drift in the machine's other load hits all alike; cells are medians over the runs.
//
// Prints a markdown block and writes it into bench/RESULTS.md (bench/run.ts keeps that block).
// Bounded: every tool run has a hard limit, the whole script stops after 300 s.
import { execFileSync } from 'node:child_process';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import os, { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { ACTIVATE_SCRIPT, foreignLoad, freePort, installCleanupHandlers, killAll, runBounded, sampleUsage, start, which, type Spawned } from './procs.ts';
import { OURS_CLI, REPO } from './proxies.ts';

const args = process.argv.slice(2);
const opt = (name: string, dflt: number): number => {
  const i = args.indexOf(name);
  return i === -1 ? dflt : Number(args[i + 1]);
};
const RUNS = opt('--runs', 3);
const SECONDS = opt('--seconds', 2);
const IDLE_FLOWS = opt('--idle-flows', 10_000);
const NODE_PATH = args.includes('--node-path');
/** socat forks a process per flow: 10,000 processes would be measuring fork, not forwarding. */
const SOCAT_IDLE_FLOWS = Math.min(IDLE_FLOWS, 1000);
const SIZE = 64;
const NGINX_STREAM_MODULE = '/usr/lib/nginx/modules/ngx_stream_module.so';

installCleanupHandlers();
const overall = setTimeout(() => {
  console.error('bench/udp.ts: over 300 s, giving up');
  killAll();
  process.exit(2);
}, 300_000);

const TOOL_SRC = path.join(REPO, 'bench', 'udptool.c');
const TOOL = path.join(REPO, 'bench', 'out', 'udptool');
if (!existsSync(TOOL) || statSync(TOOL).mtimeMs < statSync(TOOL_SRC).mtimeMs) {
  mkdirSync(path.dirname(TOOL), { recursive: true });
  execFileSync('cc', ['-O2', '-Wall', '-o', TOOL, TOOL_SRC], { stdio: 'inherit' });
}

type Name = 'ours' | 'ours-node' | 'nginx-stream' | 'socat' | 'direct';
interface Running {
  name: Name;
  port: number;
  /** The process whose CPU and RSS are the proxy's (none for direct). */
  pid: number | null;
  /** socat: a process per flow, measured as the whole tree. */
  tree: boolean;
  proc: Spawned | null;
}

/** The UDPWrap under a dgram socket (its fd is handed to ours as fd 3). */
function udpFd(s: UdpSocket): number {
  const key = Object.getOwnPropertySymbols(s).find((k) => k.description === 'state symbol');
  const state = key === undefined ? undefined : (s as unknown as Record<symbol, { handle?: { fd: number; recvStop(): number } }>)[key];
  if (state?.handle === undefined) throw new Error('no UDP handle');
  state.handle.recvStop();
  return state.handle.fd;
}

async function startOurs(echoPort: number, nodePath = false): Promise<Running> {
  const sock = createSocket('udp4');
  await new Promise<void>((resolve) => sock.bind(0, '127.0.0.1', resolve));
  const port = sock.address().port;
  const fd = udpFd(sock);
  const proc = start('/bin/sh', ['-c', ACTIVATE_SCRIPT, 'sh', process.execPath, OURS_CLI, '-c', '100000', `127.0.0.1:${echoPort}`], {
    stdio: ['ignore', 'pipe', 'pipe', fd],
    env: { ...process.env, LISTEN_FDS: '1', ...(nodePath ? { SOCKET_PROXYD_NATIVE_UDP: '0' } : {}) },
  });
  sock.close();
  return { name: nodePath ? 'ours-node' : 'ours', port, pid: proc.pid, tree: false, proc };
}

async function startNginx(echoPort: number, dir: string): Promise<Running> {
  const port = await freePort();
  const cfg = path.join(dir, `nginx-udp-${port}.conf`);
  writeFileSync(
    cfg,
    [
      `load_module ${NGINX_STREAM_MODULE};`,
      'daemon off;',
      'master_process off;', // one process: the worker is the one measured
      'worker_processes 1;',
      'worker_rlimit_nofile 20000;',
      `pid ${dir}/nginx-udp-${port}.pid;`,
      `error_log ${dir}/nginx-udp-${port}.log crit;`,
      // A UDP session takes two connections (the client's pseudo-connection and the upstream one).
      'events { worker_connections 25000; }',
      'stream {',
      '  server {',
      `    listen 127.0.0.1:${port} udp;`,
      `    proxy_pass 127.0.0.1:${echoPort};`,
      '    proxy_timeout 600s;', // sessions last like our flows (default 60 s idle, longer than a run)
      '  }',
      '}',
      '',
    ].join('\n'),
  );
  const proc = start(which('nginx') ?? 'nginx', ['-p', dir, '-e', `${dir}/nginx-udp-${port}.log`, '-c', cfg]);
  return { name: 'nginx-stream', port, pid: proc.pid, tree: false, proc };
}

async function startSocat(echoPort: number): Promise<Running> {
  const port = await freePort();
  // UDP-LISTEN with fork: a child per client address, connected to it, and its own socket to the target.
  const proc = start(which('socat') ?? 'socat', [`UDP4-LISTEN:${port},bind=127.0.0.1,fork,reuseaddr`, `UDP4:127.0.0.1:${echoPort}`]);
  return { name: 'socat', port, pid: proc.pid, tree: true, proc };
}

interface LoadResult {
  roundTrips: number;
  perSec: number;
  p50us: number;
  p99us: number;
  maxUs: number;
  lost: number;
  stale: number;
  cpuUsPerDatagram: number;
  foreign: number;
}

async function load(r: Running, flows: number): Promise<LoadResult> {
  const u0 = r.pid === null ? 0 : sampleUsage(r.pid, r.tree).cpuSec;
  const fl = foreignLoad();
  const out = await runBounded(TOOL, ['load', String(r.port), String(flows), String(SECONDS), String(SIZE)], (SECONDS + 15) * 1000);
  const foreign = fl.stop();
  const cpu = r.pid === null ? NaN : sampleUsage(r.pid, r.tree).cpuSec - u0;
  const j = JSON.parse(out.stdout.trim().split('\n').at(-1) ?? '{}') as Omit<LoadResult, 'cpuUsPerDatagram' | 'foreign'>;
  if (typeof j.roundTrips !== 'number') throw new Error(`udptool load: ${out.stdout}${out.stderr}`);
  // Each round trip is two datagrams through the proxy: the request and the echo.
  return { ...j, cpuUsPerDatagram: j.roundTrips > 0 ? (cpu / (2 * j.roundTrips)) * 1e6 : NaN, foreign };
}

/** RSS per idle flow: flows opened by `udptool idle`, held while the RSS is read. */
async function idleRss(r: Running, flows: number): Promise<{ kib: number; served: number }> {
  const pid = r.pid as number;
  // One flow first, so that the baseline holds what serving a flow at all costs.
  await runBounded(TOOL, ['load', String(r.port), '1', '0.2', String(SIZE)], 10_000);
  await sleep(500);
  const before = sampleUsage(pid, r.tree).rssKiB;
  // socat misdelivers some first datagrams (a new client's datagram can reach a child's socket): it
  // never serves them all, so it gets a shorter deadline.
  const idle = start(TOOL, ['idle', String(r.port), String(flows), r.name === 'socat' ? '15' : '60'], { stdio: ['pipe', 'pipe', 'pipe'] });
  const deadline = Date.now() + 90_000;
  while (!/READY/.test(idle.stdout()) && Date.now() < deadline && idle.child.exitCode === null) await sleep(100);
  const served = Number(/READY (\d+)/.exec(idle.stdout())?.[1] ?? 0);
  await sleep(1000);
  const after = sampleUsage(pid, r.tree).rssKiB;
  idle.child.stdin?.end();
  await idle.stop(2000);
  return { kib: served > 0 ? (after - before) / served : NaN, served };
}

function median(xs: number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return NaN;
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

const have = {
  nginx: which('nginx') !== null && existsSync(NGINX_STREAM_MODULE),
  socat: which('socat') !== null,
};
const names: Name[] = ['ours', ...(NODE_PATH ? (['ours-node'] as const) : []), ...(have.nginx ? (['nginx-stream'] as const) : []), ...(have.socat ? (['socat'] as const) : []), 'direct'];

const dir = mkdtempSync(path.join(tmpdir(), 'spd-bench-udp-'));
const echo = start(TOOL, ['echo'], { stdio: ['pipe', 'pipe', 'pipe'] });
for (let i = 0; i < 50 && !/READY/.test(echo.stdout()); i++) await sleep(20);
const echoPort = Number(/READY (\d+)/.exec(echo.stdout())?.[1]);
if (!(echoPort > 0)) throw new Error(`udptool echo: ${echo.stderr()}`);

const startOne = async (name: Name): Promise<Running> => {
  switch (name) {
    case 'ours':
      return startOurs(echoPort);
    case 'ours-node':
      return startOurs(echoPort, true);
    case 'nginx-stream':
      return startNginx(echoPort, dir);
    case 'socat':
      return startSocat(echoPort);
    case 'direct':
      return { name, port: echoPort, pid: null, tree: false, proc: null };
  }
};

const results = new Map<string, LoadResult[]>();
const idleResults = new Map<Name, { kib: number; served: number }>();
const loads: number[] = [];
try {
  const running = new Map<Name, Running>();
  for (const n of names) running.set(n, await startOne(n));
  await sleep(1000);
  // Warm-up: each proxy, both loads, briefly (JIT, socket buffers, nginx's pools).
  for (const r of running.values()) for (const flows of [1, 64]) await runBounded(TOOL, ['load', String(r.port), String(flows), '0.5', String(SIZE)], 10_000);
  for (let run = 0; run < RUNS; run++) {
    const order = names.map((_, i) => names[(i + run) % names.length] as Name);
    for (const n of order) {
      for (const flows of [1, 64]) {
        const res = await load(running.get(n) as Running, flows);
        loads.push(res.foreign);
        const key = `${n}/${flows}`;
        results.set(key, [...(results.get(key) ?? []), res]);
        console.error(`run ${run + 1}/${RUNS} ${key}: ${res.perSec.toFixed(0)} rt/s, p99 ${res.p99us} µs, ${res.cpuUsPerDatagram.toFixed(1)} µs CPU/datagram, lost ${res.lost}, stale ${res.stale}, other load ${res.foreign.toFixed(2)}`);
      }
    }
  }
  for (const r of running.values()) await r.proc?.stop(500);
  // Idle flows: a fresh proxy each, one at a time.
  for (const n of names) {
    if (n === 'direct') continue;
    const r = await startOne(n);
    await sleep(500);
    const res = await idleRss(r, n === 'socat' ? SOCAT_IDLE_FLOWS : IDLE_FLOWS);
    idleResults.set(n, res);
    console.error(`idle ${n}: ${res.kib.toFixed(2)} KiB per flow, ${res.served} flows served`);
    await r.proc?.stop(500);
  }
} finally {
  echo.child.stdin?.end();
  await echo.stop(500);
  rmSync(dir, { recursive: true, force: true });
  clearTimeout(overall);
}

const cell = (n: Name, flows: number, pick: (r: LoadResult) => number, digits: number): string => {
  const v = median((results.get(`${n}/${flows}`) ?? []).map(pick));
  return Number.isFinite(v) ? v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits }) : '–';
};
const med = (n: Name, flows: number, pick: (r: LoadResult) => number): number => median((results.get(`${n}/${flows}`) ?? []).map(pick));
const sum = (n: Name, flows: number, pick: (r: LoadResult) => number): number => (results.get(`${n}/${flows}`) ?? []).reduce((a, r) => a + pick(r), 0);
const proxies = names.filter((n) => n !== 'direct' && n !== 'ours-node');
const header = `| | ${names.join(' | ')} | ours/nginx |`;
const sep = `| --- | ${names.map(() => '---:').join(' | ')} | ---: |`;
const ratio = (flows: number, pick: (r: LoadResult) => number): string => {
  const o = med('ours', flows, pick);
  const g = med('nginx-stream', flows, pick);
  return Number.isFinite(o) && Number.isFinite(g) && g > 0 ? (o / g).toFixed(2) : '–';
};
const rows: string[] = [];
for (const flows of [1, 64]) {
  rows.push(`| ${flows} flow${flows === 1 ? '' : 's'}: round trips/s | ${names.map((n) => cell(n, flows, (r) => r.perSec, 0)).join(' | ')} | ${ratio(flows, (r) => r.perSec)} |`);
  rows.push(`| ${flows} flow${flows === 1 ? '' : 's'}: latency p50 µs | ${names.map((n) => cell(n, flows, (r) => r.p50us, 0)).join(' | ')} | ${ratio(flows, (r) => r.p50us)} |`);
  rows.push(`| ${flows} flow${flows === 1 ? '' : 's'}: latency p99 µs | ${names.map((n) => cell(n, flows, (r) => r.p99us, 0)).join(' | ')} | ${ratio(flows, (r) => r.p99us)} |`);
  rows.push(`| ${flows} flow${flows === 1 ? '' : 's'}: proxy CPU µs/datagram | ${names.map((n) => (n === 'direct' ? '–' : cell(n, flows, (r) => r.cpuUsPerDatagram, 1))).join(' | ')} | ${ratio(flows, (r) => r.cpuUsPerDatagram)} |`);
  rows.push(`| ${flows} flow${flows === 1 ? '' : 's'}: lost / stale replies (all runs) | ${names.map((n) => `${sum(n, flows, (r) => r.lost)} / ${sum(n, flows, (r) => r.stale)}`).join(' | ')} | |`);
}
const idleCell = (n: Name): string => {
  const r = idleResults.get(n);
  return r === undefined ? '–' : `${r.kib.toFixed(2)} (${r.served.toLocaleString('en-US')} flows)`;
};
rows.push(`| idle flows: proxy RSS KiB per flow | ${names.map((n) => (n === 'direct' ? '–' : idleCell(n))).join(' | ')} | ${(() => {
  const o = idleResults.get('ours')?.kib;
  const g = idleResults.get('nginx-stream')?.kib;
  return o !== undefined && g !== undefined && g > 0 ? (o / g).toFixed(2) : '–';
})()} |`);
const oursRt = [1, 64].map((f) => med('ours', f, (r) => r.perSec) / med('nginx-stream', f, (r) => r.perSec));
const when = new Date().toISOString().replace(/\.\d+Z$/, 'Z');
const lines = [
  '### 10. UDP: round trips through the proxy to a UDP echo (issue 14)',
  '',
  `Measured ${when} by \`node bench/udp.ts --runs ${RUNS} --seconds ${SECONDS} --idle-flows ${IDLE_FLOWS}${NODE_PATH ? ' --node-path' : ''}\` (${os.availableParallelism()} cores, ${os.release()}). ` +
    `bench/udptool.c: 1 or 64 client sockets (one flow each), each a closed loop of one ${SIZE}-byte datagram and its echo, ${SECONDS} s per measurement, ${RUNS} runs (the order of the proxies rotates); cells are medians. ` +
    `Ours by socket activation with a UDP socket as fd 3 (\`-c 100000\`, default 60 s flow idle timeout), established flows forwarded by its native addon (native/udp_flows.c)` +
    (NODE_PATH ? '; ours-node is the same with `SOCKET_PROXYD_NATIVE_UDP=0`: Node\'s UDP handles, the fallback where the addon does not load' : '') +
    `; nginx ${'`'}stream { listen ... udp; proxy_timeout 600s; }${'`'}, 1 worker, master_process off; ` +
    `socat \`UDP4-LISTEN:PORT,fork,reuseaddr UDP4:TARGET\` (a process per client address, measured as the whole tree). systemd-socket-proxyd refuses datagram sockets, so it has no column. ` +
    `Idle: ${IDLE_FLOWS.toLocaleString('en-US')} flows opened (one datagram each, echoed) and held, RSS 1 s later minus RSS after one flow, per flow${have.socat ? `; socat with ${SOCAT_IDLE_FLOWS.toLocaleString('en-US')} (a process each)` : ''}. ` +
    'Target (issue 14): round trips/s ahead of nginx.',
  '',
  header,
  sep,
  ...rows,
  '',
  `- Round trips/s, ours/nginx: ${oursRt.map((x) => x.toFixed(2)).join(' (1 flow), ')} (64 flows): target ${oursRt.every((x) => x >= 1) ? 'met' : '**not met**'}.`,
  `- "lost" is a datagram not answered within 200 ms (sent again); "stale" a reply that was not to the flow's latest datagram (late, duplicated or delivered to the wrong client).`,
  `- Other load on the machine during the measurements: median ${median(loads).toFixed(2)} cores (max ${Math.max(...loads).toFixed(2)}) of ${os.availableParallelism()}` +
    (median(loads) > 0.25 ? ': the machine was shared; CPU per datagram is the steadier guide.' : '.'),
  ...(proxies.length < 3 ? [`- Not measured: ${['nginx-stream', 'socat'].filter((n) => !names.includes(n as Name)).join(', ')} (not installed: bench/setup.sh).`] : []),
];
const block = ['<!-- bench:udp -->', ...lines, '<!-- /bench:udp -->'].join('\n');
console.log(lines.join('\n'));
if (!args.includes('--no-write')) {
  const file = path.join(REPO, 'bench', 'RESULTS.md');
  const old = existsSync(file) ? readFileSync(file, 'utf8') : '';
  const a = old.indexOf('<!-- bench:udp -->');
  const b = old.indexOf('<!-- /bench:udp -->');
  const out = a >= 0 && b > a ? old.slice(0, a) + block + old.slice(b + '<!-- /bench:udp -->'.length) : `${old.trimEnd()}\n\n${block}\n`;
  writeFileSync(file, out);
  console.error(`written to ${file}`);
}
process.exit(0);
