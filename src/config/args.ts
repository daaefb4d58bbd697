/**
 * Command-line parsing: a hand-made clone of what systemd-socket-proxyd v252 does with
 * glibc `getopt_long(argc, argv, "c:h", longopts)`, plus our own `--listen=ADDRESS`.
 *
 * Drop-in users script against the reference, so its quirks are kept on purpose: GNU
 * argument permutation, abbreviated long options, options acted on left to right with
 * the first error winning (`-c abc -h` fails, `-h -c abc` prints help), the positional
 * count checked only after all options, and glibc's exact error wording (which, unlike
 * systemd's own messages, starts with "argv[0]: ").
 *
 * Pure: no I/O and no process.env access; the caller passes the environment in.
 */

import { EINVAL, ERANGE, ProxyError } from '../errors.ts';
import { parseSec, USEC_INFINITY } from './timespan.ts';
import { checkRouteName, splitRouteArg } from './route.ts';

export interface Options {
  connectionsMax: number; // default 256
  exitIdleTimeUsec: bigint | null; // null = infinity (the default)
  listen: string[]; // --listen=[NAME=]ADDR values in order, raw (our extension), default []
  proxyProtocol: 'v1' | 'v2' | null; // --proxy-protocol= (v1 as systemd v261, v2 ours), default null: no header
  drainTimeoutUsec: bigint | null; // --drain-timeout=: 0n = no drain (the default), null = wait without limit
  metrics: string | null; // --metrics=ADDRESS (raw; parsed by the caller), default null
  noDelay: boolean; // --nodelay=BOOL (our extension): TCP_NODELAY on TCP sockets, default true
  /** --listen-datagram=[NAME=]ADDR values in order, raw (UDP, our extension); absent when not given. */
  listenDatagram?: string[];
  /** --idle-timeout=SPAN in µs; null = infinity; absent = not given (datagram flows: 60 s). */
  idleTimeoutUsec?: bigint | null;
  /** --connect-timeout=SPAN in µs; null = infinity (the default: the kernel's bound). */
  connectTimeoutUsec?: bigint | null;
  /** --connect-retry=SPAN in µs; 0 = no retry (the default), null = wait without limit. */
  connectRetryUsec?: bigint | null;
  /** --keepalive=SPAN in µs (at most MAX_KEEPIDLE_SEC s); 0 = off (the default). */
  keepAliveUsec?: bigint;
  /** The plain positional TARGET: the default route. null when only NAME=TARGET routes are given. */
  target: string | null;
  /** The NAME=TARGET positionals (our extension), in order; names valid and distinct. */
  routes: { name: string; target: string }[];
}

export type Parsed =
  | { action: 'help' }
  | { action: 'version' }
  | { action: 'run'; options: Options };

type ValueOptionId =
  | 'connections-max'
  | 'exit-idle-time'
  | 'listen'
  | 'proxy-protocol'
  | 'drain-timeout'
  | 'metrics'
  | 'nodelay'
  | 'listen-datagram'
  | 'idle-timeout'
  | 'connect-timeout'
  | 'connect-retry'
  | 'keepalive';
type OptionId = ValueOptionId | 'help' | 'version';

interface LongOption {
  readonly name: string;
  readonly hasArg: boolean;
  readonly id: OptionId;
}

/*
 * Order matters: glibc lists ambiguous candidates in table order. The first four are in
 * the order the reference prints them; the options added since go after them, so an
 * ambiguity message is the reference's plus the newer names.
 */
const LONG_OPTIONS: readonly LongOption[] = [
  { name: 'connections-max', hasArg: true, id: 'connections-max' },
  { name: 'exit-idle-time', hasArg: true, id: 'exit-idle-time' },
  { name: 'help', hasArg: false, id: 'help' },
  { name: 'version', hasArg: false, id: 'version' },
  { name: 'listen', hasArg: true, id: 'listen' },
  { name: 'proxy-protocol', hasArg: true, id: 'proxy-protocol' },
  { name: 'drain-timeout', hasArg: true, id: 'drain-timeout' },
  { name: 'metrics', hasArg: true, id: 'metrics' },
  { name: 'nodelay', hasArg: true, id: 'nodelay' },
  // Appended: the ambiguity lists of the options above keep their order.
  { name: 'listen-datagram', hasArg: true, id: 'listen-datagram' },
  { name: 'idle-timeout', hasArg: true, id: 'idle-timeout' },
  { name: 'connect-timeout', hasArg: true, id: 'connect-timeout' },
  { name: 'connect-retry', hasArg: true, id: 'connect-retry' },
  { name: 'keepalive', hasArg: true, id: 'keepalive' },
];

/** The reference's own options (the first four entries): their abbreviations keep meaning them. */
const REFERENCE_OPTION_COUNT = 4;

/** The largest TCP_KEEPIDLE Linux accepts (MAX_TCP_KEEPIDLE), in seconds (the engine checks it too). */
export const MAX_KEEPIDLE_SEC = 32767;
const MAX_KEEPIDLE_USEC = BigInt(MAX_KEEPIDLE_SEC) * 1_000_000n;

function usage(message: string, errno: number = EINVAL): ProxyError {
  return new ProxyError('ERR_USAGE', message, errno);
}

/**
 * glibc's long-option lookup (process_long_option): an exact name match wins, otherwise a
 * unique prefix. `body` is the argument without its leading "--", possibly with "=value".
 * The messages quote the text as typed (including "=value") except for the two that name
 * the matched option, which use its full name -- as glibc does.
 */
function lookupLong(body: string, prog: string): { option: LongOption; value: string | undefined } {
  const eq = body.indexOf('=');
  const name = eq === -1 ? body : body.slice(0, eq);
  const value = eq === -1 ? undefined : body.slice(eq + 1);

  const exact = LONG_OPTIONS.find((o) => o.name === name);
  if (exact !== undefined) return { option: exact, value };

  // A drop-in: what abbreviates one of the reference's options still means it, although
  // newer names share the prefix (`--connect=5` is --connections-max, not ambiguous with
  // --connect-timeout). No two of the reference's options share a first letter.
  const reference = LONG_OPTIONS.slice(0, REFERENCE_OPTION_COUNT).filter((o) => o.name.startsWith(name));
  if (reference.length === 1) return { option: reference[0] as LongOption, value };

  // glibc would not call two prefix matches ambiguous if they had identical has_arg/flag/val,
  // but every entry here has a distinct val, so any second match is an ambiguity.
  const matches = LONG_OPTIONS.filter((o) => o.name.startsWith(name));
  if (matches.length > 1) {
    const candidates = matches.map((o) => ` '--${o.name}'`).join('');
    throw usage(`${prog}: option '--${body}' is ambiguous; possibilities:${candidates}`);
  }
  const only = matches[0];
  if (only === undefined) throw usage(`${prog}: unrecognized option '--${body}'`);
  return { option: only, value };
}

/**
 * C strtoul(s, &end, 0) on a 64-bit unsigned long in the C locale: skips isspace(), takes an
 * optional sign, auto-detects 0x/0 prefixes, wraps a negative result modulo 2^64 and flags
 * overflow. `end` is 0 when nothing was converted (strtoul sets end = s then).
 */
function strtoul(s: string): { value: bigint; end: number; overflow: boolean } {
  const ULONG_MAX = 2n ** 64n - 1n;
  let i = 0;
  while (i < s.length && ' \t\n\v\f\r'.includes(s.charAt(i))) i++;
  let negative = false;
  if (s.charAt(i) === '+' || s.charAt(i) === '-') {
    negative = s.charAt(i) === '-';
    i++;
  }
  let base = 10;
  if (s.charAt(i) === '0') {
    // "0x" only switches to hex when a hex digit follows; otherwise "0" is parsed (as octal)
    // and the conversion stops at the "x" -- which makes it trailing garbage for safe_atou.
    if ((s.charAt(i + 1) === 'x' || s.charAt(i + 1) === 'X') && digitValue(s.charAt(i + 2)) < 16) {
      base = 16;
      i += 2;
    } else {
      base = 8;
    }
  }
  const start = i;
  let value = 0n;
  let overflow = false;
  for (; i < s.length; i++) {
    const d = digitValue(s.charAt(i));
    if (d >= base) break;
    value = value * BigInt(base) + BigInt(d);
    if (value > ULONG_MAX) overflow = true;
  }
  if (i === start) return { value: 0n, end: 0, overflow: false };
  if (overflow) return { value: ULONG_MAX, end: i, overflow: true };
  if (negative && value !== 0n) value = 2n ** 64n - value;
  return { value, end: i, overflow: false };
}

function digitValue(ch: string): number {
  // ASCII 0-9, a-z, A-Z only, like strtoul in the C locale; anything else ends the number.
  const n = /^[0-9a-zA-Z]$/.test(ch) ? parseInt(ch, 36) : NaN;
  return Number.isNaN(n) ? 99 : n;
}

/**
 * systemd v252 safe_atou(): strips its own WHITESPACE set (" \t\n\r", not \v or \f), then
 * strtoul base 0; rejects trailing text (EINVAL), a leading '-' on a non-zero result or a
 * value above 2^32-1 (ERANGE). The '-' check looks only at the first byte after that strip,
 * so "\v-18446744073709551615" sneaks through as 1 -- the reference accepts it too.
 * Returns the value or a negative errno.
 */
function safeAtou(text: string): number {
  let skip = 0;
  while (skip < text.length && ' \t\n\r'.includes(text.charAt(skip))) skip++;
  const s = text.slice(skip);
  const { value, end, overflow } = strtoul(s);
  if (overflow) return -ERANGE;
  if (end === 0 || end !== s.length) return -EINVAL;
  if (value !== 0n && s.startsWith('-')) return -ERANGE;
  if (value > 0xffffffffn) return -ERANGE;
  return Number(value);
}

/**
 * systemd's parse_boolean(): "1", "yes", "y", "true", "t", "on" and "0", "no", "n", "false",
 * "f", "off", case-insensitive (strcaseeq); anything else, including "" and surrounding
 * space, is an error. Returns null for an invalid word.
 */
export function parseBoolean(text: string): boolean | null {
  switch (text.toLowerCase()) {
    case '1':
    case 'yes':
    case 'y':
    case 'true':
    case 't':
    case 'on':
      return true;
    case '0':
    case 'no':
    case 'n':
    case 'false':
    case 'f':
    case 'off':
      return false;
    default:
      return null;
  }
}

function timespanErrno(err: unknown): number | undefined {
  if (err instanceof Error && 'errno' in err && typeof err.errno === 'number') return err.errno;
  return undefined;
}

/** A span where "infinity" means no bound: null. */
function parseSpanOrNull(id: ValueOptionId, arg: string): bigint | null {
  const usec = parseSpan(id, arg);
  return usec === USEC_INFINITY ? null : usec;
}

function parseSpan(id: ValueOptionId, arg: string): bigint {
  try {
    return parseSec(arg);
  } catch (err) {
    const errno = timespanErrno(err);
    if (errno === undefined) throw err; // not a parse failure but a bug: don't mask it
    throw usage(`Failed to parse --${id}= argument: ${arg}`, errno);
  }
}

/** Acts on one option with a value, the way parse_argv's switch does. */
function apply(id: ValueOptionId, arg: string, options: Options): void {
  switch (id) {
    case 'connections-max': {
      const n = safeAtou(arg);
      if (n < 0) throw usage(`Failed to parse --connections-max= argument: ${arg}`, -n);
      // Checked per occurrence, not after the loop: `-c 0 -c 5 x` fails in the reference.
      if (n < 1) throw usage('Connection limit is too low.');
      options.connectionsMax = n;
      return;
    }
    case 'exit-idle-time':
      options.exitIdleTimeUsec = parseSpanOrNull(id, arg);
      return;
    case 'drain-timeout':
      options.drainTimeoutUsec = parseSpanOrNull(id, arg);
      return;
    case 'metrics':
      // Stored raw, like --listen=: the caller parses it with parseAddress().
      options.metrics = arg;
      return;
    case 'idle-timeout':
      options.idleTimeoutUsec = parseSpanOrNull(id, arg);
      return;
    case 'connect-timeout': {
      const usec = parseSpanOrNull(id, arg);
      options.connectTimeoutUsec = usec === 0n ? null : usec;
      return;
    }
    case 'connect-retry':
      options.connectRetryUsec = parseSpanOrNull(id, arg);
      return;
    case 'keepalive': {
      const usec = parseSpan(id, arg);
      // TCP_KEEPIDLE is whole seconds up to 32767: a longer span cannot be honoured, say so.
      if (usec !== USEC_INFINITY && usec > MAX_KEEPIDLE_USEC) throw usage(`Failed to parse --keepalive= argument: ${arg}`, ERANGE);
      options.keepAliveUsec = usec === USEC_INFINITY ? 0n : usec;
      return;
    }
    case 'listen-datagram':
      (options.listenDatagram ??= []).push(arg);
      return;
    case 'listen':
      // Stored raw: the listener module validates addresses and reports its own errors.
      options.listen.push(arg);
      return;
    case 'proxy-protocol':
      // Exact and case-sensitive, like systemd's proxy_protocol_from_string().
      if (arg !== 'v1' && arg !== 'v2') throw usage(`Failed to parse --proxy-protocol= argument: ${arg}`);
      options.proxyProtocol = arg;
      return;
    case 'nodelay': {
      const value = parseBoolean(arg);
      if (value === null) throw usage(`Failed to parse --nodelay= argument: ${arg}`);
      options.noDelay = value;
      return;
    }
  }
}

/**
 * Parses `argv` (without node and the script). `prog` prefixes glibc-style messages the way
 * glibc uses argv[0]. Pass `process.env` as `env` to honour POSIXLY_CORRECT (set, even to
 * "", means: stop at the first non-option, as glibc does); omitted means not set.
 * Throws ProxyError('ERR_USAGE', line, EINVAL | ERANGE).
 */
export function parseArgv(
  argv: readonly string[],
  prog: string,
  env: { POSIXLY_CORRECT?: string | undefined } = {},
): Parsed {
  const requireOrder = env.POSIXLY_CORRECT !== undefined;
  const options: Options = {
    connectionsMax: 256,
    exitIdleTimeUsec: null,
    listen: [],
    proxyProtocol: null,
    drainTimeoutUsec: 0n,
    metrics: null,
    noDelay: true,
    target: null,
    routes: [],
  };
  const positional: string[] = [];

  let i = 0;
  while (i < argv.length) {
    const arg = argv[i] as string;
    i++;

    if (arg === '--') {
      positional.push(...argv.slice(i));
      break;
    }
    if (!arg.startsWith('-') || arg === '-') {
      if (requireOrder) {
        positional.push(...argv.slice(i - 1));
        break;
      }
      // GNU permutation: glibc moves non-options to the end; only their order matters here.
      positional.push(arg);
      continue;
    }

    if (arg.startsWith('--')) {
      const { option, value } = lookupLong(arg.slice(2), prog);
      if (option.id === 'help' || option.id === 'version') {
        if (value !== undefined) throw usage(`${prog}: option '--${option.name}' doesn't allow an argument`);
        return { action: option.id };
      }
      let optarg = value;
      if (optarg === undefined) {
        // The next element is taken whatever it looks like ("--", "-h", ...), as glibc does.
        if (i >= argv.length) throw usage(`${prog}: option '--${option.name}' requires an argument`);
        optarg = argv[i] as string;
        i++;
      }
      apply(option.id, optarg, options);
      continue;
    }

    // A cluster of short options, "c:h". Code points, not UTF-16 units, so a message never
    // quotes half a surrogate pair (glibc would quote a single byte; unprintable either way).
    const chars = Array.from(arg.slice(1));
    for (let k = 0; k < chars.length; k++) {
      const ch = chars[k] as string;
      if (ch === 'h') return { action: 'help' };
      if (ch !== 'c') throw usage(`${prog}: invalid option -- '${ch}'`);
      let optarg = chars.slice(k + 1).join('');
      if (optarg === '') {
        if (i >= argv.length) throw usage(`${prog}: option requires an argument -- 'c'`);
        optarg = argv[i] as string;
        i++;
      }
      apply('connections-max', optarg, options);
      break; // the rest of the cluster was c's argument
    }
  }

  // The reference's count rule, for plain TARGETs: NAME=TARGET routes come in addition.
  if (positional.length === 0) throw usage('Not enough parameters.');
  let plain = 0;
  for (const arg of positional) {
    const { name, value } = splitRouteArg(arg);
    if (name === null) {
      if (++plain > 1) throw usage('Too many parameters.');
      options.target = arg;
      continue;
    }
    checkRouteName(name, arg);
    if (options.routes.some((r) => r.name === name)) throw usage(`Route '${name}' is given twice.`);
    options.routes.push({ name, target: value });
  }
  return { action: 'run', options };
}

/** The full --help text (ends with "\n"). */
export function helpText(progName: string): string {
  return `${progName} [OPTIONS...] HOST:PORT
${progName} [OPTIONS...] SOCKET
${progName} [OPTIONS...] NAME=TARGET... [TARGET]

Bidirectionally proxy local sockets to another (possibly remote) socket.
NAME=TARGET sends the sockets named NAME (FileDescriptorName=) to TARGET; a
plain TARGET takes every other socket.

  -c --connections-max=N  Set the maximum number of connections to be accepted
                          (default: 256)
     --exit-idle-time=SPAN
                          Exit when without a connection for this duration. See
                          the systemd.time(7) man page for time span format
     --listen=[NAME=]ADDRESS
                          Also listen on ADDRESS, besides any sockets passed in
                          by systemd: PORT (every address), HOST:PORT,
                          [IPv6]:PORT, /path or @abstract; may be repeated;
                          NAME= names the socket for routes
     --proxy-protocol=v1|v2
                          Send the backend a PROXY protocol header (v1: text, as
                          haproxy's send-proxy; v2: binary) with the client's
                          address, before any of the client's bytes
     --drain-timeout=SPAN On SIGTERM/SIGINT stop accepting but keep forwarding
                          open connections for up to SPAN ("infinity": no
                          limit) before exiting (default: 0, close at once)
     --metrics=ADDRESS    Serve Prometheus metrics at GET /metrics on ADDRESS
                          (HOST:PORT, [IPv6]:PORT, /path or @abstract); keep
                          it on loopback or a UNIX socket
     --nodelay=BOOL       Set TCP_NODELAY on the TCP sockets of each connection,
                          so small writes are not delayed (default: yes)
     --listen-datagram=[NAME=]ADDRESS
                          Also receive UDP datagrams on ADDRESS (PORT,
                          HOST:PORT or [IPv6]:PORT) and forward them, one flow
                          per client; may be repeated; NAME= names the socket
                          for routes
     --idle-timeout=SPAN  Close a connection after this long without data either
                          way (default: infinity); a UDP flow after this long
                          without a datagram (default: 60s)
     --connect-timeout=SPAN
                          Give up connecting to one address of the target after
                          this long and try the next (default: infinity)
     --connect-retry=SPAN Wait up to SPAN after accepting a client for a backend
                          that is not listening yet, trying again with backoff
                          (default: 0, fail at once)
     --keepalive=SPAN     Enable TCP keepalive on both sockets of a connection,
                          first probe after SPAN idle, at most 32767s
                          (default: off)
  -h --help               Show this help
     --version            Show package version

See the socket-proxyd(8) man page for details.
`;
}
