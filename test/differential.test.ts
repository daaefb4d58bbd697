/**
 * Differential tests: the same scenario against /lib/systemd/systemd-socket-proxyd
 * and ours. Where the two are meant to agree, the observations must be equal;
 * where we deliberately differ (v252 bugs that upstream fixed), the test says so and
 * checks both sides, so a change on either side is noticed.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { openSync, closeSync } from 'node:fs';
import type { Socket } from 'node:net';
import {
  connect,
  echo,
  randomBytes,
  readAll,
  roundTrip,
  runProxy,
  sha256,
  startBackend,
  startProxy,
  waitFor,
  type Flavour,
  type StartOptions,
} from './helpers.ts';

const FLAVOURS: Flavour[] = ['ref', 'ours'];

/** The first thing a client sees: data (as text), '' for EOF or reset, 'timeout'. */
function firstReply(s: Socket, ms = 3000): Promise<string> {
  return new Promise((res) => {
    const timer = setTimeout(() => res('timeout'), ms);
    const done = (v: string): void => {
      clearTimeout(timer);
      res(v);
    };
    s.once('data', (d: Buffer) => done(d.toString()));
    s.once('end', () => done(''));
    s.once('error', () => done(''));
  });
}

async function both<T>(scenario: (flavour: Flavour) => Promise<T>): Promise<{ ref: T; ours: T }> {
  const [ref, ours] = await Promise.all(FLAVOURS.map(scenario));
  return { ref: ref as T, ours: ours as T };
}

describe('agreement with systemd-socket-proxyd', () => {
  test('echo through the proxy: identical bytes, nothing logged', async () => {
    const backend = await startBackend(echo);
    const payload = randomBytes(2 * 1024 * 1024);
    const r = await both(async (flavour) => {
      const p = await startProxy({ flavour, args: [backend.address], listen: [{ kind: 'tcp' }] });
      try {
        const s = await connect(p.listeners[0]!.connectOptions);
        // Do not half-close: v252 would drop the reply. Read exactly the echo, then close.
        const chunks: Buffer[] = [];
        let n = 0;
        const done = new Promise<void>((res) => {
          s.on('data', (d: Buffer) => {
            chunks.push(d);
            n += d.length;
            if (n >= payload.length) res();
          });
        });
        s.write(payload);
        await done;
        s.destroy();
        return { hash: sha256(Buffer.concat(chunks)), stderr: p.stderr() };
      } finally {
        await p.stop();
      }
    });
    assert.deepEqual(r.ours, r.ref);
    assert.equal(r.ours.hash, sha256(payload));
    await backend.close();
  });

  test('backend closes after sending: client gets every byte, then EOF', async () => {
    const body = randomBytes(4 * 1024 * 1024);
    const backend = await startBackend((s) => s.end(body));
    const r = await both(async (flavour) => {
      const p = await startProxy({ flavour, args: [backend.address], listen: [{ kind: 'tcp' }] });
      try {
        const s = await connect(p.listeners[0]!.connectOptions);
        const got = await readAll(s);
        s.destroy();
        return { ended: got.ended, hash: sha256(got.data) };
      } finally {
        await p.stop();
      }
    });
    assert.deepEqual(r.ours, r.ref);
    assert.equal(r.ours.hash, sha256(body));
    await backend.close();
  });

  test('connect errors: same message, client closed without data', async () => {
    const probe = await startBackend(() => {});
    const dead = probe.port;
    await probe.close();
    for (const target of [`127.0.0.1:${dead}`, '/nonexistent/socket-proxyd-test.sock', '@socket-proxyd-no-such-abstract']) {
      const r = await both(async (flavour) => {
        const p = await startProxy({ flavour, args: [target], listen: [{ kind: 'tcp' }] });
        try {
          const got = await roundTrip(p.listeners[0]!.connectOptions, Buffer.alloc(0), 5000);
          await waitFor(() => p.stderr().includes('\n'), 3000, 'log line');
          return { data: got.data.length, ended: got.ended !== 'timeout', stderr: p.stderr(), alive: p.child.exitCode === null };
        } finally {
          await p.stop();
        }
      });
      assert.deepEqual(r.ours, r.ref, target);
    }
  });

  test('bad environments: same message and exit status', async () => {
    const devnull = openSync('/dev/null', 'r');
    const cases: StartOptions[] = [
      { args: ['127.0.0.1:1'] },
      { args: ['127.0.0.1:1'], listen: [{ kind: 'tcp' }], listenPid: '1' },
      { args: ['127.0.0.1:1'], listenFds: 'x' },
      { args: ['127.0.0.1:1'], listenFds: '0' },
      { args: ['127.0.0.1:1'], listen: [{ kind: 'tcp' }], listenFds: '1000' },
      { args: ['127.0.0.1:1'], fds: [devnull] },
      { args: ['-c', '0', '127.0.0.1:1'] },
      { args: ['--exit-idle-time=5S', '127.0.0.1:1'] },
      { args: [] },
      { args: ['a', 'b'] },
    ];
    try {
      for (const c of cases) {
        const r = await both(async (flavour) => {
          const out = await runProxy({ ...c, flavour });
          return { code: out.code, stderr: out.stderr, stdout: out.stdout };
        });
        assert.deepEqual(r.ours, r.ref, JSON.stringify(c.args) + (c.listenFds ?? ''));
      }
    } finally {
      closeSync(devnull);
    }
  });

  test('limit refusal is accept-then-close with the same warning', async () => {
    const backend = await startBackend(echo);
    // -c 1 for ours, -c 0 is invalid, so compare the moment of refusal: ours at N+1, v252 at N+2 (see below).
    const r = await both(async (flavour) => {
      const p = await startProxy({ flavour, args: ['-c', flavour === 'ours' ? '2' : '1', backend.address], listen: [{ kind: 'tcp' }] });
      try {
        const held: Socket[] = [];
        for (let i = 0; i < 2; i++) {
          const s = await connect(p.listeners[0]!.connectOptions);
          s.write('x');
          await once(s, 'data');
          held.push(s);
        }
        const refused = await connect(p.listeners[0]!.connectOptions);
        const got = await readAll(refused, 3000);
        await waitFor(() => p.stderr().includes('\n'), 3000, 'warning');
        for (const s of held) s.destroy();
        return { data: got.data.length, ended: got.ended, stderr: p.stderr() };
      } finally {
        await p.stop();
      }
    });
    assert.deepEqual(r.ours, r.ref);
    assert.equal(r.ours.stderr, 'Hit connection limit, refusing connection.\n');
    await backend.close();
  });
});

describe('deliberate differences (v252 bugs fixed upstream)', () => {
  test('-c N: v252 serves N+1 at once, ours is a hard cap of N', async () => {
    const backend = await startBackend(echo);
    const served = await both(async (flavour) => {
      const p = await startProxy({ flavour, args: ['-c', '1', backend.address], listen: [{ kind: 'tcp' }] });
      const sockets: Socket[] = [];
      let count = 0;
      try {
        for (let i = 0; i < 3; i++) {
          const s = await connect(p.listeners[0]!.connectOptions);
          sockets.push(s);
          s.write('ping');
          if ((await firstReply(s, 2000)) === 'ping') count++;
        }
        return count;
      } finally {
        for (const s of sockets) s.destroy();
        await p.stop();
      }
    });
    assert.equal(served.ref, 2);
    assert.equal(served.ours, 1);
    await backend.close();
  });

  test('half-close: v252 drops the reply to a request sent with SHUT_WR, ours delivers it', async () => {
    const backend = await startBackend((s) => {
      const chunks: Buffer[] = [];
      s.on('data', (d: Buffer) => chunks.push(d));
      s.on('end', () => s.end(`reply to ${Buffer.concat(chunks).length} bytes`));
    });
    const r = await both(async (flavour) => {
      const p = await startProxy({ flavour, args: [backend.address], listen: [{ kind: 'tcp' }] });
      try {
        const got = await roundTrip(p.listeners[0]!.connectOptions, Buffer.from('request-body'), 5000);
        return got.data.toString();
      } finally {
        await p.stop();
      }
    });
    assert.equal(r.ref, '');
    assert.equal(r.ours, 'reply to 12 bytes');
    await backend.close();
  });

  test('[::1]:PORT: v252 cannot resolve it, ours connects', async () => {
    const backend = await startBackend(echo, { host: '::1' });
    const r = await both(async (flavour) => {
      const p = await startProxy({ flavour, args: [`[::1]:${backend.port}`], listen: [{ kind: 'tcp' }] });
      try {
        const s = await connect(p.listeners[0]!.connectOptions);
        s.write('hi');
        const got = await firstReply(s);
        s.destroy();
        await waitFor(() => flavour === 'ours' || p.stderr() !== '', 3000, 'log');
        return { got, stderr: p.stderr() };
      } finally {
        await p.stop();
      }
    });
    assert.deepEqual(r.ref, { got: '', stderr: 'Failed to resolve host: Name or service not known\n' });
    assert.deepEqual(r.ours, { got: 'hi', stderr: '' });
    await backend.close();
  });
});
