/**
 * Routes by socket name (issue 12): `NAME=TARGET` positionals and `--listen=NAME=ADDRESS`,
 * the real CLI with real sockets. Sockets are passed as systemd does (fds 3.., LISTEN_FDS,
 * LISTEN_FDNAMES); each backend answers with its own tag before echoing, so a test sees
 * both which backend a socket reached and that the bytes came through exactly.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { get } from 'node:http';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import {
  connect,
  prng,
  randomBytes,
  readAll,
  roundTrip,
  runProxy,
  startBackend,
  startProxy,
  tempDir,
  unusedPort,
  waitFor,
  type Backend,
  type ListenSpec,
} from './helpers.ts';
import { startReceiver } from './notify-helpers.ts';

const tmp = tempDir();
process.on('exit', () => tmp.cleanup());

/** A backend that first sends "TAG\n", then echoes (half-close included). */
function tagged(tag: string, where: { path?: string } = {}): Promise<Backend> {
  return startBackend((s: Socket) => {
    s.write(`${tag}\n`);
    s.pipe(s);
  }, where);
}

/** Send a random payload through `to`; the reply must be exactly "TAG\n" + payload. */
async function expectReaches(to: { host: string; port: number } | { path: string }, tag: string, size = 64 * 1024): Promise<void> {
  const payload = randomBytes(size);
  const r = await roundTrip(to, payload, 10_000);
  assert.equal(r.ended, 'eof');
  assert.equal(r.data.subarray(0, tag.length + 1).toString(), `${tag}\n`, `reached ${JSON.stringify(r.data.subarray(0, 20).toString())}, wanted ${tag}`);
  assert.ok(r.data.subarray(tag.length + 1).equals(payload), `byte-exact through ${tag}`);
}

/** Wait until something accepts on a UNIX path (the file appears at bind(), before listen()). */
async function listening(path: string): Promise<void> {
  const deadline = Date.now() + 5000;
  for (;;) {
    try {
      (await connect({ path })).destroy();
      return;
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 20));
    }
  }
}

function shuffle<T>(items: T[], rand: () => number): T[] {
  const a = [...items];
  for (let i = a.length - 1; i > 0; i--) {
    const j = Math.floor(rand() * (i + 1));
    [a[i], a[j]] = [a[j] as T, a[i] as T];
  }
  return a;
}

test('three passed sockets, names in shuffled order (two share a name), each reach their own backend byte-exact', async () => {
  const web = await tagged('web');
  const db = await tagged('db', { path: join(tmp.dir, 'db.sock') });
  try {
    // The sockets: two from "db.socket" (a unit with two ListenStream=), one from "web";
    // systemd's fd order across socket units is undefined, so try several orders.
    const sockets: { name: string; spec: ListenSpec }[] = [
      { name: 'db', spec: { kind: 'tcp' } },
      { name: 'db', spec: { kind: 'unix', path: join(tmp.dir, 'front-db.sock') } },
      { name: 'web.socket', spec: { kind: 'tcp', host: '::1' } },
    ];
    const rand = prng(12);
    const orders = [shuffle(sockets, rand), shuffle(sockets, rand), [...sockets].reverse()];
    for (const [k, order] of orders.entries()) {
      const args = k % 2 === 0 ? [`web.socket=${web.address}`, `db=${db.address}`] : [`db=${db.address}`, `web.socket=${web.address}`];
      const p = await startProxy({
        args,
        listen: order.map((s) => (s.spec.kind === 'unix' ? { kind: 'unix', path: `${s.spec.path}.${k}` } : s.spec)),
        env: { LISTEN_FDNAMES: order.map((s) => s.name).join(':') },
      });
      try {
        await Promise.all(p.listeners.map((l, i) => expectReaches(l.connectOptions, order[i]!.name === 'db' ? 'db' : 'web')));
        assert.equal(p.stderr(), '', `order ${order.map((s) => s.name).join(':')}`);
      } finally {
        await p.stop();
      }
    }
  } finally {
    await web.close();
    await db.close();
  }
});

test('the default route takes unnamed sockets and names without a route; --listen=NAME=ADDRESS names our own sockets', async () => {
  const web = await tagged('web');
  const other = await tagged('default');
  const listenWeb = join(tmp.dir, 'listen-web.sock');
  const listenPlain = join(tmp.dir, 'listen-plain.sock');
  try {
    // fd 3 "ssh.socket" (no route of its own), fd 4 "web", fd 5 an empty name (unnamed).
    const p = await startProxy({
      args: [`--listen=web=${listenWeb}`, `web=${web.address}`, other.address, `--listen=${listenPlain}`],
      listen: [{ kind: 'tcp' }, { kind: 'tcp' }, { kind: 'tcp' }],
      env: { LISTEN_FDNAMES: 'ssh.socket:web:' },
    });
    try {
      await listening(listenWeb);
      await listening(listenPlain);
      await expectReaches(p.listeners[0]!.connectOptions, 'default');
      await expectReaches(p.listeners[1]!.connectOptions, 'web');
      await expectReaches(p.listeners[2]!.connectOptions, 'default');
      await expectReaches({ path: listenWeb }, 'web');
      await expectReaches({ path: listenPlain }, 'default');
      assert.equal(p.stderr(), '');
    } finally {
      await p.stop();
    }
    // Without LISTEN_FDNAMES every passed socket is unnamed: the default route.
    const q = await startProxy({ args: [`--listen=web=${listenWeb}.2`, `web=${web.address}`, other.address], listen: [{ kind: 'tcp' }] });
    try {
      await listening(`${listenWeb}.2`);
      await expectReaches(q.listeners[0]!.connectOptions, 'default');
      await expectReaches({ path: `${listenWeb}.2` }, 'web');
    } finally {
      await q.stop();
    }
  } finally {
    await web.close();
    await other.close();
  }
});

test("a UNIX path with '=' is a plain target; after NAME= the rest is the target, '=' and all", async () => {
  const path = join(tmp.dir, 'a=b.sock');
  const backend = await tagged('eq', { path });
  try {
    for (const args of [[path], [`x=${path}`], [`--listen=x=${join(tmp.dir, 'c=d.sock')}`, `x=${path}`]]) {
      const named = args.length === 2;
      const p = await startProxy({ args, listen: named ? [] : [{ kind: 'tcp' }], env: { LISTEN_FDNAMES: 'x' } });
      try {
        if (named) {
          await listening(join(tmp.dir, 'c=d.sock'));
          await expectReaches({ path: join(tmp.dir, 'c=d.sock') }, 'eq');
        } else {
          await expectReaches(p.listeners[0]!.connectOptions, 'eq');
        }
        assert.equal(p.stderr(), '');
      } finally {
        await p.stop();
      }
    }
  } finally {
    await backend.close();
  }
});

test('start-up errors: one line naming the route or socket, exit 1, nothing bound', async () => {
  const bound = join(tmp.dir, 'never-bound.sock');
  const cases: { args: string[]; names?: string; sockets?: number; line: string }[] = [
    { args: ['=/run/x'], line: "Invalid route '=/run/x': empty name (names follow FileDescriptorName= rules)." },
    { args: ['a:b=/run/x'], line: "Invalid route 'a:b=/run/x': name contains ':' (names follow FileDescriptorName= rules)." },
    { args: ['web=/a', 'web=/b'], line: "Route 'web' is given twice." },
    { args: ['web=/a', '/b', '/c'], line: 'Too many parameters.' },
    { args: ['--listen=a\tb=127.0.0.1:0', 'x'], line: "Invalid route '--listen=a\\tb=127.0.0.1:0': name is not printable ASCII (names follow FileDescriptorName= rules)." },
    // A bad target names its route when there are several; alone, today's line.
    { args: ['web=/a', 'db=localhost:99999'], line: "db: Invalid address 'localhost:99999': port 99999 is out of range (1-65535)." },
    { args: ['web=/a', `@${'x'.repeat(108)}`], line: "(default): Specified address doesn't fit in an AF_UNIX address, refusing: Invalid argument" },
    { args: ['db=localhost:99999'], line: "Invalid address 'localhost:99999': port 99999 is out of range (1-65535)." },
    // Matching sockets to routes.
    { args: ['web=/a'], names: 'ssh.socket', line: "No route for socket 'ssh.socket' (fd 3): give ssh.socket=TARGET, or a plain TARGET as the default route." },
    { args: ['web=/a'], line: 'No route for the unnamed socket fd 3: give a plain TARGET as the default route.' },
    { args: ['web=/a', 'db=/b'], names: 'web:', sockets: 2, line: 'No route for the unnamed socket fd 4: give a plain TARGET as the default route.' },
    { args: ['web=/a', 'wbe=/b', '/c'], names: 'web', line: "Route 'wbe' matches no socket (socket names: 'web')." },
    { args: ['web=/a', '/c'], line: "Route 'web' matches no socket (no socket has a name)." },
    { args: [`--listen=web=${bound}`, 'web=/a', 'db=/b'], sockets: 0, line: "Route 'db' matches no socket (socket names: 'web')." },
    { args: [`--listen=wbe=${bound}`, 'web=/a'], sockets: 0, line: `No route for socket 'wbe' (--listen=wbe=${bound}): give wbe=TARGET, or a plain TARGET as the default route.` },
  ];
  await Promise.all(
    cases.map(async (c) => {
      const n = c.sockets ?? 1;
      const r = await runProxy({
        args: c.args,
        listen: Array.from({ length: n }, () => ({ kind: 'tcp' }) as const),
        env: c.names === undefined ? {} : { LISTEN_FDNAMES: c.names },
      });
      assert.equal(r.code, 1, c.args.join(' '));
      assert.equal(r.stdout, '');
      assert.equal(r.stderr, `${c.line}\n`, c.args.join(' '));
    }),
  );
  assert.ok(!existsSync(bound), 'the route check comes before any --listen socket is bound');
});

test('a route error comes before READY=1: the service manager gets only ERRNO=22', async () => {
  const address = join(tmp.dir, 'notify.sock');
  const receiver = await startReceiver(address, 1, 5);
  const r = await runProxy({ args: ['web=/a', 'wbe=/b'], listen: [{ kind: 'tcp' }], env: { LISTEN_FDNAMES: 'web', NOTIFY_SOCKET: address } });
  assert.equal(r.code, 1);
  assert.equal(r.stderr, "Route 'wbe' matches no socket (socket names: 'web').\n");
  const got = await receiver.done;
  assert.deepEqual(got.map((d) => d.payload), ['ERRNO=22']);
});

test('with several routes each line about a connection names its route; with one route, lines are exactly today\'s', async () => {
  // Refuses, and stays refusing: a port no other test file takes meanwhile.
  const deadAddress = `127.0.0.1:${await unusedPort()}`;
  const live = await tagged('live');
  try {
    const p = await startProxy({
      args: [`web=${deadAddress}`, `db=${live.address}`, deadAddress],
      listen: [{ kind: 'tcp' }, { kind: 'tcp' }, { kind: 'tcp' }],
      env: { LISTEN_FDNAMES: 'db:web:other', SYSTEMD_LOG_LEVEL: 'debug' },
    });
    try {
      await expectReaches(p.listeners[0]!.connectOptions, 'live');
      for (const i of [1, 2]) {
        const r = await readAll(await connect(p.listeners[i]!.connectOptions), 5000);
        assert.equal(r.data.length, 0);
      }
      await waitFor(() => p.stderr().split('\n').filter((l) => l.includes('Failed to connect')).length === 2, 5000, 'two failures');
      const lines = p.stderr().trimEnd().split('\n');
      for (const line of lines) assert.match(line, /^(web|db|\(default\)): /, line);
      assert.ok(lines.includes('web: Failed to connect to remote host: Connection refused'), p.stderr());
      assert.ok(lines.includes('(default): Failed to connect to remote host: Connection refused'), p.stderr());
      assert.ok(lines.some((l) => /^db: New connection from 127\.0\.0\.1:\d+$/.test(l)), p.stderr());
    } finally {
      await p.stop();
    }
    // One (named) route: exactly the reference's line.
    const q = await startProxy({ args: [`web=${deadAddress}`], listen: [{ kind: 'tcp' }], env: { LISTEN_FDNAMES: 'web' } });
    try {
      await readAll(await connect(q.listeners[0]!.connectOptions), 5000);
      await waitFor(() => q.stderr().includes('\n'), 5000, 'the failure line');
      assert.equal(q.stderr(), 'Failed to connect to remote host: Connection refused\n');
    } finally {
      await q.stop();
    }
  } finally {
    await live.close();
  }
});

/** GET /metrics over a UNIX socket. */
function scrape(socketPath: string): Promise<string> {
  return new Promise((resolve, reject) => {
    get({ socketPath, path: '/metrics' }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (d: string) => (body += d));
      res.on('end', () => resolve(body));
    }).on('error', reject);
  });
}

test('--connections-max is one cap across all routes; --metrics= counts per route', async () => {
  const a = await tagged('a');
  const b = await tagged('b');
  const metrics = join(tmp.dir, 'metrics.sock');
  try {
    const p = await startProxy({
      args: ['-c', '2', `--metrics=${metrics}`, `a=${a.address}`, `b=${b.address}`],
      listen: [{ kind: 'tcp' }, { kind: 'tcp' }],
      env: { LISTEN_FDNAMES: 'a:b' },
    });
    try {
      const [toA, toB] = [p.listeners[0]!.connectOptions, p.listeners[1]!.connectOptions];
      const held: Socket[] = [];
      for (const [to, tag] of [[toA, 'a'], [toB, 'b']] as const) {
        const s = await connect(to);
        const [d] = (await once(s, 'data')) as [Buffer];
        assert.equal(d.toString(), `${tag}\n`);
        held.push(s);
      }
      // One on each route: both routes are now full, whichever the third one uses.
      for (const to of [toA, toB]) {
        const r = await readAll(await connect(to), 3000);
        assert.equal(r.data.length, 0);
        assert.equal(r.ended, 'eof');
      }
      await waitFor(() => p.stderr().split('\n').length === 3, 3000, 'two warnings');
      assert.equal(p.stderr(), 'a: Hit connection limit, refusing connection.\nb: Hit connection limit, refusing connection.\n');
      assert.equal(a.sockets.length + b.sockets.length, 2, 'the refused clients never reached a backend');
      held[0]!.end();
      await once(held[0]!, 'close');
      await waitFor(() => a.sockets.every((s) => s.destroyed), 3000, 'release');
      await expectReaches(toB, 'b', 1000);
      held[1]!.destroy();
      // Each route its own series: a 1 accepted + 1 refused, b 2 accepted + 1 refused.
      await listening(metrics);
      const body = await scrape(metrics);
      for (const line of [
        'socket_proxyd_connections_accepted_total{route="a"} 1',
        'socket_proxyd_connections_accepted_total{route="b"} 2',
        'socket_proxyd_connections_refused_total{route="a"} 1',
        'socket_proxyd_connections_refused_total{route="b"} 1',
      ]) {
        assert.ok(body.split('\n').includes(line), `${line} in:\n${body}`);
      }
    } finally {
      await p.stop();
    }
  } finally {
    await a.close();
    await b.close();
  }
});

test('--exit-idle-time counts connections on every route: an open connection on one route keeps the proxy up', async () => {
  const a = await tagged('a');
  const b = await tagged('b');
  try {
    const p = await startProxy({
      args: ['--exit-idle-time=300ms', `a=${a.address}`, `b=${b.address}`],
      listen: [{ kind: 'tcp' }, { kind: 'tcp' }],
      env: { LISTEN_FDNAMES: 'a:b' },
    });
    try {
      const s = await connect(p.listeners[1]!.connectOptions);
      const [d] = (await once(s, 'data')) as [Buffer];
      assert.equal(d.toString(), 'b\n');
      // Well past the idle time, with the one connection (on route b) still open: still running.
      await new Promise((r) => setTimeout(r, 1000));
      assert.equal(p.child.exitCode, null, `exited while route b had a connection: ${p.stderr()}`);
      s.destroy();
      const timer = setTimeout(() => p.child.kill('SIGKILL'), 5000);
      const { code, signal } = await p.exited;
      clearTimeout(timer);
      assert.deepEqual({ code, signal }, { code: 0, signal: null }, 'idle exit once the last connection closed');
    } finally {
      await p.stop();
    }
  } finally {
    await a.close();
    await b.close();
  }
});
