import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { notify, setNotifyErrorHandler, watchdogPeriodMs } from '../src/system/notify.ts';
import { gccIdent, startReceiver } from './notify-helpers.ts';

const root = fileURLToPath(new URL('..', import.meta.url));
const notifyUrl = pathToFileURL(join(root, 'src/system/notify.ts')).href;
const committedAddon = join(root, `prebuilds/${process.platform}-${process.arch}/sd_notify.node`);

const tmp = mkdtempSync(join(tmpdir(), 'notify-test-'));
process.on('exit', () => rmSync(tmp, { recursive: true, force: true }));
let seq = 0;
const uniqueAbstract = (): string => `@socket-proxyd-test-${process.pid}-${++seq}`;
const uniquePath = (): string => join(tmp, `n${++seq}.sock`);

interface ChildResult {
  pid: number;
  ok: boolean;
  errors: string[];
  mappedAddons: string[];
}

/** Runs `body` in a fresh `node` with NOTIFY_SOCKET as given (undefined = unset); it reports pid, result, mapped *.node files. */
async function runChild(notifySocket: string | undefined, body: string): Promise<ChildResult> {
  const env: NodeJS.ProcessEnv = { ...process.env };
  delete env['NOTIFY_SOCKET'];
  delete env['NODE_TEST_CONTEXT'];
  if (notifySocket !== undefined) env['NOTIFY_SOCKET'] = notifySocket;
  const code = `
    import { readFileSync } from 'node:fs';
    const errors = [];
    let ok;
    ${body}
    const mappedAddons = [...new Set(readFileSync('/proc/self/maps', 'utf8').split('\\n')
      .map((l) => l.split(/\\s+/).slice(5).join(' ')).filter((p) => p.endsWith('.node')))];
    console.log(JSON.stringify({ pid: process.pid, ok, errors, mappedAddons }));
  `;
  const child = spawn(process.execPath, ['--no-warnings', '--input-type=module', '-e', code], {
    env,
    stdio: ['ignore', 'pipe', 'pipe'],
    timeout: 15000,
  });
  let out = '';
  let err = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const status = await new Promise<number | null>((resolve) => child.on('close', resolve));
  assert.equal(status, 0, `child failed: ${err}`);
  const result = JSON.parse(out) as ChildResult;
  assert.equal(result.pid, child.pid, 'the child reports its own pid');
  return result;
}

const sendReadyViaNotifyTs = `
  const { notify, setNotifyErrorHandler } = await import(${JSON.stringify(notifyUrl)});
  setNotifyErrorHandler((m) => errors.push(m));
  ok = notify('READY=1\\nSTATUS=x');
`;

async function assertDelivered(address: string): Promise<void> {
  const receiver = await startReceiver(address);
  const child = await runChild(address, sendReadyViaNotifyTs);
  const got = await receiver.done;
  assert.deepEqual(child.errors, []);
  assert.equal(child.ok, true);
  assert.deepEqual(got, [{ payload: 'READY=1\nSTATUS=x', pid: child.pid }]);
  assert.ok(child.mappedAddons.some((p) => p.endsWith('/sd_notify.node')), 'the addon was loaded to send');
}

test('path NOTIFY_SOCKET: datagram arrives with the sending process as SCM_CREDENTIALS pid', async () => {
  await assertDelivered(uniquePath());
});

test('abstract @NOTIFY_SOCKET: delivered to the exact (unpadded) name', async () => {
  await assertDelivered(uniqueAbstract());
});

test('abstract name of the maximum length (107 bytes incl. @) is delivered; 108 is refused', async () => {
  const base = uniqueAbstract();
  const longest = base + 'x'.repeat(107 - base.length);
  assert.equal(Buffer.byteLength(longest), 107);
  await assertDelivered(longest);

  const tooLong = await runChild(longest + 'y', sendReadyViaNotifyTs);
  assert.equal(tooLong.ok, false);
  assert.equal(tooLong.errors.length, 1);
  assert.match(tooLong.errors[0] ?? '', /invalid length 108/);
});

test('unset or empty NOTIFY_SOCKET: false, no error, and no native addon is loaded', async () => {
  for (const value of [undefined, '']) {
    const child = await runChild(value, sendReadyViaNotifyTs);
    assert.equal(child.ok, false);
    assert.deepEqual(child.errors, []);
    assert.deepEqual(child.mappedAddons, [], `NOTIFY_SOCKET=${String(value)}`);
  }
});

test('a path nobody is listening on: false, no throw, hook called once per distinct failure', () => {
  const saved = process.env['NOTIFY_SOCKET'];
  const reasons: string[] = [];
  setNotifyErrorHandler((m) => reasons.push(m));
  try {
    const missing = uniquePath();
    process.env['NOTIFY_SOCKET'] = missing;
    assert.equal(notify('WATCHDOG=1'), false);
    assert.equal(notify('WATCHDOG=1'), false);
    assert.deepEqual(reasons, [`sd_notify: sending to ${missing} failed: ENOENT`]);

    // A socket file whose owner is gone: a bound-then-closed python socket leaves one behind.
    const stale = uniquePath();
    const made = spawnSync(
      'python3',
      ['-c', 'import socket,sys; s=socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(sys.argv[1]); s.close()', stale],
      { timeout: 10000 },
    );
    assert.equal(made.status, 0);
    process.env['NOTIFY_SOCKET'] = stale;
    assert.equal(notify('WATCHDOG=1'), false);
    assert.equal(reasons.length, 2);
    assert.equal(reasons[1], `sd_notify: sending to ${stale} failed: ECONNREFUSED`);

    // An abstract name nobody bound.
    process.env['NOTIFY_SOCKET'] = uniqueAbstract();
    assert.equal(notify('READY=1'), false);
    assert.match(reasons[2] ?? '', /ECONNREFUSED$/);

    // A throwing hook must not make notify() throw.
    setNotifyErrorHandler(() => {
      throw new Error('hook exploded');
    });
    process.env['NOTIFY_SOCKET'] = uniquePath();
    assert.equal(notify('READY=1'), false);
  } finally {
    setNotifyErrorHandler(() => {});
    if (saved === undefined) delete process.env['NOTIFY_SOCKET'];
    else process.env['NOTIFY_SOCKET'] = saved;
  }
});

test('NOTIFY_SOCKET that is neither /absolute nor @abstract, or too long: false with a reason', () => {
  const saved = process.env['NOTIFY_SOCKET'];
  const reasons: string[] = [];
  setNotifyErrorHandler((m) => reasons.push(m));
  try {
    for (const bad of ['run/notify', 'vsock:2:1234', '@', '/' + 'a'.repeat(107)]) {
      process.env['NOTIFY_SOCKET'] = bad;
      assert.equal(notify('READY=1'), false, bad);
    }
    assert.equal(reasons.length, 4);
    assert.match(reasons[0] ?? '', /NOTIFY_SOCKET=run\/notify is neither an absolute path nor an @abstract name/);
    assert.match(reasons[1] ?? '', /vsock:2:1234 is neither/);
    assert.match(reasons[2] ?? '', /invalid length 1 /);
    assert.match(reasons[3] ?? '', /invalid length 108 /);
  } finally {
    setNotifyErrorHandler(() => {});
    if (saved === undefined) delete process.env['NOTIFY_SOCKET'];
    else process.env['NOTIFY_SOCKET'] = saved;
  }
});

test('addon send(): positive errno for OS errors, TypeError only for wrong argument types', async () => {
  const { createRequire } = await import('node:module');
  const addon = createRequire(import.meta.url)(committedAddon) as {
    send(path: unknown, message?: unknown): number;
  };
  assert.equal(addon.send(join(tmp, 'absent.sock'), 'x'), 2); // ENOENT
  assert.equal(addon.send('relative', 'x'), 22); // EINVAL
  assert.equal(addon.send('/' + 'a'.repeat(107), Buffer.from('x')), 36); // ENAMETOOLONG
  assert.equal(addon.send('/' + 'a'.repeat(500), 'x'), 36); // never truncated into a "valid" path
  assert.throws(() => addon.send(1, 'x'), TypeError);
  assert.throws(() => addon.send('/x', 42), TypeError);
  assert.throws(() => addon.send('/x'), TypeError);
});

test('watchdogPeriodMs', () => {
  const pid = 4242;
  const cases: Array<[Record<string, string | undefined>, number | null]> = [
    [{}, null],
    [{ WATCHDOG_USEC: undefined }, null],
    [{ WATCHDOG_USEC: '' }, null],
    [{ WATCHDOG_USEC: '0' }, null],
    [{ WATCHDOG_USEC: 'garbage' }, null],
    [{ WATCHDOG_USEC: '-500000' }, null],
    [{ WATCHDOG_USEC: '5e5' }, null],
    [{ WATCHDOG_USEC: '500000 ' }, null],
    [{ WATCHDOG_USEC: '18446744073709551615' }, null], // USEC_INFINITY
    [{ WATCHDOG_USEC: '500000' }, 250],
    [{ WATCHDOG_USEC: '1000000' }, 500],
    [{ WATCHDOG_USEC: '1' }, 1], // never 0 (a 0 ms interval would spin)
    [{ WATCHDOG_USEC: '18446744073709551614' }, 2 ** 31 - 1], // clamped to what setTimeout holds
    [{ WATCHDOG_USEC: '500000', WATCHDOG_PID: String(pid) }, 250],
    [{ WATCHDOG_USEC: '500000', WATCHDOG_PID: String(pid + 1) }, null],
    [{ WATCHDOG_USEC: '500000', WATCHDOG_PID: '' }, null],
    [{ WATCHDOG_USEC: '500000', WATCHDOG_PID: 'x' }, null],
    [{ WATCHDOG_USEC: '500000', WATCHDOG_PID: '0' }, null],
    [{ WATCHDOG_USEC: '500000', WATCHDOG_PID: undefined }, 250],
  ];
  for (const [env, want] of cases) {
    assert.equal(watchdogPeriodMs(env, pid), want, JSON.stringify(env));
  }
});

test('native/build.sh rebuilds the addon from source, and the fresh build delivers too', async (t) => {
  const cc = process.env['CC'] ?? 'gcc';
  const version = spawnSync(cc, ['--version'], { encoding: 'utf8', timeout: 10000 });
  if (version.status !== 0) {
    t.skip(`no C compiler (${cc}); the committed prebuild is still exercised by the tests above`);
    return;
  }
  const out = join(tmp, 'rebuilt', 'sd_notify.node');
  const build = spawnSync(join(root, 'native/build.sh'), [out], { encoding: 'utf8', timeout: 60000 });
  assert.equal(build.status, 0, `build.sh failed: ${build.stderr}`);

  const address = uniqueAbstract();
  const receiver = await startReceiver(address);
  const child = await runChild(
    address,
    `
    const { createRequire } = await import('node:module');
    const addon = createRequire(import.meta.url)(${JSON.stringify(out)});
    const errno = addon.send(process.env.NOTIFY_SOCKET, Buffer.from('READY=1\\nSTATUS=rebuilt'));
    ok = errno === 0;
    if (!ok) errors.push('errno ' + errno);
  `,
  );
  assert.deepEqual(child.errors, []);
  assert.deepEqual(await receiver.done, [{ payload: 'READY=1\nSTATUS=rebuilt', pid: child.pid }]);
  assert.deepEqual(child.mappedAddons, [out]);

  // The build is deterministic (no debug info, no build-id), so with the same
  // compiler the committed binary must be byte-identical to a fresh build.
  const committed = readFileSync(committedAddon);
  const committedBy = gccIdent(committed.toString('latin1'));
  const localGcc = gccIdent(version.stdout);
  assert.notEqual(committedBy, null, 'the committed prebuild names the GCC that built it in .comment');
  if (committedBy === localGcc) {
    assert.ok(
      readFileSync(out).equals(committed),
      `${committedAddon} differs from a fresh build of native/sd_notify.c: run native/build.sh and commit it`,
    );
  } else {
    t.diagnostic(`prebuild made by ${String(committedBy)}, local ${cc} is ${String(localGcc)}: byte comparison not possible`);
  }
});
