/**
 * Socket addresses, as the TARGET argument and --listen= give them. Pure parsing:
 * no sockets, no DNS. Everything that can never work is refused here, at start-up,
 * with one clear line (the reference discovers it on every connection instead).
 *
 *   /path/to/socket    UNIX socket (path must fit sun_path with its NUL: <= 107 bytes)
 *   @name              abstract UNIX socket (exact-length address: <= 107 bytes after '@')
 *   HOST:PORT          split at the LAST colon, so "::1:8080" is [::1] port 8080 (as the reference)
 *   [IPV6]:PORT        bracketed IPv6 (the reference cannot parse this: systemd issue #35621)
 *   HOST               no colon: port 80, as the reference (TARGET only)
 *   PORT               --listen= only: a bare port means every address, as systemd's
 *                      ListenStream=PORT ([::]:PORT, dual-stack)
 *   PORT may be a number 1..65535 or a service name from /etc/services (tcp).
 */
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { ENAMETOOLONG, EINVAL, ProxyError } from '../errors.ts';

export type Address =
  /** `path` is what Node's net API takes: abstract names start with "\0". */
  | { readonly kind: 'unix'; readonly path: string; readonly text: string }
  /**
   * An IP literal: connect without any DNS lookup. `anyAddress`: a bare `--listen=PORT`,
   * every address as systemd's ListenStream=PORT (IPv6 dual-stack, IPv4 without IPv6).
   */
  | {
      readonly kind: 'ip';
      readonly host: string;
      readonly port: number;
      readonly family: 4 | 6;
      readonly text: string;
      readonly anyAddress?: boolean;
    }
  /** A host name: resolved (getaddrinfo) on every connection, so DNS changes apply without restart. */
  | { readonly kind: 'name'; readonly host: string; readonly port: number; readonly text: string };

/** sizeof(struct sockaddr_un.sun_path) on Linux. */
const SUN_PATH_MAX = 108;

function unixAddress(text: string): Address {
  const bytes = Buffer.byteLength(text);
  // systemd's sockaddr_un_set_path(): a path needs room for its NUL; an abstract name
  // ("@" becomes the leading NUL) may use all 108 bytes. "/" and "@" alone are invalid.
  if (bytes < 2) {
    throw new ProxyError(
      'ERR_TARGET',
      "Specified address doesn't fit in an AF_UNIX address, refusing: Invalid argument",
      EINVAL,
    );
  }
  const isPath = text[0] === '/';
  if (bytes > SUN_PATH_MAX - (isPath ? 1 : 0)) {
    throw new ProxyError(
      'ERR_TARGET',
      `Specified address doesn't fit in an AF_UNIX address, refusing: ${isPath ? 'File name too long' : 'Invalid argument'}`,
      isPath ? ENAMETOOLONG : EINVAL,
    );
  }
  return { kind: 'unix', path: isPath ? text : `\0${text.slice(1)}`, text };
}

let servicesCache: Map<string, number> | null = null;

/** Parse /etc/services once (only ever needed for a named port). */
function tcpServices(): Map<string, number> {
  if (servicesCache !== null) return servicesCache;
  const map = new Map<string, number>();
  let text = '';
  try {
    text = readFileSync('/etc/services', 'latin1');
  } catch {
    // No /etc/services: only numeric ports work, and the error below says so.
  }
  for (const raw of text.split('\n')) {
    const line = raw.replace(/#.*/, '').trim();
    if (line === '') continue;
    const fields = line.split(/\s+/);
    const m = /^([0-9]+)\/tcp$/.exec(fields[1] ?? '');
    if (m === null) continue;
    const port = Number(m[1]);
    for (const name of [fields[0], ...fields.slice(2)]) {
      if (name !== undefined && !map.has(name)) map.set(name, port);
    }
  }
  servicesCache = map;
  return map;
}

function parsePort(text: string, service: string, allowZero: boolean): number {
  if (/^[0-9]+$/.test(service)) {
    const port = Number(service);
    if (port > 65535 || (port === 0 && !allowZero)) {
      throw new ProxyError('ERR_TARGET', `Invalid address '${text}': port ${service} is out of range (1-65535).`, EINVAL);
    }
    return port;
  }
  if (service === '') {
    throw new ProxyError('ERR_TARGET', `Invalid address '${text}': empty port.`, EINVAL);
  }
  const port = tcpServices().get(service);
  if (port === undefined) {
    throw new ProxyError('ERR_TARGET', `Invalid address '${text}': unknown TCP service '${service}'.`, EINVAL);
  }
  return port;
}

/**
 * Parse an address. `allowPortZero` is for --listen= (bind to any free port);
 * a connect target on port 0 can never work.
 */
export function parseAddress(text: string, allowPortZero = false): Address {
  if (text.startsWith('/') || text.startsWith('@')) return unixAddress(text);
  if (text.includes('\0')) {
    throw new ProxyError('ERR_TARGET', 'Invalid address: contains a NUL byte.', EINVAL);
  }

  let host: string;
  let service: string;
  if (text.startsWith('[')) {
    const close = text.indexOf(']');
    const rest = close < 0 ? '' : text.slice(close + 1);
    if (close < 0 || (rest !== '' && !rest.startsWith(':'))) {
      throw new ProxyError('ERR_TARGET', `Invalid address '${text}': expected [IPV6]:PORT.`, EINVAL);
    }
    host = text.slice(1, close);
    service = rest === '' ? '80' : rest.slice(1);
    if (isIP(host) !== 6) {
      throw new ProxyError('ERR_TARGET', `Invalid address '${text}': '${host}' is not an IPv6 address.`, EINVAL);
    }
  } else {
    const colon = text.lastIndexOf(':');
    host = colon < 0 ? text : text.slice(0, colon);
    service = colon < 0 ? '80' : text.slice(colon + 1);
  }
  if (host === '') {
    throw new ProxyError('ERR_TARGET', `Invalid address '${text}': empty host name.`, EINVAL);
  }
  const port = parsePort(text, service, allowPortZero);
  const family = isIP(host);
  if (family === 4 || family === 6) return { kind: 'ip', host, port, family, text };
  if (/\s/.test(host)) {
    throw new ProxyError('ERR_TARGET', `Invalid address '${text}': host name contains white space.`, EINVAL);
  }
  return { kind: 'name', host, port, text };
}

/**
 * Parse a --listen= address. As a TARGET, "7303" would be host 7303 port 80 (the
 * reference's reading, kept for TARGET); to listen on, a bare port means what
 * ListenStream=7303 means in a socket unit: every address, dual-stack.
 */
export function parseListenAddress(text: string): Address {
  if (/^[0-9]+$/.test(text)) {
    const port = parsePort(text, text, true);
    return { kind: 'ip', host: '::', port, family: 6, text, anyAddress: true };
  }
  return parseAddress(text, true);
}

/** How an address is shown in messages: [v6]:port, v4:port, /path, @abstract. */
export function formatAddress(a: Address): string {
  if (a.kind === 'unix') return a.text;
  return a.kind === 'ip' && a.family === 6 ? `[${a.host}]:${a.port}` : `${a.host}:${a.port}`;
}

/**
 * A peer as the reference's getpeername_pretty() shows it: `a.b.c.d:port` or
 * `[v6]:port`, an IPv4-mapped address (an IPv4 client on a dual-stack socket) as IPv4.
 */
export function formatPeer(address: string, port: number): string {
  const shown = address.startsWith('::ffff:') && address.includes('.') ? address.slice(7) : address;
  return shown.includes(':') ? `[${shown}]:${port}` : `${shown}:${port}`;
}
