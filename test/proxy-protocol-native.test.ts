/**
 * native/proxy_header.c, the addon that reads an accepted socket's two addresses and writes the
 * PROXY protocol header in one call, against the TypeScript encoder it replaces on the data path:
 * - it tells whether the client's first bytes already wait in the socket (FIONREAD), so the
 *   engine sends the header with them or alone at once, without a turn of the event loop;
 * - on real connections (many IPv4 loopback addresses and ports, ::1, an IPv4 client on a
 *   dual-stack socket, a UNIX socket) the addon's v1 and v2 headers are byte for byte the
 *   TypeScript ones, and both are the bytes written out here from the addresses the test chose;
 * - the CLI loads it only with --proxy-protocol= (its file is mapped in the proxy then, not
 *   otherwise), and what the backend receives is that header;
 * - prebuilds/linux-x64 and linux-arm64 rebuild byte for byte with native/build.sh;
 * - the arm64 build loads and encodes under qemu-aarch64-static (arm64 Node of npm).
 * nginx and haproxy check the headers the CLI sends in proxy-protocol-receivers.test.ts.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { clientBytesWaiting, headerFor, headerForJs, loadHeaderAddon } from '../src/engine/proxy-protocol.ts';
import type { StreamHandle } from '../src/engine/uv.ts';
import { ROOT, startProxy, tempDir } from './helpers.ts';
import { ARM64_NODE, CROSS_CC, arm64Runner, missing, onPath } from './arm64-helpers.ts';
import { gccIdent } from './notify-helpers.ts';

const SIG = '0d0a0d0a000d0a515549540a';
const tmp = tempDir();
process.on('exit', () => tmp.cleanup());

/** A connected pair: the accepted socket (whose header we make) and the client. */
async function accepted(listen: net.ListenOptions, connect: net.NetConnectOpts): Promise<{ server: net.Socket; client: net.Socket; close(): void }> {
  // pauseOnConnect: the accepted side never reads, so what a client sends waits in the socket.
  const srv = net.createServer({ pauseOnConnect: true });
  srv.listen(listen);
  await once(srv, 'listening');
  const addr = srv.address();
  const opts = typeof addr === 'string' || addr === null ? connect : ({ ...connect, port: addr.port } as net.NetConnectOpts);
  const client = net.connect(opts);
  const [server] = (await once(srv, 'connection')) as [net.Socket];
  if (client.connecting) await once(client, 'connect');
  return {
    server,
    client,
    close() {
      client.destroy();
      server.destroy();
      srv.close();
    },
  };
}

/** headerFor() / headerForJs() where a header is due (a client that is still there). */
function hdr(version: 1 | 2, handle: StreamHandle): Buffer {
  const b = headerFor(version, handle);
  assert.ok(b !== null, 'a header, not "client gone"');
  return b;
}
function hdrJs(version: 1 | 2, handle: StreamHandle): Buffer {
  const b = headerForJs(version, handle);
  assert.ok(b !== null, 'a header, not "client gone"');
  return b;
}
const handleOf = (s: net.Socket): StreamHandle => (s as unknown as { _handle: StreamHandle })._handle;
const port16 = (p: number): string => p.toString(16).padStart(4, '0');
const v4hex = (a: string): string => a.split('.').map((o) => Number(o).toString(16).padStart(2, '0')).join('');

test('the addon loads from prebuilds/ for this platform', () => {
  assert.equal(loadHeaderAddon(), null, 'loadHeaderAddon() says why not');
  assert.ok(existsSync(join(ROOT, 'prebuilds', `${process.platform}-${process.arch}`, 'proxy_header.node')));
});

test('IPv4: 24 pairs of loopback addresses and ports, addon = TypeScript = the bytes expected', async () => {
  assert.equal(loadHeaderAddon(), null);
  let seed = 12345;
  const rand = (n: number): number => {
    seed = (seed * 1103515245 + 12345) >>> 0;
    return seed % n;
  };
  for (let i = 0; i < 24; i++) {
    const dst = `127.${rand(256)}.${rand(256)}.${1 + rand(254)}`;
    const src = `127.${rand(256)}.${rand(256)}.${1 + rand(254)}`;
    const c = await accepted({ host: dst, port: 0 }, { host: dst, localAddress: src, port: 0 });
    try {
      const h = handleOf(c.server);
      const sp = c.client.localPort as number;
      const dp = c.server.localPort as number;
      const v1 = `PROXY TCP4 ${src} ${dst} ${sp} ${dp}\r\n`;
      const v2 = `${SIG}2111000c${v4hex(src)}${v4hex(dst)}${port16(sp)}${port16(dp)}`;
      assert.equal(hdr(1, h).toString('latin1'), v1);
      assert.equal(hdrJs(1, h).toString('latin1'), v1);
      assert.equal(hdr(2, h).toString('hex'), v2);
      assert.equal(hdrJs(2, h).toString('hex'), v2);
    } finally {
      c.close();
    }
  }
});

test('IPv6 ::1, and an IPv4 client on a dual-stack socket (demoted to TCP4), addon = TypeScript', async () => {
  const six = await accepted({ host: '::1', port: 0 }, { host: '::1', port: 0 });
  try {
    const h = handleOf(six.server);
    const sp = six.client.localPort as number;
    const dp = six.server.localPort as number;
    const one = '00000000000000000000000000000001';
    assert.equal(hdr(1, h).toString('latin1'), `PROXY TCP6 ::1 ::1 ${sp} ${dp}\r\n`);
    assert.equal(hdr(2, h).toString('hex'), `${SIG}21210024${one}${one}${port16(sp)}${port16(dp)}`);
    assert.ok(hdr(1, h).equals(hdrJs(1, h)));
    assert.ok(hdr(2, h).equals(hdrJs(2, h)));
  } finally {
    six.close();
  }
  const dual = await accepted({ host: '::', port: 0, ipv6Only: false }, { host: '127.0.0.1', localAddress: '127.0.0.9', port: 0 });
  try {
    const h = handleOf(dual.server);
    assert.equal(dual.server.remoteAddress, '::ffff:127.0.0.9', 'the accepted socket sees a mapped address');
    const sp = dual.client.localPort as number;
    const dp = dual.server.localPort as number;
    assert.equal(hdr(1, h).toString('latin1'), `PROXY TCP4 127.0.0.9 127.0.0.1 ${sp} ${dp}\r\n`);
    assert.equal(hdr(2, h).toString('hex'), `${SIG}2111000c7f0000097f000001${port16(sp)}${port16(dp)}`);
    assert.ok(hdr(1, h).equals(hdrJs(1, h)));
    assert.ok(hdr(2, h).equals(hdrJs(2, h)));
  } finally {
    dual.close();
  }
});

test('a UNIX socket client: v1 PROXY UNKNOWN, v2 LOCAL, from both', async () => {
  const c = await accepted({ path: join(tmp.dir, 'unix.sock') }, { path: join(tmp.dir, 'unix.sock') });
  try {
    const h = handleOf(c.server);
    for (const f of [hdr, hdrJs]) {
      assert.equal(f(1, h).toString('latin1'), 'PROXY UNKNOWN\r\n');
      assert.equal(f(2, h).toString('hex'), `${SIG}20000000`);
    }
  } finally {
    c.close();
  }
});

test('clientBytesWaiting(): false before the client sent a byte, true once its bytes wait in the socket (TCP and UNIX)', async () => {
  for (const [listen, conn] of [
    [{ host: '127.0.0.1', port: 0 }, { host: '127.0.0.1', port: 0 }],
    [{ path: join(tmp.dir, 'waiting.sock') }, { path: join(tmp.dir, 'waiting.sock') }],
  ] as [net.ListenOptions, net.NetConnectOpts][]) {
    const c = await accepted(listen, conn);
    try {
      hdr(2, handleOf(c.server));
      assert.equal(clientBytesWaiting(), false, 'nothing sent yet');
      c.client.write('x');
      const deadline = Date.now() + 5000;
      let waiting = false;
      while (!waiting && Date.now() < deadline) {
        await new Promise((r) => setTimeout(r, 5));
        hdr(2, handleOf(c.server));
        waiting = clientBytesWaiting();
      }
      assert.equal(waiting, true, 'the byte is seen waiting');
      hdrJs(2, handleOf(c.server));
      assert.equal(clientBytesWaiting(), true, 'hdrJs() does not touch the flag');
    } finally {
      c.close();
    }
  }
});

test('a TCP client that reset: no header at all (null), from both, never LOCAL / UNKNOWN in its name', async () => {
  const c = await accepted({ host: '127.0.0.1', port: 0 }, { host: '127.0.0.1', port: 0 });
  try {
    c.client.write('hello');
    c.client.resetAndDestroy();
    const handle = handleOf(c.server) as unknown as { getpeername(o: object): number };
    const deadline = Date.now() + 5000;
    while (handle.getpeername({}) === 0 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
    assert.notEqual(handle.getpeername({}), 0, 'the reset has arrived');
    for (const version of [1, 2] as const) {
      assert.equal(headerFor(version, handleOf(c.server)), null, `v${version}: addon`);
      assert.equal(headerForJs(version, handleOf(c.server)), null, `v${version}: TypeScript`);
    }
  } finally {
    c.close();
  }
});

test('the CLI: a client that sent its request and reset while the backend was not up yet is dropped, the backend gets no byte of it', async (t) => {
  const sock = join(tmp.dir, 'late-backend.sock');
  const proxy = await startProxy({ args: ['--proxy-protocol=v2', '--connect-retry=20s', sock], listen: [{ kind: 'tcp' }], env: { SYSTEMD_LOG_LEVEL: 'debug' } });
  t.after(() => proxy.stop());
  const port = (proxy.listeners[0]?.connectOptions as { port: number }).port;
  const client = net.connect({ host: '127.0.0.1', port });
  await once(client, 'connect');
  client.write('GET /delete-everything HTTP/1.0\r\n\r\n');
  await new Promise((r) => setTimeout(r, 100));
  client.resetAndDestroy();
  await new Promise((r) => setTimeout(r, 100));
  // The backend comes up now: the proxy's waiting client connects at its next probe (<= 200 ms),
  // well before its once-a-second check for resets.
  const got: Buffer[] = [];
  let conns = 0;
  const backend = net.createServer((s) => {
    conns++;
    s.on('data', (d: Buffer) => got.push(d));
    s.on('error', () => {});
  });
  backend.listen(sock);
  await once(backend, 'listening');
  t.after(() => backend.close());
  await new Promise((r) => setTimeout(r, 1500));
  assert.equal(Buffer.concat(got).length, 0, `the backend got ${Buffer.concat(got).toString('latin1')}`);
  assert.doesNotMatch(proxy.stderr(), /reporting fallback proxy data/, 'no LOCAL header was made for it');
  t.diagnostic(`${conns} backend connection(s) for the client that reset`);
  // And a client that stays is served, header first.
  const ok = net.connect({ host: '127.0.0.1', port });
  await once(ok, 'connect');
  ok.write('hi');
  await new Promise<void>((resolve) => {
    const check = (): void => {
      if (Buffer.concat(got).length >= 30) resolve();
      else setTimeout(check, 10);
    };
    check();
  });
  ok.destroy();
  const bytes = Buffer.concat(got);
  assert.equal(bytes.subarray(0, 12).toString('hex'), SIG.replace(/ /g, ''));
  assert.equal(bytes.subarray(28).toString(), 'hi');
});

test('each header is a buffer of its own: a later header does not change an earlier one', async () => {
  const a = await accepted({ host: '127.0.0.1', port: 0 }, { host: '127.0.0.1', localAddress: '127.0.0.2', port: 0 });
  const b = await accepted({ host: '::1', port: 0 }, { host: '::1', port: 0 });
  try {
    const first = hdr(2, handleOf(a.server));
    const copy = Buffer.from(first);
    hdr(2, handleOf(b.server));
    hdr(1, handleOf(b.server));
    assert.ok(first.equals(copy));
  } finally {
    a.close();
    b.close();
  }
});

/** Whether the process maps our proxy_header addon (any arch). */
function mapsHeaderAddon(pid: number): boolean {
  return readFileSync(`/proc/${String(pid)}/maps`, 'utf8').includes('/proxy_header.node');
}

test('the CLI maps the addon with --proxy-protocol= only, and the backend gets its header', async (t) => {
  let got: Buffer[] = [];
  const backend = net.createServer((s) => {
    s.on('data', (d: Buffer) => {
      got.push(d);
      if (Buffer.concat(got).includes('hello')) s.end('ok');
    });
  });
  backend.listen(0, '127.0.0.1');
  await once(backend, 'listening');
  t.after(() => backend.close());
  const target = `127.0.0.1:${(backend.address() as net.AddressInfo).port}`;
  /** One connection through the proxy from 127.0.0.5; what the backend received. */
  const through = async (port: number): Promise<{ bytes: Buffer; localPort: number }> => {
    got = [];
    const client = net.connect({ host: '127.0.0.1', port, localAddress: '127.0.0.5' });
    await once(client, 'connect');
    const localPort = client.localPort as number;
    client.end('hello');
    const reply: Buffer[] = [];
    client.on('data', (d: Buffer) => reply.push(d));
    await once(client, 'close');
    assert.equal(Buffer.concat(reply).toString(), 'ok');
    return { bytes: Buffer.concat(got), localPort };
  };
  for (const args of [[target], ['--proxy-protocol=v2', target]]) {
    const proxy = await startProxy({ args, listen: [{ kind: 'tcp' }] });
    t.after(() => proxy.stop());
    const port = (proxy.listeners[0]?.connectOptions as { port: number }).port;
    const { bytes, localPort } = await through(port);
    if (args.length === 1) {
      assert.equal(bytes.toString(), 'hello', 'no header without the option');
      assert.equal(mapsHeaderAddon(proxy.pid), false, 'not loaded without --proxy-protocol=');
    } else {
      assert.equal(bytes.subarray(0, 28).toString('hex'), `${SIG}2111000c7f0000057f000001${port16(localPort)}${port16(port)}`);
      assert.equal(bytes.subarray(28).toString(), 'hello');
      assert.equal(mapsHeaderAddon(proxy.pid), true, 'loaded with --proxy-protocol=v2');
    }
  }
});

for (const arch of ['x64', 'arm64'] as const) {
  test(`native/build.sh rebuilds prebuilds/linux-${arch}/proxy_header.node byte for byte`, (t) => {
    const native = process.arch === arch;
    const cc = native ? (process.env['CC'] ?? 'gcc') : arch === 'arm64' ? CROSS_CC : null;
    if (cc === null) {
      t.skip(`no cross compiler for ${arch} is set up here`);
      return;
    }
    if (!onPath(cc)) {
      missing(t, `${cc} not found (scripts/ci-deps.sh installs it)`);
      return;
    }
    const committed = readFileSync(join(ROOT, 'prebuilds', `linux-${arch}`, 'proxy_header.node'));
    assert.equal(committed.readUInt16LE(18), arch === 'arm64' ? 183 : 62, 'e_machine of the committed prebuild');
    const out = join(tmp.dir, `build-${arch}`, 'proxy_header.node');
    const build = spawnSync(join(ROOT, 'native', 'build.sh'), [`--arch=${arch}`, out], {
      encoding: 'utf8',
      timeout: 60_000,
      env: { ...process.env, CC: cc },
    });
    assert.equal(build.status, 0, `build.sh failed: ${build.stderr}`);
    const version = spawnSync(cc, ['--version'], { encoding: 'utf8', timeout: 10_000 });
    const committedBy = gccIdent(committed.toString('latin1'));
    assert.notEqual(committedBy, null, 'the prebuild names the GCC that built it');
    if (committedBy !== gccIdent(version.stdout)) {
      t.diagnostic(`prebuild made by ${String(committedBy)}, local ${cc} differs: byte comparison not possible`);
      return;
    }
    assert.ok(readFileSync(out).equals(committed), `prebuilds/linux-${arch}/proxy_header.node differs from a fresh build: run npm run prebuilds and commit`);
  });
}

test('the arm64 addon, under the arm64 Node, writes the same header as the TypeScript encoder', async (t: TestContext) => {
  const run = arm64Runner(t);
  if (run === null) return;
  // dist/ is tsc's output (npm test builds it first): the same module the CLI uses.
  const script = `
    import net from 'node:net';
    import { once } from 'node:events';
    const m = await import(${JSON.stringify(join(ROOT, 'dist', 'engine', 'proxy-protocol.js'))});
    const why = m.loadHeaderAddon();
    const srv = net.createServer().listen(0, '127.0.0.1');
    await once(srv, 'listening');
    const c = net.connect({ host: '127.0.0.1', port: srv.address().port, localAddress: '127.0.0.7' });
    const [s] = await once(srv, 'connection');
    const out = { why, arch: process.arch, v1: m.headerFor(1, s._handle).toString('hex'), v2: m.headerFor(2, s._handle).toString('hex'),
      js1: m.headerForJs(1, s._handle).toString('hex'), js2: m.headerForJs(2, s._handle).toString('hex'), sp: c.localPort, dp: srv.address().port,
      mapped: (await import('node:fs')).readFileSync('/proc/self/maps', 'utf8').includes('linux-arm64/proxy_header.node') };
    console.log(JSON.stringify(out));
    c.destroy(); s.destroy(); srv.close();
  `;
  const r = await run(['--input-type=module', '-e', script]);
  assert.equal(r.status, 0, r.stderr);
  const out = JSON.parse(r.stdout) as { why: string | null; arch: string; v1: string; v2: string; js1: string; js2: string; sp: number; dp: number; mapped: boolean };
  assert.equal(out.arch, 'arm64');
  assert.equal(out.why, null, 'the arm64 addon loaded');
  assert.equal(out.mapped, true, 'prebuilds/linux-arm64/proxy_header.node is mapped');
  assert.equal(Buffer.from(out.v1, 'hex').toString('latin1'), `PROXY TCP4 127.0.0.7 127.0.0.1 ${out.sp} ${out.dp}\r\n`);
  assert.equal(out.v2, `${SIG}2111000c7f0000077f000001${port16(out.sp)}${port16(out.dp)}`);
  assert.equal(out.js1, out.v1);
  assert.equal(out.js2, out.v2);
  t.diagnostic(`arm64 Node at ${ARM64_NODE}`);
});
