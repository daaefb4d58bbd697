/**
 * The UDP flows addon (native/udp_flows.c) itself; what it forwards is tested by the UDP
 * behaviour tests (test/datagram.test.ts), which run on it.
 * - native/build.sh rebuilds it (and sd_notify) into a directory, byte for byte the committed
 *   prebuild when the compiler is the one that made it (the build is reproducible);
 * - its calls: a TypeError only for wrong argument types, a negative errno for what the OS
 *   refuses, and every fd it took back after closeListener().
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { once } from 'node:events';
import { readdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { ROOT, tempDir } from './helpers.ts';
import { gccIdent } from './notify-helpers.ts';
import type { NativeListener, UdpFlowsAddon } from '../src/engine/udp-native.ts';

const PREBUILDS = join(ROOT, 'prebuilds', `${process.platform}-${process.arch}`);
const tmp = tempDir();
process.on('exit', () => tmp.cleanup());

test('native/build.sh DIR builds every addon, each byte for byte the committed prebuild', (t) => {
  const cc = process.env['CC'] ?? 'gcc';
  const version = spawnSync(cc, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  if (version.status !== 0) {
    if (process.env['CI']) assert.fail(`no C compiler (${cc})`);
    t.skip(`no C compiler (${cc})`);
    return;
  }
  const dir = join(tmp.dir, 'out');
  const build = spawnSync(join(ROOT, 'native', 'build.sh'), [dir], { encoding: 'utf8', timeout: 120_000 });
  assert.equal(build.status, 0, `build.sh failed: ${build.stderr}`);
  const names = ['proxy_header.node', 'sd_notify.node', 'udp_flows.node'];
  assert.deepEqual(readdirSync(dir).sort(), names);
  const committed = readFileSync(join(PREBUILDS, 'udp_flows.node'));
  const committedBy = gccIdent(committed.toString('latin1'));
  assert.notEqual(committedBy, null, 'the committed prebuild names the GCC that built it in .comment');
  if (committedBy !== gccIdent(version.stdout)) {
    t.diagnostic(`prebuild made by ${String(committedBy)}, local ${cc} is ${String(gccIdent(version.stdout))}: byte comparison not possible`);
    return;
  }
  for (const name of names) {
    assert.ok(readFileSync(join(dir, name)).equals(readFileSync(join(PREBUILDS, name))), `${name} differs from a fresh build: run npm run prebuilds and commit`);
  }
});

/** sockaddr_in for 127.0.0.1:port, as the addon hands client addresses to onMiss. */
function sockaddrIn(port: number): Uint8Array {
  const b = Buffer.alloc(16);
  b.writeUInt16LE(2, 0); // AF_INET
  b.writeUInt16BE(port, 2);
  b.set([127, 0, 0, 1], 4);
  return b;
}

/** The addon closes a socket in its handle's close callback: the last phase of a turn of the loop, after setImmediate's. */
async function closeCallbacks(): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, 10));
}

function fds(): number {
  return readdirSync('/proc/self/fd').length;
}

test('the addon: TypeErrors for wrong types, negative errnos from the OS, every fd back after closeListener', async () => {
  const addon = createRequire(import.meta.url)(join(PREBUILDS, 'udp_flows.node')) as UdpFlowsAddon;
  const noop = (): void => {};
  assert.equal(addon.listen(-1, {}, noop, noop), -9, 'EBADF');
  assert.throws(() => addon.listen(0, {}, 'x' as unknown as typeof noop, noop), TypeError);
  assert.throws(() => addon.start({} as NativeListener), TypeError);

  const { sock, target, fd } = await loopbackPair();
  const before = fds();
  const l = addon.listen(fd, {}, noop, noop);
  assert.equal(typeof l, 'object');
  const listener = l as NativeListener;
  assert.equal(addon.start(listener), 0);
  const port = target.address().port;
  const id = addon.open(listener, sockaddrIn(40000), '127.0.0.1', port, false, 0);
  assert.ok(id > 0, `a flow id: ${id}`);
  assert.equal(addon.open(listener, sockaddrIn(40000), '127.0.0.1', port, false, 0), -17, 'EEXIST: one flow per client');
  assert.equal(addon.open(listener, sockaddrIn(40001), 'not an address', port, false, 0), -22, 'EINVAL');
  assert.equal(addon.open(listener, new Uint8Array(3), '127.0.0.1', port, false, 0), -22, 'EINVAL: no sockaddr');
  assert.equal(addon.send(listener, id + 1000, new Uint8Array(1)), -2, 'ENOENT: no such flow');
  const got = once(target, 'message');
  assert.equal(addon.send(listener, id, Buffer.from('to the target')), 0);
  const [message] = (await got) as [Buffer];
  assert.equal(message.toString(), 'to the target');
  assert.deepEqual(addon.stats(listener), [13, 0, 1, 0]);
  assert.deepEqual(addon.stats(listener), [0, 0, 0, 0], 'counters are taken');
  assert.deepEqual(addon.sweep(listener, 100, 1000), [], 'not idle yet');
  assert.deepEqual(addon.sweep(listener, 1000, 1000), [id], 'idle for the limit: ended');
  addon.open(listener, sockaddrIn(40002), '127.0.0.1', port, false, 1000);
  await closeCallbacks();
  assert.equal(fds(), before + 2, 'the listener copy and a flow socket');
  addon.closeListener(listener);
  assert.throws(() => addon.start(listener), /listener closed/);
  sock.close();
  target.close();
  await closeCallbacks();
  assert.equal(fds(), before - 2, 'every socket of the addon, and the two of this test, closed');
});

/** Two bound loopback UDP sockets: one for a listener (and its fd), one as the target. */
async function loopbackPair(): Promise<{ sock: ReturnType<typeof createSocket>; target: ReturnType<typeof createSocket>; fd: number }> {
  const sock = createSocket('udp4');
  sock.bind(0, '127.0.0.1');
  await once(sock, 'listening');
  const target = createSocket('udp4');
  target.bind(0, '127.0.0.1');
  await once(target, 'listening');
  const key = Object.getOwnPropertySymbols(sock).find((k) => k.description === 'state symbol') as symbol;
  const fd = (sock as unknown as Record<symbol, { handle: { fd: number } } | undefined>)[key]?.handle.fd ?? -1;
  return { sock, target, fd };
}

/** A listener on a fresh loopback socket, its target, and a cleanup. */
async function listenerFor(addon: UdpFlowsAddon): Promise<{ listener: NativeListener; target: ReturnType<typeof createSocket>; done: () => void }> {
  const noop = (): void => {};
  const { sock, target, fd } = await loopbackPair();
  const l = addon.listen(fd, {}, noop, noop);
  assert.equal(typeof l, 'object');
  const listener = l as NativeListener;
  assert.equal(addon.start(listener), 0);
  return {
    listener,
    target,
    done: () => {
      addon.closeListener(listener);
      sock.close();
      target.close();
    },
  };
}

/** Run `fn` with the addon, a listener from listenerFor() and its target; cleans up after. */
async function withListener(fn: (addon: UdpFlowsAddon, listener: NativeListener, target: ReturnType<typeof createSocket>) => Promise<void>): Promise<void> {
  const addon = createRequire(import.meta.url)(join(PREBUILDS, 'udp_flows.node')) as UdpFlowsAddon;
  const { listener, target, done } = await listenerFor(addon);
  try {
    await fn(addon, listener, target);
  } finally {
    done();
    await closeCallbacks();
  }
}

const ENOENT = -2;

test('flow ids carry a generation: an id whose flow was closed names nothing, even once a new flow has its slot', async () => {
  await withListener(async (addon, listener, target) => {
    const port = target.address().port;
    const a = addon.open(listener, sockaddrIn(41000), '127.0.0.1', port, false, 0);
    assert.ok(a > 0, `a flow id: ${a}`);
    addon.close(listener, a);
    // The slot a had is free: the next open takes it (the free list), with another id.
    const b = addon.open(listener, sockaddrIn(41001), '127.0.0.1', port, false, 0);
    assert.ok(b > 0, `a flow id: ${b}`);
    assert.notEqual(b, a, "the new flow does not get the closed flow's id");
    assert.ok(Number.isSafeInteger(b), `an exact JS integer: ${b}`);
    assert.equal(addon.send(listener, a, Buffer.from('for the old flow')), ENOENT, 'a send on the stale id finds no flow');
    addon.close(listener, a); // must not close b
    // b still works: its datagram reaches the target, from b's own socket.
    const got = once(target, 'message');
    assert.equal(addon.send(listener, b, Buffer.from('on b')), 0, 'b is still open after a close on the stale id');
    const [message] = (await got) as [Buffer];
    assert.equal(message.toString(), 'on b');
    // Sweep reports the id open gave (ids beyond 2^32 would be mangled by a uint32).
    assert.deepEqual(addon.sweep(listener, 1000, 1000), [b]);
    assert.equal(addon.send(listener, b, new Uint8Array(1)), ENOENT);
  });
});

test('flow ids: many open/close cycles, with flows open alongside, never hand out an id that was used before, and every dead id stays dead', async () => {
  await withListener(async (addon, listener, target) => {
    const port = target.address().port;
    const used = new Set<number>();
    const dead: number[] = [];
    const live: number[] = [];
    let client = 42000;
    const open = (): void => {
      const id = addon.open(listener, sockaddrIn(client++), '127.0.0.1', port, false, 0);
      assert.ok(id > 0 && Number.isSafeInteger(id), `a flow id: ${id}`);
      assert.ok(!used.has(id), `id ${id} handed out again`);
      used.add(id);
      live.push(id);
    };
    for (let i = 0; i < 4; i++) open();
    // Deterministic order of closes (oldest, newest, middle), so slots are reused in varied orders.
    for (let i = 0; i < 600; i++) {
      const at = i % 3 === 0 ? 0 : i % 3 === 1 ? live.length - 1 : live.length >> 1;
      const [id] = live.splice(at, 1) as [number];
      addon.close(listener, id);
      dead.push(id);
      open();
    }
    assert.equal(used.size, 604);
    for (const id of dead) assert.equal(addon.send(listener, id, new Uint8Array(1)), ENOENT, `dead id ${id}`);
    for (const id of dead) addon.close(listener, id); // all no-ops
    for (const id of live) assert.equal(addon.send(listener, id, new Uint8Array(1)), 0, `live id ${id} still open`);
    assert.deepEqual(addon.sweep(listener, 1000, 1000).sort((x, y) => x - y), [...live].sort((x, y) => x - y));
  });
});

test('sweep: a failure while making its result ends no flow (none is lost unreported)', async () => {
  await withListener(async (addon, listener, target) => {
    const port = target.address().port;
    const ids = [43000, 43001, 43002].map((p) => addon.open(listener, sockaddrIn(p), '127.0.0.1', port, false, 0));
    // napi_set_element on the result meets an inherited setter that throws at index 1: the
    // N-API call fails after the first id was stored.
    Object.defineProperty(Array.prototype, '1', {
      configurable: true,
      set() {
        throw new Error('no element 1');
      },
    });
    try {
      assert.throws(() => addon.sweep(listener, 1000, 1000), /no element 1/);
    } finally {
      delete (Array.prototype as unknown as Record<string, unknown>)['1'];
    }
    for (const id of ids) assert.equal(addon.send(listener, id, new Uint8Array(1)), 0, `flow ${id} still open: the failed sweep ended nothing`);
    // (the sends above stamped the flows with the sweep clock, 1000)
    assert.deepEqual(addon.sweep(listener, 2000, 1000).sort((x, y) => x - y), [...ids].sort((x, y) => x - y), 'the next sweep reports them all');
  });
});
