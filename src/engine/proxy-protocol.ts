/**
 * The PROXY protocol header (haproxy's doc/proxy-protocol.txt, versions 1 and 2):
 * what we send the backend first, so that it learns who the client is.
 *
 * Source = the client (peer of the accepted socket); destination = the address the
 * client connected to (local address of the accepted socket), as systemd v261's
 * `--proxy-protocol=v1` does with getpeername()/getsockname().
 *
 * Families, chosen so that every receiver we know of accepts the header:
 * - both ends IPv4: TCP4 / v2 AF_INET (0x11);
 * - both ends IPv4-mapped IPv6 (an IPv4 client on a dual-stack socket): demoted to
 *   IPv4, TCP4 / 0x11. haproxy sends `TCP6 ::ffff:a.b.c.d` here, which Apache's
 *   mod_remoteip and caddy-l4 reject; nginx's v2 writer demotes too;
 * - otherwise IPv6 on either end: TCP6 / 0x21, an IPv4 end promoted to ::ffff:a.b.c.d
 *   (one family per header: nginx's v1 mixes them, and parsers reject that);
 * - anything else (a UNIX socket client, an address we cannot read): v1
 *   `PROXY UNKNOWN\r\n`, short form only (haproxy rejects the long one), v2 the LOCAL
 *   command with family UNSPEC and no address block (haproxy 2.6 rejects the PROXY
 *   command with UNSPEC; nginx and haproxy both accept LOCAL). Never a v2 AF_UNIX
 *   block: haproxy cannot parse one.
 * No v2 TLVs: no receiver we know needs one.
 *
 * The encoders are pure; headerFor() reads the addresses off the client's handle. It
 * uses our addon native/proxy_header.c when it loads (loadHeaderAddon(), once per
 * process): the kernel's sockaddrs go straight into the header, where Node's
 * getpeername()/getsockname() make strings that encodeV2 parses back (2.7 µs against
 * 0.6 µs per connection, bench/ANALYSIS.md). The addon applies the same rules, and
 * test/proxy-protocol-native.test.ts holds the two to the same bytes.
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import type { StreamHandle } from './uv.ts';

/** 0: no header (the default), 1: v1 (text), 2: v2 (binary). */
export type ProxyProtocolVersion = 0 | 1 | 2;

/** One end of a TCP connection, as Node's handles report it (getpeername/getsockname). */
export interface SockAddr {
  address: string;
  /** 'IPv4' | 'IPv6' (older Nodes reported 4 | 6). */
  family: string | number;
  port: number;
}

/** The 12-byte v2 signature; it contains a NUL, so it is no C string. */
export const V2_SIGNATURE = Buffer.from([0x0d, 0x0a, 0x0d, 0x0a, 0x00, 0x0d, 0x0a, 0x51, 0x55, 0x49, 0x54, 0x0a]);

/** v2 version/command byte: version 2, LOCAL or PROXY. */
const V2_LOCAL = 0x20;
const V2_PROXY = 0x21;
/** v2 family/transport byte. */
const V2_UNSPEC = 0x00;
const V2_TCP4 = 0x11;
const V2_TCP6 = 0x21;

const V1_UNKNOWN = 'PROXY UNKNOWN\r\n';

/** What upstream logs (at debug level here) when it falls back to UNKNOWN. */
export const MSG_FALLBACK_V1 = "Only TCP on IPv4 and IPv6 are supported, reporting fallback proxy data 'UNKNOWN'.";
export const MSG_FALLBACK_V2 = "Only TCP on IPv4 and IPv6 are supported, reporting fallback proxy data 'LOCAL'.";

/** Both ends in one family, or null when the header cannot carry them (UNKNOWN / LOCAL). */
interface Pair {
  v6: boolean;
  src: string;
  dst: string;
  srcPort: number;
  dstPort: number;
}

function isV6(a: SockAddr): boolean {
  return a.family === 'IPv6' || a.family === 6;
}

function isV4(a: SockAddr): boolean {
  return a.family === 'IPv4' || a.family === 4;
}

/** `::ffff:a.b.c.d` (how inet_ntop prints an IPv4-mapped address) -> `a.b.c.d`, else null. */
function unmapped(address: string): string | null {
  if (address.length > 7 && address.slice(0, 7).toLowerCase() === '::ffff:' && address.indexOf(':', 7) === -1 && address.indexOf('.') > 0) {
    return address.slice(7);
  }
  return null;
}

/** An IPv6 address without a `%scope` suffix (Node appends one for link-local peers). */
function unscoped(address: string): string {
  const pct = address.indexOf('%');
  return pct === -1 ? address : address.slice(0, pct);
}

function validPort(port: number): boolean {
  return Number.isInteger(port) && port >= 0 && port <= 65535;
}

/** Apply the family rule; null means UNKNOWN / LOCAL. */
function pairOf(src: SockAddr | null, dst: SockAddr | null): Pair | null {
  if (src === null || dst === null || !validPort(src.port) || !validPort(dst.port)) return null;
  const src4 = isV4(src);
  const dst4 = isV4(dst);
  if ((!src4 && !isV6(src)) || (!dst4 && !isV6(dst))) return null;
  if (src4 && dst4) return { v6: false, src: src.address, dst: dst.address, srcPort: src.port, dstPort: dst.port };
  const s = src4 ? null : unscoped(src.address);
  const d = dst4 ? null : unscoped(dst.address);
  if (s !== null && d !== null) {
    // Both ends mapped: an IPv4 client on a dual-stack socket. Plain IPv4. Only one end
    // mapped (the other real IPv6 or IPv4): both as IPv6, below.
    const s4 = unmapped(s);
    const d4 = s4 === null ? null : unmapped(d);
    if (s4 !== null && d4 !== null) return { v6: false, src: s4, dst: d4, srcPort: src.port, dstPort: dst.port };
  }
  return {
    v6: true,
    src: s ?? `::ffff:${src.address}`,
    dst: d ?? `::ffff:${dst.address}`,
    srcPort: src.port,
    dstPort: dst.port,
  };
}

/**
 * The v1 line: `PROXY TCP4|TCP6 SRC DST SRCPORT DSTPORT\r\n`, or `PROXY UNKNOWN\r\n`.
 * At most 104 bytes (TCP6 with two full-length addresses), within the 107 the spec allows.
 */
export function encodeV1(src: SockAddr | null, dst: SockAddr | null): Buffer {
  const p = pairOf(src, dst);
  if (p === null) return Buffer.from(V1_UNKNOWN, 'latin1');
  return Buffer.from(`PROXY ${p.v6 ? 'TCP6' : 'TCP4'} ${p.src} ${p.dst} ${p.srcPort} ${p.dstPort}\r\n`, 'latin1');
}

/**
 * The v2 header: signature, 0x21 (PROXY), 0x11 or 0x21, the length (12 or 36), then
 * source and destination addresses and ports, all in network order: 28 or 52 bytes.
 * LOCAL (0x20, family 0x00, length 0): 16 bytes.
 */
export function encodeV2(src: SockAddr | null, dst: SockAddr | null): Buffer {
  const p = pairOf(src, dst);
  const addrLen = p === null ? 0 : p.v6 ? 36 : 12;
  const buf = Buffer.allocUnsafe(16 + addrLen);
  V2_SIGNATURE.copy(buf, 0);
  buf[12] = p === null ? V2_LOCAL : V2_PROXY;
  buf[13] = p === null ? V2_UNSPEC : p.v6 ? V2_TCP6 : V2_TCP4;
  buf.writeUInt16BE(addrLen, 14);
  if (p === null) return buf;
  if (p.v6) {
    if (!writeIPv6(p.src, buf, 16) || !writeIPv6(p.dst, buf, 32)) return encodeV2(null, null);
    buf.writeUInt16BE(p.srcPort, 48);
    buf.writeUInt16BE(p.dstPort, 50);
  } else {
    if (!writeIPv4(p.src, buf, 16) || !writeIPv4(p.dst, buf, 20)) return encodeV2(null, null);
    buf.writeUInt16BE(p.srcPort, 24);
    buf.writeUInt16BE(p.dstPort, 26);
  }
  return buf;
}

/** Dotted quad -> 4 bytes at `off`. False if it is not one. */
export function writeIPv4(text: string, out: Buffer, off: number): boolean {
  let part = 0;
  let value = 0;
  let digits = 0;
  for (let i = 0; i <= text.length; i++) {
    const c = i === text.length ? 0x2e : text.charCodeAt(i);
    if (c === 0x2e) {
      if (digits === 0 || part > 3) return false;
      out[off + part++] = value;
      value = 0;
      digits = 0;
    } else if (c >= 0x30 && c <= 0x39 && digits < 3) {
      value = value * 10 + (c - 0x30);
      if (value > 255) return false;
      digits++;
    } else {
      return false;
    }
  }
  return part === 4;
}

/**
 * IPv6 text (hex groups, at most one `::`, optionally a dotted quad at the end, as
 * inet_ntop prints it) -> 16 bytes at `off`. False if it is not one.
 */
export function writeIPv6(text: string, out: Buffer, off: number): boolean {
  const gap = text.indexOf('::');
  if (gap !== -1 && text.indexOf('::', gap + 1) !== -1) return false;
  const head = gap === -1 ? text : text.slice(0, gap);
  const tail = gap === -1 ? '' : text.slice(gap + 2);
  const words: number[] = [];
  const tailWords: number[] = [];
  if (!parseGroups(head, words, gap === -1) || !parseGroups(tail, tailWords, true)) return false;
  const total = words.length + tailWords.length;
  if (gap === -1 ? total !== 8 : total > 7) return false;
  out.fill(0, off, off + 16);
  for (let i = 0; i < words.length; i++) out.writeUInt16BE(words[i] as number, off + 2 * i);
  const start = 8 - tailWords.length;
  for (let i = 0; i < tailWords.length; i++) out.writeUInt16BE(tailWords[i] as number, off + 2 * (start + i));
  return true;
}

/** Colon-separated hex groups into `words`; the last may be a dotted quad if `lastMayBeV4`. */
function parseGroups(text: string, words: number[], lastMayBeV4: boolean): boolean {
  if (text === '') return true;
  const groups = text.split(':');
  for (let i = 0; i < groups.length; i++) {
    const g = groups[i] as string;
    if (i === groups.length - 1 && lastMayBeV4 && g.includes('.')) {
      const quad = Buffer.allocUnsafe(4);
      if (!writeIPv4(g, quad, 0)) return false;
      words.push(quad.readUInt16BE(0), quad.readUInt16BE(2));
      continue;
    }
    if (!/^[0-9a-fA-F]{1,4}$/.test(g)) return false;
    words.push(parseInt(g, 16));
  }
  return true;
}

/** Reused for every header: getpeername/getsockname fill them in, the encoder reads them at once. */
const peer: SockAddr = { address: '', family: '', port: 0 };
const local: SockAddr = { address: '', family: '', port: 0 };

/** A handle that may be a TCP one (a PipeWrap has neither method). */
interface NamedHandle {
  fd?: number;
  getpeername?(out: SockAddr): number;
  getsockname?(out: SockAddr): number;
}

/** native/proxy_header.c: header() writes the header of the connection on `fd` into `scratch`, by the rules above. */
export interface HeaderAddon {
  init(scratch: Buffer): void;
  /** The header's length in the scratch buffer. */
  header(fd: number, version: 1 | 2): number;
}

/** Where the addon writes each header (the longest, v1 TCP6, is 104 bytes; the spec allows 107). */
const scratch = Buffer.allocUnsafeSlow(108);

// undefined: not tried yet; null: tried and failed (a failed dlopen does not heal).
let addon: HeaderAddon | null | undefined;

/**
 * Load the addon for this platform, once; returns why not when it cannot (headerFor
 * then encodes in TypeScript, with the same result). The prebuilds sit in the package
 * root, which is one level up from the bundled CLI (dist/main.js) and two from
 * src/engine/ and dist/engine/: the nearest directory up with package.json.
 */
export function loadHeaderAddon(): string | null {
  if (addon !== undefined) return addon === null ? 'tried before and failed' : null;
  addon = null;
  const rel = join('prebuilds', `${process.platform}-${process.arch}`, 'proxy_header.node');
  let dir = dirname(fileURLToPath(import.meta.url));
  for (let up = 0; up < 3; up++, dir = dirname(dir)) {
    // The package root holds package.json and prebuilds/ (a build may put a package.json
    // of its own in dist/: go on up past it).
    const file = join(dir, rel);
    if (!existsSync(join(dir, 'package.json')) || !existsSync(file)) continue;
    try {
      const loaded = createRequire(import.meta.url)(file) as Partial<HeaderAddon> | null;
      if (typeof loaded?.header !== 'function' || typeof loaded.init !== 'function') return `${file} does not export init() and header()`;
      loaded.init(scratch);
      addon = loaded as HeaderAddon;
      return null;
    } catch (err) {
      return `cannot load ${file}: ${(err instanceof Error ? err.message : String(err)).split('\n')[0]}`;
    }
  }
  return `no ${rel} in a package root above ${fileURLToPath(import.meta.url)}`;
}

/** Whether `header` (of `version`) is the fallback: UNKNOWN / LOCAL (the caller logs that at debug level). */
export function isFallback(version: 1 | 2, header: Buffer): boolean {
  // The fallback headers are exactly 15 (v1 UNKNOWN) and 16 (v2 LOCAL) bytes; no other is.
  return header.length === (version === 1 ? 15 : 16);
}

/** header()'s flag: the client's first bytes are waiting (native/proxy_header.c). */
const HAS_BYTES = 256;
let bytesWaiting = false;

/**
 * The header for a connection accepted on `client`, or null when that is a TCP client
 * that has gone (its address can no longer be read): the caller drops the connection,
 * as LOCAL / UNKNOWN would make the backend take our address for the client's.
 * Afterwards clientBytesWaiting() says whether the client's first bytes were already
 * in its socket.
 */
export function headerFor(version: 1 | 2, client: StreamHandle): Buffer | null {
  const h = client as unknown as NamedHandle;
  if (addon != null) {
    const fd = h.fd;
    if (typeof fd === 'number' && fd >= 0) {
      const r = addon.header(fd, version);
      const n = r & (HAS_BYTES - 1);
      bytesWaiting = r >= HAS_BYTES;
      if (n === 0) return null;
      // Its own copy: the header outlives this call (a pending write may hold it).
      const out = Buffer.allocUnsafe(n);
      for (let i = 0; i < n; i++) out[i] = scratch[i] as number;
      return out;
    }
  }
  // Node cannot tell without reading them: as if there were none.
  bytesWaiting = false;
  return headerForJs(version, client);
}

/**
 * Whether the client of the last headerFor() call had sent bytes that wait in its
 * socket (always false without the addon): the caller then sends the header with them,
 * in the same write, when they are read in the next poll phase; otherwise alone at once.
 */
export function clientBytesWaiting(): boolean {
  return bytesWaiting;
}

/** headerFor() without the addon: Node's getpeername()/getsockname() and the encoders above. */
export function headerForJs(version: 1 | 2, client: StreamHandle): Buffer | null {
  const h = client as unknown as NamedHandle;
  let src: SockAddr | null = null;
  let dst: SockAddr | null = null;
  // A PipeWrap (a UNIX client) has neither method: UNKNOWN / LOCAL. A TCP handle whose
  // peer cannot be read has lost its client.
  if (h.getpeername !== undefined && h.getsockname !== undefined) {
    if (h.getsockname(local) !== 0) return version === 1 ? encodeV1(null, null) : encodeV2(null, null);
    if (h.getpeername(peer) !== 0) return null;
    src = peer;
    dst = local;
  }
  return version === 1 ? encodeV1(src, dst) : encodeV2(src, dst);
}
