/**
 * --proxy-protocol=v1|v2 against REAL receivers, through the real CLI (dist/cli.js):
 *
 * - nginx (`listen ... proxy_protocol`) reports what it parsed ($proxy_protocol_addr,
 *   _port, _server_addr, _server_port) in a header to a small app behind it, which
 *   echoes that and the request body back;
 * - haproxy (`bind ... accept-proxy`, mode tcp) relays to an echo server with
 *   `send-proxy`, i.e. re-encodes what it parsed as a v1 line, and relays the bytes;
 *
 * for v1 and v2, with the client on IPv4, IPv6, a dual-stack socket (IPv4 client:
 * must arrive as plain IPv4) and a UNIX socket (v1 UNKNOWN / v2 LOCAL: accepted, and
 * the receiver keeps the connection's own addresses), with UNIX and TCP targets, and
 * the client's bytes intact after the header; UNIX, TCP and [::1]:PORT targets. Plus, on the wire: exactly the header then the client's bytes,
 * and nothing at all without the option; [::1]:PORT, @abstract and host-name targets;
 * a header write that fails (LD_PRELOAD shim); and the man page's unit files with
 * systemd v261's `--proxy-protocol=v1`, run by systemd-socket-activate and by a real
 * systemd manager (socket activation, Type=notify, PrivateTmp=, PrivateNetwork=)
 * against nginx.
 *
 * nginx and haproxy run as foreground processes with their own configuration in a
 * temporary directory, on UNIX sockets or on ports found free by binding port 0,
 * and are killed at the end. Missing: a failure under CI, otherwise a skip.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { accessSync, constants, mkdirSync, readFileSync, readlinkSync, realpathSync, writeFileSync } from 'node:fs';
import { createServer as createHttpServer } from 'node:http';
import { createServer, type Server, type Socket } from 'node:net';
import { dirname, join } from 'node:path';
import {
  OURS,
  ROOT,
  connect,
  randomBytes,
  readAll,
  startBackend,
  startProxy,
  tempDir,
  waitFor,
  type Listener,
  type ListenSpec,
  type Proxy,
} from './helpers.ts';
import { managerUnavailable, startManager } from './systemd-manager.ts';

const tmp = tempDir();
const children = new Set<ChildProcess>();
process.on('exit', () => {
  for (const child of children) child.kill('SIGKILL');
  tmp.cleanup();
});

const CI = process.env.CI !== undefined && process.env.CI !== '';

/** A program's path, looked up in PATH and the sbin directories (nginx and haproxy live there). */
function findProgram(name: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(':'), '/usr/sbin', '/sbin', '/usr/local/sbin'];
  for (const dir of dirs) {
    if (dir === '') continue;
    try {
      accessSync(join(dir, name), constants.X_OK);
      return join(dir, name);
    } catch {
      // not here
    }
  }
  return null;
}

/** `false` (run) or a skip reason; under CI a missing program fails instead. */
function missing(...names: string[]): string | false {
  const absent = names.filter((n) => findProgram(n) === null);
  if (absent.length === 0) return false;
  const why = `${absent.join(', ')} not installed (scripts/ci-deps.sh installs ${absent.length > 1 ? 'them' : 'it'})`;
  if (CI) throw new Error(why);
  return why;
}

/** A free TCP port: bind port 0, read it, close. (Another process could take it in between; unlikely.) */
async function freePort(host = '127.0.0.1'): Promise<number> {
  const s = createServer();
  s.listen({ host, port: 0 });
  await once(s, 'listening');
  const port = (s.address() as { port: number }).port;
  s.close();
  await once(s, 'close');
  return port;
}

/** Spawn a receiver in the foreground; killed at the end of the file (or of the process). */
function spawnReceiver(cmd: string, args: string[]): { child: ChildProcess; output: () => string } {
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  children.add(child);
  child.on('exit', () => children.delete(child));
  let out = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (out += d));
  return { child, output: () => out };
}

async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, 'exit');
  child.kill('SIGKILL');
  await exited;
}

/** Wait until something accepts on a UNIX path or a TCP port. */
async function waitAccepting(where: { path: string } | { host: string; port: number }, child: ChildProcess, output: () => string): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (child.exitCode !== null) throw new Error(`receiver exited (${child.exitCode}): ${output()}`);
    try {
      const s = await connect(where);
      s.destroy();
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`receiver not accepting on ${JSON.stringify(where)}: ${output()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/**
 * Wait until the receiver accepts everywhere; if it does not, kill it and close what is behind
 * it before failing, or its pipes would keep this process (and the test run) alive.
 */
async function waitAcceptingAll(
  wheres: Array<{ path: string } | { host: string; port: number }>,
  child: ChildProcess,
  output: () => string,
  behind: Server,
): Promise<void> {
  try {
    for (const where of wheres) await waitAccepting(where, child, output);
  } catch (err) {
    await stopChild(child);
    behind.close();
    throw err;
  }
}

interface Receiver {
  /** UNIX socket the receiver listens on, with the PROXY protocol required. */
  path: string;
  /** TCP port (127.0.0.1) it also listens on, PROXY protocol required. */
  port: number;
  /** TCP port on ::1, PROXY protocol required. */
  port6: number;
  child: ChildProcess;
  output: () => string;
  /** The app/echo server behind it. */
  behind: Server;
}

// ---------------------------------------------------------------------------------------------
// nginx: http, `listen ... proxy_protocol`; the parsed values go to the app in X-PP.

const NGINX_PP = 'a=$proxy_protocol_addr p=$proxy_protocol_port sa=$proxy_protocol_server_addr sp=$proxy_protocol_server_port';

function nginxConf(dir: string, listens: string[], app: string): string {
  return `daemon off;
master_process off;
worker_processes 1;
pid ${dir}/nginx.pid;
error_log ${dir}/error.log info;
events { worker_connections 128; }
http {
  access_log off;
  client_body_temp_path ${dir}/body;
  proxy_temp_path ${dir}/proxy;
  fastcgi_temp_path ${dir}/fastcgi;
  uwsgi_temp_path ${dir}/uwsgi;
  scgi_temp_path ${dir}/scgi;
  server {
${listens.map((l) => `    listen ${l} proxy_protocol;`).join('\n')}
    location / {
      proxy_pass http://unix:${app}:;
      proxy_set_header X-PP "${NGINX_PP}";
      client_max_body_size 1m;
    }
  }
}
`;
}

/** The app behind nginx: replies `pp=<X-PP>\n` followed by the request body, byte for byte. */
async function startApp(path: string): Promise<Server> {
  const app = createHttpServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (d: Buffer) => chunks.push(d));
    req.on('end', () => {
      const body = Buffer.concat([Buffer.from(`pp=${String(req.headers['x-pp'] ?? '')}\n`), ...chunks]);
      res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': body.length });
      res.end(body);
    });
  });
  app.listen(path);
  await once(app, 'listening');
  return app;
}

async function startNginx(name: string): Promise<Receiver> {
  const dir = join(tmp.dir, name);
  mkdirSync(dir);
  const path = join(dir, 'nginx.sock');
  const port = await freePort();
  const port6 = await freePort('::1');
  const behind = await startApp(join(dir, 'app.sock'));
  const conf = join(dir, 'nginx.conf');
  writeFileSync(conf, nginxConf(dir, [`unix:${path}`, `127.0.0.1:${port}`, `[::1]:${port6}`], join(dir, 'app.sock')));
  const { child, output } = spawnReceiver(findProgram('nginx') as string, ['-p', dir, '-e', join(dir, 'error.log'), '-c', conf]);
  await waitAcceptingAll([{ path }, { host: '::1', port: port6 }], child, output, behind);
  return { path, port, port6, child, output, behind };
}

/** One HTTP request through the proxy to nginx; resolves with nginx's view and the echoed body. */
async function viaNginx(to: { host: string; port: number } | { path: string }, body: Buffer): Promise<{ pp: string; body: Buffer; clientPort: number }> {
  const s = await connect(to);
  const clientPort = s.localPort ?? 0;
  const reading = readAll(s);
  // No half-close: nginx would take the client's EOF for an abort.
  s.write(Buffer.concat([Buffer.from(`POST /t HTTP/1.0\r\nHost: t\r\nContent-Length: ${body.length}\r\n\r\n`), body]));
  const r = await reading;
  s.destroy();
  const text = r.data;
  const head = text.indexOf('\r\n\r\n');
  assert.ok(head > 0, `an HTTP response from nginx, got ${JSON.stringify(text.subarray(0, 200).toString('latin1'))}`);
  assert.match(text.subarray(0, head).toString('latin1'), /^HTTP\/1\.1 200 /);
  const payload = text.subarray(head + 4);
  const nl = payload.indexOf('\n');
  return { pp: payload.subarray(0, nl).toString('latin1'), body: payload.subarray(nl + 1), clientPort };
}

// ---------------------------------------------------------------------------------------------
// haproxy: mode tcp, `accept-proxy`, relaying to an echo server with `send-proxy`.

function haproxyConf(path: string, port: number, port6: number, echoPath: string): string {
  return `global
  maxconn 256
defaults
  mode tcp
  timeout connect 5s
  timeout client 20s
  timeout server 20s
frontend fe
  bind ${path} accept-proxy
  bind 127.0.0.1:${port} accept-proxy
  bind ipv6@::1:${port6} accept-proxy
  default_backend be
backend be
  server echo ${echoPath} send-proxy
`;
}

/**
 * Behind haproxy: reads everything until the client's EOF, then replies with
 * haproxy's v1 line (without CRLF), "\n", and the rest, byte for byte.
 */
async function startEcho(path: string): Promise<Server> {
  const server = createServer({ allowHalfOpen: true }, (s) => {
    s.on('error', () => {});
    const chunks: Buffer[] = [];
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('end', () => {
      const all = Buffer.concat(chunks);
      const eol = all.indexOf('\r\n');
      s.end(eol < 0 ? Buffer.concat([Buffer.from('no header\n'), all]) : Buffer.concat([all.subarray(0, eol), Buffer.from('\n'), all.subarray(eol + 2)]));
    });
  });
  server.listen(path);
  await once(server, 'listening');
  return server;
}

async function startHaproxy(name: string): Promise<Receiver> {
  const dir = join(tmp.dir, name);
  mkdirSync(dir);
  const path = join(dir, 'haproxy.sock');
  const port = await freePort();
  const port6 = await freePort('::1');
  const behind = await startEcho(join(dir, 'echo.sock'));
  const conf = join(dir, 'haproxy.cfg');
  writeFileSync(conf, haproxyConf(path, port, port6, join(dir, 'echo.sock')));
  const { child, output } = spawnReceiver(findProgram('haproxy') as string, ['-db', '-f', conf]);
  await waitAcceptingAll([{ path }, { host: '::1', port: port6 }], child, output, behind);
  return { path, port, port6, child, output, behind };
}

/** Send `payload` through the proxy to haproxy, half-close, read the reply to EOF. */
async function viaHaproxy(to: { host: string; port: number } | { path: string }, payload: Buffer): Promise<{ line: string; rest: Buffer; clientPort: number }> {
  const s = await connect(to);
  const clientPort = s.localPort ?? 0;
  const reading = readAll(s);
  s.end(payload);
  const r = await reading;
  s.destroy();
  const nl = r.data.indexOf('\n');
  assert.ok(nl >= 0, `a reply through haproxy (ended: ${r.ended}), got ${r.data.length} bytes`);
  return { line: r.data.subarray(0, nl).toString('latin1'), rest: r.data.subarray(nl + 1), clientPort };
}

// ---------------------------------------------------------------------------------------------
// The client side: one proxy per (receiver, version) serves four listeners.

type Kind = 'ipv4' | 'ipv6' | 'dual' | 'unix';
const KINDS: Kind[] = ['ipv4', 'ipv6', 'dual', 'unix'];

function listenSpecs(name: string): ListenSpec[] {
  return [
    { kind: 'tcp', host: '127.0.0.1' },
    { kind: 'tcp', host: '::1' },
    // Node's listen on '::' is dual-stack (IPV6_V6ONLY off): an IPv4 client arrives as ::ffff:
    { kind: 'tcp', host: '::' },
    { kind: 'unix', path: join(tmp.dir, `${name}-client.sock`) },
  ];
}

/** Where a client of listener `i` connects, and the address it expects the receiver to report. */
function clientSide(l: Listener, kind: Kind): { to: { host: string; port: number } | { path: string }; address: string; port: number } {
  if (kind === 'unix') return { to: l.connectOptions, address: '', port: 0 };
  const port = (l.connectOptions as { port: number }).port;
  if (kind === 'ipv6') return { to: { host: '::1', port }, address: '::1', port };
  return { to: { host: '127.0.0.1', port }, address: '127.0.0.1', port };
}

/** nginx's X-PP for a client, given what the proxy should have told it. */
function nginxSays(address: string, clientPort: number, port: number): string {
  if (address === '') return 'a= p= sa= sp='; // LOCAL / UNKNOWN: no PROXY addresses
  return `a=${address} p=${clientPort} sa=${address} sp=${port}`;
}

/** haproxy's send-proxy line for a client. */
function haproxySays(address: string, clientPort: number, port: number): string {
  // LOCAL / UNKNOWN: haproxy keeps the real connection, which came in on a UNIX socket.
  if (address === '') return 'PROXY UNKNOWN';
  return `PROXY ${address.includes(':') ? 'TCP6' : 'TCP4'} ${address} ${address} ${clientPort} ${port}`;
}

const skipReceivers = missing('nginx', 'haproxy');

describe('real receivers', { skip: skipReceivers }, () => {
  let nginx: Receiver;
  let haproxy: Receiver;
  before(async () => {
    const started = await Promise.allSettled([startNginx('nginx'), startHaproxy('haproxy')]);
    const failed = started.find((r) => r.status === 'rejected');
    if (failed !== undefined) {
      // Stop the one that did start: its pipes would keep the test process alive.
      for (const r of started) if (r.status === 'fulfilled') await stopChild(r.value.child).then(() => r.value.behind.close());
      throw (failed as PromiseRejectedResult).reason;
    }
    [nginx, haproxy] = started.map((r) => (r as PromiseFulfilledResult<Receiver>).value) as [Receiver, Receiver];
  });
  after(async () => {
    for (const r of [nginx, haproxy]) {
      if (r === undefined) continue;
      await stopChild(r.child);
      r.behind.close();
    }
  });

  for (const version of ['v1', 'v2'] as const) {
    test(`nginx (listen ... proxy_protocol), ${version}: IPv4, IPv6, dual-stack IPv4 client as IPv4, UNIX client as ${version === 'v1' ? 'UNKNOWN' : 'LOCAL'}; body intact`, async () => {
      const name = `nginx-${version}`;
      const p = await startProxy({ args: [`--proxy-protocol=${version}`, nginx.path], listen: listenSpecs(name) });
      try {
        for (const [i, kind] of KINDS.entries()) {
          const side = clientSide(p.listeners[i] as Listener, kind);
          const body = randomBytes(4096 + i);
          const r = await viaNginx(side.to, body);
          assert.equal(r.pp, `pp=${nginxSays(side.address, r.clientPort, side.port)}`, `${kind}: what nginx parsed`);
          assert.ok(r.body.equals(body), `${kind}: the body arrived intact`);
        }
        assert.equal(p.stderr(), '', 'nothing logged at the default level (the UNIX fallback is a debug message)');
      } finally {
        await p.stop();
      }
    });

    test(`haproxy (accept-proxy), ${version}: IPv4, IPv6, dual-stack IPv4 client as IPv4, UNIX client as ${version === 'v1' ? 'UNKNOWN' : 'LOCAL'}; bytes intact, half-close`, async () => {
      const name = `haproxy-${version}`;
      const p = await startProxy({ args: [`--proxy-protocol=${version}`, haproxy.path], listen: listenSpecs(name) });
      try {
        for (const [i, kind] of KINDS.entries()) {
          const side = clientSide(p.listeners[i] as Listener, kind);
          const payload = randomBytes(65536 + i);
          const r = await viaHaproxy(side.to, payload);
          assert.equal(r.line, haproxySays(side.address, r.clientPort, side.port), `${kind}: what haproxy parsed`);
          assert.ok(r.rest.equals(payload), `${kind}: the client's bytes arrived intact`);
        }
        assert.equal(p.stderr(), '');
      } finally {
        await p.stop();
      }
    });
  }

  test('TCP targets and --listen=: nginx and haproxy on 127.0.0.1 ports, v1 and v2', async () => {
    for (const [receiver, version] of [[nginx, 'v2'], [haproxy, 'v1'], [nginx, 'v1'], [haproxy, 'v2']] as const) {
      const port = await freePort('::');
      const p = await startProxy({ args: [`--proxy-protocol=${version}`, `--listen=[::]:${port}`, `127.0.0.1:${receiver.port}`] });
      try {
        const to = { host: '127.0.0.1', port };
        await waitAcceptingProxy(to, p);
        if (receiver === nginx) {
          const body = randomBytes(1000);
          const r = await viaNginx(to, body);
          assert.equal(r.pp, `pp=${nginxSays('127.0.0.1', r.clientPort, port)}`, `nginx ${version}`);
          assert.ok(r.body.equals(body));
          const r6 = await viaNginx({ host: '::1', port }, body);
          assert.equal(r6.pp, `pp=${nginxSays('::1', r6.clientPort, port)}`, `nginx ${version} over IPv6`);
        } else {
          const payload = randomBytes(100_000);
          const r = await viaHaproxy(to, payload);
          assert.equal(r.line, haproxySays('127.0.0.1', r.clientPort, port), `haproxy ${version}`);
          assert.ok(r.rest.equals(payload));
        }
      } finally {
        await p.stop();
      }
    }
  });

  // No @abstract target here: nginx 1.22 has no abstract sockets, and haproxy 2.6's abns@ pads
  // the name with NULs to the full sun_path (a name no command line can carry); the header
  // bytes do not depend on the target's kind, and "on the wire" checks them for @abstract.
  test('IPv6 [::1]:PORT targets: nginx and haproxy, v1 and v2, IPv4 and IPv6 clients', async () => {
    const targets = [
      [nginx, `[::1]:${nginx.port6}`],
      [haproxy, `[::1]:${haproxy.port6}`],
    ] as const;
    for (const [receiver, target] of targets) {
      for (const version of ['v1', 'v2'] as const) {
        const p = await startProxy({ args: [`--proxy-protocol=${version}`, target], listen: [{ kind: 'tcp', host: '127.0.0.1' }, { kind: 'tcp', host: '::1' }] });
        try {
          for (const [i, kind] of (['ipv4', 'ipv6'] as const).entries()) {
            const side = clientSide(p.listeners[i] as Listener, kind);
            const what = `${receiver === nginx ? 'nginx' : 'haproxy'} at ${target}, ${version}, ${kind} client`;
            if (receiver === nginx) {
              const body = randomBytes(2000 + i);
              const r = await viaNginx(side.to, body);
              assert.equal(r.pp, `pp=${nginxSays(side.address, r.clientPort, side.port)}`, what);
              assert.ok(r.body.equals(body), `${what}: body intact`);
            } else {
              const payload = randomBytes(70_000 + i);
              const r = await viaHaproxy(side.to, payload);
              assert.equal(r.line, haproxySays(side.address, r.clientPort, side.port), what);
              assert.ok(r.rest.equals(payload), `${what}: bytes intact`);
            }
          }
          assert.equal(p.stderr(), '');
        } finally {
          await p.stop();
        }
      }
    }
  });

  test('control: without --proxy-protocol both receivers refuse the connection (the header is what they accepted)', async () => {
    const p = await startProxy({ args: [nginx.path], listen: [{ kind: 'tcp' }] });
    const q = await startProxy({ args: [haproxy.path], listen: [{ kind: 'tcp' }] });
    try {
      const s = await connect(p.listeners[0]!.connectOptions);
      const reading = readAll(s);
      s.write('GET / HTTP/1.0\r\n\r\n');
      const r = await reading;
      s.destroy();
      assert.equal(r.data.length, 0, `nginx answered nothing (broken header), got ${JSON.stringify(r.data.toString('latin1').slice(0, 80))}`);
      const t = await connect(q.listeners[0]!.connectOptions);
      const reading2 = readAll(t);
      t.end(Buffer.from('hello'));
      const r2 = await reading2;
      t.destroy();
      assert.equal(r2.data.length, 0, 'haproxy relayed nothing');
    } finally {
      await Promise.all([p.stop(), q.stop()]);
    }
  });
});

/** Wait until a proxy started with --listen= accepts. */
async function waitAcceptingProxy(to: { host: string; port: number }, p: Proxy): Promise<void> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    if (p.child.exitCode !== null) throw new Error(`proxy exited: ${p.stderr()}`);
    try {
      // A probe that connects and closes at once: the proxy connects the backend and tears down.
      const s = await connect(to);
      s.destroy();
      return;
    } catch {
      if (Date.now() > deadline) throw new Error(`proxy not accepting: ${p.stderr()}`);
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// On the wire, with our own backend recording the raw bytes.

/** A backend that records every byte of each connection until EOF, then closes. */
async function recordingBackend(where: { host?: string; path?: string } = {}): Promise<{ address: string; got: Promise<Buffer>[]; close(): Promise<void> }> {
  const got: Promise<Buffer>[] = [];
  const b = await startBackend((s: Socket) => {
    got.push(
      new Promise((res) => {
        const chunks: Buffer[] = [];
        s.on('data', (d: Buffer) => chunks.push(d));
        s.on('end', () => {
          s.end();
          res(Buffer.concat(chunks));
        });
        s.on('close', () => res(Buffer.concat(chunks)));
      }),
    );
  }, where);
  return { address: b.address, got, close: () => b.close() };
}

async function sendAndClose(to: { host: string; port: number } | { path: string }, payload: Buffer): Promise<number> {
  const s = await connect(to);
  const port = s.localPort ?? 0;
  // Written at once on connect: the proxy has not even reached the backend yet.
  const reading = readAll(s);
  s.end(payload);
  await reading;
  s.destroy();
  return port;
}

const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const be16 = (n: number): string => n.toString(16).padStart(4, '0');

describe('on the wire', () => {
  test('without the option nothing is sent: the backend gets exactly the client\'s bytes', async () => {
    const b = await recordingBackend();
    const p = await startProxy({ args: [b.address], listen: [{ kind: 'tcp' }, { kind: 'unix', path: join(tmp.dir, 'none.sock') }] });
    try {
      for (const l of p.listeners) {
        const payload = Buffer.concat([Buffer.from('PROXY '), randomBytes(3000)]);
        await sendAndClose(l.connectOptions, payload);
        await waitFor(() => b.got.length === p.listeners.indexOf(l) + 1, 5000, 'the backend connection');
        assert.ok((await b.got.at(-1)!).equals(payload));
      }
    } finally {
      await p.stop();
      await b.close();
    }
  });

  test('v1 and v2: exactly one header, then the client\'s bytes (written before the backend was even connected)', async (t) => {
    const b = await recordingBackend();
    const u = await recordingBackend({ path: join(tmp.dir, 'wire-backend.sock') });
    t.after(() => Promise.all([b.close(), u.close()]));
    for (const [version, backend] of [['v1', b], ['v2', b], ['v1', u], ['v2', u]] as const) {
      const before = backend.got.length;
      const p = await startProxy({ args: [`--proxy-protocol=${version}`, backend.address], listen: [{ kind: 'tcp' }, { kind: 'tcp', host: '::1' }] });
      try {
        for (const [i, l] of p.listeners.entries()) {
          const payload = randomBytes(50_000);
          const port = (l.connectOptions as { port: number }).port;
          const clientPort = await sendAndClose(l.connectOptions, payload);
          await waitFor(() => backend.got.length === before + i + 1, 5000, 'the backend connection');
          const got = await backend.got.at(-1)!;
          let header: Buffer;
          if (version === 'v1') {
            header = Buffer.from(i === 0 ? `PROXY TCP4 127.0.0.1 127.0.0.1 ${clientPort} ${port}\r\n` : `PROXY TCP6 ::1 ::1 ${clientPort} ${port}\r\n`);
          } else if (i === 0) {
            header = hex(`0d0a0d0a000d0a515549540a 21 11 000c 7f000001 7f000001 ${be16(clientPort)} ${be16(port)}`);
          } else {
            const one = '00000000000000000000000000000001';
            header = hex(`0d0a0d0a000d0a515549540a 21 21 0024 ${one} ${one} ${be16(clientPort)} ${be16(port)}`);
          }
          assert.ok(got.equals(Buffer.concat([header, payload])), `${version} via ${backend.address}, listener ${i}: got ${JSON.stringify(got.subarray(0, 60).toString('latin1'))}`);
        }
      } finally {
        await p.stop();
      }
    }
  });

  test('a backend that speaks first: with a client that sends nothing, the header goes alone and the banner comes back (v1, v2)', async (t) => {
    // Like an SMTP or SSH server behind haproxy/nginx: nothing is said before the whole header is in.
    const b = await startBackend((sock: Socket) => {
      let got = Buffer.alloc(0);
      sock.on('data', (d: Buffer) => {
        got = Buffer.concat([got, d]);
        const complete =
          got.subarray(0, 6).toString() === 'PROXY ' ? got.includes('\r\n') : got.length >= 16 && got.length >= 16 + got.readUInt16BE(14);
        if (complete && !sock.writableEnded) sock.end(`220 banner after ${got.length} header bytes\r\n`);
      });
    });
    t.after(() => b.close());
    for (const version of ['v1', 'v2']) {
      const p = await startProxy({ args: [`--proxy-protocol=${version}`, b.address], listen: [{ kind: 'tcp' }] });
      try {
        const s = await connect(p.listeners[0]?.connectOptions as { host: string; port: number });
        const r = await readAll(s, 5000);
        s.destroy();
        assert.equal(r.ended, 'eof');
        assert.match(r.data.toString(), version === 'v1' ? /^220 banner after 4[0-9] header bytes\r\n$/ : /^220 banner after 28 header bytes\r\n$/);
      } finally {
        await p.stop();
      }
    }
  });

  test('a client that half-closes without a byte: the backend gets the header, then end of file', async (t) => {
    const b = await recordingBackend();
    t.after(() => b.close());
    const p = await startProxy({ args: ['--proxy-protocol=v1', b.address], listen: [{ kind: 'tcp' }] });
    try {
      const to = p.listeners[0]?.connectOptions as { host: string; port: number };
      const clientPort = await sendAndClose(to, Buffer.alloc(0));
      await waitFor(() => b.got.length === 1, 5000, 'the backend connection');
      assert.equal((await b.got[0]!).toString(), `PROXY TCP4 127.0.0.1 127.0.0.1 ${clientPort} ${to.port}\r\n`);
    } finally {
      await p.stop();
    }
  });

  test('a client that speaks first: its first bytes leave in the same write as the header (one segment to the backend)', async (t) => {
    const got: Buffer[] = [];
    const b = await startBackend((sock: Socket) => {
      const i = got.push(Buffer.alloc(0)) - 1;
      sock.on('data', (d: Buffer) => (got[i] = Buffer.concat([got[i] as Buffer, d])));
    });
    t.after(() => b.close());
    const p = await startProxy({ args: ['--proxy-protocol=v2', b.address], listen: [{ kind: 'tcp' }] });
    const clients: Socket[] = [];
    try {
      const to = p.listeners[0]?.connectOptions as { host: string; port: number };
      const request = Buffer.from('GET / HTTP/1.1\r\nHost: x\r\n\r\n');
      // Sent while the proxy is still starting, so each request is in its socket before the
      // proxy has a backend for it (as for the client whose arrival starts a socket unit).
      for (let i = 0; i < 5; i++) {
        const s = await connect(to);
        s.write(request);
        clients.push(s);
      }
      await waitFor(() => got.length === 5 && got.every((g) => g.length === 28 + request.length), 5000, 'five headers and requests');
      for (const g of got) assert.ok(g.subarray(28).equals(request) && g.subarray(0, 12).equals(hex('0d0a0d0a000d0a515549540a')));
      // With TCP_NODELAY every write is a segment: the kernel counts one per backend socket.
      const ss = spawnSync('ss', ['-tinH', 'state', 'established', `( dport = :${b.port} )`], { encoding: 'utf8' });
      const segs = [...ss.stdout.matchAll(/data_segs_out:(\d+)/g)].map((m) => Number(m[1]));
      assert.deepEqual(segs, [1, 1, 1, 1, 1], ss.stdout);
    } finally {
      for (const s of clients) s.destroy();
      await p.stop();
    }
  });

  test('[::1]:PORT and @abstract targets: the same header, once, then the client\'s bytes', async (t) => {
    const v6 = await recordingBackend({ host: '::1' });
    const abs = await recordingBackend({ path: `\0spd-pp-wire-${process.pid}` });
    t.after(() => Promise.all([v6.close(), abs.close()]));
    const v6Port = Number(v6.address.split(':').at(-1));
    for (const [target, backend] of [[`[::1]:${v6Port}`, v6], [abs.address, abs]] as const) {
      assert.ok(target.startsWith('[') || target.startsWith('@'), target);
      for (const version of ['v1', 'v2'] as const) {
        const before = backend.got.length;
        const p = await startProxy({ args: [`--proxy-protocol=${version}`, target], listen: [{ kind: 'tcp' }] });
        try {
          const payload = randomBytes(20_000);
          const port = (p.listeners[0]!.connectOptions as { port: number }).port;
          const clientPort = await sendAndClose(p.listeners[0]!.connectOptions, payload);
          await waitFor(() => backend.got.length === before + 1, 5000, 'the backend connection');
          const header =
            version === 'v1'
              ? Buffer.from(`PROXY TCP4 127.0.0.1 127.0.0.1 ${clientPort} ${port}\r\n`)
              : hex(`0d0a0d0a000d0a515549540a 21 11 000c 7f000001 7f000001 ${be16(clientPort)} ${be16(port)}`);
          const got = await backend.got.at(-1)!;
          assert.ok(got.equals(Buffer.concat([header, payload])), `${version} to ${target}: got ${JSON.stringify(got.subarray(0, 60).toString('latin1'))}`);
          assert.equal(p.stderr(), '');
        } finally {
          await p.stop();
        }
      }
    }
  });

  test('limits and backpressure unchanged: -c 1 still refuses the 2nd client; 16 MiB to a backend that stalls arrives whole after the header', async (t) => {
    // The backend holds its reads for a while (the proxy must stop reading the client
    // meanwhile, header written or not), then records everything.
    const chunks: Buffer[][] = [];
    const done: Array<Promise<void>> = [];
    const b = await startBackend((sock: Socket) => {
      const mine: Buffer[] = [];
      chunks.push(mine);
      sock.pause();
      setTimeout(() => sock.resume(), 500);
      sock.on('data', (d: Buffer) => mine.push(d));
      done.push(new Promise((res) => sock.on('end', () => (sock.end(), res()))));
    });
    t.after(() => b.close());
    const p = await startProxy({ args: ['--proxy-protocol=v2', '-c', '1', b.address], listen: [{ kind: 'tcp' }] });
    try {
      const to = p.listeners[0]!.connectOptions as { host: string; port: number };
      const first = await connect(to);
      const clientPort = first.localPort ?? 0;
      await waitFor(() => chunks.length === 1, 5000, 'the first backend connection');
      // The cap: a second client is accepted and closed at once, and reaches no backend.
      const second = await connect(to);
      const refused = await readAll(second, 3000);
      assert.equal(refused.data.length, 0);
      assert.equal(refused.ended, 'eof');
      await waitFor(() => p.stderr().includes('Hit connection limit'), 3000, 'the limit warning');
      assert.equal(chunks.length, 1, 'the refused client reached no backend');
      // Backpressure: 16 MiB written at once, while the backend is not reading.
      const payload = randomBytes(16 * 1024 * 1024);
      const reading = readAll(first, 30_000);
      first.end(payload);
      await waitFor(() => done.length === 1, 20_000, 'the backend saw the EOF');
      await done[0];
      await reading;
      const header = hex(`0d0a0d0a000d0a515549540a 21 11 000c 7f000001 7f000001 ${be16(clientPort)} ${be16(to.port)}`);
      const got = Buffer.concat(chunks[0]!);
      assert.equal(got.length, header.length + payload.length);
      assert.ok(got.subarray(0, header.length).equals(header), 'the header first');
      assert.ok(got.subarray(header.length).equals(payload), 'then every byte of the client, in order');
      assert.equal(p.stderr(), 'Hit connection limit, refusing connection.\n');
    } finally {
      await p.stop();
    }
  });

  test('a host-name target: the header goes, once, to the address that connected', async () => {
    const b = await recordingBackend();
    const port = Number(b.address.split(':').at(-1));
    const p = await startProxy({ args: ['--proxy-protocol=v1', `localhost:${port}`], listen: [{ kind: 'tcp' }] });
    try {
      const payload = randomBytes(1000);
      const clientPort = await sendAndClose(p.listeners[0]!.connectOptions, payload);
      await waitFor(() => b.got.length === 1, 5000, 'the backend connection');
      const lport = (p.listeners[0]!.connectOptions as { port: number }).port;
      assert.ok((await b.got[0]!).equals(Buffer.concat([Buffer.from(`PROXY TCP4 127.0.0.1 127.0.0.1 ${clientPort} ${lport}\r\n`), payload])));
    } finally {
      await p.stop();
      await b.close();
    }
  });

  test('UNIX client: the fallback is logged at debug level only, with upstream\'s words', async (t) => {
    const b = await recordingBackend();
    t.after(() => b.close());
    for (const [version, level, word] of [['v1', 'debug', 'UNKNOWN'], ['v2', 'debug', 'LOCAL'], ['v1', 'info', '']] as const) {
      const p = await startProxy({ args: [`--proxy-protocol=${version}`, b.address], listen: [{ kind: 'unix', path: join(tmp.dir, `fb-${version}-${level}.sock`) }], env: { SYSTEMD_LOG_LEVEL: level } });
      try {
        const before = b.got.length;
        await sendAndClose(p.listeners[0]!.connectOptions, Buffer.from('x'));
        await waitFor(() => b.got.length === before + 1, 5000, 'the backend connection');
        const header = version === 'v1' ? Buffer.from('PROXY UNKNOWN\r\n') : hex('0d0a0d0a000d0a515549540a 20 00 0000');
        assert.ok((await b.got.at(-1)!).equals(Buffer.concat([header, Buffer.from('x')])));
        const line = `Only TCP on IPv4 and IPv6 are supported, reporting fallback proxy data '${word}'.`;
        if (level === 'debug') await waitFor(() => p.stderr().includes(line), 5000, line);
        else assert.ok(!p.stderr().includes('Only TCP'), p.stderr());
      } finally {
        await p.stop();
      }
    }
  });

  test('a header that cannot be written: "Failed to write to remote host: ..." at error level, that connection closed, the proxy keeps serving', async (t) => {
    const cc = findProgram('cc');
    if (cc === null) {
      if (CI) assert.fail('cc is needed to build the LD_PRELOAD shim');
      t.skip('no C compiler');
      return;
    }
    const shim = join(tmp.dir, 'header_write_fail.so');
    const r = spawnSync(cc, ['-shared', '-fPIC', '-O2', '-o', shim, join(ROOT, 'test/fixtures/header_write_fail.c'), '-ldl'], { encoding: 'utf8', timeout: 30_000 });
    assert.equal(r.status, 0, r.stderr);
    const b = await recordingBackend();
    t.after(() => b.close());
    // A client that sends nothing (the header goes alone) and one whose first bytes are there
    // when the backend connects (header and bytes in one write): the same line either way.
    for (const [version, speaksFirst] of [['v1', false], ['v2', false], ['v1', true], ['v2', true]] as const) {
      const before = b.got.length;
      // SYSTEMD_LOG_LEVEL=err: the line must still appear, so it is logged at error level (or above).
      const p = await startProxy({
        args: [`--proxy-protocol=${version}`, b.address],
        listen: [{ kind: 'tcp' }],
        env: { LD_PRELOAD: shim, SPD_HEADER_FAIL_ERRNO: '32', SYSTEMD_LOG_LEVEL: 'err' },
      });
      try {
        const s = await connect(p.listeners[0]!.connectOptions);
        if (speaksFirst) s.write('GET / HTTP/1.0\r\n\r\n');
        const first = await readAll(s);
        s.destroy();
        assert.equal(first.data.length, 0, 'the client got nothing');
        assert.notEqual(first.ended, 'timeout', 'the client\'s connection was closed');
        await waitFor(() => p.stderr().includes('\n'), 5000, 'a log line');
        assert.equal(p.stderr(), 'Failed to write to remote host: Broken pipe\n');
        // The next connection is served, header and all.
        const payload = randomBytes(2000);
        await sendAndClose(p.listeners[0]!.connectOptions, payload);
        await waitFor(() => b.got.length === before + 2, 5000, 'two backend connections');
        assert.equal((await b.got[before]!).length, 0, 'the failed connection sent the backend nothing');
        const got = await b.got[before + 1]!;
        assert.ok(got.subarray(got.length - payload.length).equals(payload));
        assert.equal(got.length - payload.length, version === 'v1' ? got.indexOf('\r\n') + 2 : 28);
        assert.equal(p.child.exitCode, null, 'still running');
      } finally {
        await p.stop();
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------
// A unit file as systemd v261 documents the option, run by systemd-socket-activate.

/*
 * The man page's "Simple Example" (proxy-to-nginx.socket/.service, nginx on a UNIX
 * socket) with v261's option added, the way a v261 user writes it. The v261 page's
 * own text was not available to copy; its examples are otherwise unchanged since v252.
 */
const V261_SOCKET = `[Socket]
ListenStream=80

[Install]
WantedBy=sockets.target
`;
const V261_SERVICE = `[Unit]
Requires=nginx.service
After=nginx.service
Requires=proxy-to-nginx.socket
After=proxy-to-nginx.socket

[Service]
Type=notify
ExecStart=/usr/lib/systemd/systemd-socket-proxyd --proxy-protocol=v1 /run/nginx/socket
PrivateTmp=yes
PrivateNetwork=yes
`;

describe('systemd v261 unit file', { skip: missing('nginx', 'systemd-socket-activate') }, () => {
  test('ExecStart=... --proxy-protocol=v1 /run/nginx/socket runs unchanged under systemd-socket-activate, against nginx', async () => {
    const dir = join(tmp.dir, 'v261');
    mkdirSync(dir);
    writeFileSync(join(dir, 'proxy-to-nginx.socket'), V261_SOCKET);
    writeFileSync(join(dir, 'proxy-to-nginx.service'), V261_SERVICE);
    const execStart = (readFileSync(join(dir, 'proxy-to-nginx.service'), 'utf8').match(/^ExecStart=(.*)$/m) as RegExpMatchArray)[1]!.split(' ');
    const listenStream = (readFileSync(join(dir, 'proxy-to-nginx.socket'), 'utf8').match(/^ListenStream=(.*)$/m) as RegExpMatchArray)[1]!;
    assert.equal(listenStream, '80');
    // Only what this machine forces: our binary for systemd's, a free port for 80 (tests never
    // take fixed ports), and nginx's socket in a temporary directory for /run/nginx/socket.
    const sock = join(dir, 'nginx.sock');
    const argv = execStart.slice(1).map((a) => (a === '/run/nginx/socket' ? sock : a));
    assert.deepEqual(argv, ['--proxy-protocol=v1', sock]);
    const app = await startApp(join(dir, 'app.sock'));
    writeFileSync(join(dir, 'nginx.conf'), nginxConf(dir, [`unix:${sock}`], join(dir, 'app.sock')));
    const ng = spawnReceiver(findProgram('nginx') as string, ['-p', dir, '-e', join(dir, 'error.log'), '-c', join(dir, 'nginx.conf')]);
    const port = await freePort('::');
    // -l PORT, like ListenStream=PORT: an IPv6 dual-stack socket, as systemd makes it.
    const act = spawnReceiver(findProgram('systemd-socket-activate') as string, ['-l', String(port), '--', process.execPath, OURS, ...argv]);
    try {
      await waitAccepting({ path: sock }, ng.child, ng.output);
      const body = randomBytes(3000);
      for (const host of ['127.0.0.1', '::1']) {
        const r = await retry(() => viaNginx({ host, port }, body));
        assert.equal(r.pp, `pp=${nginxSays(host, r.clientPort, port)}`, `nginx saw the client (${host})`);
        assert.ok(r.body.equals(body));
      }
    } finally {
      await stopChild(act.child);
      await stopChild(ng.child);
      app.close();
    }
  });
});

/** Skip reason for the real-manager test, or false; under CI a missing piece fails instead. */
function noManager(): string | false {
  const why = managerUnavailable() ?? missing('nginx');
  if (why === false || why === null) return false;
  if (CI) throw new Error(why);
  return why;
}

describe('systemd v261 unit files under a real systemd manager', { skip: noManager() }, () => {
  test('proxy-to-nginx.socket and .service as in the man page, with --proxy-protocol=v1: activated, Type=notify, PrivateTmp=, PrivateNetwork=; nginx sees each client', async (t) => {
    const manager = await startManager('spd-v261-test');
    const nginxDir = join(manager.kit, 'nginx');
    mkdirSync(nginxDir);
    const sock = join(nginxDir, 'socket');
    const log = join(manager.kit, 'proxy.log');
    const app = await startApp(join(manager.kit, 'app.sock'));
    t.after(async () => {
      await manager.systemctl('stop', 'proxy-to-nginx.service', 'proxy-to-nginx.socket', 'nginx.service');
      await manager.close();
      app.close();
    });
    const port = await freePort('::');
    // The man page's units, changed only where this machine forces it: a free port for 80
    // (tests never take fixed ports), our program for systemd's (node and dist/cli.js by
    // absolute path: the bin's `#!/usr/bin/env node` would find the system's older Node
    // under systemd's PATH), and nginx's socket under the test's directory. Its directory
    // is in /run, so PrivateTmp=yes does not hide it.
    const socketUnit = V261_SOCKET.replace(/^ListenStream=80$/m, `ListenStream=${port}`);
    const serviceUnit = V261_SERVICE.replace(
      'ExecStart=/usr/lib/systemd/systemd-socket-proxyd --proxy-protocol=v1 /run/nginx/socket',
      `ExecStart=${process.execPath} ${OURS} --proxy-protocol=v1 ${sock}`,
    );
    assert.notEqual(socketUnit, V261_SOCKET);
    assert.notEqual(serviceUnit, V261_SERVICE);
    writeFileSync(join(manager.unitDir, 'proxy-to-nginx.socket'), socketUnit);
    writeFileSync(join(manager.unitDir, 'proxy-to-nginx.service'), serviceUnit);
    // What the test needs besides: the proxy's stderr in a file (a drop-in, so the unit stays
    // as written), and an nginx.service for Requires=, listening on that socket.
    mkdirSync(join(manager.unitDir, 'proxy-to-nginx.service.d'));
    // PrivateTmp=yes hides /tmp and /var/tmp from the proxy: a checkout there (CI's fresh
    // clone may be one) is bound into its namespace read-only, again by a drop-in.
    const hidden = [ROOT, dirname(realpathSync(process.execPath))].filter((d) => /^\/(var\/)?tmp\//.test(`${d}/`));
    const binds = [...new Set(hidden)].map((d) => `BindReadOnlyPaths=${d}\n`).join('');
    writeFileSync(join(manager.unitDir, 'proxy-to-nginx.service.d', 'test.conf'), `[Service]\nStandardError=append:${log}\n${binds}`);
    writeFileSync(join(nginxDir, 'nginx.conf'), nginxConf(nginxDir, [`unix:${sock}`], join(manager.kit, 'app.sock')));
    writeFileSync(
      join(manager.unitDir, 'nginx.service'),
      `[Service]\nExecStart=${findProgram('nginx') as string} -p ${nginxDir} -e ${join(nginxDir, 'error.log')} -c ${join(nginxDir, 'nginx.conf')}\n`,
    );
    assert.equal((await manager.systemctl('daemon-reload')).status, 0);
    const verify = await manager.systemctl('start', 'nginx.service');
    assert.equal(verify.status, 0, verify.stderr);
    await retry(async () => (await connect({ path: sock })).destroy());
    const started = await manager.systemctl('start', 'proxy-to-nginx.socket');
    assert.equal(started.status, 0, started.stderr);
    const state = async (): Promise<string> => (await manager.systemctl('show', '-P', 'ActiveState', 'proxy-to-nginx.service')).stdout.trim();
    assert.equal(await state(), 'inactive', 'nothing started before the first client');

    const body = randomBytes(3000);
    // ListenStream=PORT is dual-stack: the IPv4 client arrives as ::ffff:127.0.0.1 and must be sent as TCP4.
    for (const host of ['127.0.0.1', '::1']) {
      const r = await viaNginx({ host, port }, body);
      assert.equal(r.pp, `pp=${nginxSays(host, r.clientPort, port)}`, `nginx saw the client (${host}); proxy log: ${readFileSync(log, 'utf8')}`);
      assert.ok(r.body.equals(body));
    }
    // Type=notify: active means systemd got READY=1 from the proxy.
    assert.equal(await state(), 'active');
    const pid = Number((await manager.systemctl('show', '-P', 'MainPID', 'proxy-to-nginx.service')).stdout.trim());
    assert.ok(pid > 0);
    assert.match(readFileSync(`/proc/${pid}/cmdline`, 'utf8'), /dist\/cli\.js\0--proxy-protocol=v1\0/);
    // PrivateNetwork=yes took effect: the proxy runs in a network namespace of its own, and
    // still serves (its socket came from systemd, its backend is a UNIX socket).
    assert.notEqual(readlinkSync(`/proc/${pid}/ns/net`), readlinkSync('/proc/self/ns/net'));
    assert.equal(readFileSync(log, 'utf8'), '', 'the proxy logged nothing');
  });
});

/** systemd-socket-activate binds before it prints; until then connections are refused. */
async function retry<T>(fn: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      return await fn();
    } catch (err) {
      if (Date.now() > deadline) throw err;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}
