/** Unit tests of the pure parts: target addresses and the activation environment. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseAddress, parseListenAddress, formatAddress } from '../src/config/address.ts';
import { takeListenFds } from '../src/system/activation.ts';
import { ProxyError } from '../src/errors.ts';

test('addresses: the forms TARGET and --listen= accept', () => {
  const ok: [string, object][] = [
    ['127.0.0.1:8080', { kind: 'ip', host: '127.0.0.1', port: 8080, family: 4 }],
    ['127.0.0.1', { kind: 'ip', host: '127.0.0.1', port: 80, family: 4 }],
    ['::1:8080', { kind: 'ip', host: '::1', port: 8080, family: 6 }],
    ['[::1]:8080', { kind: 'ip', host: '::1', port: 8080, family: 6 }],
    ['[::1]', { kind: 'ip', host: '::1', port: 80, family: 6 }],
    ['[fe80::1%lo]:22', { kind: 'ip', host: 'fe80::1%lo', port: 22, family: 6 }],
    ['localhost:http', { kind: 'name', host: 'localhost', port: 80 }],
    ['example.com:443', { kind: 'name', host: 'example.com', port: 443 }],
    ['example.com', { kind: 'name', host: 'example.com', port: 80 }],
    ['/run/nginx.sock', { kind: 'unix', path: '/run/nginx.sock' }],
    ['@abstract', { kind: 'unix', path: '\0abstract' }],
    [`/${'a'.repeat(106)}`, { kind: 'unix', path: `/${'a'.repeat(106)}` }],
    [`@${'a'.repeat(107)}`, { kind: 'unix', path: `\0${'a'.repeat(107)}` }],
  ];
  for (const [text, want] of ok) {
    const got = parseAddress(text);
    for (const [k, v] of Object.entries(want)) assert.equal((got as Record<string, unknown>)[k], v, `${text}: ${k}`);
  }
  assert.equal(formatAddress(parseAddress('::1:80')), '[::1]:80');
  assert.equal(formatAddress(parseAddress('@x1')), '@x1');
});

test('addresses that can never work are refused with one line', () => {
  const bad = [
    '127.0.0.1:65536', '127.0.0.1:0', ':80', 'host:', '/', '@', `/${'a'.repeat(107)}`, `@${'a'.repeat(108)}`,
    '[::1', '[::1]x', '[127.0.0.1]:80', 'host:nosuchservice', 'a b:80', 'x\0y:80',
  ];
  for (const text of bad) {
    assert.throws(() => parseAddress(text), (e: unknown) => e instanceof ProxyError && e.code === 'ERR_TARGET' && !e.message.includes('\n'), text);
  }
  assert.equal(parseAddress('127.0.0.1:0', true).kind, 'ip', '--listen= may ask for any free port');
});

test('activation: LISTEN_* consumed; pid mismatch means none; malformed means error', () => {
  const env: Record<string, string | undefined> = { LISTEN_PID: '1', LISTEN_FDS: '1', LISTEN_FDNAMES: 'x', OTHER: 'y' };
  assert.deepEqual(takeListenFds(env, 12345), []);
  assert.deepEqual(Object.keys(env), ['OTHER'], 'all LISTEN_* removed even when not for us');
  assert.deepEqual(takeListenFds({}, 1), []);
  assert.deepEqual(takeListenFds({ LISTEN_PID: '7' }, 7), [], 'no LISTEN_FDS');
  for (const fds of ['x', '0', '-1', '']) {
    assert.throws(() => takeListenFds({ LISTEN_PID: '7', LISTEN_FDS: fds }, 7), /Failed to receive sockets from parent\./, fds);
  }
  assert.throws(() => takeListenFds({ LISTEN_PID: 'abc', LISTEN_FDS: '1' }, 7), /Failed to receive sockets from parent\./);
  // fd 3.. in this test process are not sockets we were given: a closed or non-socket fd is an error.
  assert.throws(() => takeListenFds({ LISTEN_PID: '7', LISTEN_FDS: '1000' }, 7), ProxyError);
});

test('--listen=PORT is every address ([::]:PORT, dual-stack, as ListenStream=PORT); TARGET PORT stays host PORT, port 80', () => {
  const listen = parseListenAddress('7303');
  assert.deepEqual(listen, { kind: 'ip', host: '::', port: 7303, family: 6, text: '7303', anyAddress: true });
  assert.equal(formatAddress(listen), '[::]:7303');
  assert.equal((parseListenAddress('0') as { port: number }).port, 0);
  // The reference's reading of a TARGET without a colon is unchanged.
  assert.deepEqual(parseAddress('7303'), { kind: 'name', host: '7303', port: 80, text: '7303' });
  // Every other --listen= form parses as before (port 0 allowed).
  assert.deepEqual(parseListenAddress('127.0.0.1:0'), parseAddress('127.0.0.1:0', true));
  assert.deepEqual(parseListenAddress('/run/x.sock'), parseAddress('/run/x.sock'));
  assert.throws(() => parseListenAddress('70000'), { code: 'ERR_TARGET', message: "Invalid address '70000': port 70000 is out of range (1-65535)." });
});
