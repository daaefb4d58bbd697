/**
 * What systemd expects from its socket proxy, through the real CLI (dist/cli.js,
 * `npm run build` first): sd_notify (READY/STATUS, STOPPING, ERRNO, WATCHDOG),
 * signals, and logging. Where the reference systemd-socket-proxyd 252 is meant to
 * agree (ERRNO values, watchdog pings, message texts and levels, SYSTEMD_LOG_LEVEL
 * parsing) the same scenario runs against it and the results are compared.
 *
 * Notifications are received by test/fixtures/notify_recv.py on a datagram socket
 * with SO_PASSCRED, as systemd's own, so every datagram carries the sender's pid.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { readFileSync, existsSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import {
  ROOT,
  OURS,
  REFERENCE,
  connect,
  echo,
  readAll,
  roundTrip,
  startBackend,
  startProxy,
  tempDir,
  waitFor,
  type Flavour,
  type Proxy,
  type StartOptions,
} from './helpers.ts';

const RECEIVER = join(ROOT, 'test/fixtures/notify_recv.py');
const MODULE_RECORDER = join(ROOT, 'test/fixtures/record_modules.mjs');
const ACCEPT_SHIM_SOURCE = join(ROOT, 'test/fixtures/accept_fail.c');

const tmp = tempDir();
process.on('exit', () => tmp.cleanup());
let seq = 0;
const unique = (): string => `${process.pid}-${++seq}`;

// ---------------------------------------------------------------------------------------------
// A notify socket

interface Datagram {
  payload: string;
  pid: number | null;
  /** performance.now() when the test saw it. */
  at: number;
}

interface Receiver {
  address: string;
  got: Datagram[];
  child: ChildProcess;
  /** Resolves with the first datagram (already received or future) matching `pred`. */
  waitFor(pred: (d: Datagram) => boolean, timeoutMs?: number, what?: string): Promise<Datagram>;
  close(): Promise<void>;
}

const receivers = new Set<ChildProcess>();
process.on('exit', () => {
  for (const r of receivers) r.kill('SIGKILL');
});

async function startReceiver(kind: 'path' | 'abstract' = 'path'): Promise<Receiver> {
  const address = kind === 'path' ? join(tmp.dir, `notify-${unique()}.sock`) : `@spd-systemd-test-${unique()}`;
  // Many datagrams allowed, 30 s of silence ends it; close() ends it sooner.
  const child = spawn('python3', [RECEIVER, address, '100000', '30'], { stdio: ['ignore', 'pipe', 'inherit'] });
  receivers.add(child);
  const got: Datagram[] = [];
  const waiters = new Set<() => void>();
  const exited = once(child, 'exit');
  await new Promise<void>((resolve, reject) => {
    child.once('exit', (code) => reject(new Error(`notify receiver exited (${String(code)}) before binding`)));
    createInterface({ input: child.stdout as NodeJS.ReadableStream }).on('line', (line) => {
      const msg = JSON.parse(line) as { ready?: boolean; payload?: string; pid?: number | null };
      if (msg.ready === true) {
        resolve();
        return;
      }
      got.push({ payload: msg.payload ?? '', pid: msg.pid ?? null, at: performance.now() });
      for (const wake of waiters) wake();
    });
  });
  return {
    address,
    got,
    child,
    waitFor(pred, timeoutMs = SLOW, what = 'a datagram') {
      return new Promise((resolve, reject) => {
        const check = (): boolean => {
          const found = got.find(pred);
          if (found === undefined) return false;
          clearTimeout(timer);
          waiters.delete(check);
          resolve(found);
          return true;
        };
        const timer = setTimeout(() => {
          waiters.delete(check);
          reject(new Error(`timed out waiting for ${what}; got ${JSON.stringify(got.map((d) => d.payload))}`));
        }, timeoutMs);
        if (!check()) waiters.add(check);
      });
    },
    async close() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
      receivers.delete(child);
    },
  };
}

/** Generous bound for anything that may include a proxy's start-up on a busy machine. */
const SLOW = 10_000;

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const isWatchdog = (d: Datagram): boolean => d.payload === 'WATCHDOG=1';

/** A TCP port on loopback that nothing listens on (bound, then released). */
async function closedPort(): Promise<number> {
  const s = createServer();
  s.listen(0, '127.0.0.1');
  await once(s, 'listening');
  const port = (s.address() as { port: number }).port;
  s.close();
  await once(s, 'close');
  return port;
}

/** The exit of a proxy, or a failure after `ms`. */
async function exitWithin(p: Proxy, ms: number): Promise<{ code: number | null; signal: NodeJS.Signals | null }> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`proxy did not exit within ${ms} ms; stderr: ${p.stderr()}`)), ms);
  });
  try {
    return await Promise.race([p.exited, timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** Write, wait for the echo, close: works without half-close (the reference has none). */
async function exchange(to: { host: string; port: number } | { path: string }, text: string, timeoutMs = SLOW): Promise<string> {
  const c = await connect(to);
  c.on('error', () => {});
  let got = '';
  try {
    c.write(text);
    c.setEncoding('utf8');
    c.on('data', (d: string) => (got += d));
    await waitFor(() => got.length >= text.length || c.readableEnded, timeoutMs, `echo of ${text}`).catch(() => undefined);
    return got;
  } finally {
    c.destroy();
  }
}

/** Resolves when a socket gets data, EOF, an error (RST) or closes, or after `ms`. */
function settled(c: Socket, ms: number): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    const done = (): void => {
      clearTimeout(timer);
      resolve();
    };
    c.once('data', done);
    c.once('end', done);
    c.once('error', done);
    c.once('close', done);
  });
}

function alive(p: Proxy): boolean {
  return p.child.exitCode === null && p.child.signalCode === null;
}

// =============================================================================================
// Independent scenarios with no tight timing: run side by side to keep the file fast.
describe('sd_notify', { concurrency: true }, () => {
  test('READY=1 with STATUS= once every listening socket is served, sent from the proxy pid (path NOTIFY_SOCKET)', async () => {
    const backend = await startBackend(echo);
    const receiver = await startReceiver('path');
    const path = join(tmp.dir, `listen-${unique()}.sock`);
    const abstract = `@spd-listen-${unique()}`;
    const p = await startProxy({
      args: [`--listen=${path}`, `--listen=${abstract}`, backend.address],
      listen: [{ kind: 'tcp' }, { kind: 'tcp' }],
      env: { NOTIFY_SOCKET: receiver.address },
    });
    try {
      const ready = await receiver.waitFor((d) => d.payload.startsWith('READY=1'), SLOW, 'READY=1');
      // Every socket, inherited or bound by --listen, serves at once after READY.
      const targets = [
        ...p.listeners.map((l) => l.connectOptions),
        { path },
        { path: `\0${abstract.slice(1)}` },
      ];
      const replies = await Promise.all(targets.map((t, i) => roundTrip(t, Buffer.from(`ping${i}`), SLOW)));
      replies.forEach((r, i) => assert.equal(r.data.toString(), `ping${i}`, `socket ${i} serves right after READY=1`));
      assert.equal(ready.pid, p.pid, 'READY=1 comes from the proxy process itself (NotifyAccess=main)');
      assert.match(ready.payload, /^READY=1\nSTATUS=\S.*$/, 'READY=1 carries a STATUS= line');
      await sleep(100);
      assert.equal(receiver.got.filter((d) => d.payload.includes('READY=1')).length, 1, 'READY=1 is sent once');
      assert.equal(p.stderr(), '');
    } finally {
      await p.stop();
      await receiver.close();
      await backend.close();
    }
  });

  test('READY=1 is sent only after listen() on every socket (strace order)', async () => {
    // Deterministic ordering check: the syscall trace of the proxy must show every listen()
    // (on the --listen sockets it binds itself) before the sendto() that carries READY=1.
    // Under strace the proxy is strace's child, so LISTEN_PID cannot match: --listen only.
    const receiver = await startReceiver('path');
    const trace = join(tmp.dir, `strace-${unique()}.txt`);
    const listens = Array.from({ length: 4 }, (_, i) => `--listen=${join(tmp.dir, `order-${unique()}-${i}.sock`)}`);
    const p = await startProxy({
      args: [...listens, '--listen=127.0.0.1:0', '127.0.0.1:9'],
      env: { NOTIFY_SOCKET: receiver.address },
      wrapper: ['strace', '-f', '-qq', '-e', 'trace=listen,sendto', '-e', 'signal=none', '-o', trace],
    });
    let tracee: number | null = null;
    try {
      const ready = await receiver.waitFor((d) => d.payload.startsWith('READY=1'), 10_000, 'READY=1 under strace');
      tracee = ready.pid;
      assert.ok(tracee !== null);
      // Stop the traced proxy itself (killing strace would leave it running).
      process.kill(tracee, 'SIGTERM');
      assert.equal((await exitWithin(p, SLOW)).code, 0);
      const lines = readFileSync(trace, 'utf8').split('\n');
      const listenLines = lines.flatMap((l, i) => (/\blisten\(\d+, \d+\)\s*=\s*0$/.test(l) ? [i] : []));
      const readyLine = lines.findIndex((l) => /sendto\(.*READY=1/.test(l));
      assert.equal(listenLines.length, 5, `five sockets listened:\n${lines.join('\n')}`);
      assert.ok(readyLine > Math.max(...listenLines), `READY=1 after the last listen():\n${lines.join('\n')}`);
    } finally {
      if (tracee !== null) {
        try {
          process.kill(tracee, 'SIGKILL');
        } catch {
          // already gone
        }
      }
      await p.stop();
      await receiver.close();
    }
  });

  test('abstract @NOTIFY_SOCKET: READY=1 and STOPPING=1 arrive from the proxy pid', async () => {
    const receiver = await startReceiver('abstract');
    const p = await startProxy({ args: ['127.0.0.1:9'], listen: [{ kind: 'tcp' }], env: { NOTIFY_SOCKET: receiver.address } });
    try {
      const ready = await receiver.waitFor((d) => d.payload.startsWith('READY=1'), SLOW, 'READY=1');
      assert.equal(ready.pid, p.pid);
      p.child.kill('SIGTERM');
      const stopping = await receiver.waitFor((d) => d.payload.startsWith('STOPPING=1'), 2000, 'STOPPING=1');
      assert.equal(stopping.pid, p.pid);
      assert.deepEqual(await exitWithin(p, 2000), { code: 0, signal: null });
    } finally {
      await p.stop();
      await receiver.close();
    }
  });

  test('ERRNO=N on failure, the same as the reference (22 = EINVAL, 34 = ERANGE); nothing for --help', async () => {
    const cases: { args: string[]; errno: number | null }[] = [
      { args: ['-c', '0', 'x'], errno: 22 },
      { args: ['-c', '-1', 'x'], errno: 34 },
      { args: ['-c', '4294967296', 'x'], errno: 34 },
      { args: ['--exit-idle-time=bogus', 'x'], errno: 22 },
      { args: ['a', 'b'], errno: 22 },
      { args: [], errno: 22 },
      { args: ['--bogus', 'x'], errno: 22 },
      { args: ['127.0.0.1:1'], errno: 22 },
      { args: ['-h'], errno: null },
    ];
    // One notify socket for all runs: the sender pid tells them apart.
    const receiver = await startReceiver('path');
    try {
      const runs = await Promise.all(
        cases.flatMap((c) =>
          (['ours', 'ref'] as const).map(async (flavour) => {
            const p = await startProxy({ flavour, args: c.args, env: { NOTIFY_SOCKET: receiver.address } });
            const { code } = await exitWithin(p, 10_000);
            return { ...c, flavour, code, pid: p.pid };
          }),
        ),
      );
      const expected = runs.filter((r) => r.errno !== null).length;
      // Each datagram was sent before its sender exited; let the receiver report them all.
      await waitFor(() => receiver.got.length >= expected, SLOW, `${expected} datagrams`).catch(() => undefined);
      await sleep(100);
      const pids = new Set(runs.map((r) => r.pid));
      for (const d of receiver.got) assert.ok(pids.has(d.pid ?? -1), `datagram ${JSON.stringify(d)} comes from a proxy pid`);
      for (const r of runs) {
        const payloads = receiver.got.filter((d) => d.pid === r.pid).map((d) => d.payload);
        const label = `${r.flavour}, args ${JSON.stringify(r.args)}`;
        assert.deepEqual(payloads, r.errno === null ? [] : [`ERRNO=${r.errno}`], label);
        assert.equal(r.code, r.errno === null ? 0 : 1, label);
      }
    } finally {
      await receiver.close();
    }
  });

  test('ERRNO= for a target refused at start-up (ours only: the reference fails per connection)', async () => {
    const receiver = await startReceiver('abstract');
    const p = await startProxy({ args: ['/' + 'x'.repeat(120)], listen: [{ kind: 'tcp' }], env: { NOTIFY_SOCKET: receiver.address } });
    try {
      assert.equal((await exitWithin(p, SLOW)).code, 1);
      const d = await receiver.waitFor((x) => x.payload.startsWith('ERRNO='), 2000);
      assert.equal(d.payload, 'ERRNO=36', 'ENAMETOOLONG');
      assert.equal(d.pid, p.pid);
      assert.ok(!receiver.got.some((x) => x.payload.includes('READY=1')), 'no READY=1 when start-up fails');
    } finally {
      await p.stop();
      await receiver.close();
    }
  });

  test('nothing extra is loaded when NOTIFY_SOCKET is unset', async () => {
    async function run(notifySocket: string | undefined): Promise<{ modules: string[]; maps: string }> {
      const log = join(tmp.dir, `modules-${unique()}.txt`);
      const backend = await startBackend(echo);
      const env: Record<string, string> = { NODE_OPTIONS: `--import=${MODULE_RECORDER}`, SPD_MODULE_LOG: log };
      if (notifySocket !== undefined) env.NOTIFY_SOCKET = notifySocket;
      const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }], env });
      try {
        // Once it has served a connection it is fully up (READY=1 was sent, if it ever is).
        const r = await roundTrip(p.listeners[0]!.connectOptions, Buffer.from('x'), SLOW);
        assert.equal(r.data.toString(), 'x');
        const maps = readFileSync(`/proc/${p.pid}/maps`, 'utf8');
        const modules = existsSync(log) ? readFileSync(log, 'utf8').split('\n').filter(Boolean) : [];
        return { modules, maps };
      } finally {
        await p.stop();
        await backend.close();
      }
    }
    const receiver = await startReceiver('path');
    try {
      const [unset, set] = await Promise.all([run(undefined), run(receiver.address)]);
      // The recorder works: it saw our entry point in both runs.
      assert.ok(unset.modules.some((u) => u.endsWith('/dist/main.js')), `recorder saw main.js: ${unset.modules.join(' ')}`);
      assert.ok(!unset.modules.some((u) => u.endsWith('/dist/system/notify.js')), 'notify.js not loaded without NOTIFY_SOCKET');
      assert.ok(!unset.maps.includes('sd_notify.node'), 'the native addon is not mapped without NOTIFY_SOCKET');
      assert.ok(set.modules.some((u) => u.endsWith('/dist/system/notify.js')), 'notify.js loaded with NOTIFY_SOCKET');
      assert.ok(set.maps.includes('sd_notify.node'), 'the addon is mapped with NOTIFY_SOCKET');
    } finally {
      await receiver.close();
    }
  });

  test('a failing notify socket never kills the proxy, and says so once', async () => {
    const backend = await startBackend(echo);
    const bad = [join(tmp.dir, 'no-such-dir', 'notify.sock'), 'relative/notify.sock', `@spd-nobody-${unique()}`];
    try {
      await Promise.all(
        bad.map(async (notifySocket) => {
          const p = await startProxy({
            args: [backend.address],
            listen: [{ kind: 'tcp' }],
            env: { NOTIFY_SOCKET: notifySocket, WATCHDOG_USEC: '20000' },
          });
          try {
            await sleep(400); // ~40 failed pings
            assert.ok(alive(p), `alive with NOTIFY_SOCKET=${notifySocket}`);
            const r = await roundTrip(p.listeners[0]!.connectOptions, Buffer.from('still here'), SLOW);
            assert.equal(r.data.toString(), 'still here');
            const lines = p.stderr().split('\n').filter(Boolean);
            assert.equal(lines.length, 1, `one line, not one per ping: ${JSON.stringify(lines)}`);
            assert.match(lines[0] as string, /notify/i);
          } finally {
            await p.stop();
          }
        }),
      );
      // A failure on the error path is still the error path: message, exit 1.
      const p = await startProxy({ args: ['-c', '0', 'x'], env: { NOTIFY_SOCKET: bad[0] as string } });
      assert.equal((await exitWithin(p, SLOW)).code, 1);
      assert.match(p.stderr(), /^Connection limit is too low\.$/m);
    } finally {
      await backend.close();
    }
  });

  test('a service manager that stops reading never blocks the proxy', async () => {
    const backend = await startBackend(echo);
    const receiver = await startReceiver('path');
    // A stopped receiver's queue (net.unix.max_dgram_qlen) fills after a few datagrams; a
    // blocking send would then freeze the event loop, and with it all proxied traffic.
    receiver.child.kill('SIGSTOP');
    const p = await startProxy({
      args: [backend.address],
      listen: [{ kind: 'tcp' }],
      env: { NOTIFY_SOCKET: receiver.address, WATCHDOG_USEC: '10000' },
    });
    try {
      // Up (however long start-up takes on a busy machine), then ~60 more pings at 5 ms.
      assert.equal(await exchange(p.listeners[0]!.connectOptions, 'up', 10_000), 'up');
      await sleep(300);
      await waitFor(() => p.stderr().includes('EAGAIN'), SLOW, 'the full queue to be reported');
      // Up and warm: a round trip takes milliseconds; 3 s leaves room for a busy machine.
      for (let i = 0; i < 3; i++) {
        const r = await roundTrip(p.listeners[0]!.connectOptions, Buffer.from(`n${i}`), 3000);
        assert.equal(r.data.toString(), `n${i}`, 'still served, promptly');
      }
      assert.ok(alive(p));
      assert.equal(p.stderr().split('\n').filter(Boolean).length, 1, `reported once: ${p.stderr()}`);
    } finally {
      await p.stop();
      receiver.child.kill('SIGCONT');
      await receiver.close();
      await backend.close();
    }
  });

  test('--exit-idle-time: the idle exit sends STOPPING=1 and exits 0, also with no connection ever', async () => {
    const receiver = await startReceiver('path');
    const t0 = performance.now();
    const p = await startProxy({ args: ['--exit-idle-time=300ms', '127.0.0.1:9'], listen: [{ kind: 'tcp' }], env: { NOTIFY_SOCKET: receiver.address } });
    try {
      assert.deepEqual(await exitWithin(p, SLOW), { code: 0, signal: null });
      assert.ok(performance.now() - t0 >= 300, 'not before the idle time');
      const stopping = await receiver.waitFor((d) => d.payload.startsWith('STOPPING=1'), 1000, 'STOPPING=1');
      assert.equal(stopping.pid, p.pid);
      assert.deepEqual(
        receiver.got.map((d) => d.payload.split('\n')[0]),
        ['READY=1', 'STOPPING=1'],
      );
      assert.equal(p.stderr(), '', 'an idle exit is silent');
    } finally {
      await p.stop();
      await receiver.close();
    }
  });
});

// =============================================================================================
// Timing-sensitive: each on its own.
describe('watchdog', () => {
  test('WATCHDOG=1 at least every WATCHDOG_USEC/2, from the proxy pid, like the reference', async () => {
    const usec = 400_000;
    // Delivery jitter on a loaded machine (the test sees the datagram via a python pipe).
    const slackMs = 150;
    const receiver = await startReceiver('abstract');
    const runs: { label: string; p: Proxy }[] = [];
    try {
      for (const flavour of ['ours', 'ref'] as const) {
        for (const pidMode of ['unset', 'self'] as const) {
          const p = await startProxy({
            flavour,
            args: ['127.0.0.1:9'],
            listen: [{ kind: 'tcp' }],
            env: { NOTIFY_SOCKET: receiver.address, WATCHDOG_USEC: String(usec) },
            // WATCHDOG_PID=$$ is the proxy's own pid: the harness execs it from that shell.
            ...(pidMode === 'self' ? { listenPid: '$$ WATCHDOG_PID=$$' } : {}),
          });
          runs.push({ label: `${flavour}, WATCHDOG_PID ${pidMode}`, p });
        }
      }
      // From each proxy's first ping, watch 1.2 s.
      for (const { label, p } of runs) await receiver.waitFor((d) => d.pid === p.pid && isWatchdog(d), SLOW, `${label}: first ping`);
      await sleep(1200);
      for (const { label, p } of runs) {
        assert.ok(alive(p), `${label}: still running`);
        const pings = receiver.got.filter((d) => d.pid === p.pid && isWatchdog(d));
        const gaps = pings.slice(1).map((d, i) => d.at - (pings[i] as Datagram).at);
        // Ours pings every WATCHDOG_USEC/2 (the issue's bound); the reference's sd-event
        // pings somewhere between 1/2 and 3/4 of it (measured: ~250 ms of 400 ms).
        const bound = label.startsWith('ours') ? usec / 2000 : (usec * 3) / 4000;
        assert.ok(pings.length >= 4, `${label}: ${pings.length} pings`);
        assert.ok(Math.max(...gaps) <= bound + slackMs, `${label}: gaps ${gaps.map((g) => g.toFixed(0)).join(',')} ms`);
      }
      const pids = new Set(runs.map((r) => r.p.pid));
      for (const d of receiver.got) assert.ok(pids.has(d.pid ?? -1), `datagram ${JSON.stringify(d)} comes from a proxy pid`);
    } finally {
      for (const { p } of runs) await p.stop();
      await receiver.close();
    }
  });

  test('no WATCHDOG=1 without WATCHDOG_USEC, or when WATCHDOG_PID names another process (as the reference)', async () => {
    const envs: Record<string, string>[] = [{}, { WATCHDOG_USEC: '100000', WATCHDOG_PID: '1' }, { WATCHDOG_USEC: '0' }];
    const receiver = await startReceiver('path');
    const runs: { env: Record<string, string>; flavour: Flavour; p: Proxy }[] = [];
    try {
      for (const env of envs) {
        for (const flavour of ['ours', 'ref'] as const) {
          const p = await startProxy({ flavour, args: ['127.0.0.1:9'], listen: [{ kind: 'tcp' }], env: { NOTIFY_SOCKET: receiver.address, ...env } });
          runs.push({ env, flavour, p });
        }
      }
      // Ours is up once its READY=1 is in; then leave time for pings that must not come.
      for (const r of runs) if (r.flavour === 'ours') await receiver.waitFor((d) => d.pid === r.p.pid, SLOW, 'READY=1');
      await sleep(500);
      for (const { env, flavour, p } of runs) {
        assert.ok(alive(p));
        const payloads = receiver.got.filter((d) => d.pid === p.pid).map((d) => d.payload);
        const expected = flavour === 'ours' ? ['READY=1\nSTATUS=Processing requests...'] : [];
        assert.deepEqual(payloads, expected, `${flavour} with ${JSON.stringify(env)}`);
      }
    } finally {
      for (const { p } of runs) await p.stop();
      await receiver.close();
    }
  });
});

// =============================================================================================
describe('signals', () => {
  for (const signal of ['SIGTERM', 'SIGINT'] as const) {
    test(`${signal}: STOPPING=1, every connection closed, exit 0 well under a second`, async () => {
      const backend = await startBackend(echo);
      const receiver = await startReceiver('path');
      const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }], env: { NOTIFY_SOCKET: receiver.address } });
      try {
        await receiver.waitFor((d) => d.payload.startsWith('READY=1'));
        const clients: Socket[] = [];
        for (let i = 0; i < 3; i++) {
          const c = await connect(p.listeners[0]!.connectOptions);
          c.write(`held${i}`);
          const [data] = (await once(c, 'data')) as [Buffer];
          assert.equal(data.toString(), `held${i}`);
          clients.push(c);
        }
        await waitFor(() => backend.sockets.length === 3, 2000, 'three backend connections');
        const clientEnds = clients.map((c) => readAll(c, 2000));
        const backendCloses = backend.sockets.map((s) => (s.closed ? Promise.resolve() : once(s, 'close').then(() => undefined)));

        const t0 = performance.now();
        p.child.kill(signal);
        const result = await exitWithin(p, 2000);
        const elapsed = performance.now() - t0;
        assert.deepEqual(result, { code: 0, signal: null }, 'a clean exit, not death by signal');
        // "Well under a second", with room for a busy test machine.
        assert.ok(elapsed < 800, `exited after ${elapsed.toFixed(0)} ms`);

        const stopping = await receiver.waitFor((d) => d.payload.startsWith('STOPPING=1'), 1000, 'STOPPING=1');
        assert.equal(stopping.pid, p.pid);
        assert.match(stopping.payload, /^STOPPING=1\nSTATUS=\S/);
        for (const end of await Promise.all(clientEnds)) assert.notEqual(end.ended, 'timeout', 'client connection closed');
        await Promise.all(backendCloses);
        // Nothing accepts any more.
        await assert.rejects(connect(p.listeners[0]!.connectOptions), /ECONNREFUSED/);
        assert.equal(p.stderr(), '', 'a requested stop is not an error');
      } finally {
        await p.stop();
        await receiver.close();
        await backend.close();
      }
    });
  }

  test('SIGPIPE never kills the proxy: ignored, and a closed stderr does not take it down', async () => {
    const port = await closedPort();
    const p = await startProxy({ args: [`127.0.0.1:${port}`], listen: [{ kind: 'tcp' }] });
    try {
      const to = p.listeners[0]!.connectOptions;
      // First connection: the proxy is up and logs the failure.
      await readAll(await connect(to), SLOW);
      await waitFor(() => p.stderr().includes('Connection refused'), SLOW, 'the connect error');

      const status = readFileSync(`/proc/${p.pid}/status`, 'utf8');
      const sigIgn = BigInt(`0x${/SigIgn:\s*([0-9a-f]+)/.exec(status)?.[1] ?? '0'}`);
      assert.equal((sigIgn >> 12n) & 1n, 1n, 'SIGPIPE (13) is ignored');

      p.child.kill('SIGPIPE');
      await sleep(100);
      assert.ok(alive(p), 'survives kill -PIPE');

      // Now make writing to stderr fail with EPIPE: the reader end goes away.
      p.child.stderr?.destroy();
      for (let i = 0; i < 3; i++) {
        const r = await readAll(await connect(to), SLOW);
        assert.notEqual(r.ended, 'timeout');
      }
      await sleep(100);
      assert.ok(alive(p), 'survives logging into a closed stderr');
      await readAll(await connect(to), SLOW);
    } finally {
      await p.stop();
    }
  });
});

// =============================================================================================
// Logging. The level of each line is read from its sd-daemon(3) "<N>" prefix: ours prints it
// because the test connects stderr "to the journal" (JOURNAL_STREAM = stderr's dev:ino, set by a
// wrapper that execs the proxy in place, so pids are unchanged); the reference prints it with
// SYSTEMD_LOG_TARGET=console-prefixed (as <facility*8+level>, so only level & 7 is compared).

const JOURNAL_WRAPPER = ['sh', '-c', 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$@"', 'sh'];

interface Line {
  level: number;
  text: string;
}

function parseLines(stderr: string): Line[] {
  return stderr
    .split('\n')
    .filter(Boolean)
    .map((l) => {
      const m = /^<([0-9]+)>(.*)$/.exec(l);
      assert.ok(m !== null, `every line has a priority prefix: ${JSON.stringify(l)}`);
      return { level: Number(m[1]) & 7, text: m[2] as string };
    });
}

function prefixed(flavour: Flavour, options: StartOptions): StartOptions {
  return flavour === 'ours'
    ? { ...options, flavour, wrapper: [...JOURNAL_WRAPPER, ...(options.wrapper ?? [])] }
    : { ...options, flavour, env: { ...options.env, SYSTEMD_LOG_TARGET: 'console-prefixed' } };
}

/** Start the proxy towards `target`, make one connection that fails, return its log lines. */
async function logOfOneFailedConnection(flavour: Flavour, target: string): Promise<Line[]> {
  const p = await startProxy(prefixed(flavour, { args: [target], listen: [{ kind: 'tcp' }] }));
  try {
    await readAll(await connect(p.listeners[0]!.connectOptions), SLOW);
    await waitFor(() => p.stderr().includes('\n'), SLOW, 'a log line');
    return parseLines(p.stderr());
  } finally {
    await p.stop();
  }
}

let acceptShim: string | undefined;
function buildAcceptShim(): string {
  if (acceptShim !== undefined) return acceptShim;
  const out = join(tmp.dir, 'accept_fail.so');
  const r = spawnSync('cc', ['-shared', '-fPIC', '-O2', '-o', out, ACCEPT_SHIM_SOURCE, '-ldl'], { encoding: 'utf8', timeout: 30_000 });
  assert.equal(r.status, 0, `building the accept4() shim needs a C compiler (cc): ${r.error?.message ?? r.stderr}`);
  acceptShim = out;
  return out;
}

describe('logging', { concurrency: true }, () => {
  /** One scenario against one flavour; resolves with the prefixed lines. */
  type Scenario = (flavour: Flavour) => Promise<Line[]>;

  const scenarios: Record<string, { expect: Line[]; run: Scenario }> = {
    'connection limit hit (warning)': {
      expect: [{ level: 4, text: 'Hit connection limit, refusing connection.' }],
      async run(flavour) {
        const backend = await startBackend(echo);
        const p = await startProxy(prefixed(flavour, { args: ['-c', '1', backend.address], listen: [{ kind: 'tcp' }] }));
        const held: Socket[] = [];
        try {
          // Ours is a hard cap; the reference lets max+1 through (v252 off-by-one).
          const attempts = flavour === 'ours' ? 2 : 3;
          for (let i = 0; i < attempts; i++) {
            const c = await connect(p.listeners[0]!.connectOptions);
            held.push(c);
            c.on('error', () => {});
            // Served (echo) or refused (EOF): either way the proxy has dealt with it.
            c.write('x');
            await settled(c, SLOW);
          }
          await waitFor(() => p.stderr().includes('Hit connection'), SLOW, 'the limit message');
          return parseLines(p.stderr());
        } finally {
          for (const c of held) c.destroy();
          await p.stop();
          await backend.close();
        }
      },
    },
    'connect failure (error)': {
      expect: [{ level: 3, text: 'Failed to connect to remote host: Connection refused' }],
      async run(flavour) {
        return logOfOneFailedConnection(flavour, `127.0.0.1:${await closedPort()}`);
      },
    },
    'resolve failure (error)': {
      // "a..b" fails inside glibc (empty label): no DNS packet leaves the machine.
      expect: [{ level: 3, text: 'Failed to resolve host: Name or service not known' }],
      async run(flavour) {
        return logOfOneFailedConnection(flavour, 'a..b:80');
      },
    },
    'UNIX address too long (error; ours at start-up, the reference per connection)': {
      expect: [{ level: 3, text: "Specified address doesn't fit in an AF_UNIX address, refusing: File name too long" }],
      async run(flavour) {
        const p = await startProxy(prefixed(flavour, { args: ['/' + 'x'.repeat(120)], listen: [{ kind: 'tcp' }] }));
        try {
          if (flavour === 'ours') {
            assert.equal((await exitWithin(p, SLOW)).code, 1);
          } else {
            await readAll(await connect(p.listeners[0]!.connectOptions), SLOW);
            await waitFor(() => p.stderr().includes('\n'), SLOW, 'a log line');
          }
          return parseLines(p.stderr());
        } finally {
          await p.stop();
        }
      },
    },
  };

  for (const [name, { expect, run }] of Object.entries(scenarios)) {
    test(`${name}: message and level as the reference`, async () => {
      const [ours, ref] = await Promise.all([run('ours'), run('ref')]);
      assert.deepEqual(ref.slice(0, 1), expect, 'the reference (sanity check of the scenario)');
      assert.deepEqual(ours, expect, 'ours: exactly this one line');
    });
  }

  test('accept() failure: the reference warns; both keep serving; ours never logs it at another level', async () => {
    // Node's libuv (>= 1.49) drops accept() errors inside uv__server_io without calling
    // back, so ours cannot see them: its warning branch in proxy.ts is unreachable today.
    // What must hold regardless: no crash, the next connection is served, and nothing is
    // printed other than the reference's warning.
    const warning = { level: 4, text: 'Failed to accept() socket: No buffer space available' };
    async function run(flavour: Flavour): Promise<Line[]> {
      const backend = await startBackend(echo);
      const shim = buildAcceptShim();
      const p = await startProxy(
        prefixed(flavour, { args: [backend.address], listen: [{ kind: 'tcp' }], env: { LD_PRELOAD: shim, SPD_ACCEPT_FAIL_ERRNO: '105' } }),
      );
      try {
        const got = await exchange(p.listeners[0]!.connectOptions, 'after');
        assert.equal(got, 'after', `${flavour} serves the connection after the failed accept()`);
        if (flavour === 'ref') await waitFor(() => p.stderr().includes('accept'), SLOW, 'the accept warning');
        await sleep(100);
        assert.ok(alive(p));
        return parseLines(p.stderr());
      } finally {
        await p.stop();
        await backend.close();
      }
    }
    const [ours, ref] = await Promise.all([run('ours'), run('ref')]);
    assert.deepEqual(ref, [warning], 'the reference warns (and the shim did fail an accept)');
    assert.ok(ours.length === 0 || (ours.length === 1 && ours[0]?.level === 4 && ours[0].text === warning.text), JSON.stringify(ours));
  });

  test('debug: "New connection from ADDR", only with SYSTEMD_LOG_LEVEL=debug; otherwise success is silent', async () => {
    async function run(flavour: Flavour, level: string | undefined): Promise<{ lines: Line[]; port: number }> {
      const backend = await startBackend(echo);
      const env: Record<string, string> = level === undefined ? {} : { SYSTEMD_LOG_LEVEL: level };
      const p = await startProxy(prefixed(flavour, { args: [backend.address], listen: [{ kind: 'tcp' }], env }));
      try {
        const c = await connect(p.listeners[0]!.connectOptions);
        const port = c.localPort as number;
        const reading = readAll(c, SLOW);
        c.end('hello');
        const r = await reading;
        c.destroy();
        // The reference has no half-close: it may drop the reply; ours must echo it.
        if (flavour === 'ours') assert.equal(r.data.toString(), 'hello');
        const debug = level === 'debug' || level === '0x7';
        if (debug) await waitFor(() => p.stderr().includes('New connection'), SLOW, 'the debug line');
        await sleep(150); // the close has been processed by now
        return { lines: parseLines(p.stderr()), port };
      } finally {
        await p.stop();
        await backend.close();
      }
    }
    const levels = [undefined, 'info', 'debug', '0x7'];
    const results = await Promise.all(levels.flatMap((l) => [run('ours', l), run('ref', l)]));
    levels.forEach((level, i) => {
      const ours = results[2 * i] as { lines: Line[]; port: number };
      const ref = results[2 * i + 1] as { lines: Line[]; port: number };
      const debug = level === 'debug' || level === '0x7';
      const expectOurs = debug ? [{ level: 7, text: `New connection from 127.0.0.1:${ours.port}` }] : [];
      assert.deepEqual(ours.lines, expectOurs, `ours, SYSTEMD_LOG_LEVEL=${String(level)}`);
      const refNew = ref.lines.filter((l) => l.text.startsWith('New connection'));
      assert.deepEqual(refNew, debug ? [{ level: 7, text: `New connection from 127.0.0.1:${ref.port}` }] : []);
      if (!debug) assert.deepEqual(ref.lines, [], `the reference is silent too at ${String(level)}`);
    });
  });

  test('SYSTEMD_LOG_LEVEL accepts what systemd accepts (names, numbers 0-7 as safe_atou reads them)', async () => {
    const values = ['crit', 'err', 'warning', '2', '3', '8', '-1', 'error', 'ERR', '', ' 3', '+0x2', '03', '08', '3 '];
    async function run(flavour: Flavour, value: string): Promise<string> {
      const p = await startProxy(prefixed(flavour, { args: ['-c', '0', 'x'], env: { SYSTEMD_LOG_LEVEL: value } }));
      await exitWithin(p, SLOW);
      await sleep(20);
      return p.stderr();
    }
    const results = await Promise.all(values.map(async (v) => ({ v, ours: await run('ours', v), ref: await run('ref', v) })));
    for (const { v, ours, ref } of results) {
      const norm = (s: string): string => parseLines(s).map((l) => `<${l.level}>${l.text}`).join('\n');
      assert.equal(norm(ours), norm(ref), `SYSTEMD_LOG_LEVEL=${JSON.stringify(v)}`);
    }
    // The table really discriminates: an invalid value is reported, err hides warnings, crit hides errors.
    const by = new Map(results.map((r) => [r.v, r.ours]));
    assert.match(by.get('error') ?? '', /^<4>Failed to parse log level 'error'\. Ignoring\.$/m);
    assert.equal(by.get('err'), '<3>Connection limit is too low.\n');
    assert.equal(by.get('crit'), '');
  });

  test('journal prefix only when JOURNAL_STREAM is stderr; plain lines otherwise', async () => {
    const args = ['-c', '0', 'x'];
    const env = { SYSTEMD_LOG_LEVEL: 'bogus' };
    const journal = await startProxy({ args, env, wrapper: JOURNAL_WRAPPER });
    // Another file's device:inode (the wrapper stats its stdin, /dev/null), and garbage.
    const other = await startProxy({ args, env, wrapper: ['sh', '-c', 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/0) exec "$@"', 'sh'] });
    const garbage = await startProxy({ args, env: { ...env, JOURNAL_STREAM: 'journal' } });
    const plain = await startProxy({ args, env });
    await Promise.all([journal, other, garbage, plain].map((p) => exitWithin(p, SLOW)));
    await sleep(20);
    assert.equal(journal.stderr(), "<4>Failed to parse log level 'bogus'. Ignoring.\n<3>Connection limit is too low.\n");
    const expectPlain = "Failed to parse log level 'bogus'. Ignoring.\nConnection limit is too low.\n";
    assert.equal(other.stderr(), expectPlain);
    assert.equal(garbage.stderr(), expectPlain);
    assert.equal(plain.stderr(), expectPlain);
  });

  test('the CLI under test is the built one', () => {
    // Guard against testing a stale tree: dist/ must exist (npm run build).
    assert.ok(existsSync(OURS), `${OURS} exists (run npm run build)`);
    assert.ok(existsSync(REFERENCE), `${REFERENCE} exists`);
  });
});
