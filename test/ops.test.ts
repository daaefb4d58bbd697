/**
 * Operating the proxy (issue 13), through the real CLI (dist/cli.js): graceful drain
 * on SIGTERM/SIGINT (--drain-timeout=), the live STATUS= line, the SIGUSR1 statistics
 * line, and the Prometheus endpoint (--metrics=), checked with promtool.
 *
 * Under socket activation a drain must leave new clients in the kernel's backlog for
 * the next start: test/fixtures/socket_unit.py holds the listening socket the way a
 * .socket unit does and starts the proxies on it. The same under a real systemd
 * manager is in test/ops-systemd.test.ts.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import { request } from 'node:http';
import { createSocket } from 'node:dgram';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import {
  OURS,
  ROOT,
  connect,
  echo,
  fdCount,
  randomBytes,
  readAll,
  sha256,
  startBackend,
  startProxy,
  tempDir,
  waitFor,
  type Proxy,
} from './helpers.ts';

const RECEIVER = join(ROOT, 'test/fixtures/notify_recv.py');
const SOCKET_UNIT = join(ROOT, 'test/fixtures/socket_unit.py');
const MODULE_RECORDER = join(ROOT, 'test/fixtures/record_modules.mjs');
const SLOW = 10_000;

const tmp = tempDir();
process.on('exit', () => tmp.cleanup());
let seq = 0;
const unique = (): string => `${process.pid}-${++seq}`;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL');
});

// ---------------------------------------------------------------------------------------------
// A notify socket (test/fixtures/notify_recv.py), each datagram stamped with when it arrived.

interface Datagram {
  payload: string;
  pid: number | null;
  at: number;
}

interface Receiver {
  address: string;
  got: Datagram[];
  close(): Promise<void>;
}

async function startReceiver(): Promise<Receiver> {
  const address = join(tmp.dir, `notify-${unique()}.sock`);
  const child = spawn('python3', [RECEIVER, address, '100000', '60'], { stdio: ['ignore', 'pipe', 'inherit'] });
  children.add(child);
  const got: Datagram[] = [];
  const exited = once(child, 'exit');
  await new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`notify receiver exited (${String(code)}) before binding`)));
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
      const msg = JSON.parse(line) as { ready?: boolean; payload?: string; pid?: number | null };
      if (msg.ready === true) resolve();
      else got.push({ payload: msg.payload ?? '', pid: msg.pid ?? null, at: performance.now() });
    });
  });
  return {
    address,
    got,
    async close() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
      children.delete(child);
    },
  };
}

async function exitWithin(p: { exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }> }, ms: number, what = 'proxy'): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not exit within ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([p.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** A backend: "stream N\n" gets N KiB of random data in 16 paced pieces over `ms`, then EOF; anything else is echoed. */
async function streamingBackend(ms: number): Promise<Awaited<ReturnType<typeof startBackend>> & { sent: Map<Socket, Buffer> }> {
  const sent = new Map<Socket, Buffer>();
  const backend = await startBackend((s) => {
    let head = Buffer.alloc(0);
    const onData = (d: Buffer): void => {
      head = Buffer.concat([head, d]);
      const nl = head.indexOf(10);
      if (nl === -1 && head.length < 64) return;
      s.removeListener('data', onData);
      const m = /^stream ([0-9]+)$/.exec(head.subarray(0, nl).toString());
      if (m === null) {
        s.write(head);
        s.pipe(s);
        return;
      }
      const payload = randomBytes(Number(m[1]) * 1024);
      sent.set(s, payload);
      const piece = Math.ceil(payload.length / 16);
      let i = 0;
      const timer = setInterval(() => {
        if (s.destroyed) {
          clearInterval(timer);
          return;
        }
        s.write(payload.subarray(i * piece, (i + 1) * piece));
        if (++i === 16) {
          clearInterval(timer);
          s.end();
        }
      }, ms / 16);
    };
    s.on('data', onData);
  });
  return Object.assign(backend, { sent });
}

// ---------------------------------------------------------------------------------------------
// socket_unit.py: a listening socket held like a .socket unit holds it.

interface SocketUnit {
  port: number;
  start(name: string, argv: string[]): Promise<number>;
  exited(name: string): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  stderr(name: string): string;
  close(): Promise<void>;
}

async function startSocketUnit(): Promise<SocketUnit> {
  const child = spawn('python3', [SOCKET_UNIT, tmp.dir], { stdio: ['pipe', 'pipe', 'inherit'] });
  children.add(child);
  const events: Array<Record<string, unknown>> = [];
  const wakers = new Set<() => void>();
  createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
    events.push(JSON.parse(line) as Record<string, unknown>);
    for (const w of wakers) w();
  });
  const event = (pred: (e: Record<string, unknown>) => boolean, ms = SLOW): Promise<Record<string, unknown>> =>
    new Promise((resolve, reject) => {
      const check = (): boolean => {
        const e = events.find(pred);
        if (e === undefined) return false;
        wakers.delete(check);
        clearTimeout(timer);
        resolve(e);
        return true;
      };
      const timer = setTimeout(() => {
        wakers.delete(check);
        reject(new Error(`socket_unit.py: no such event in ${JSON.stringify(events)}`));
      }, ms);
      if (!check()) wakers.add(check);
    });
  const exitedAt = once(child, 'exit');
  const port = (await event((e) => 'port' in e)).port as number;
  return {
    port,
    async start(name, argv) {
      child.stdin?.write(`start ${name} ${JSON.stringify(argv)}\n`);
      return (await event((e) => e.started === name)).pid as number;
    },
    async exited(name) {
      const code = (await event((e) => e.exited === name, 60_000)).code as number;
      return code < 0 ? { code: null, signal: (['', 'SIGHUP', 'SIGINT', 'SIGQUIT', 'SIGILL', 'SIGTRAP', 'SIGABRT', 'SIGBUS', 'SIGFPE', 'SIGKILL'][-code] ?? 'SIGTERM') as NodeJS.Signals } : { code, signal: null };
    },
    stderr: (name) => readFileSync(join(tmp.dir, `${name}.err`), 'utf8'),
    async close() {
      child.stdin?.end();
      await exitedAt;
      children.delete(child);
    },
  };
}

function parseExtend(payload: string): number | null {
  const m = /^EXTEND_TIMEOUT_USEC=([0-9]+)$/m.exec(payload);
  return m === null ? null : Number(m[1]);
}

// =============================================================================================
describe('drain', () => {
  test('SIGTERM under activation: a transfer in flight completes byte-exact, exit 0; a client arriving during the drain waits and is served by the next start', async () => {
    const backend = await streamingBackend(1500);
    const receiver = await startReceiver();
    const unit = await startSocketUnit();
    const to = { host: '127.0.0.1', port: unit.port };
    const argv = [process.execPath, OURS, '--drain-timeout=20s', backend.address];
    try {
      const pid1 = await unit.start('first', ['env', `NOTIFY_SOCKET=${receiver.address}`, ...argv]);
      await waitFor(() => receiver.got.some((d) => d.payload.startsWith('READY=1')), SLOW, 'READY=1');
      // A transfer (256 KiB, paced over 1.5 s) that is in flight when the signal comes.
      const c = await connect(to);
      const reading = readAll(c, 30_000);
      c.write('stream 256\n');
      const [first] = (await once(c, 'data')) as [Buffer];
      assert.ok(first.length > 0);
      const t0 = performance.now();
      process.kill(pid1, 'SIGTERM');
      await waitFor(() => receiver.got.some((d) => d.payload.startsWith('STOPPING=1')), SLOW, 'STOPPING=1');
      // A new client: the kernel completes its handshake into the backlog, but the draining proxy must not accept it.
      const late = await connect(to);
      late.write('late\n');
      let lateReply = '';
      late.on('data', (d: Buffer) => (lateReply += d.toString()));
      const r = await reading;
      // The backend has finished; the client closes its side too, which ends the connection.
      c.end();
      const exit1 = await unit.exited('first');
      const drainMs = performance.now() - t0;
      assert.deepEqual(exit1, { code: 0, signal: null });
      assert.equal(r.ended, 'eof');
      const payload = [...backend.sent.values()][0] as Buffer;
      assert.equal(r.data.length, payload.length + 0, 'every byte arrived');
      assert.equal(sha256(r.data), sha256(payload), 'byte-exact');
      assert.ok(drainMs < 10_000, `the proxy exited once the transfer was done (${drainMs.toFixed(0)} ms), not at the drain timeout`);
      assert.equal(backend.sockets.length, 1, 'the draining proxy never connected the late client to the backend');
      assert.equal(unit.stderr('first'), `Draining 1 connection for up to 20s...\n`);

      // The notify datagrams, in order, all from the proxy.
      const mine = receiver.got.filter((d) => d.pid === pid1).map((d) => d.payload);
      assert.equal(mine.length, receiver.got.length, 'every datagram came from the proxy pid');
      assert.equal(mine[0], 'READY=1\nSTATUS=Processing requests...');
      const stopAt = mine.findIndex((p) => p.startsWith('STOPPING=1'));
      for (const p of mine.slice(1, stopAt)) assert.match(p, /^STATUS=Processing requests: /);
      const stopping = mine[stopAt] as string;
      assert.match(stopping, /^STOPPING=1\nSTATUS=Draining 1 connection\.\.\.\nEXTEND_TIMEOUT_USEC=[0-9]+$/);
      const extend = parseExtend(stopping) as number;
      assert.ok(extend > 20_000_000 - 2_000_000 && extend <= 25_000_000, `EXTEND_TIMEOUT_USEC=${extend}: the drain timeout plus time to exit`);
      for (const p of mine.slice(stopAt + 1)) assert.match(p, /^STATUS=Draining [0-9]+ connections?\.\.\.$|^EXTEND_TIMEOUT_USEC=/);

      // The late client is still waiting, unanswered; the next start serves it.
      assert.ok(!late.destroyed && !late.readableEnded && lateReply === '', 'the late client was neither served, nor closed, nor reset');
      await unit.start('second', argv);
      await waitFor(() => lateReply === 'late\n', SLOW, 'the late client served by the second proxy');
      late.destroy();
    } finally {
      await unit.close();
      await receiver.close();
      await backend.close();
    }
  });

  test('a connection that outlasts the drain timeout is closed at the timeout; --listen= sockets go at once (path removed); exit 0', async () => {
    const backend = await startBackend(echo);
    const path = join(tmp.dir, `listen-${unique()}.sock`);
    const p = await startProxy({ args: ['--drain-timeout=1s', `--listen=${path}`, backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const held: Socket[] = [];
      for (const where of [p.listeners[0]!.connectOptions, { path }]) {
        await waitFor(() => existsSync(path), SLOW, 'the --listen= socket');
        const c = await connect(where);
        c.write('x');
        await once(c, 'data');
        held.push(c);
      }
      const ends = held.map((c) => readAll(c, 10_000));
      const t0 = performance.now();
      p.child.kill('SIGINT');
      await waitFor(() => !existsSync(path), 1000, 'the --listen= path removed at drain start');
      await assert.rejects(connect({ path }), /ENOENT/);
      // Still forwarding meanwhile.
      held[0]!.write('still');
      const [echoed] = (await once(held[0]!, 'data')) as [Buffer];
      assert.equal(echoed.toString(), 'still');
      const result = await exitWithin(p, 5000);
      const elapsed = performance.now() - t0;
      assert.deepEqual(result, { code: 0, signal: null });
      for (const end of await Promise.all(ends)) assert.notEqual(end.ended, 'timeout');
      assert.ok(elapsed >= 950 && elapsed < 1800, `closed at the timeout: ${elapsed.toFixed(0)} ms after SIGINT (1000 ms)`);
      assert.equal(p.stderr(), 'Draining 2 connections for up to 1s...\nDrain timeout reached, closing 2 connections.\n');
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('a second SIGTERM during the drain stops at once, exit 0', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: ['--drain-timeout=infinity', backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const c = await connect(p.listeners[0]!.connectOptions);
      c.write('x');
      await once(c, 'data');
      const end = readAll(c, 10_000);
      p.child.kill('SIGTERM');
      await waitFor(() => p.stderr().includes('Draining'), SLOW, 'the drain');
      await sleep(300);
      assert.equal(p.child.exitCode, null, 'draining, without limit');
      const t0 = performance.now();
      p.child.kill('SIGTERM');
      const result = await exitWithin(p, 2000);
      assert.deepEqual(result, { code: 0, signal: null });
      assert.ok(performance.now() - t0 < 800, 'at once');
      assert.notEqual((await end).ended, 'timeout');
      assert.equal(p.stderr(), 'Draining 1 connection...\n');
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('with a drain timeout but nothing open, SIGTERM stops at once as without one', async () => {
    const backend = await startBackend(echo);
    const receiver = await startReceiver();
    const p = await startProxy({ args: ['--drain-timeout=1min', backend.address], listen: [{ kind: 'tcp' }], env: { NOTIFY_SOCKET: receiver.address } });
    try {
      await waitFor(() => receiver.got.some((d) => d.payload.startsWith('READY=1')), SLOW, 'READY=1');
      p.child.kill('SIGTERM');
      assert.deepEqual(await exitWithin(p, 2000), { code: 0, signal: null });
      await waitFor(() => receiver.got.length >= 2, 2000, 'STOPPING=1');
      assert.deepEqual(receiver.got.map((d) => d.payload), ['READY=1\nSTATUS=Processing requests...', 'STOPPING=1\nSTATUS=Shutting down...']);
      assert.equal(p.stderr(), '');
    } finally {
      await p.stop();
      await receiver.close();
      await backend.close();
    }
  });
});

// =============================================================================================
describe('status and statistics', () => {
  test('STATUS= follows the counters, at most once a second, and nothing is sent while idle', async () => {
    const backend = await startBackend(echo);
    const receiver = await startReceiver();
    const p = await startProxy({ args: ['-c', '2', backend.address], listen: [{ kind: 'tcp' }], env: { NOTIFY_SOCKET: receiver.address } });
    const to = p.listeners[0]!.connectOptions;
    try {
      await waitFor(() => receiver.got.length >= 1, SLOW, 'READY=1');
      await sleep(1600);
      assert.deepEqual(receiver.got.map((d) => d.payload), ['READY=1\nSTATUS=Processing requests...'], 'nothing while idle');

      // Two held connections, a third refused by the limit.
      const held: Socket[] = [];
      for (let i = 0; i < 2; i++) {
        const c = await connect(to);
        c.write('x');
        await once(c, 'data');
        held.push(c);
      }
      const refused = await connect(to);
      assert.notEqual((await readAll(refused, SLOW)).ended, 'timeout');
      const want = 'STATUS=Processing requests: 2 open, 2 accepted, 1 refused by limit, 0 backend failures';
      await waitFor(() => receiver.got.some((d) => d.payload === want), 3000, want);

      // Churn: 12 short connections over ~1.8 s; STATUS= at most once a second.
      for (const c of held) c.destroy();
      await waitFor(() => backend.sockets.every((b) => b.closed), SLOW, 'held connections closed');
      await sleep(50);
      for (let i = 0; i < 12; i++) {
        const c = await connect(to);
        c.end('y');
        await readAll(c, SLOW);
        await sleep(150);
      }
      const final = 'STATUS=Processing requests: 0 open, 14 accepted, 1 refused by limit, 0 backend failures';
      await waitFor(() => receiver.got.some((d) => d.payload === final), 3000, final).catch((e: Error) => {
        throw new Error(`${e.message}: ${JSON.stringify(receiver.got.map((d) => d.payload))}`);
      });
      const statuses = receiver.got.filter((d) => d.payload.startsWith('STATUS='));
      for (let i = 1; i < statuses.length; i++) {
        const gap = statuses[i]!.at - statuses[i - 1]!.at;
        assert.ok(gap >= 900, `STATUS= ${gap.toFixed(0)} ms after the previous one`);
      }
      assert.ok(statuses.length >= 2 && statuses.length <= 6, `${statuses.length} STATUS= datagrams`);
      const before = receiver.got.length;
      await sleep(2000);
      assert.equal(receiver.got.length, before, 'idle again: nothing more');
    } finally {
      await p.stop();
      await receiver.close();
      await backend.close();
    }
  });

  test('SIGUSR1 logs the counters and bytes each way as one info line, and neither stops the proxy nor opens the inspector', async () => {
    const backend = await startBackend(echo);
    const closed = createServer();
    closed.listen(0, '127.0.0.1');
    await once(closed, 'listening');
    const deadPort = (closed.address() as { port: number }).port;
    closed.close();
    // journal-style prefixes, so the level is visible.
    const p = await startProxy({
      args: [backend.address],
      listen: [{ kind: 'tcp' }],
      wrapper: ['sh', '-c', 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', 'sh'],
    });
    const p2 = await startProxy({ args: [`127.0.0.1:${deadPort}`], listen: [{ kind: 'tcp' }] });
    try {
      const to = p.listeners[0]!.connectOptions;
      const up = randomBytes(3000);
      const c = await connect(to);
      const reply = readAll(c, SLOW);
      c.end(up);
      assert.equal((await reply).data.length, 3000);
      const open = await connect(to);
      open.write('12345');
      await once(open, 'data');
      const fds = fdCount(p.pid);
      p.child.kill('SIGUSR1');
      const line = '<6>Statistics: 1 open, 2 accepted, 0 refused by limit, 0 backend failures, 3005 bytes client->backend, 3005 bytes backend->client\n';
      await waitFor(() => p.stderr().includes('Statistics'), SLOW, 'the statistics line');
      assert.equal(p.stderr(), line);
      // Still running and serving; nothing new listens (Node's default SIGUSR1 opens the inspector on 9229).
      await sleep(200);
      assert.equal(p.child.exitCode, null);
      open.write('more');
      const [more] = (await once(open, 'data')) as [Buffer];
      assert.equal(more.toString(), 'more');
      assert.equal(fdCount(p.pid), fds, 'no new descriptor (an inspector would listen on one)');
      assert.doesNotMatch(p.stderr(), /Debugger/);
      open.destroy();

      await readAll(await connect(p2.listeners[0]!.connectOptions), SLOW);
      p2.child.kill('SIGUSR1');
      await waitFor(() => p2.stderr().includes('Statistics'), SLOW, 'the statistics line');
      assert.match(p2.stderr(), /^Failed to connect to remote host: Connection refused\nStatistics: 0 open, 1 accepted, 0 refused by limit, 1 backend failures, 0 bytes client->backend, 0 bytes backend->client\n$/);
    } finally {
      await p.stop();
      await p2.stop();
      await backend.close();
    }
  });
});

// =============================================================================================
// --metrics

interface HttpReply {
  status: number;
  type: string;
  body: string;
}

function httpGet(where: { host: string; port: number } | { socketPath: string }, path: string, method = 'GET'): Promise<HttpReply> {
  return new Promise((resolve, reject) => {
    const req = request({ ...where, path, method, agent: false, timeout: SLOW }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, type: String(res.headers['content-type']), body }));
    });
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.end();
  });
}

/** `name{labels} value` lines into a map. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

function promtool(text: string): { status: number | null; output: string } {
  const r = spawnSync('promtool', ['check', 'metrics'], { input: text, encoding: 'utf8', timeout: 30_000 });
  if (r.error !== undefined) {
    if (process.env.CI) assert.fail(`promtool could not be run: ${r.error.message}`);
    return { status: -1, output: 'missing' };
  }
  return { status: r.status, output: r.stdout + r.stderr };
}

/** The metrics port from the debug line "Serving metrics on HOST:PORT". */
async function metricsPort(p: Proxy): Promise<number> {
  await waitFor(() => /Serving metrics on .*:[0-9]+\n/.test(p.stderr()), SLOW, 'the metrics line');
  return Number(/Serving metrics on .*:([0-9]+)\n/.exec(p.stderr())?.[1]);
}

describe('metrics', () => {
  test('TCP: the counters match the traffic, promtool accepts the text, 404 elsewhere, 405 for other methods', async (t) => {
    const backend = await startBackend(echo);
    const p = await startProxy({
      args: ['--metrics=127.0.0.1:0', '-c', '3', backend.address],
      listen: [{ kind: 'tcp' }],
      env: { SYSTEMD_LOG_LEVEL: 'debug' },
    });
    try {
      const where = { host: '127.0.0.1', port: await metricsPort(p) };
      const to = p.listeners[0]!.connectOptions;
      // 5 finished connections, 1000*i bytes up, echoed; 3 held (the limit), a 4th refused.
      let up = 0;
      for (let i = 1; i <= 5; i++) {
        const c = await connect(to);
        const r = readAll(c, SLOW);
        c.end(randomBytes(1000 * i));
        assert.equal((await r).data.length, 1000 * i);
        up += 1000 * i;
      }
      const held: Socket[] = [];
      for (let i = 0; i < 3; i++) {
        const c = await connect(to);
        c.write('hi');
        await once(c, 'data');
        held.push(c);
      }
      up += 6;
      await readAll(await connect(to), SLOW);
      // One more that finds the backend gone.
      for (const c of held) c.destroy();
      await waitFor(() => backend.sockets.every((s) => s.closed), SLOW, 'backend sockets closed');
      await backend.close();
      await sleep(100);
      await readAll(await connect(to), SLOW);
      await waitFor(() => p.stderr().includes('Failed to connect'), SLOW, 'the failed connection');

      const r = await httpGet(where, '/metrics');
      assert.equal(r.status, 200);
      assert.equal(r.type, 'text/plain; version=0.0.4; charset=utf-8');
      const m = samples(r.body);
      assert.equal(m.get('socket_proxyd_connections_accepted_total'), 9);
      assert.equal(m.get('socket_proxyd_connections_refused_total'), 1);
      assert.equal(m.get('socket_proxyd_backend_connect_failures_total'), 1);
      assert.equal(m.get('socket_proxyd_connections_open'), 0);
      assert.equal(m.get('socket_proxyd_connections_max'), 3);
      assert.equal(m.get('socket_proxyd_forwarded_bytes_total{direction="client_to_backend"}'), up);
      assert.equal(m.get('socket_proxyd_forwarded_bytes_total{direction="backend_to_client"}'), up);
      // process_* as the client libraries define them, checked against /proc.
      const rss = Number(/VmRSS:\s+([0-9]+) kB/.exec(readFileSync(`/proc/${p.pid}/status`, 'utf8'))?.[1]) * 1024;
      assert.ok(Math.abs((m.get('process_resident_memory_bytes') ?? 0) - rss) < 8 * 1024 * 1024, 'RSS');
      assert.ok(Math.abs((m.get('process_open_fds') ?? 0) - fdCount(p.pid)) <= 2, 'open fds');
      assert.ok((m.get('process_max_fds') ?? 0) >= 1024);
      assert.ok((m.get('process_virtual_memory_bytes') ?? 0) > rss);
      const cpu = m.get('process_cpu_seconds_total') ?? -1;
      assert.ok(cpu > 0 && cpu < 60, `cpu ${cpu}`);
      const start = m.get('process_start_time_seconds') ?? 0;
      assert.ok(Math.abs(start - Date.now() / 1000) < 60, `start time ${start}`);
      for (const name of ['socket_proxyd_connections_accepted_total', 'process_cpu_seconds_total']) {
        assert.ok(r.body.includes(`# TYPE ${name} counter\n`), name);
        assert.ok(r.body.includes(`# HELP ${name} `), name);
      }
      const checked = promtool(r.body);
      if (checked.status === -1) t.skip('promtool is not installed (Debian: prometheus)');
      else assert.deepEqual(checked, { status: 0, output: '' }, 'promtool check metrics: no problems');

      for (const path of ['/', '/metricsx', '/metrics/', '/favicon.ico']) assert.equal((await httpGet(where, path)).status, 404, path);
      assert.equal((await httpGet(where, '/metrics', 'POST')).status, 405);
      const head = await httpGet(where, '/metrics', 'HEAD');
      assert.equal(head.status, 200);
      assert.equal(head.body, '');
      // Scrapes change nothing in the proxy's counters.
      const again = samples((await httpGet(where, '/metrics')).body);
      assert.equal(again.get('socket_proxyd_connections_accepted_total'), 9);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('UNIX path and @abstract endpoints; the path is removed on exit; a bad address fails start-up in one line', async () => {
    const backend = await startBackend(echo);
    const path = join(tmp.dir, `metrics-${unique()}.sock`);
    const abstract = `spd-metrics-${unique()}`;
    const p1 = await startProxy({ args: [`--metrics=${path}`, backend.address], listen: [{ kind: 'tcp' }] });
    const p2 = await startProxy({ args: [`--metrics=@${abstract}`, backend.address], listen: [{ kind: 'tcp' }] });
    try {
      for (const [p, socketPath] of [[p1, path], [p2, `\0${abstract}`]] as const) {
        const c = await connect(p.listeners[0]!.connectOptions);
        const r = readAll(c, SLOW);
        c.end('abc');
        await r;
        let got: HttpReply | undefined;
        const deadline = Date.now() + SLOW;
        while (got === undefined && Date.now() < deadline) {
          got = await httpGet({ socketPath }, '/metrics').catch(async () => {
            await sleep(50);
            return undefined;
          });
        }
        assert.ok(got !== undefined);
        assert.equal(got.status, 200);
        const m = samples(got.body);
        assert.equal(m.get('socket_proxyd_connections_accepted_total'), 1);
        assert.equal(m.get('socket_proxyd_forwarded_bytes_total{direction="client_to_backend"}'), 3);
        assert.equal((await httpGet({ socketPath }, '/other')).status, 404);
      }
      p1.child.kill('SIGTERM');
      assert.deepEqual(await exitWithin(p1, 2000), { code: 0, signal: null });
      assert.ok(!existsSync(path), 'the metrics socket file is removed on exit');

      const bad = await startProxy({ args: ['--metrics=127.0.0.1:http-alt-nope', backend.address], listen: [{ kind: 'tcp' }] });
      assert.deepEqual(await exitWithin(bad, SLOW), { code: 1, signal: null });
      assert.equal(bad.stderr(), "Invalid address '127.0.0.1:http-alt-nope': unknown TCP service 'http-alt-nope'.\n");
      const taken = await startProxy({ args: [`--metrics=@${abstract}`, backend.address], listen: [{ kind: 'tcp' }] });
      assert.deepEqual(await exitWithin(taken, SLOW), { code: 1, signal: null });
      assert.equal(taken.stderr(), `Failed to serve metrics on @${abstract}: Address already in use\n`);
    } finally {
      await p1.stop();
      await p2.stop();
      await backend.close();
    }
  });

  test('an [IPv6]:PORT endpoint serves the same text', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: ['--metrics=[::1]:0', backend.address], listen: [{ kind: 'tcp' }], env: { SYSTEMD_LOG_LEVEL: 'debug' } });
    try {
      await waitFor(() => /Serving metrics on \[::1\]:[0-9]+\n/.test(p.stderr()), SLOW, 'the metrics line with [::1]');
      const where = { host: '::1', port: await metricsPort(p) };
      const r = await httpGet(where, '/metrics');
      assert.equal(r.status, 200);
      assert.equal(samples(r.body).get('socket_proxyd_connections_accepted_total'), 0);
      assert.equal((await httpGet(where, '/nope')).status, 404);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('datagram flows: counted in the metrics (flows, bytes each way) and in the SIGUSR1 line', async () => {
    const echo = createSocket('udp4');
    echo.on('message', (m, r) => echo.send(m, r.port, r.address));
    await new Promise<void>((r) => echo.bind(0, '127.0.0.1', r));
    const path = join(tmp.dir, `metrics-${unique()}.sock`);
    const p = await startProxy({
      args: [`--metrics=${path}`, '--listen-datagram=127.0.0.1:0', `127.0.0.1:${echo.address().port}`],
      env: { SYSTEMD_LOG_LEVEL: 'debug' },
    });
    const clients = [createSocket('udp4'), createSocket('udp4')];
    try {
      await waitFor(() => /Receiving datagrams on 127\.0\.0\.1:([0-9]+)/.test(p.stderr()), SLOW, 'the datagram socket');
      const port = Number(/Receiving datagrams on 127\.0\.0\.1:([0-9]+)/.exec(p.stderr())?.[1]);
      let sent = 0;
      for (const [i, c] of clients.entries()) {
        await new Promise<void>((r) => c.bind(0, '127.0.0.1', r));
        for (let k = 0; k < 3; k++) {
          const payload = Buffer.alloc(100 * (i + 1) + k, 7);
          // UDP may drop under load: resend until this one's echo arrives.
          for (let tries = 0; ; tries++) {
            const got = new Promise<Buffer | null>((resolve) => {
              const t = setTimeout(() => resolve(null), 1000);
              c.once('message', (m: Buffer) => {
                clearTimeout(t);
                resolve(m);
              });
            });
            c.send(payload, port, '127.0.0.1');
            sent += payload.length;
            const m = await got;
            if (m !== null) {
              assert.equal(m.length, payload.length);
              break;
            }
            assert.ok(tries < 5, 'an echo within 5 tries');
          }
        }
      }
      await waitFor(() => existsSync(path), SLOW, 'the metrics socket');
      const m = samples((await httpGet({ socketPath: path }, '/metrics')).body);
      assert.equal(m.get('socket_proxyd_datagram_flows_total'), 2);
      assert.equal(m.get('socket_proxyd_datagram_flows_open'), 2);
      assert.equal(m.get('socket_proxyd_connections_accepted_total'), 0);
      assert.equal(m.get('socket_proxyd_forwarded_bytes_total{direction="client_to_backend"}'), sent);
      assert.equal(m.get('socket_proxyd_forwarded_bytes_total{direction="backend_to_client"}'), sent);
      p.child.kill('SIGUSR1');
      await waitFor(() => p.stderr().includes('Statistics:'), SLOW, 'the statistics line');
      assert.match(p.stderr(), new RegExp(`Statistics: 0 open, 0 accepted, 0 refused by limit, 0 backend failures, 2 flows open, 2 flows opened, ${sent} bytes client->backend, ${sent} bytes backend->client\n`));
    } finally {
      for (const c of clients) c.close();
      echo.close();
      await p.stop();
    }
  });

  test('with routes every per-route series carries a route label, and promtool still accepts the text', async (t) => {
    const backend = await startBackend(echo);
    const path = join(tmp.dir, `metrics-${unique()}.sock`);
    const p = await startProxy({
      args: [`--metrics=${path}`, `web=${backend.address}`, `db=${backend.address}`],
      listen: [{ kind: 'tcp' }, { kind: 'tcp' }],
      env: { LISTEN_FDNAMES: 'web:db' },
    });
    try {
      for (const [i, l] of p.listeners.entries()) {
        const c = await connect(l.connectOptions);
        const r = readAll(c, SLOW);
        c.end(Buffer.alloc(10 * (i + 1)));
        assert.equal((await r).data.length, 10 * (i + 1));
      }
      await waitFor(() => existsSync(path), SLOW, 'the metrics socket');
      const body = (await httpGet({ socketPath: path }, '/metrics')).body;
      const m = samples(body);
      assert.equal(m.get('socket_proxyd_forwarded_bytes_total{route="web",direction="client_to_backend"}'), 10);
      assert.equal(m.get('socket_proxyd_forwarded_bytes_total{route="db",direction="backend_to_client"}'), 20);
      for (const name of m.keys()) {
        if (name.startsWith('socket_proxyd_') && name !== 'socket_proxyd_connections_max') assert.match(name, /\{route="(web|db)"/, name);
      }
      const checked = promtool(body);
      if (checked.status === -1) t.skip('promtool is not installed (Debian: prometheus)');
      else assert.deepEqual(checked, { status: 0, output: '' });
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('without --metrics neither metrics.js nor node:http is loaded', async () => {
    const backend = await startBackend(echo);
    const logs = [join(tmp.dir, `modules-${unique()}.txt`), join(tmp.dir, `modules-${unique()}.txt`)];
    const runs = [[], ['--metrics=127.0.0.1:0']].map((extra, i) =>
      startProxy({
        args: [...extra, backend.address],
        listen: [{ kind: 'tcp' }],
        env: { NODE_OPTIONS: `--import=${MODULE_RECORDER}`, SPD_MODULE_LOG: logs[i] as string },
      }),
    );
    const [without, withMetrics] = await Promise.all(runs);
    try {
      for (const p of [without!, withMetrics!]) {
        const c = await connect(p.listeners[0]!.connectOptions);
        const r = readAll(c, SLOW);
        c.end('x');
        assert.equal((await r).data.toString(), 'x');
      }
      await waitFor(() => existsSync(logs[1]!) && readFileSync(logs[1]!, 'utf8').includes('node:http'), SLOW, 'metrics loaded');
      const loaded = (i: number): string[] => readFileSync(logs[i]!, 'utf8').split('\n');
      assert.ok(loaded(0).some((u) => u.endsWith('/dist/main.js')), 'the recorder works');
      assert.ok(!loaded(0).some((u) => u.endsWith('/dist/ops/metrics.js') || u === 'node:http'), 'nothing of --metrics without it');
      assert.ok(loaded(1).some((u) => u.endsWith('/dist/ops/metrics.js')), 'metrics.js with --metrics');
    } finally {
      await without!.stop();
      await withMetrics!.stop();
      await backend.close();
    }
  });
});
