/**
 * TCP_NODELAY (issue #9, section 1): a proxy that leaves Nagle's algorithm on holds
 * the second of two small writes (HTTP headers, then the body by sendfile; HTTP/2
 * HEADERS, then DATA) until the peer ACKs the first, and a peer with delayed ACKs
 * sends that ACK only after ~40 ms. socket-proxyd sets TCP_NODELAY on both TCP
 * sockets of every connection unless --nodelay=no.
 *
 * 1. The option itself, read back from the proxy's own sockets while a connection is
 *    live. Another process's socket is reachable as root through pidfd_getfd(2)
 *    (Linux >= 5.6): a python3 helper takes a copy of every socket fd of the proxy
 *    and reports its addresses and TCP_NODELAY. The C reference, which sets no
 *    option, is the control that shows the read-back can say 0.
 * 2. The effect: a client and a backend that each write every message in two pieces,
 *    200 round trips through the proxy, none near 40 ms. A loaded machine may pause a
 *    process that long, so each proxied round trip is paired with one straight to the
 *    backend, and the proxy may not stall more often than those (plus 10 of 200). The
 *    same exchange with --nodelay=no stalls at once, so the test can be seen to tell
 *    the two apart.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { join } from 'node:path';
import type { AddressInfo, Socket } from 'node:net';
import { parseAddress } from '../src/config/address.ts';
import { closeProxy, createProxy, listenOnAddress, type LookupFunction } from '../src/engine/proxy.ts';
import { connect, echo, startBackend, startProxy, tempDir, type Backend, type Flavour } from './helpers.ts';

const tmp = tempDir();
after(() => tmp.cleanup());

/**
 * Prints one JSON object per TCP socket of process argv[1]:
 * {fd, local: "addr:port", peer: "addr:port" | null, nodelay: 0 | 1}.
 * Exit 3 with a reason when the kernel or the privileges do not allow it.
 */
const SOCKOPT_HELPER = `
import ctypes, json, os, socket, sys
pid = int(sys.argv[1])
libc = ctypes.CDLL(None, use_errno=True)
SYS_pidfd_getfd = 438
try:
    pidfd = os.pidfd_open(pid)
except OSError as e:
    print('pidfd_open: %s' % e, file=sys.stderr); sys.exit(3)
def name(a):
    return '%s:%d' % (a[0], a[1])
out = []
for entry in os.listdir('/proc/%d/fd' % pid):
    try:
        if not os.readlink('/proc/%d/fd/%s' % (pid, entry)).startswith('socket:'):
            continue
    except OSError:
        continue
    fd = libc.syscall(SYS_pidfd_getfd, pidfd, int(entry), 0)
    if fd < 0:
        err = ctypes.get_errno()
        if err == 9: continue  # EBADF: closed meanwhile
        print('pidfd_getfd: %s' % os.strerror(err), file=sys.stderr); sys.exit(3)
    s = socket.socket(fileno=fd)
    try:
        if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
            try: peer = name(s.getpeername())
            except OSError: peer = None
            out.append({'fd': int(entry), 'local': name(s.getsockname()), 'peer': peer,
                        'nodelay': s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)})
    finally:
        s.close()
print(json.dumps(out))
`;

interface SockInfo {
  fd: number;
  local: string;
  peer: string | null;
  nodelay: number;
}

/** The TCP sockets of `pid`, or a reason why they cannot be read here. */
function tcpSockets(pid: number): SockInfo[] | string {
  const r = spawnSync('python3', ['-c', SOCKOPT_HELPER, String(pid)], { encoding: 'utf8', timeout: 10_000 });
  if (r.error !== undefined) return `python3 could not be run: ${r.error.message}`;
  if (r.status === 3) return r.stderr.trim();
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout) as SockInfo[];
}

/** Whether this machine lets us read another process's sockets (root, Linux >= 5.6, python3). */
const probe = tcpSockets(process.pid);
const cannotRead = typeof probe === 'string' ? probe : null;
if (cannotRead !== null && process.env.CI) {
  test('reading another process\'s socket options works (required in CI)', () => {
    assert.fail(`cannot read socket options of another process: ${cannotRead}`);
  });
}

function addr(host: string, port: number): string {
  return `${host}:${port}`;
}

/** A client socket's address as seen in the proxy: "127.0.0.1:PORT" or "::1:PORT". */
function localOf(s: Socket): string {
  return addr(s.localAddress as string, s.localPort as number);
}

/** Hold one connection open through the proxy and read TCP_NODELAY of both of its sockets there. */
async function readBack(
  flavour: Flavour,
  args: string[],
  backend: Backend,
  listen: { kind: 'tcp'; host?: string } | { kind: 'unix'; path: string },
): Promise<{ client: SockInfo | undefined; backend: SockInfo | undefined; stderr: string }> {
  const p = await startProxy({ flavour, args: [...args, backend.address], listen: [listen] });
  try {
    const before = backend.sockets.length;
    const c = await connect(p.listeners[0]!.connectOptions);
    // A byte echoed back proves both sockets exist and carry data.
    c.write('x');
    await once(c, 'data');
    const accepted = backend.sockets[before];
    assert.ok(accepted !== undefined, 'the backend saw the connection');
    const socks = tcpSockets(p.pid);
    assert.ok(typeof socks !== 'string', socks as string);
    // The proxy's client-side socket has our client as its peer; its backend-side
    // socket is the peer of the socket the backend accepted.
    const clientSide = listen.kind === 'tcp' ? socks.find((s) => s.peer === localOf(c)) : undefined;
    const backendPeer = accepted.remoteAddress === undefined ? null : addr(accepted.remoteAddress, accepted.remotePort as number);
    const backendSide = socks.find((s) => s.local === backendPeer);
    c.destroy();
    return { client: clientSide, backend: backendSide, stderr: p.stderr() };
  } finally {
    await p.stop();
  }
}

describe('TCP_NODELAY read back from the proxy\'s sockets', { skip: cannotRead ?? false }, () => {
  test('default: set on the accepted socket and on the backend socket (IPv4)', async () => {
    const backend = await startBackend(echo);
    try {
      const r = await readBack('ours', [], backend, { kind: 'tcp' });
      assert.ok(r.client !== undefined && r.backend !== undefined, 'both sockets found');
      assert.equal(r.client.nodelay, 1, 'accepted (client) socket');
      assert.equal(r.backend.nodelay, 1, 'backend socket');
      assert.equal(r.stderr, '');
    } finally {
      await backend.close();
    }
  });

  test('default: set on both sockets over IPv6 too', async () => {
    const backend = await startBackend(echo, { host: '::1' });
    try {
      const r = await readBack('ours', [], backend, { kind: 'tcp', host: '::1' });
      assert.ok(r.client !== undefined && r.backend !== undefined, 'both sockets found');
      assert.equal(r.client.nodelay, 1);
      assert.equal(r.backend.nodelay, 1);
    } finally {
      await backend.close();
    }
  });

  // (Every boolean word is parsed in args.test.ts; here one of them, end to end.)
  test('--nodelay=no: set on neither socket', async () => {
    const backend = await startBackend(echo);
    try {
      const r = await readBack('ours', ['--nodelay=no'], backend, { kind: 'tcp' });
      assert.ok(r.client !== undefined && r.backend !== undefined, 'both sockets found');
      assert.equal(r.client.nodelay, 0);
      assert.equal(r.backend.nodelay, 0);
    } finally {
      await backend.close();
    }
  });

  test('control: the C reference sets it on neither (the read-back can say 0)', async () => {
    const backend = await startBackend(echo);
    try {
      const r = await readBack('ref', [], backend, { kind: 'tcp' });
      assert.ok(r.client !== undefined && r.backend !== undefined, 'both sockets found');
      assert.equal(r.client.nodelay, 0);
      assert.equal(r.backend.nodelay, 0);
    } finally {
      await backend.close();
    }
  });

  test('library: ProxyOptions.noDelay defaults to on, false leaves it off (host-name target via lookup)', async () => {
    const backend = await startBackend(echo);
    const lookup: LookupFunction = (_host, _options, callback) => setImmediate(callback, null, [{ address: '127.0.0.1', family: 4 }]);
    try {
      for (const noDelay of [undefined, true, false]) {
        const proxy = createProxy({
          target: parseAddress(`backend.example:${backend.port}`),
          connectionsMax: 10,
          exitIdleTimeUsec: null,
          logger: { maxLevel: 6, log: () => {} },
          lookup,
          ...(noDelay === undefined ? {} : { noDelay }),
        });
        const server = await listenOnAddress(proxy, parseAddress('127.0.0.1:0', true));
        try {
          const before = backend.sockets.length;
          const c = await connect({ host: '127.0.0.1', port: (server.address() as AddressInfo).port });
          c.write('x');
          await once(c, 'data');
          const accepted = backend.sockets[before] as Socket;
          // This process holds all four sockets; the proxy's two are found by their peers.
          const socks = tcpSockets(process.pid);
          assert.ok(typeof socks !== 'string', socks as string);
          const want = noDelay === false ? 0 : 1;
          assert.equal(socks.find((s) => s.peer === localOf(c))?.nodelay, want, `accepted socket, noDelay ${String(noDelay)}`);
          assert.equal(
            socks.find((s) => s.local === addr(accepted.remoteAddress as string, accepted.remotePort as number))?.nodelay,
            want,
            `backend socket, noDelay ${String(noDelay)}`,
          );
          c.destroy();
        } finally {
          closeProxy(proxy);
        }
      }
    } finally {
      await backend.close();
    }
  });

  test('UNIX listener to a TCP backend: the backend socket gets it; TCP listener to a UNIX backend works', async () => {
    const tcpBackend = await startBackend(echo);
    const unixBackend = await startBackend(echo, { path: join(tmp.dir, 'backend.sock') });
    try {
      const r = await readBack('ours', [], tcpBackend, { kind: 'unix', path: join(tmp.dir, 'listen.sock') });
      assert.equal(r.backend?.nodelay, 1);
      assert.equal(r.stderr, '');
      // A UNIX backend has no TCP_NODELAY: the accepted TCP socket still gets it, and nothing fails.
      const p = await startProxy({ args: [unixBackend.address], listen: [{ kind: 'tcp' }] });
      try {
        const c = await connect(p.listeners[0]!.connectOptions);
        c.write('y');
        const [data] = (await once(c, 'data')) as [Buffer];
        assert.equal(data.toString(), 'y');
        const socks = tcpSockets(p.pid);
        assert.ok(typeof socks !== 'string');
        assert.equal(socks.find((s) => s.peer === localOf(c))?.nodelay, 1);
        c.destroy();
        assert.equal(p.stderr(), '');
      } finally {
        await p.stop();
      }
    } finally {
      await tcpBackend.close();
      await unixBackend.close();
    }
  });
});

// ---------------------------------------------------------------------------------------------
// The effect on latency.

/** Pause between the two pieces of a message: long enough that the proxy reads them apart. */
const PIECE_GAP_MS = 1;

/** A round trip this long is a Nagle stall (the delayed-ACK timer is >= 40 ms on Linux). */
const STALL_MS = 30;

function later(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Backend: each request ends with "\n"; the reply is "HEAD" and, in a second write
 * PIECE_GAP_MS later, "BODY\n". Its own socket has TCP_NODELAY (as nginx's has), so
 * the two pieces leave it as two segments: any stall is the proxy's.
 */
function twoPieceServer(s: Socket): void {
  s.setNoDelay(true);
  let pending = '';
  s.setEncoding('latin1');
  s.on('data', (d: string) => {
    pending += d;
    while (pending.includes('\n')) {
      pending = pending.slice(pending.indexOf('\n') + 1);
      s.write('HEAD');
      setTimeout(() => s.write('BODY\n'), PIECE_GAP_MS);
    }
  });
}

/**
 * One client connection that times split round trips: the request too goes in two
 * writes ("REQ", then "UEST\n"), so both of the proxy's sockets carry split messages.
 */
interface Pinger {
  /** ms from the first write to the reply's last byte */
  roundTrip(): Promise<number>;
  close(): void;
}

async function pinger(target: { host: string; port: number } | { path: string }): Promise<Pinger> {
  const c = await connect(target);
  c.setNoDelay(true);
  c.setEncoding('latin1');
  let got = '';
  let wake: (() => void) | null = null;
  c.on('data', (d: string) => {
    got += d;
    if (got.endsWith('\n')) wake?.();
  });
  const p: Pinger = {
    async roundTrip() {
      got = '';
      const replied = new Promise<void>((resolve, reject) => {
        const timer = setTimeout(() => reject(new Error('no reply in 5 s')), 5000);
        wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      const start = performance.now();
      c.write('REQ');
      await later(PIECE_GAP_MS);
      c.write('UEST\n');
      await replied;
      const ms = performance.now() - start;
      assert.equal(got, 'HEADBODY\n');
      return ms;
    },
    close: () => c.destroy(),
  };
  // Not counted: this one waits for the proxy to start and to connect to the backend.
  await p.roundTrip();
  return p;
}

/**
 * Round trips of 200 that may stall through the proxy beyond those that stall direct:
 * what a busy shared machine (CI, parallel tests) does to one more process. Nagle
 * stalls nearly every round trip.
 */
const MARGIN = 10;

function stalls(times: number[]): number {
  return times.filter((ms) => ms >= STALL_MS).length;
}

function summary(times: number[]): string {
  const sorted = [...times].sort((a, b) => a - b);
  const at = (q: number): string => (sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] as number).toFixed(1);
  return `n=${times.length} p50=${at(0.5)} p99=${at(0.99)} max=${at(1)} ms, ${stalls(times)} >= ${STALL_MS} ms`;
}

function median(times: number[]): number {
  return [...times].sort((a, b) => a - b)[times.length >> 1] as number;
}

/**
 * `count` round trips through the proxy, each followed by one straight to the backend
 * (no proxy), so both see the same load on the machine. A busy machine can pause any
 * process for 30 ms now and then; the direct round trips show how often that happens,
 * and the proxied ones may stall that often, plus a small margin, but no more. Stops
 * early once the proxy is clearly stalling, which bounds the time a Nagle proxy takes.
 */
async function compareWithDirect(proxied: Pinger, direct: Pinger, count: number, margin: number): Promise<{ via: number[]; direct: number[] }> {
  const via: number[] = [];
  const straight: number[] = [];
  for (let i = 0; i < count; i++) {
    via.push(await proxied.roundTrip());
    straight.push(await direct.roundTrip());
    if (stalls(via) > stalls(straight) + margin) break;
  }
  return { via, direct: straight };
}

describe('split messages through the proxy: no Nagle stall', () => {
  test('200 round trips, each message in two writes: none near 40 ms; with --nodelay=no they stall', async (t) => {
    const backend = await startBackend(twoPieceServer);
    const direct = await pinger({ host: '127.0.0.1', port: backend.port });
    try {
      const on = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
      let r: { via: number[]; direct: number[] };
      try {
        const via = await pinger(on.listeners[0]!.connectOptions);
        r = await compareWithDirect(via, direct, 200, MARGIN);
        via.close();
      } finally {
        await on.stop();
      }
      t.diagnostic(`default: ${summary(r.via)}; direct meanwhile: ${summary(r.direct)}`);
      // With Nagle nearly every round trip stalls (~40 ms per direction); with TCP_NODELAY
      // none should, beyond what the machine does to a direct connection meanwhile. The
      // proxy is one more process for the scheduler to pause, hence the margin.
      assert.equal(r.via.length, 200, `stopped early: stalls through the proxy: ${summary(r.via)}; direct: ${summary(r.direct)}`);
      assert.ok(stalls(r.via) <= stalls(r.direct) + MARGIN, `no more stalls than direct: ${summary(r.via)}; direct: ${summary(r.direct)}`);
      assert.ok(median(r.via) < STALL_MS / 2, `round trips take a few ms: ${summary(r.via)}`);

      // The control: the same exchange through the same proxy with Nagle left on.
      const off = await startProxy({ args: ['--nodelay=no', backend.address], listen: [{ kind: 'tcp' }] });
      try {
        const via = await pinger(off.listeners[0]!.connectOptions);
        r = await compareWithDirect(via, direct, 40, MARGIN);
        via.close();
      } finally {
        await off.stop();
      }
      t.diagnostic(`--nodelay=no: ${summary(r.via)}; direct meanwhile: ${summary(r.direct)}`);
      assert.ok(stalls(r.via) > stalls(r.direct) + MARGIN, `without TCP_NODELAY round trips stall: ${summary(r.via)}; direct: ${summary(r.direct)}`);
      assert.ok(median(r.via) >= STALL_MS, `without TCP_NODELAY the typical round trip stalls: ${summary(r.via)}`);
    } finally {
      direct.close();
      await backend.close();
    }
  });
});
