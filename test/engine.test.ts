/** The engine used as a library, in-process: resolver fallback and shutdown. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { createProxy, closeProxy, listenOnAddress, type LookupFunction } from '../src/engine/proxy.ts';
import { parseAddress } from '../src/config/address.ts';
import type { Logger } from '../src/system/log.ts';
import { connect, echo, readAll, roundTrip, startBackend } from './helpers.ts';

function memoryLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  return { maxLevel: 6, lines, log: (level: number, message: string) => lines.push(`<${level}>${message}`) };
}

test('a host name with several addresses: each is tried in order until one connects', async () => {
  const backend = await startBackend(echo);
  const asked: string[] = [];
  // 127.0.0.2 is loopback too but nothing listens there on this port: refused at once.
  const lookup: LookupFunction = (host, _options, callback) => {
    asked.push(host);
    setImmediate(callback, null, [
      { address: '127.0.0.2', family: 4 },
      { address: '127.0.0.1', family: 4 },
    ]);
  };
  const logger = memoryLogger();
  const proxy = createProxy({
    target: parseAddress(`backend.example:${backend.port}`),
    connectionsMax: 10,
    exitIdleTimeUsec: null,
    logger,
    lookup,
  });
  const server = await listenOnAddress(proxy, parseAddress('127.0.0.1:0', true));
  const { port } = server.address() as AddressInfo;
  try {
    for (let i = 0; i < 2; i++) {
      const r = await roundTrip({ host: '127.0.0.1', port }, Buffer.from(`hello ${i}`));
      assert.equal(r.data.toString(), `hello ${i}`);
    }
    assert.deepEqual(asked, ['backend.example', 'backend.example'], 'resolved on every connection');
    assert.deepEqual(logger.lines, [], 'a fallback that succeeds is not an error');
  } finally {
    closeProxy(proxy);
    await backend.close();
  }
});

test('resolution failure and all addresses failing: one error line, client closed', async () => {
  const logger = memoryLogger();
  let mode: 'fail' | 'refuse' = 'fail';
  const lookup: LookupFunction = (_host, _options, callback) => {
    if (mode === 'fail') {
      const err = Object.assign(new Error('getaddrinfo ENOTFOUND'), { code: 'ENOTFOUND' });
      setImmediate(callback, err, []);
    } else setImmediate(callback, null, [{ address: '127.0.0.2', family: 4 }, { address: '127.0.0.3', family: 4 }]);
  };
  const proxy = createProxy({ target: parseAddress('nowhere.example:9'), connectionsMax: 10, exitIdleTimeUsec: null, logger, lookup });
  const server = await listenOnAddress(proxy, parseAddress('127.0.0.1:0', true));
  const { port } = server.address() as AddressInfo;
  try {
    let r = await roundTrip({ host: '127.0.0.1', port }, Buffer.alloc(0), 3000);
    assert.equal(r.ended, 'eof');
    mode = 'refuse';
    r = await roundTrip({ host: '127.0.0.1', port }, Buffer.alloc(0), 3000);
    assert.equal(r.ended, 'eof');
    assert.deepEqual(logger.lines, [
      '<3>Failed to resolve host: Name or service not known',
      '<3>Failed to connect to remote host: Connection refused',
    ]);
  } finally {
    closeProxy(proxy);
  }
});

test('closeProxy stops accepting and tears down open connections', async () => {
  const backend = await startBackend(echo);
  const proxy = createProxy({ target: parseAddress(backend.address), connectionsMax: 10, exitIdleTimeUsec: null, logger: memoryLogger() });
  const server = await listenOnAddress(proxy, parseAddress('127.0.0.1:0', true));
  const { port } = server.address() as AddressInfo;
  const s = await connect({ host: '127.0.0.1', port });
  s.write('x');
  await once(s, 'data');
  const reading = readAll(s, 3000);
  const serverClosed = once(server, 'close');
  closeProxy(proxy);
  const r = await reading;
  assert.notEqual(r.ended, 'timeout');
  await serverClosed;
  assert.equal(proxy.connections.size, 0);
  await backend.close();
});
