/**
 * The PROXY protocol encoder, byte-exact against haproxy's doc/proxy-protocol.txt:
 * v1 lines and v2 headers for IPv4, IPv6, IPv4-mapped (demoted only when both ends
 * are mapped), UNIX/unknown (v1 `PROXY UNKNOWN\r\n`, v2 LOCAL), ports 0 and 65535,
 * and the longest v1 line. Expected bytes are written out by hand, not computed by
 * the code under test.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { encodeV1, encodeV2, writeIPv6, type SockAddr } from '../src/engine/proxy-protocol.ts';

const v4 = (address: string, port: number): SockAddr => ({ address, family: 'IPv4', port });
const v6 = (address: string, port: number): SockAddr => ({ address, family: 'IPv6', port });
const hex = (s: string): Buffer => Buffer.from(s.replace(/\s+/g, ''), 'hex');
const SIG = '0d0a0d0a000d0a515549540a';

test('v1: TCP4, the spec\'s example line', () => {
  assert.equal(encodeV1(v4('192.168.0.1', 56324), v4('192.168.0.11', 443)).toString('latin1'), 'PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n');
});

test('v1: ports 0 and 65535, no leading zeros', () => {
  assert.equal(encodeV1(v4('10.0.0.1', 0), v4('10.0.0.2', 65535)).toString('latin1'), 'PROXY TCP4 10.0.0.1 10.0.0.2 0 65535\r\n');
  assert.equal(encodeV1(v4('255.255.255.255', 65535), v4('255.255.255.255', 65535)).length, 56); // the spec's TCP4 maximum
});

test('v1: TCP6 as getpeername prints it (scope id dropped)', () => {
  assert.equal(encodeV1(v6('::1', 40000), v6('::1', 8080)).toString('latin1'), 'PROXY TCP6 ::1 ::1 40000 8080\r\n');
  assert.equal(encodeV1(v6('fe80::1%lo', 1), v6('fe80::2%2', 2)).toString('latin1'), 'PROXY TCP6 fe80::1 fe80::2 1 2\r\n');
});

test('v1: the longest line is 104 bytes, within the spec\'s 107', () => {
  const full = 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff';
  const line = encodeV1(v6(full, 65535), v6(full, 65535));
  assert.equal(line.toString('latin1'), `PROXY TCP6 ${full} ${full} 65535 65535\r\n`);
  assert.equal(line.length, 104);
  assert.ok(line.length <= 107);
});

test('v1: both ends IPv4-mapped (dual-stack socket, IPv4 client) -> TCP4', () => {
  assert.equal(encodeV1(v6('::ffff:127.0.0.1', 5000), v6('::ffff:127.0.0.2', 80)).toString('latin1'), 'PROXY TCP4 127.0.0.1 127.0.0.2 5000 80\r\n');
  assert.equal(encodeV1(v6('::FFFF:1.2.3.4', 1), v6('::ffff:5.6.7.8', 2)).toString('latin1'), 'PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n');
});

test('v1: only one end mapped -> both IPv6; an IPv4 end is promoted to ::ffff:', () => {
  assert.equal(encodeV1(v6('::ffff:1.2.3.4', 1), v6('2001:db8::1', 2)).toString('latin1'), 'PROXY TCP6 ::ffff:1.2.3.4 2001:db8::1 1 2\r\n');
  assert.equal(encodeV1(v6('2001:db8::1', 1), v4('192.0.2.1', 22)).toString('latin1'), 'PROXY TCP6 2001:db8::1 ::ffff:192.0.2.1 1 22\r\n');
  assert.equal(encodeV1(v4('192.0.2.1', 1), v6('::ffff:192.0.2.2', 22)).toString('latin1'), 'PROXY TCP6 ::ffff:192.0.2.1 ::ffff:192.0.2.2 1 22\r\n');
  // ::ffff:0:a.b.c.d (SIIT) and ::a.b.c.d are not mapped addresses
  assert.equal(encodeV1(v6('::ffff:0:1.2.3.4', 1), v6('::ffff:0:1.2.3.5', 2)).toString('latin1'), 'PROXY TCP6 ::ffff:0:1.2.3.4 ::ffff:0:1.2.3.5 1 2\r\n');
});

test('v1: UNIX or unknown -> the short PROXY UNKNOWN line (haproxy rejects the long form)', () => {
  const unknown = 'PROXY UNKNOWN\r\n';
  assert.equal(encodeV1(null, null).toString('latin1'), unknown);
  assert.equal(encodeV1(v4('1.2.3.4', 1), null).toString('latin1'), unknown);
  assert.equal(encodeV1({ address: '/run/x', family: 'unix', port: 0 }, v4('1.2.3.4', 1)).toString('latin1'), unknown);
  assert.equal(encodeV1(v4('1.2.3.4', 65536), v4('1.2.3.4', 1)).toString('latin1'), unknown);
  assert.equal(encodeV1(null, null).length, 15);
});

test('v2: TCP over IPv4, 28 bytes', () => {
  assert.deepEqual(
    encodeV2(v4('192.168.0.1', 56324), v4('192.168.0.11', 443)),
    hex(`${SIG} 21 11 000c  c0a80001 c0a8000b  dc04 01bb`),
  );
});

test('v2: ports 0 and 65535', () => {
  assert.deepEqual(encodeV2(v4('0.0.0.0', 0), v4('255.255.255.255', 65535)), hex(`${SIG} 21 11 000c 00000000 ffffffff 0000 ffff`));
});

test('v2: TCP over IPv6, 52 bytes', () => {
  assert.deepEqual(
    encodeV2(v6('2001:db8::1', 40000), v6('::1', 8080)),
    hex(`${SIG} 21 21 0024  20010db8000000000000000000000001 00000000000000000000000000000001  9c40 1f90`),
  );
  const full = 'ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff';
  assert.deepEqual(encodeV2(v6(full, 65535), v6('fe80::1%eth0', 0)), hex(`${SIG} 21 21 0024 ${'ff'.repeat(16)} fe800000000000000000000000000001 ffff 0000`));
});

test('v2: both ends mapped -> AF_INET; one end mapped -> AF_INET6 with the mapped bytes', () => {
  assert.deepEqual(encodeV2(v6('::ffff:127.0.0.1', 5000), v6('::ffff:127.0.0.2', 80)), hex(`${SIG} 21 11 000c 7f000001 7f000002 1388 0050`));
  assert.deepEqual(
    encodeV2(v6('::ffff:1.2.3.4', 1), v6('2001:db8::1', 2)),
    hex(`${SIG} 21 21 0024 00000000000000000000ffff01020304 20010db8000000000000000000000001 0001 0002`),
  );
  assert.deepEqual(
    encodeV2(v4('1.2.3.4', 1), v6('::1', 2)),
    hex(`${SIG} 21 21 0024 00000000000000000000ffff01020304 00000000000000000000000000000001 0001 0002`),
  );
});

test('v2: UNIX or unknown -> LOCAL (0x20), family UNSPEC (0x00), length 0: 16 bytes', () => {
  const local = hex(`${SIG} 20 00 0000`);
  assert.deepEqual(encodeV2(null, null), local);
  assert.deepEqual(encodeV2(v4('1.2.3.4', 1), null), local);
  assert.deepEqual(encodeV2({ address: '', family: 'unix', port: 0 }, v4('1.2.3.4', 1)), local);
  // never a v2 AF_UNIX (0x31) block, never the PROXY command with UNSPEC (haproxy 2.6 rejects it)
  assert.notEqual(encodeV2(null, null)[12], 0x21);
});

test('IPv6 text to bytes: every form inet_ntop prints, and garbage refused', () => {
  const out = Buffer.alloc(16);
  const cases: [string, string][] = [
    ['::', '00000000000000000000000000000000'],
    ['::1', '00000000000000000000000000000001'],
    ['1::', '00010000000000000000000000000000'],
    ['1:2:3:4:5:6:7:8', '00010002000300040005000600070008'],
    ['1:2:3:4:5:6::8', '00010002000300040005000600000008'],
    ['::ffff:10.1.2.3', '00000000000000000000ffff0a010203'],
    ['64:ff9b::192.0.2.33', '0064ff9b0000000000000000c0000221'],
    ['ABCD:ef01::', 'abcdef01000000000000000000000000'],
  ];
  for (const [text, bytes] of cases) {
    assert.ok(writeIPv6(text, out, 0), text);
    assert.equal(out.toString('hex'), bytes, text);
  }
  for (const bad of ['', ':', '1:2:3:4:5:6:7', '1:2:3:4:5:6:7:8:9', '1::2::3', '12345::', 'g::', '::1.2.3', '::256.0.0.1', '1:2:3:4:5:6:7::8']) {
    assert.equal(writeIPv6(bad, out, 0), false, bad);
  }
});
