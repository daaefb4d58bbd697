/**
 * Integration tests of the core (issue #2): the real CLI from dist/ under socket
 * activation, on loopback and UNIX sockets.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, openSync, closeSync, readFileSync } from 'node:fs';
import { createConnection, type Socket } from 'node:net';
import { join } from 'node:path';
import {
  connect,
  echo,
  fdOf,
  randomBytes,
  readAll,
  roundTrip,
  rssKiB,
  runProxy,
  sha256,
  startBackend,
  startProxy,
  tempDir,
  waitFor,
} from './helpers.ts';

const tmp = tempDir();
after(() => tmp.cleanup());

let abstractSeq = 0;
function abstractName(): string {
  return `spd-test-${process.pid}-${abstractSeq++}`;
}

async function echoCheck(target: { host: string; port: number } | { path: string }, size = 256 * 1024): Promise<void> {
  const payload = randomBytes(size);
  const r = await roundTrip(target, payload);
  assert.equal(r.ended, 'eof');
  assert.equal(r.data.length, payload.length);
  assert.equal(sha256(r.data), sha256(payload));
}

describe('forwarding to each kind of target', () => {
  test('IPv4 listener to an IPv4 target, 1 MiB both ways, byte-exact', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
    try {
      await echoCheck(p.listeners[0]!.connectOptions, 1024 * 1024);
      assert.equal(p.stderr(), '', 'nothing is logged for a normal connection');
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('IPv6 listener to an IPv6 target, written both as ::1:PORT and [::1]:PORT', async () => {
    const backend = await startBackend(echo, { host: '::1' });
    for (const target of [`::1:${backend.port}`, `[::1]:${backend.port}`]) {
      const p = await startProxy({ args: [target], listen: [{ kind: 'tcp', host: '::1' }] });
      try {
        await echoCheck(p.listeners[0]!.connectOptions);
      } finally {
        await p.stop();
      }
    }
    await backend.close();
  });

  test('UNIX path listener to a UNIX path target', async () => {
    const path = join(tmp.dir, 'backend.sock');
    const backend = await startBackend(echo, { path });
    const p = await startProxy({ args: [path], listen: [{ kind: 'unix', path: join(tmp.dir, 'proxy.sock') }] });
    try {
      await echoCheck(p.listeners[0]!.connectOptions);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('abstract listener to an abstract @target (exact-length address)', async () => {
    const name = abstractName();
    const backend = await startBackend(echo, { path: `\0${name}` });
    const p = await startProxy({ args: [`@${name}`], listen: [{ kind: 'abstract', name: abstractName() }] });
    try {
      await echoCheck(p.listeners[0]!.connectOptions);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('host name target is resolved (localhost:PORT), and a named service port works', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: [`localhost:${backend.port}`], listen: [{ kind: 'tcp' }] });
    try {
      await echoCheck(p.listeners[0]!.connectOptions);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('two listening fds (TCP and UNIX) are both served, to the one target', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({
      args: [backend.address],
      listen: [{ kind: 'tcp' }, { kind: 'unix', path: join(tmp.dir, 'two.sock') }],
    });
    try {
      await echoCheck(p.listeners[0]!.connectOptions);
      await echoCheck(p.listeners[1]!.connectOptions);
      assert.equal(backend.sockets.length, 2);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('standalone mode: --listen= TCP and UNIX without systemd', async () => {
    const backend = await startBackend(echo);
    const path = join(tmp.dir, 'standalone.sock');
    // Find a free port by binding and releasing it.
    const probe = await startBackend(() => {});
    const port = probe.port;
    await probe.close();
    const p = await startProxy({ args: [`--listen=127.0.0.1:${port}`, '--listen', path, backend.address] });
    try {
      await waitFor(() => {
        try {
          readFileSync(`/proc/${p.pid}/net/unix`, 'utf8');
        } catch {
          /* ignore */
        }
        return execFileSync('ss', ['-Hltn', `sport = :${port}`], { encoding: 'utf8' }).includes(`:${port}`);
      }, 5000, 'standalone listener');
      await echoCheck({ host: '127.0.0.1', port });
      await echoCheck({ path });
    } finally {
      await p.stop();
      await backend.close();
    }
  });
});

describe('standalone UNIX sockets', () => {
  test('--listen=/path: a stale socket file is replaced, and the file is removed on SIGTERM', async () => {
    const backend = await startBackend(echo);
    const path = join(tmp.dir, 'stale.sock');
    // A socket file nobody listens on, as a killed process leaves behind.
    execFileSync('python3', ['-c', `import socket; socket.socket(socket.AF_UNIX).bind(${JSON.stringify(path)})`]);
    assert.ok(existsSync(path));
    const p = await startProxy({ args: [`--listen=${path}`, backend.address] });
    try {
      await waitFor(() => {
        try {
          return readFileSync('/proc/net/unix', 'utf8').includes(path);
        } catch {
          return false;
        }
      }, 5000, 'listening');
      await echoCheck({ path }, 1000);
      p.child.kill('SIGTERM');
      const { code } = await p.exited;
      assert.equal(code, 0);
      assert.equal(existsSync(path), false, 'socket file removed on exit');
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('--listen=/path refuses to take over a socket someone is listening on', async () => {
    const path = join(tmp.dir, 'live.sock');
    const live = await startBackend(echo, { path });
    try {
      const r = await runProxy({ args: [`--listen=${path}`, '127.0.0.1:1'] });
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `Failed to listen on ${path}: Address already in use\n`);
      await echoCheck({ path }, 10);
    } finally {
      await live.close();
    }
  });
});

describe('half-close', () => {
  test('client FIN is passed on and the reply still flows back (request/response after SHUT_WR)', async () => {
    // The backend answers only after it has seen EOF: v252 drops this reply.
    const backend = await startBackend((s) => {
      const chunks: Buffer[] = [];
      s.on('data', (d: Buffer) => chunks.push(d));
      s.on('end', () => {
        const body = Buffer.concat(chunks);
        s.end(Buffer.concat([Buffer.from(`got ${body.length} bytes after your FIN:`), body]));
      });
    });
    const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const payload = randomBytes(300_000);
      const r = await roundTrip(p.listeners[0]!.connectOptions, payload);
      assert.equal(r.ended, 'eof');
      const header = Buffer.from('got 300000 bytes after your FIN:');
      assert.deepEqual(r.data.subarray(0, header.length), header);
      assert.equal(sha256(r.data.subarray(header.length)), sha256(payload));
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('backend FIN is passed on and the client can keep sending', async () => {
    let received: Promise<Buffer> | null = null;
    const backend = await startBackend((s) => {
      s.end('HELLO\n'); // shutdown(SHUT_WR), keep reading
      received = new Promise((res) => {
        const chunks: Buffer[] = [];
        s.on('data', (d: Buffer) => chunks.push(d));
        s.on('end', () => res(Buffer.concat(chunks)));
      });
    });
    const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const s = await connect(p.listeners[0]!.connectOptions);
      const reading = readAll(s);
      const r = await reading;
      assert.equal(r.ended, 'eof');
      assert.equal(r.data.toString(), 'HELLO\n');
      // The client's direction is still open after the backend's FIN.
      const payload = randomBytes(200_000);
      const closed = once(s, 'close');
      s.end(payload);
      await waitFor(() => received !== null, 5000, 'backend connection');
      const got = await (received as unknown as Promise<Buffer>);
      assert.equal(sha256(got), sha256(payload));
      await closed;
    } finally {
      await p.stop();
      await backend.close();
    }
  });
});

describe('resets and errors', () => {
  test('RST from the client closes the backend side; the proxy keeps serving', async () => {
    const backend = await startBackend((s) => {
      s.on('data', () => {});
      s.write(randomBytes(64 * 1024));
    });
    const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const s = await connect(p.listeners[0]!.connectOptions);
      s.write('x');
      await waitFor(() => backend.sockets.length === 1, 5000, 'backend accept');
      const bs = backend.sockets[0]!;
      // The backend sees the end of its connection: EOF (or a reset if it had unread data).
      const gone = new Promise((res) => {
        bs.once('end', res);
        bs.once('error', res);
      });
      s.resetAndDestroy();
      await Promise.race([gone, new Promise((_, rej) => setTimeout(() => rej(new Error('backend not closed')), 3000))]);
      // The next client is still served: the backend greets it with its 64 KiB.
      const next = await connect(p.listeners[0]!.connectOptions);
      const [first] = (await once(next, 'data')) as [Buffer];
      assert.ok(first.length > 0);
      next.destroy();
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('RST from the backend closes the client side; the proxy keeps serving', async () => {
    let first = true;
    const backend = await startBackend((s) => {
      if (first) {
        first = false;
        s.once('data', () => s.resetAndDestroy());
      } else echo(s);
    });
    const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const s = await connect(p.listeners[0]!.connectOptions);
      const reading = readAll(s, 3000);
      s.write('trigger');
      const r = await reading;
      assert.notEqual(r.ended, 'timeout', 'client must see the backend going away');
      s.destroy();
      await echoCheck(p.listeners[0]!.connectOptions, 1000);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('connect failure: the reference message, client closed, proxy survives', async () => {
    const probe = await startBackend(() => {});
    const deadPort = probe.port;
    await probe.close();
    const p = await startProxy({ args: [`127.0.0.1:${deadPort}`], listen: [{ kind: 'tcp' }] });
    try {
      const r = await roundTrip(p.listeners[0]!.connectOptions, Buffer.alloc(0));
      assert.equal(r.data.length, 0);
      assert.notEqual(r.ended, 'timeout');
      await waitFor(() => p.stderr().includes('\n'), 3000, 'log line');
      assert.equal(p.stderr(), 'Failed to connect to remote host: Connection refused\n');
      assert.equal(p.child.exitCode, null, 'still running');
    } finally {
      await p.stop();
    }
  });

  test('missing UNIX socket: "No such file or directory"', async () => {
    const p = await startProxy({ args: [join(tmp.dir, 'nope.sock')], listen: [{ kind: 'tcp' }] });
    try {
      const r = await roundTrip(p.listeners[0]!.connectOptions, Buffer.alloc(0));
      assert.notEqual(r.ended, 'timeout');
      await waitFor(() => p.stderr().includes('\n'), 3000, 'log line');
      assert.equal(p.stderr(), 'Failed to connect to remote host: No such file or directory\n');
    } finally {
      await p.stop();
    }
  });
});

describe('connection limit', () => {
  test('-c 2 is a hard cap: the 3rd concurrent connection is closed at once, served again after one closes', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: ['-c', '2', backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const target = p.listeners[0]!.connectOptions;
      const held: Socket[] = [];
      for (let i = 0; i < 2; i++) {
        const s = await connect(target);
        s.write(`ping${i}`);
        const [d] = (await once(s, 'data')) as [Buffer];
        assert.equal(d.toString(), `ping${i}`);
        held.push(s);
      }
      const refused = await connect(target);
      const r = await readAll(refused, 3000);
      assert.equal(r.data.length, 0);
      assert.equal(r.ended, 'eof');
      await waitFor(() => p.stderr().includes('Hit connection limit'), 3000, 'warning');
      assert.equal(p.stderr(), 'Hit connection limit, refusing connection.\n');
      assert.equal(backend.sockets.length, 2, 'the refused client never reached the backend');
      // Close one; the next client is served.
      held[0]!.end();
      await once(held[0]!, 'close');
      await waitFor(() => backend.sockets.filter((b) => !b.destroyed).length < 2, 3000, 'release');
      await echoCheck(target, 1000);
      for (const s of held) s.destroy();
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('connections still connecting count toward the limit', async () => {
    // A listener with a full accept queue drops SYNs, so connect() to it hangs.
    const hole = spawn('python3', ['-c', HOLE], { stdio: ['ignore', 'pipe', 'inherit'] });
    try {
      const [line] = (await once(hole.stdout!.setEncoding('utf8'), 'data')) as [string];
      const port = Number(line.trim());
      const fill: Socket[] = [];
      for (let i = 0; i < 2; i++) {
        const f = createConnection({ host: '127.0.0.1', port });
        f.on('error', () => {});
        fill.push(f);
      }
      await new Promise((r) => setTimeout(r, 100));
      const p = await startProxy({ args: ['-c', '1', `127.0.0.1:${port}`], listen: [{ kind: 'tcp' }] });
      try {
        const pending = await connect(p.listeners[0]!.connectOptions);
        await new Promise((r) => setTimeout(r, 200));
        const refused = await connect(p.listeners[0]!.connectOptions);
        const r = await readAll(refused, 3000);
        assert.equal(r.ended, 'eof');
        await waitFor(() => p.stderr() !== '', 3000, 'log line');
        assert.equal(p.stderr(), 'Hit connection limit, refusing connection.\n');
        pending.destroy();
      } finally {
        await p.stop();
        for (const f of fill) f.destroy();
      }
    } finally {
      hole.kill();
    }
  });
});

const HOLE = `
import socket, time
s = socket.socket()
s.bind(('127.0.0.1', 0))
s.listen(0)
print(s.getsockname()[1], flush=True)
time.sleep(30)
`;

describe('idle exit', () => {
  test('--exit-idle-time: exits 0 silently after the span from start-up', async () => {
    const backend = await startBackend(echo);
    const t0 = Date.now();
    const p = await startProxy({ args: ['--exit-idle-time=300ms', backend.address], listen: [{ kind: 'tcp' }] });
    const { code, signal } = await p.exited;
    const elapsed = Date.now() - t0;
    assert.equal(code, 0);
    assert.equal(signal, null);
    assert.equal(p.stderr(), '');
    assert.ok(elapsed >= 300, `exited after ${elapsed} ms`);
    assert.ok(elapsed < 3000, `exited after ${elapsed} ms`);
    await backend.close();
  });

  test('an open connection holds the proxy; the span runs from the last close', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: ['--exit-idle-time=400ms', backend.address], listen: [{ kind: 'tcp' }] });
    try {
      const s = await connect(p.listeners[0]!.connectOptions);
      await new Promise((r) => setTimeout(r, 900));
      assert.equal(p.child.exitCode, null, 'still running while a connection is open');
      const closedAt = Date.now();
      s.end();
      await once(s, 'close');
      const { code } = await p.exited;
      const elapsed = Date.now() - closedAt;
      assert.equal(code, 0);
      assert.ok(elapsed >= 350 && elapsed < 3000, `exited ${elapsed} ms after the last close`);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  test('spans longer than setTimeout allows (1y) do not fire early', async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: ['--exit-idle-time=1y', backend.address], listen: [{ kind: 'tcp' }] });
    try {
      await new Promise((r) => setTimeout(r, 500));
      assert.equal(p.child.exitCode, null);
      assert.doesNotMatch(p.stderr(), /TimeoutOverflowWarning/);
      await echoCheck(p.listeners[0]!.connectOptions, 10);
    } finally {
      await p.stop();
      await backend.close();
    }
  });
});

describe('slow reader', () => {
  test('backpressure: 64 MiB to a paused client, proxy RSS stays bounded, bytes intact', async () => {
    const size = 64 * 1024 * 1024;
    const payload = randomBytes(size);
    let start = (): void => {};
    const go = new Promise<void>((res) => (start = res));
    const backend = await startBackend((s) => {
      void go.then(() => s.end(payload));
    });
    const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
    try {
      // Baseline after start-up and one warm-up connection.
      await echoCheck(p.listeners[0]!.connectOptions, 0).catch(() => {});
      const baseline = rssKiB(p.pid);
      const s = createConnection({ ...(p.listeners[0]!.connectOptions as { host: string; port: number }), allowHalfOpen: true });
      s.pause();
      await once(s, 'connect');
      start();
      // Let the proxy fill every buffer it is willing to fill.
      await new Promise((r) => setTimeout(r, 1500));
      const stalled = rssKiB(p.pid);
      const r = readAll(s, 30_000);
      s.resume();
      const got = await r;
      assert.equal(got.data.length, size);
      assert.equal(sha256(got.data), sha256(payload));
      // Unbounded buffering would hold most of the 64 MiB; the kernel's socket buffers hold a few MiB.
      assert.ok(stalled - baseline < 16 * 1024, `RSS grew ${stalled - baseline} KiB while the client did not read`);
    } finally {
      await p.stop();
      await backend.close();
    }
  });
});

describe('activation environment', () => {
  test("keeps systemd's backlog (no re-listen with Node's 511)", async () => {
    const backend = await startBackend(echo);
    const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }] });
    try {
      await echoCheck(p.listeners[0]!.connectOptions, 10);
      const port = (p.listeners[0]!.connectOptions as { port: number }).port;
      const line = execFileSync('ss', ['-Hltn', `sport = :${port}`], { encoding: 'utf8' }).trim();
      const sendQ = Number(line.split(/\s+/)[2]);
      assert.ok(sendQ >= 4096, `backlog is ${sendQ}: ${line}`);
    } finally {
      await p.stop();
      await backend.close();
    }
  });

  const badEnvCases: { name: string; opts: Parameters<typeof runProxy>[0]; message: string }[] = [
    { name: 'no LISTEN_FDS', opts: { args: ['127.0.0.1:1'] }, message: "Didn't get any sockets passed in." },
    {
      name: 'LISTEN_PID of another process',
      opts: { args: ['127.0.0.1:1'], listen: [{ kind: 'tcp' }], listenPid: '1' },
      message: "Didn't get any sockets passed in.",
    },
    {
      name: 'LISTEN_FDS=x with our pid',
      opts: { args: ['127.0.0.1:1'], listenFds: 'x' },
      message: 'Failed to receive sockets from parent.',
    },
    {
      name: 'LISTEN_FDS=0 with our pid',
      opts: { args: ['127.0.0.1:1'], listenFds: '0' },
      message: 'Failed to receive sockets from parent.',
    },
    {
      name: 'LISTEN_FDS=1000 (fds not open)',
      opts: { args: ['127.0.0.1:1'], listen: [{ kind: 'tcp' }], listenFds: '1000' },
      message: 'Failed to receive sockets from parent.',
    },
  ];
  for (const c of badEnvCases) {
    test(`bad environment: ${c.name}`, async () => {
      const r = await runProxy(c.opts);
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `${c.message}\n`);
    });
  }

  // A UDP socket is served now (test/datagram.test.ts); AF_UNIX datagram and seqpacket
  // sockets are still refused (test/properties.test.ts).
  test('fd 3 that is not a listening stream socket: /dev/null, connected TCP', async () => {
    const devnull = openSync('/dev/null', 'r');
    const backend = await startBackend(() => {});
    const conn = createConnection({ host: '127.0.0.1', port: backend.port });
    await once(conn, 'connect');
    try {
      for (const fd of [devnull, fdOf(conn)]) {
        const r = await runProxy({ args: ['127.0.0.1:1'], fds: [fd] });
        assert.equal(r.code, 1, `fd kind ${fd}: ${r.stderr}`);
        assert.equal(r.stderr, 'Passed in socket is not a stream socket.\n');
      }
    } finally {
      closeSync(devnull);
      conn.destroy();
      await backend.close();
    }
  });
});

describe('targets refused at start-up', () => {
  const cases: [string, string][] = [
    ['127.0.0.1:99999', "Invalid address '127.0.0.1:99999': port 99999 is out of range (1-65535)."],
    [':80', "Invalid address ':80': empty host name."],
    ['127.0.0.1:0', "Invalid address '127.0.0.1:0': port 0 is out of range (1-65535)."],
    [`/${'x'.repeat(120)}`, "Specified address doesn't fit in an AF_UNIX address, refusing: File name too long"],
    ['@', "Specified address doesn't fit in an AF_UNIX address, refusing: Invalid argument"],
    ['[::1', "Invalid address '[::1': expected [IPV6]:PORT."],
    ['localhost:no-such-service', "Invalid address 'localhost:no-such-service': unknown TCP service 'no-such-service'."],
  ];
  for (const [target, message] of cases) {
    test(`refuses ${target.length > 30 ? `${target.slice(0, 20)}...` : target}`, async () => {
      const r = await runProxy({ args: [target], listen: [{ kind: 'tcp' }] });
      assert.equal(r.code, 1);
      assert.equal(r.stderr, `${message}\n`);
    });
  }
});

test('a Node.js without the stream bindings the data path needs: one line, exit 1, before any connection', async () => {
  // The data path uses Node's stream handles through process.binding (src/engine/uv.ts); take it away.
  const r = await runProxy({
    args: ['127.0.0.1:9'],
    listen: [{ kind: 'tcp' }],
    env: { NODE_OPTIONS: '--import=data:text/javascript,delete(process.binding)' },
  });
  assert.equal(r.code, 1);
  assert.match(r.stderr, /^This Node\.js \(v[0-9.]+\) lacks process\.binding, which socket-proxyd needs\.\n$/);
});
