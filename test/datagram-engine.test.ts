/**
 * The datagram engine in-process, on a clock the test moves: the default flow idle span
 * (60 s when --idle-timeout= is not given) is checked without waiting a minute. Real UDP
 * sockets on loopback; only the sweep's interval and performance.now() are faked.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { once } from 'node:events';
import { parseAddress } from '../src/config/address.ts';
import { datagramAddress, listenDatagramOnAddress } from '../src/engine/datagram.ts';
import type { Logger } from '../src/system/log.ts';
import { closeProxy, createProxy, type LookupFunction } from '../src/engine/proxy.ts';
import { readdirSync } from 'node:fs';
import { udpNative, type NativeListener, type UdpFlowsAddon } from '../src/engine/udp-native.ts';

/** The path under test: the native addon, unless SOCKET_PROXYD_NATIVE_UDP=0 (test/datagram-node-path.test.ts). */
const NATIVE = process.env['SOCKET_PROXYD_NATIVE_UDP'] !== '0';

function memoryLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return { maxLevel: 7, lines, log: (level: number, message: string) => lines.push(`<${level}>${message}`) };
}

async function udp4(): Promise<UdpSocket> {
  const s = createSocket('udp4');
  s.bind(0, '127.0.0.1');
  await once(s, 'listening');
  return s;
}

test('without --idle-timeout a flow ends after 60 s without a datagram, not before (and a datagram either way restarts the span)', async (t) => {
  const echo = await udp4();
  echo.on('message', (m, r) => echo.send(m, r.port, r.address));
  const logger = memoryLogger();
  const proxy = createProxy({
    target: parseAddress(`127.0.0.1:${echo.address().port}`),
    connectionsMax: 10,
    exitIdleTimeUsec: null,
    logger,
  });
  // The sweep runs on setInterval and reads performance.now(): both move only when we say.
  t.mock.timers.enable({ apis: ['setInterval'] });
  let fake = 1_000_000;
  const realNow = performance.now;
  performance.now = () => fake;
  t.after(() => {
    performance.now = realNow;
  });
  const client = await udp4();
  try {
    const listener = await listenDatagramOnAddress(proxy, parseAddress('127.0.0.1:0', true));
    const port = datagramAddress(listener).port;
    const ask = async (text: string): Promise<void> => {
      const reply = once(client, 'message', { signal: AbortSignal.timeout(5000) });
      client.send(text, port, '127.0.0.1');
      assert.equal(String((await reply)[0]), text);
    };
    /** Move the clock by `ms`, one second (one sweep period) at a time. */
    const advance = (ms: number): void => {
      for (let left = ms; left > 0; left -= 1000) {
        const step = Math.min(1000, left);
        fake += step;
        t.mock.timers.tick(step);
      }
    };
    await ask('open');
    assert.equal(proxy.flows, 1);
    assert.equal(listener.native !== null, NATIVE, 'served by the path under test');
    assert.equal(udpNative() !== null, NATIVE);
    advance(59_000);
    assert.equal(proxy.flows, 1, 'open after 59 s');
    // Traffic restarts the span.
    await ask('still here');
    advance(59_000);
    assert.equal(proxy.flows, 1, 'open 59 s after the last datagram');
    advance(3_000);
    assert.equal(proxy.flows, 0, 'closed at most two sweeps (2 s) after 60 s without a datagram');
    assert.match(logger.lines.join('\n'), /<7>Flow from 127\.0\.0\.1:[0-9]+ closed/);
  } finally {
    closeProxy(proxy);
    client.close();
    echo.close();
  }
});

test('a host-name target: the addresses are tried in order, one a socket cannot be connected to is skipped', async () => {
  const echo = await udp4();
  echo.on('message', (m, r) => echo.send(m, r.port, r.address));
  const asked: string[] = [];
  // fe80::1 without a scope: connect(2) on a UDP socket fails at once (EINVAL), as for an
  // address of a family or network the host cannot reach; the next address is used.
  const lookup: LookupFunction = (host, _options, callback) => {
    asked.push(host);
    setImmediate(callback, null, [
      { address: 'fe80::1', family: 6 },
      { address: '127.0.0.1', family: 4 },
    ]);
  };
  const logger = memoryLogger();
  const proxy = createProxy({
    target: parseAddress(`flows.example:${echo.address().port}`),
    connectionsMax: 10,
    exitIdleTimeUsec: null,
    logger,
    lookup,
  });
  const client = await udp4();
  try {
    const listener = await listenDatagramOnAddress(proxy, parseAddress('127.0.0.1:0', true));
    const port = datagramAddress(listener).port;
    const reply = once(client, 'message', { signal: AbortSignal.timeout(5000) });
    client.send('first datagram, held while resolving', port, '127.0.0.1');
    assert.equal(String((await reply)[0]), 'first datagram, held while resolving');
    assert.deepEqual(asked, ['flows.example']);
    assert.ok(!logger.lines.some((l) => l.startsWith('<4>')), `no warning: ${logger.lines.join('\n')}`);
  } finally {
    closeProxy(proxy);
    client.close();
    echo.close();
  }
});

// The native path only: Node's path has no flow ids (this file also runs on it, from
// test/datagram-node-path.test.ts, where these two tests are not registered at all).
if (NATIVE) test('native path: a flow the addon ended without telling us is dropped on the next miss, and a new one opened (never a send by its old id)', async () => {
  const echo = await udp4();
  echo.on('message', (m, r) => echo.send(m, r.port, r.address));
  const logger = memoryLogger();
  const proxy = createProxy({ target: parseAddress(`127.0.0.1:${echo.address().port}`), connectionsMax: 10, exitIdleTimeUsec: null, logger });
  const a = await udp4();
  const b = await udp4();
  const toB: string[] = [];
  b.on('message', (m) => toB.push(String(m)));
  try {
    const listener = await listenDatagramOnAddress(proxy, parseAddress('127.0.0.1:0', true));
    const port = datagramAddress(listener).port;
    const ask = async (client: UdpSocket, text: string): Promise<void> => {
      const reply = once(client, 'message', { signal: AbortSignal.timeout(3000) });
      client.send(text, port, '127.0.0.1');
      assert.equal(String((await reply)[0]), text);
    };
    await ask(a, 'a1');
    const [stale] = [...listener.byId.keys()] as [number];
    // The addon ends A's flow and we do not hear of it (as after a failed N-API call there).
    (udpNative() as UdpFlowsAddon).close(listener.native as NativeListener, stale);
    assert.equal(proxy.flows, 1, 'we still think A has a flow');
    // B's new flow may take the slot A's had in the addon.
    await ask(b, 'b1');
    // A's next datagram is a miss in the addon: it must reach the target on a flow of A's own.
    await ask(a, 'a2');
    assert.deepEqual(toB, ['b1'], "nothing of A's reached B");
    assert.equal(proxy.flows, 2);
    assert.equal(listener.byId.size, 2);
    assert.ok(!listener.byId.has(stale), 'the stale id is forgotten');
    assert.match(logger.lines.join('\n'), /<4>Flow from 127\.0\.0\.1:[0-9]+ was ended by the native data path unreported/);
  } finally {
    closeProxy(proxy);
    a.close();
    b.close();
    echo.close();
  }
});

if (NATIVE) test("native path: a listen() of the addon that throws (not an errno) still closes Node's handle on the socket", async () => {
  const addon = udpNative();
  assert.ok(addon !== null, 'the addon loads (native path)');
  const proxy = createProxy({ target: parseAddress('127.0.0.1:9'), connectionsMax: 10, exitIdleTimeUsec: null, logger: memoryLogger() });
  // The real addon throws only when an N-API call fails (a dying environment): stand in for that.
  const listen = addon.listen;
  addon.listen = () => {
    throw new Error('udp_flows: N-API call failed');
  };
  try {
    // The sockets of the tests before close in their handles' close callbacks: let them finish first.
    await new Promise((resolve) => setTimeout(resolve, 50));
    const before = readdirSync('/proc/self/fd').length;
    await assert.rejects(listenDatagramOnAddress(proxy, parseAddress('127.0.0.1:0', true)), /udp_flows: N-API call failed/);
    await new Promise((resolve) => setTimeout(resolve, 10));
    assert.equal(readdirSync('/proc/self/fd').length, before, 'no fd left open');
  } finally {
    addon.listen = listen;
    closeProxy(proxy);
  }
});
