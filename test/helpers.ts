/**
 * Test harness: start the real CLI (ours, built in dist/, or the C reference) the
 * way systemd does: listening sockets as fds 3.., LISTEN_FDS, and LISTEN_PID equal
 * to the pid of the exec'd proxy (`sh -c 'LISTEN_PID=$$ exec "$@"'`).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { createHash, randomBytes } from 'node:crypto';
import { linkSync, readdirSync, readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { createConnection, createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const ROOT = resolve(import.meta.dirname, '..');
export const OURS = join(ROOT, 'dist', 'cli.js');
export const REFERENCE = '/lib/systemd/systemd-socket-proxyd';

export type Flavour = 'ours' | 'ref';

export function proxyCommand(flavour: Flavour): string[] {
  return flavour === 'ours' ? [process.execPath, OURS] : [REFERENCE];
}

/** A listening socket the test owns, to hand to the proxy. */
export type ListenSpec =
  | { kind: 'tcp'; host?: string }
  | { kind: 'unix'; path: string }
  | { kind: 'abstract'; name: string };

export interface Listener {
  spec: ListenSpec;
  /** What a client connects to. */
  connectOptions: { host: string; port: number } | { path: string };
  server: Server;
}

export async function makeListener(spec: ListenSpec): Promise<Listener> {
  const server = createServer();
  if (spec.kind === 'tcp') {
    server.listen({ host: spec.host ?? '127.0.0.1', port: 0, backlog: 4096 });
  } else if (spec.kind === 'unix') {
    // libuv unlinks a path socket when the server that bound it closes, and we close ours
    // right after handing the fd over: bind a temporary name and hard-link the real one.
    server.listen({ path: `${spec.path}.bind`, backlog: 4096 });
  } else {
    server.listen({ path: `\0${spec.name}`, backlog: 4096 });
  }
  await once(server, 'listening');
  if (spec.kind === 'unix') linkSync(`${spec.path}.bind`, spec.path);
  // Nobody must accept on the test's side: the proxy gets the fd, we close ours after spawn.
  server.removeAllListeners('connection');
  const addr = server.address();
  const connectOptions =
    spec.kind === 'tcp'
      ? { host: spec.host ?? '127.0.0.1', port: (addr as { port: number }).port }
      : { path: spec.kind === 'unix' ? spec.path : `\0${spec.name}` };
  return { spec, connectOptions, server };
}

export function fdOf(thing: { _handle?: { fd?: number } } | Server | Socket): number {
  const fd = (thing as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) throw new Error('no fd');
  return fd;
}

export interface Proxy {
  child: ChildProcess;
  pid: number;
  listeners: Listener[];
  /** Everything written to stderr so far. */
  stderr(): string;
  stdout(): string;
  /** Resolves with the exit code (or signal name) when the process ends. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stop(): Promise<void>;
}

export interface StartOptions {
  flavour?: Flavour;
  args: string[];
  listen?: ListenSpec[];
  /** Raw fds to pass instead of (or after) listeners, e.g. a UDP socket or /dev/null. */
  fds?: number[];
  env?: Record<string, string>;
  /** Override LISTEN_FDS (default: number of fds passed). */
  listenFds?: string;
  /** Override LISTEN_PID (default: the proxy's own pid). */
  listenPid?: string;
  /** Wrap the command, e.g. ['prlimit', '--nofile=64']. */
  wrapper?: string[];
}

const running = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of running) child.kill('SIGKILL');
});

export async function startProxy(options: StartOptions): Promise<Proxy> {
  const listeners: Listener[] = [];
  for (const spec of options.listen ?? []) listeners.push(await makeListener(spec));
  const fds = [...listeners.map((l) => fdOf(l.server)), ...(options.fds ?? [])];
  const env: Record<string, string> = {
    PATH: process.env.PATH ?? '/usr/bin:/bin',
    // Which UDP data path (test/datagram-node-path.test.ts runs the UDP tests on Node's).
    ...(process.env.SOCKET_PROXYD_NATIVE_UDP === undefined ? {} : { SOCKET_PROXYD_NATIVE_UDP: process.env.SOCKET_PROXYD_NATIVE_UDP }),
    ...options.env,
  };
  if (fds.length > 0 || options.listenFds !== undefined) env.LISTEN_FDS = options.listenFds ?? String(fds.length);
  const pidExpr = options.listenPid ?? '$$';
  const command = [...(options.wrapper ?? []), ...proxyCommand(options.flavour ?? 'ours'), ...options.args];
  const child = spawn('sh', ['-c', `LISTEN_PID=${pidExpr} exec "$@"`, 'sh', ...command], {
    env,
    stdio: ['ignore', 'pipe', 'pipe', ...fds],
  });
  running.add(child);
  // The proxy has its copies now; close ours so that only the proxy accepts.
  for (const l of listeners) l.server.close();
  let err = '';
  let out = '';
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (err += d));
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (out += d));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((res) => {
    // 'close', not 'exit': it comes after stdout and stderr are drained, so stderr() is complete.
    child.on('close', (code, signal) => {
      running.delete(child);
      res({ code, signal });
    });
  });
  return {
    child,
    pid: child.pid as number,
    listeners,
    stderr: () => err,
    stdout: () => out,
    exited,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

/** Run the CLI to completion (no sockets expected to be served). */
export async function runProxy(options: StartOptions, timeoutMs = 10_000): Promise<{ code: number | null; signal: string | null; stdout: string; stderr: string }> {
  const p = await startProxy(options);
  const timer = setTimeout(() => p.child.kill('SIGKILL'), timeoutMs);
  const { code, signal } = await p.exited;
  clearTimeout(timer);
  // let the pipes drain
  await new Promise((r) => setImmediate(r));
  return { code, signal, stdout: p.stdout(), stderr: p.stderr() };
}

/** Connect to a listener and wait until connected. */
export async function connect(options: { host: string; port: number } | { path: string }): Promise<Socket> {
  const s = createConnection({ ...options, allowHalfOpen: true });
  // A reset is an outcome tests look at (readAll reports it), never an uncaught exception.
  s.on('error', () => {});
  await once(s, 'connect');
  return s;
}

/** Read everything until EOF (or error); resolves with the bytes and how it ended. */
export function readAll(s: Socket, timeoutMs = 10_000): Promise<{ data: Buffer; ended: 'eof' | 'error' | 'timeout'; error?: string }> {
  return new Promise((res) => {
    const chunks: Buffer[] = [];
    const timer = setTimeout(() => done('timeout'), timeoutMs);
    let finished = false;
    function done(ended: 'eof' | 'error' | 'timeout', error?: string): void {
      if (finished) return;
      finished = true;
      clearTimeout(timer);
      s.removeAllListeners('data');
      res(error === undefined ? { data: Buffer.concat(chunks), ended } : { data: Buffer.concat(chunks), ended, error });
    }
    s.on('data', (d: Buffer) => chunks.push(d));
    s.once('end', () => done('eof'));
    s.once('error', (e: NodeJS.ErrnoException) => done('error', e.code ?? e.message));
    // Destroyed by the test itself (no 'end', no 'error'): stop waiting, so no timer outlives it.
    s.once('close', () => done('error', 'closed'));
  });
}

/**
 * A TCP port on 127.0.0.1 that nothing listens on now and that no other test will take:
 * picked at random below the kernel's ephemeral range (32768 and up), where every `port 0`
 * bind of the other test files lands, and checked free. A port freed from the ephemeral
 * range could be handed to a test file running alongside before it is used.
 */
export async function unusedPort(): Promise<number> {
  for (;;) {
    const port = 20_000 + Math.floor(Math.random() * 10_000);
    const s = createServer();
    const ok = await new Promise<boolean>((res) => {
      s.once('error', () => res(false));
      s.listen(port, '127.0.0.1', () => res(true));
    });
    if (!ok) continue;
    s.close();
    await once(s, 'close');
    return port;
  }
}

/** Wait for a condition, polling; throws after timeoutMs. */
export async function waitFor(cond: () => boolean, timeoutMs = 5000, what = 'condition'): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

export function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

export { randomBytes };

/** A backend server that runs `onConn` for each connection; records them. */
export interface Backend {
  server: Server;
  port: number;
  path?: string;
  address: string;
  sockets: Socket[];
  close(): Promise<void>;
}

export async function startBackend(
  onConn: (s: Socket) => void,
  where: { host?: string; path?: string } = {},
): Promise<Backend> {
  const sockets: Socket[] = [];
  const server = createServer({ allowHalfOpen: true }, (s) => {
    sockets.push(s);
    s.on('error', () => {});
    onConn(s);
  });
  if (where.path !== undefined) server.listen({ path: where.path, backlog: 4096 });
  else server.listen({ host: where.host ?? '127.0.0.1', port: 0, backlog: 4096 });
  await once(server, 'listening');
  const port = where.path === undefined ? (server.address() as { port: number }).port : 0;
  const host = where.host ?? '127.0.0.1';
  const address =
    where.path !== undefined
      ? where.path.startsWith('\0')
        ? `@${where.path.slice(1)}`
        : where.path
      : host.includes(':')
        ? `${host}:${port}`
        : `${host}:${port}`;
  return {
    server,
    port,
    ...(where.path !== undefined ? { path: where.path } : {}),
    address,
    sockets,
    async close() {
      for (const s of sockets) s.destroy();
      server.close();
      await once(server, 'close').catch(() => {});
    },
  };
}

/** Echo backend with half-close: echoes everything, ends when the client ends. */
export function echo(s: Socket): void {
  s.pipe(s);
}

export function tempDir(): { dir: string; cleanup(): void } {
  const dir = mkdtempSync(join(tmpdir(), 'spd-test-'));
  return { dir, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** Number of open fds of a process. */
export function fdCount(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).length;
}

/**
 * A process's fd count once it has stopped changing (5 equal samples 20 ms apart,
 * at most 5 s): a proxy closes a finished connection's sockets a loop turn or two
 * after the client has seen the end, so a count taken right after a probe
 * connection may still include them.
 */
export async function settledFdCount(pid: number): Promise<number> {
  const deadline = Date.now() + 5000;
  let last = fdCount(pid);
  let same = 0;
  while (same < 5 && Date.now() < deadline) {
    await new Promise((r) => setTimeout(r, 20));
    const now = fdCount(pid);
    same = now === last ? same + 1 : 0;
    last = now;
  }
  return last;
}

/** Anonymous resident memory of a process in KiB: what a leak grows (the binary's code pages do not count). */
export function rssAnonKiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /RssAnon:\s+([0-9]+) kB/.exec(status);
  return m === null ? 0 : Number(m[1]);
}

/** Resident set size of a process in KiB. */
export function rssKiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const m = /VmRSS:\s+([0-9]+) kB/.exec(status);
  return m === null ? 0 : Number(m[1]);
}

/** utime+stime of a process in clock ticks (1/100 s here). */
export function cpuTicks(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return Number(fields[11]) + Number(fields[12]);
}

/** Send data, half-close, and collect the reply until EOF. */
export async function roundTrip(
  options: { host: string; port: number } | { path: string },
  payload: Buffer,
  timeoutMs = 10_000,
): Promise<{ data: Buffer; ended: string }> {
  const s = await connect(options);
  const reading = readAll(s, timeoutMs);
  s.end(payload);
  const r = await reading;
  s.destroy();
  return r;
}

/** mulberry32: a tiny seeded PRNG, so a randomised test reproduces from its seed. */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}
