// Process plumbing for the benchmark suite: spawning with guaranteed cleanup, socket activation,
// /proc sampling (CPU, page faults, RSS over a process tree) and small waiting helpers.
import { spawn, execFileSync } from 'node:child_process';
import type { ChildProcess, SpawnOptions } from 'node:child_process';
import { readFileSync, readdirSync, existsSync } from 'node:fs';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

// Every child is spawned `detached`, i.e. as the leader of its own process group, so that killing
// the group also takes down whatever it forked (socat's per-connection children, sh wrappers).
const live = new Set<ChildProcess>();

export function killGroup(child: ChildProcess, signal: NodeJS.Signals = 'SIGKILL'): void {
  if (child.pid === undefined) return;
  try {
    process.kill(-child.pid, signal);
  } catch {
    // already gone
  }
}

const cleanups: (() => void)[] = [];
/** Synchronous work for the end of the run, however it ends (removing the temp directory). */
export function onCleanup(fn: () => void): void {
  cleanups.push(fn);
}

export function killAll(): void {
  for (const c of live) killGroup(c, 'SIGKILL');
  live.clear();
  for (const fn of cleanups.splice(0)) {
    try {
      fn();
    } catch {
      // best effort
    }
  }
}

let handlersInstalled = false;
export function installCleanupHandlers(): void {
  if (handlersInstalled) return;
  handlersInstalled = true;
  // 'exit' handlers must be synchronous: process.kill is.
  process.on('exit', killAll);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.on(sig, () => {
      killAll();
      process.exit(sig === 'SIGINT' ? 130 : 143);
    });
  }
}

export interface Spawned {
  child: ChildProcess;
  pid: number;
  stdout: () => string;
  stderr: () => string;
  exited: Promise<number | null>;
  stop: (graceMs?: number) => Promise<void>;
}

export function start(cmd: string, args: string[], opts: SpawnOptions = {}): Spawned {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'], ...opts, detached: true });
  if (child.pid === undefined) throw new Error(`failed to spawn ${cmd}`);
  live.add(child);
  let out = '';
  let err = '';
  // Keep only the tail: a misbehaving proxy can log a lot (EMFILE warnings in a busy loop).
  child.stdout?.on('data', (d: Buffer) => {
    out = (out + d.toString()).slice(-65536);
  });
  child.stderr?.on('data', (d: Buffer) => {
    err = (err + d.toString()).slice(-65536);
  });
  const exited = new Promise<number | null>((resolve) => {
    child.on('exit', (code, signal) => {
      // Whatever the leader left in its group (socat's per-connection children) goes with it,
      // now, while the group id cannot yet have been reused.
      killGroup(child, 'SIGKILL');
      live.delete(child);
      resolve(code ?? (signal ? 128 : null));
    });
    child.on('error', () => {
      live.delete(child);
      resolve(null);
    });
  });
  const pid = child.pid;
  const stop = async (graceMs = 1000): Promise<void> => {
    if (child.exitCode !== null || child.signalCode !== null) {
      killGroup(child); // reap any leftovers in the group
      return;
    }
    killGroup(child, 'SIGTERM');
    const t = await Promise.race([exited.then(() => 'exited'), sleep(graceMs, 'timeout')]);
    killGroup(child, 'SIGKILL');
    if (t === 'timeout') await Promise.race([exited, sleep(2000)]);
  };
  return { child, pid, stdout: () => out, stderr: () => err, exited, stop };
}

/** A TCP listening socket on 127.0.0.1 owned by the bench, to be handed to a proxy as fd 3. */
export async function listenLoopback(backlog = 4096): Promise<{ server: net.Server; port: number; fd: number }> {
  const server = net.createServer();
  // The bench never accepts on it: the proxy gets the socket before any client connects, and the
  // bench closes its own copy right after spawning.
  server.on('connection', (c) => c.destroy());
  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen({ host: '127.0.0.1', port: 0 }, backlog, () => resolve());
  });
  const addr = server.address();
  if (addr === null || typeof addr === 'string') throw new Error('no address');
  const handle = (server as unknown as { _handle: { fd: number } | null })._handle;
  if (handle === null || typeof handle.fd !== 'number' || handle.fd < 0) throw new Error('no fd on listening handle');
  return { server, port: addr.port, fd: handle.fd };
}

/**
 * Starts `argv` by socket activation: the listening socket becomes fd 3, LISTEN_FDS=1 and
 * LISTEN_PID is the pid of the exec'd program (sh sets it to its own pid and then execs).
 * The soft fd limit is raised to the hard limit for every proxy alike (Node does that by itself;
 * the reference does not). SIGPIPE is ignored, as systemd does for every unit (IgnoreSIGPIPE=yes
 * by default; an ignored signal stays ignored across exec): without that the reference v252 dies
 * of SIGPIPE when it splice()s into a socket whose peer has gone (seen with iperf3 -P 8).
 */
export const ACTIVATE_SCRIPT = 'trap "" PIPE; ulimit -n "$(ulimit -Hn)"; LISTEN_PID=$$ exec "$@"';

export async function startActivated(argv: string[], env: NodeJS.ProcessEnv = {}): Promise<Spawned & { port: number }> {
  const { server, port, fd } = await listenLoopback();
  const s = start('/bin/sh', ['-c', ACTIVATE_SCRIPT, 'sh', ...argv], {
    stdio: ['ignore', 'pipe', 'pipe', fd],
    env: { ...process.env, ...env, LISTEN_FDS: '1' },
  });
  server.close();
  return { ...s, port };
}

// ---------------------------------------------------------------- /proc sampling

let clkTck = 0;
function ticksPerSecond(): number {
  if (clkTck === 0) {
    try {
      clkTck = Number(execFileSync('getconf', ['CLK_TCK']).toString().trim()) || 100;
    } catch {
      clkTck = 100;
    }
  }
  return clkTck;
}

interface StatFields {
  ppid: number;
  minflt: number;
  cminflt: number;
  utime: number;
  stime: number;
  cutime: number;
  cstime: number;
}

function readStat(pid: number): StatFields | null {
  let text: string;
  try {
    text = readFileSync(`/proc/${pid}/stat`, 'utf8');
  } catch {
    return null;
  }
  // comm may contain spaces and parentheses: the fields start after the last ')'.
  const f = text.slice(text.lastIndexOf(')') + 2).split(' ');
  const n = (i: number): number => Number(f[i] ?? 0);
  return { ppid: n(1), minflt: n(7), cminflt: n(8), utime: n(11), stime: n(12), cutime: n(13), cstime: n(14) };
}

function readRssKiB(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** pid and all its live descendants. */
export function processTree(root: number): number[] {
  const children = new Map<number, number[]>();
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    const st = readStat(Number(name));
    if (st === null) continue;
    const list = children.get(st.ppid) ?? [];
    list.push(Number(name));
    children.set(st.ppid, list);
  }
  const out: number[] = [];
  const queue = [root];
  while (queue.length > 0 && out.length < 100000) {
    const p = queue.shift() as number;
    if (!existsSync(`/proc/${p}`)) continue;
    out.push(p);
    for (const c of children.get(p) ?? []) queue.push(c);
  }
  return out;
}

export interface Usage {
  cpuSec: number; // user+system of the tree, plus reaped children (socat's per-connection processes)
  minflt: number;
  rssKiB: number; // summed over the tree
  procs: number;
}

export function sampleUsage(root: number, tree: boolean): Usage {
  const pids = tree ? processTree(root) : [root];
  let ticks = 0;
  let minflt = 0;
  let rssKiB = 0;
  for (const p of pids) {
    const st = readStat(p);
    if (st === null) continue;
    ticks += st.utime + st.stime + st.cutime + st.cstime;
    minflt += st.minflt + st.cminflt;
    rssKiB += readRssKiB(p);
  }
  return { cpuSec: ticks / ticksPerSecond(), minflt, rssKiB, procs: pids.length };
}

/**
 * CPU seconds the process has run, every thread (main, libuv pool, V8 helpers) summed, from
 * /proc/PID/task/TID/schedstat (nanoseconds on the CPU). utime+stime from /proc/PID/stat counts
 * clock ticks (10 ms): over a 2 s measurement of ~0.7 CPU-s that is ±3% per sample, too coarse
 * to compare two runs to within 5%. Threads that exited meanwhile are not counted (a Node
 * process keeps its threads). NaN when unreadable.
 */
export function schedCpuSec(pid: number): number {
  let ns = 0;
  try {
    for (const tid of readdirSync(`/proc/${pid}/task`)) {
      try {
        ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
      } catch {
        // the thread exited between readdir and read
      }
    }
  } catch {
    return NaN;
  }
  return ns / 1e9;
}

// ---------------------------------------------------------------- waiting

/** Polls /proc/net/tcp for a LISTEN socket on 127.0.0.1:port without connecting to it. */
export async function waitTcpListening(port: number, timeoutMs = 5000): Promise<boolean> {
  const hex = `:${port.toString(16).toUpperCase().padStart(4, '0')}`;
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    const text = readFileSync('/proc/net/tcp', 'utf8');
    for (const line of text.split('\n')) {
      const cols = line.trim().split(/\s+/);
      if (cols[1]?.endsWith(hex) && cols[3] === '0A') return true;
    }
    await sleep(20);
  }
  return false;
}

export async function waitFile(path: string, timeoutMs = 5000): Promise<boolean> {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (existsSync(path)) return true;
    await sleep(20);
  }
  return false;
}

/** A port that was free a moment ago, for the programs that bind their own listening socket. */
export async function freePort(): Promise<number> {
  const s = net.createServer();
  await new Promise<void>((resolve) => s.listen(0, '127.0.0.1', () => resolve()));
  const addr = s.address();
  await new Promise<void>((resolve) => s.close(() => resolve()));
  if (addr === null || typeof addr === 'string') throw new Error('no port');
  return addr.port;
}

/** Runs a command to completion with a hard time limit; resolves with its output. */
export async function runBounded(
  cmd: string,
  args: string[],
  timeoutMs: number,
  opts: SpawnOptions = {},
): Promise<{ code: number | null; stdout: string; stderr: string; timedOut: boolean }> {
  const s = start(cmd, args, opts);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    killGroup(s.child, 'SIGKILL');
  }, timeoutMs);
  const code = await s.exited;
  clearTimeout(timer);
  // let the pipes drain
  await sleep(5);
  return { code, stdout: s.stdout(), stderr: s.stderr(), timedOut };
}

export function which(name: string, extra: string[] = []): string | null {
  for (const dir of [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin', ...extra]) {
    if (dir !== '' && existsSync(`${dir}/${name}`)) return `${dir}/${name}`;
  }
  return null;
}

/** user+nice+system CPU seconds of the whole machine so far (irq/softirq excluded: not charged to processes). */
export function machineBusySeconds(): number {
  const first = readFileSync('/proc/stat', 'utf8').split('\n')[0] ?? '';
  const f = first.trim().split(/\s+/).slice(1).map(Number);
  return ((f[0] ?? 0) + (f[1] ?? 0) + (f[2] ?? 0)) / ticksPerSecond();
}

/**
 * Measures the CPU that processes outside this bench used between start() and stop(): the other
 * load on a shared machine, which makes the figures noisy. The bench's own tree includes every
 * reaped child (wrk, iperf3, proxies) through cutime/cstime.
 */
export function foreignLoad(): { stop: () => number } {
  const t0 = Date.now();
  const busy0 = machineBusySeconds();
  const ours0 = sampleUsage(process.pid, true).cpuSec;
  return {
    stop: () => {
      const wall = (Date.now() - t0) / 1000;
      const foreign = machineBusySeconds() - busy0 - (sampleUsage(process.pid, true).cpuSec - ours0);
      return wall > 0 ? Math.max(0, foreign / wall) : 0;
    },
  };
}

/**
 * Waits until processes outside the bench use less than `cores` of CPU over a 0.5 s window, for at
 * most maxMs. Returns the last load seen (so the caller can say the figures will be noisy).
 */
export async function waitQuiet(cores: number, maxMs: number): Promise<{ load: number; waitedMs: number }> {
  const t0 = Date.now();
  for (;;) {
    const probe = foreignLoad();
    await sleep(500);
    const load = probe.stop();
    const waitedMs = Date.now() - t0;
    if (load < cores || waitedMs >= maxMs) return { load, waitedMs };
  }
}
