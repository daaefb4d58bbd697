/**
 * src/config/args.ts against the real systemd-socket-proxyd v252.
 *
 * Every row of TABLE is parsed by us; every row the reference can understand (no --listen)
 * is also run through /lib/systemd/systemd-socket-proxyd, and both must agree on the
 * outcome (help / version / run / error) and, for errors, on the exact stderr line. We pass
 * the reference's own path as `prog`, so glibc's "argv[0]: ..." lines compare verbatim.
 * Without LISTEN_FDS the reference stops after a successful parse with "Didn't get any
 * sockets passed in.", which is what "run" means on its side. A second test reads the
 * reference's ERRNO= (sent over NOTIFY_SOCKET) for every error row and checks ours.
 */

import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { test } from 'node:test';

import { helpText, parseArgv, type Options, type Parsed } from '../src/config/args.ts';
import { EINVAL, ERANGE, ProxyError } from '../src/errors.ts';

const REF = '/lib/systemd/systemd-socket-proxyd';

type Want =
  | { kind: 'help' }
  | { kind: 'version' }
  | {
      kind: 'run';
      target: string | null;
      c: number;
      idle: bigint | null;
      listen: string[];
      pp: 'v1' | 'v2' | null;
      drain: bigint | null;
      metrics: string | null;
      noDelay: boolean;
      extra: Partial<Options>;
      routes: { name: string; target: string }[];
    }
  | { kind: 'error'; message: string; errno: number };

interface Row {
  argv: string[];
  want: Want;
  /** POSIXLY_CORRECT value for this row (both sides); absent = unset. */
  posix?: string;
  /** Uses --listen or --nodelay, which the reference does not know: check our side only. */
  oursOnly?: true;
  /** Our message is the reference's plus this (our extra long option in a candidate list). */
  refSuffix?: string;
}

const HELP: Want = { kind: 'help' };
const VERSION: Want = { kind: 'version' };
function ok(
  target: string | null,
  v: {
    c?: number;
    idle?: bigint | null;
    listen?: string[];
    pp?: 'v1' | 'v2';
    drain?: bigint | null;
    metrics?: string;
    noDelay?: boolean;
    routes?: [string, string][];
  } = {},
  extra: Partial<Options> = {},
): Want {
  return {
    kind: 'run',
    target,
    c: v.c ?? 256,
    idle: v.idle === undefined ? null : v.idle,
    listen: v.listen ?? [],
    pp: v.pp ?? null,
    drain: v.drain === undefined ? 0n : v.drain,
    metrics: v.metrics ?? null,
    noDelay: v.noDelay ?? true,
    extra,
    routes: (v.routes ?? []).map(([name, t]) => ({ name, target: t })),
  };
}
function badNoDelay(arg: string): Want {
  return fail(`Failed to parse --nodelay= argument: ${arg}`);
}
/** A NAME=TARGET argument that is refused. */
function badRoute(arg: string, why: string): Want {
  return fail(`Invalid route '${arg}': ${why} (names follow FileDescriptorName= rules).`);
}
/** A systemd-side message (no prefix). */
function fail(message: string, errno: number = EINVAL): Want {
  return { kind: 'error', message, errno };
}
/** A message glibc's getopt prints itself: prefixed with argv[0], always EINVAL. */
function glibc(message: string): Want {
  return { kind: 'error', message: `${REF}: ${message}`, errno: EINVAL };
}
function badC(arg: string, errno: number = EINVAL): Want {
  return fail(`Failed to parse --connections-max= argument: ${arg}`, errno);
}
function badIdle(arg: string, errno: number = EINVAL): Want {
  return fail(`Failed to parse --exit-idle-time= argument: ${arg}`, errno);
}

const TABLE: Row[] = [
  // Exactly one positional, counted after all options.
  { argv: [], want: fail('Not enough parameters.') },
  { argv: ['a', 'b'], want: fail('Too many parameters.') },
  { argv: ['x'], want: ok('x') }, // defaults: -c 256, idle infinity, no --listen, nodelay on
  { argv: ['127.0.0.1:1'], want: ok('127.0.0.1:1') },
  { argv: ['x', 'y', '-c', 'abc'], want: badC('abc') }, // option errors come before the count

  // A lone "-" is positional; "--" ends options (everything after is positional).
  { argv: ['-'], want: ok('-') },
  { argv: ['-', 'x'], want: fail('Too many parameters.') },
  { argv: ['--'], want: fail('Not enough parameters.') },
  { argv: ['x', '--'], want: ok('x') },
  { argv: ['--', '-h'], want: ok('-h') },
  { argv: ['a', '--', '-h', 'b'], want: fail('Too many parameters.') },
  { argv: ['-c5', '--', '-c6', 'x'], want: fail('Too many parameters.') },

  // Short options "c:h": attached or separate value, clusters, -c swallows whatever follows.
  { argv: ['-c5', 'x'], want: ok('x', { c: 5 }) },
  { argv: ['-c', '5', 'x'], want: ok('x', { c: 5 }) },
  { argv: ['-hc5'], want: HELP },
  { argv: ['-ch'], want: badC('h') },
  { argv: ['-c', '-h', 'x'], want: badC('-h') },
  { argv: ['-c', '--', 'x'], want: badC('--') },
  { argv: ['-c=5', 'x'], want: badC('=5') },
  { argv: ['-c'], want: glibc("option requires an argument -- 'c'") },
  { argv: ['-xc5'], want: glibc("invalid option -- 'x'") },
  { argv: ['-:', 'x'], want: glibc("invalid option -- ':'") }, // ':' is in "c:h" but is no option
  { argv: ['-W', 'foo'], want: glibc("invalid option -- 'W'") }, // no "W;" in the optstring

  // Long options: "=V" or a separate V, unique prefixes, exact names, glibc's wording.
  { argv: ['--connections-max=7', 'x'], want: ok('x', { c: 7 }) },
  { argv: ['--connections-max', '7', 'x'], want: ok('x', { c: 7 }) },
  { argv: ['--conn=0x10', 'x'], want: ok('x', { c: 16 }) },
  { argv: ['--exit', '5', 'x'], want: ok('x', { idle: 5_000_000n }) },
  // The value is taken even when it is "--"; parse_sec calls anything starting with '-' ERANGE.
  { argv: ['--exit-idle-time', '--', 'x'], want: badIdle('--', ERANGE) },
  { argv: ['--version'], want: VERSION },
  { argv: ['--vers'], want: VERSION },
  { argv: ['--help', 'x', 'y'], want: HELP },
  { argv: ['--h=1'], want: glibc("option '--help' doesn't allow an argument") }, // full name, no "=1"
  { argv: ['--vers=1'], want: glibc("option '--version' doesn't allow an argument") },
  { argv: ['--help='], want: glibc("option '--help' doesn't allow an argument") },
  { argv: ['--bogus'], want: glibc("unrecognized option '--bogus'") },
  { argv: ['--bogus=5', 'x'], want: glibc("unrecognized option '--bogus=5'") }, // keeps "=5"
  { argv: ['--versionx'], want: glibc("unrecognized option '--versionx'") }, // longer is no prefix
  { argv: ['---x'], want: glibc("unrecognized option '---x'") },
  { argv: ['--connections-max'], want: glibc("option '--connections-max' requires an argument") },
  { argv: ['--conn'], want: glibc("option '--connections-max' requires an argument") },
  { argv: ['-c1', '--exit-idle-time'], want: glibc("option '--exit-idle-time' requires an argument") },
  {
    // An empty name prefixes every option: glibc's only reachable ambiguity with these names.
    argv: ['--=5', 'x'],
    want: glibc(
      "option '--=5' is ambiguous; possibilities:" +
        " '--connections-max' '--exit-idle-time' '--help' '--version' '--listen' '--proxy-protocol' '--drain-timeout' '--metrics' '--nodelay' '--listen-datagram' '--idle-timeout' '--connect-timeout' '--connect-retry' '--keepalive'",
    ),
    refSuffix: " '--listen' '--proxy-protocol' '--drain-timeout' '--metrics' '--nodelay' '--listen-datagram' '--idle-timeout' '--connect-timeout' '--connect-retry' '--keepalive'",
  },

  // Routes (issue 12): NAME=TARGET positionals besides at most one plain TARGET. A leading
  // '/' or '@' is always a plain UNIX target, '=' or not; both sides run those.
  { argv: ['/run/a=b.sock'], want: ok('/run/a=b.sock') },
  { argv: ['@x=y'], want: ok('@x=y') },
  { argv: ['/run/a=b', '@c=d'], want: fail('Too many parameters.') },
  { argv: ['web=/run/nginx.sock'], oursOnly: true, want: ok(null, { routes: [['web', '/run/nginx.sock']] }) },
  {
    argv: ['web=/run/nginx.sock', 'db=/run/postgresql/.s.PGSQL.5432'],
    oursOnly: true,
    want: ok(null, { routes: [['web', '/run/nginx.sock'], ['db', '/run/postgresql/.s.PGSQL.5432']] }),
  },
  { argv: ['a=1.2.3.4:80', 'x', '-c3', 'b=c=d'], oursOnly: true, want: ok('x', { c: 3, routes: [['a', '1.2.3.4:80'], ['b', 'c=d']] }) },
  { argv: ['x', 'web.socket=/s', '--', 'y'], oursOnly: true, want: fail('Too many parameters.') },
  { argv: ['a=b', 'c=d', 'x', 'y'], oursOnly: true, want: fail('Too many parameters.') },
  { argv: ['a= ', 'b=', 'x'], oursOnly: true, want: ok('x', { routes: [['a', ' '], ['b', '']] }) }, // bad targets: main.ts
  { argv: ['=x'], oursOnly: true, want: badRoute('=x', 'empty name') },
  { argv: ['a:b=x'], oursOnly: true, want: badRoute('a:b=x', "name contains ':'") },
  { argv: ['a\tb=x'], oursOnly: true, want: badRoute('a\tb=x', 'name is not printable ASCII') },
  { argv: ['\x7f=x'], oursOnly: true, want: badRoute('\x7f=x', 'name is not printable ASCII') },
  { argv: ['é=x'], oursOnly: true, want: badRoute('é=x', 'name is not printable ASCII') },
  { argv: [`${'n'.repeat(255)}=x`], oursOnly: true, want: ok(null, { routes: [['n'.repeat(255), 'x']] }) },
  { argv: [`${'n'.repeat(256)}=x`], oursOnly: true, want: badRoute(`${'n'.repeat(256)}=x`, 'name longer than 255 characters') },
  { argv: [' sp ace =x'], oursOnly: true, want: ok(null, { routes: [[' sp ace ', 'x']] }) }, // systemd allows spaces
  { argv: ['web=/a', 'x', 'web=/b'], oursOnly: true, want: fail("Route 'web' is given twice.") },
  { argv: ['--listen=web=127.0.0.1:0', 'web=x'], oursOnly: true, want: ok(null, { listen: ['web=127.0.0.1:0'], routes: [['web', 'x']] }) },

  // GNU permutation and strict left-to-right: the first decisive option wins.
  { argv: ['x', '-c', '5'], want: ok('x', { c: 5 }) },
  { argv: ['x', '-h'], want: HELP },
  { argv: ['-h', 'x', 'y', 'z'], want: HELP },
  { argv: ['-h', '-c', 'abc'], want: HELP },
  { argv: ['-c', 'abc', '-h'], want: badC('abc') },
  { argv: ['-c', '0', '-h'], want: fail('Connection limit is too low.') },
  { argv: ['--version', '--bogus'], want: VERSION },
  { argv: ['--bogus', '--version'], want: glibc("unrecognized option '--bogus'") },

  // Repeated options: the last value wins, but each occurrence is checked when seen.
  { argv: ['-c', '2', '-c', '9', 'x'], want: ok('x', { c: 9 }) },
  { argv: ['--connections-max=2', '--connections-max=0', 'x'], want: fail('Connection limit is too low.') },
  { argv: ['-c', '0', '-c', '5', 'x'], want: fail('Connection limit is too low.') },
  { argv: ['--exit-idle-time=1', '--exit-idle-time=bogus', 'x'], want: badIdle('bogus') },
  { argv: ['--exit-idle-time=bogus', '--exit-idle-time=1', 'x'], want: badIdle('bogus') },

  // POSIXLY_CORRECT (even empty): option parsing stops at the first non-option.
  { argv: ['a', '-h'], posix: '', want: fail('Too many parameters.') },
  { argv: ['-c5', 'a', '-c', '0'], posix: '1', want: fail('Too many parameters.') },
  { argv: ['-h', 'a'], posix: '1', want: HELP },
  { argv: ['-c7', '--', '-h'], posix: '1', want: ok('-h', { c: 7 }) },
  { argv: ['x', '--'], posix: '1', want: fail('Too many parameters.') }, // "--" after x is positional

  // -c N is systemd safe_atou: strtoul base 0, leading space only, 32-bit, no negatives.
  { argv: ['-c', '0x10', 'x'], want: ok('x', { c: 16 }) },
  { argv: ['-c', '0X1f', 'x'], want: ok('x', { c: 31 }) },
  { argv: ['-c', '010', 'x'], want: ok('x', { c: 8 }) },
  { argv: ['-c', '+5', 'x'], want: ok('x', { c: 5 }) },
  { argv: ['-c', ' 5', 'x'], want: ok('x', { c: 5 }) },
  { argv: ['-c', '\t\v5', 'x'], want: ok('x', { c: 5 }) }, // \v is skipped by strtoul, not by systemd
  { argv: ['-c', '4294967295', 'x'], want: ok('x', { c: 4294967295 }) },
  { argv: ['-c', '\v-18446744073709551615', 'x'], want: ok('x', { c: 1 }) }, // wraps to 1; the '-' check misses it
  { argv: ['-c', '09', 'x'], want: badC('09') },
  { argv: ['-c', '5 ', 'x'], want: badC('5 ') },
  { argv: ['-c', '', 'x'], want: badC('') },
  { argv: ['-c', '0x', 'x'], want: badC('0x') },
  { argv: ['-c', '+', 'x'], want: badC('+') },
  { argv: ['-c', 'abc', 'x'], want: badC('abc') },
  { argv: ['-c', '-1', 'x'], want: badC('-1', ERANGE) },
  { argv: ['-c', '4294967296', 'x'], want: badC('4294967296', ERANGE) },
  { argv: ['-c', '18446744073709551616', 'x'], want: badC('18446744073709551616', ERANGE) },
  { argv: ['-c', '99999999999999999999999x', 'x'], want: badC('99999999999999999999999x', ERANGE) }, // overflow wins
  { argv: ['-c', '0', 'x'], want: fail('Connection limit is too low.') },
  { argv: ['-c', '-0', 'x'], want: fail('Connection limit is too low.') }, // "-0" is 0, not negative

  // --exit-idle-time is parse_sec (src/config/timespan.ts); its errno is passed through.
  { argv: ['--exit-idle-time=0', 'x'], want: ok('x', { idle: 0n }) },
  { argv: ['--exit-idle-time=infinity', 'x'], want: ok('x', { idle: null }) },
  { argv: ['--exit-idle-time=5min 20s', 'x'], want: ok('x', { idle: 320_000_000n }) },
  { argv: ['--exit-idle-time=500ms', 'x'], want: ok('x', { idle: 500_000n }) },
  { argv: ['--exit-idle-time=1y', 'x'], want: ok('x', { idle: 31_557_600_000_000n }) },
  { argv: ['--exit-idle-time=', 'x'], want: badIdle('') },
  { argv: ['--exit-idle-time=bogus', 'x'], want: badIdle('bogus') },
  { argv: ['--exit-idle-time=5S', 'x'], want: badIdle('5S') },
  { argv: ['--exit-idle-time=-1', 'x'], want: badIdle('-1', ERANGE) },
  { argv: ['--exit-idle-time=600000y', 'x'], want: badIdle('600000y', ERANGE) },

  // --listen (ours): required value, repeatable, kept raw and in order; same getopt rules.
  { argv: ['--listen=127.0.0.1:8080', 'x'], oursOnly: true, want: ok('x', { listen: ['127.0.0.1:8080'] }) },
  {
    argv: ['--listen', '/run/a.sock', 'x', '--listen=@abs'],
    oursOnly: true,
    want: ok('x', { listen: ['/run/a.sock', '@abs'] }),
  },
  { argv: ['--listen-d=[::1]:80', '-c3', 'x'], oursOnly: true, want: ok('x', { c: 3 }, { listenDatagram: ['[::1]:80'] }) },
  // "--listen" is an exact name, but "--lis" prefixes --listen-datagram too: ambiguous, as glibc says.
  { argv: ['--lis=[::1]:80', 'x'], oursOnly: true, want: glibc("option '--lis=[::1]:80' is ambiguous; possibilities: '--listen' '--listen-datagram'") },

  // --listen-datagram (ours): repeatable, raw, in order, next to --listen.
  {
    argv: ['--listen-datagram', '127.0.0.1:53', '--listen=/a', 'x', '--listen-datagram=[::]:53'],
    oursOnly: true,
    want: ok('x', { listen: ['/a'] }, { listenDatagram: ['127.0.0.1:53', '[::]:53'] }),
  },
  { argv: ['--listen-datagram'], oursOnly: true, want: glibc("option '--listen-datagram' requires an argument") },

  // --idle-timeout (ours): a span; infinity is null; absent when not given (flows default to 60 s).
  { argv: ['--idle-timeout=90s', 'x'], oursOnly: true, want: ok('x', {}, { idleTimeoutUsec: 90_000_000n }) },
  { argv: ['--idle', '250ms', 'x'], oursOnly: true, want: ok('x', {}, { idleTimeoutUsec: 250_000n }) },
  { argv: ['--idle-timeout=infinity', 'x'], oursOnly: true, want: ok('x', {}, { idleTimeoutUsec: null }) },
  { argv: ['--idle-timeout=soon', 'x'], oursOnly: true, want: fail('Failed to parse --idle-timeout= argument: soon') },
  { argv: ['--idle-timeout=-1', 'x'], oursOnly: true, want: fail('Failed to parse --idle-timeout= argument: -1', ERANGE) },
  { argv: ['--idle-timeout=0', 'x'], oursOnly: true, want: ok('x', {}, { idleTimeoutUsec: 0n }) },

  // --connect-timeout, --connect-retry, --keepalive (ours, issue 11): spans.
  { argv: ['--connect-timeout=5s', 'x'], oursOnly: true, want: ok('x', {}, { connectTimeoutUsec: 5_000_000n }) },
  { argv: ['--connect-timeout=infinity', 'x'], oursOnly: true, want: ok('x', {}, { connectTimeoutUsec: null }) },
  { argv: ['--connect-timeout=0', 'x'], oursOnly: true, want: ok('x', {}, { connectTimeoutUsec: null }) },
  { argv: ['--connect-timeout=5 parsecs', 'x'], oursOnly: true, want: fail('Failed to parse --connect-timeout= argument: 5 parsecs') },
  { argv: ['--connect-t', '1min', 'x'], oursOnly: true, want: ok('x', {}, { connectTimeoutUsec: 60_000_000n }) },
  { argv: ['--connect-retry=30s', 'x'], oursOnly: true, want: ok('x', {}, { connectRetryUsec: 30_000_000n }) },
  { argv: ['--connect-retry=infinity', 'x'], oursOnly: true, want: ok('x', {}, { connectRetryUsec: null }) },
  { argv: ['--connect-retry=0', 'x'], oursOnly: true, want: ok('x', {}, { connectRetryUsec: 0n }) },
  { argv: ['--connect-retry=', 'x'], oursOnly: true, want: fail('Failed to parse --connect-retry= argument: ') },
  { argv: ['--connect-r=-5s', 'x'], oursOnly: true, want: fail('Failed to parse --connect-retry= argument: -5s', ERANGE) },
  { argv: ['--keepalive=1min', 'x'], oursOnly: true, want: ok('x', {}, { keepAliveUsec: 60_000_000n }) },
  { argv: ['--keepalive=0', 'x'], oursOnly: true, want: ok('x', {}, { keepAliveUsec: 0n }) },
  { argv: ['--keepalive=infinity', 'x'], oursOnly: true, want: ok('x', {}, { keepAliveUsec: 0n }) },
  { argv: ['--keepalive=32767s', 'x'], oursOnly: true, want: ok('x', {}, { keepAliveUsec: 32_767_000_000n }) },
  { argv: ['--keepalive=32768s', 'x'], oursOnly: true, want: fail('Failed to parse --keepalive= argument: 32768s', ERANGE) },
  { argv: ['--keepalive=12h', 'x'], oursOnly: true, want: fail('Failed to parse --keepalive= argument: 12h', ERANGE) },
  { argv: ['--keepalive=often', 'x'], oursOnly: true, want: fail('Failed to parse --keepalive= argument: often') },
  { argv: ['--connect-=1s', 'x'], oursOnly: true, want: glibc("option '--connect-=1s' is ambiguous; possibilities: '--connect-timeout' '--connect-retry'") },
  // A drop-in: abbreviations of the reference's own options keep meaning them, although
  // --connect-timeout/--connect-retry share the prefix. Both sides run these.
  { argv: ['--connect=5', 'x'], want: ok('x', { c: 5 }) },
  { argv: ['--c', '7', 'x'], want: ok('x', { c: 7 }) },
  { argv: ['--conn=3', 'x'], want: ok('x', { c: 3 }) },
  { argv: ['--listen=', 'x'], oursOnly: true, want: ok('x', { listen: [''] }) },
  { argv: ['x', '--listen', '-h'], oursOnly: true, want: ok('x', { listen: ['-h'] }) },
  { argv: ['--listen'], oursOnly: true, want: glibc("option '--listen' requires an argument") },
  { argv: ['--listen=a', '-h'], oursOnly: true, want: HELP },

  // --proxy-protocol (systemd v261 has v1; v2 is ours): long only, exact, case-sensitive.
  { argv: ['--proxy-protocol=v1', 'x'], oursOnly: true, want: ok('x', { pp: 'v1' }) },
  { argv: ['x', '--proxy-protocol', 'v2'], oursOnly: true, want: ok('x', { pp: 'v2' }) },
  { argv: ['--proxy-protocol=v1', '--prox=v2', 'x'], oursOnly: true, want: ok('x', { pp: 'v2' }) }, // last wins
  { argv: ['--proxy-protocol=V1', 'x'], oursOnly: true, want: fail('Failed to parse --proxy-protocol= argument: V1') },
  { argv: ['--proxy-protocol=v3', 'x'], oursOnly: true, want: fail('Failed to parse --proxy-protocol= argument: v3') },
  { argv: ['--proxy-protocol=', 'x'], oursOnly: true, want: fail('Failed to parse --proxy-protocol= argument: ') },
  { argv: ['--proxy-protocol=v1 ', 'x'], oursOnly: true, want: fail('Failed to parse --proxy-protocol= argument: v1 ') },
  { argv: ['--proxy-protocol'], oursOnly: true, want: glibc("option '--proxy-protocol' requires an argument") },
  { argv: ['--proxy-protocol=x', '-h'], oursOnly: true, want: fail('Failed to parse --proxy-protocol= argument: x') },
  { argv: ['-p', 'v1', 'x'], oursOnly: true, want: glibc("invalid option -- 'p'") }, // no short form, as upstream

  // --drain-timeout (ours): a systemd.time(7) span; 0 (the default) closes at once, infinity waits.
  { argv: ['--drain-timeout=30s', 'x'], oursOnly: true, want: ok('x', { drain: 30_000_000n }) },
  { argv: ['--drain-timeout', '1min 500ms', 'x'], oursOnly: true, want: ok('x', { drain: 60_500_000n }) },
  { argv: ['--drain-timeout=0', 'x'], oursOnly: true, want: ok('x', { drain: 0n }) },
  { argv: ['--drain-timeout=infinity', 'x'], oursOnly: true, want: ok('x', { drain: null }) },
  { argv: ['--dr=5', 'x'], oursOnly: true, want: ok('x', { drain: 5_000_000n }) },
  { argv: ['--drain-timeout=soon', 'x'], oursOnly: true, want: fail('Failed to parse --drain-timeout= argument: soon') },
  { argv: ['--drain-timeout=', 'x'], oursOnly: true, want: fail('Failed to parse --drain-timeout= argument: ') },
  { argv: ['--drain-timeout=-1', 'x'], oursOnly: true, want: fail('Failed to parse --drain-timeout= argument: -1', ERANGE) },
  { argv: ['--drain-timeout'], oursOnly: true, want: glibc("option '--drain-timeout' requires an argument") },

  // --metrics (ours): kept raw; the CLI parses it as an address (address.test.ts covers the forms).
  { argv: ['--metrics=127.0.0.1:9100', 'x'], oursOnly: true, want: ok('x', { metrics: '127.0.0.1:9100' }) },
  { argv: ['--metrics', '@m', '--metrics=/run/m.sock', 'x'], oursOnly: true, want: ok('x', { metrics: '/run/m.sock' }) },
  { argv: ['--metrics'], oursOnly: true, want: glibc("option '--metrics' requires an argument") },

  // --nodelay=BOOL (ours): systemd's parse_boolean words, any case; the last one wins.
  ...['1', 'yes', 'y', 'true', 't', 'on', 'YES', 'On', 'TRUE'].map((w): Row => ({ argv: [`--nodelay=${w}`, 'x'], oursOnly: true, want: ok('x') })),
  ...['0', 'no', 'n', 'false', 'f', 'off', 'NO', 'Off', 'False'].map((w): Row => ({ argv: [`--nodelay=${w}`, 'x'], oursOnly: true, want: ok('x', { noDelay: false }) })),
  { argv: ['--nodelay', 'no', 'x'], oursOnly: true, want: ok('x', { noDelay: false }) },
  { argv: ['--nod=off', 'x', '--nodelay=on'], oursOnly: true, want: ok('x') },
  { argv: ['--n=0', '-c2', 'x'], oursOnly: true, want: ok('x', { c: 2, noDelay: false }) },
  { argv: ['--nodelay=', 'x'], oursOnly: true, want: badNoDelay('') },
  { argv: ['--nodelay=maybe', 'x'], oursOnly: true, want: badNoDelay('maybe') },
  { argv: ['--nodelay= yes', 'x'], oursOnly: true, want: badNoDelay(' yes') },
  { argv: ['--nodelay=2', 'x'], oursOnly: true, want: badNoDelay('2') },
  { argv: ['--nodelay=yess', 'x'], oursOnly: true, want: badNoDelay('yess') },
  { argv: ['--nodelay=bogus', '-h'], oursOnly: true, want: badNoDelay('bogus') }, // left to right
  { argv: ['--nodelay'], oursOnly: true, want: glibc("option '--nodelay' requires an argument") },
  { argv: ['--nodelay=no', 'x', 'y'], oursOnly: true, want: fail('Too many parameters.') },
];

type Outcome =
  | { kind: 'help' }
  | { kind: 'version' }
  | { kind: 'run' }
  | { kind: 'error'; message: string };

function refEnv(row: Row): NodeJS.ProcessEnv {
  // A minimal environment: no LISTEN_*, no NOTIFY_SOCKET, no SYSTEMD_LOG_*, untranslated glibc.
  const env: NodeJS.ProcessEnv = { PATH: '/usr/sbin:/usr/bin:/sbin:/bin', LC_ALL: 'C' };
  if (row.posix !== undefined) env.POSIXLY_CORRECT = row.posix;
  return env;
}

interface Ran {
  status: number | null;
  stdout: string;
  stderr: string;
}

/** Runs a process to completion (async, so several reference runs overlap: keeps the file fast). */
function run(file: string, args: readonly string[], env: NodeJS.ProcessEnv, input?: string): Promise<Ran> {
  return new Promise((resolve) => {
    // stdin only when there is input: the reference exits without reading, and writing to
    // it would race into EPIPE.
    const stdin = input === undefined ? 'ignore' : 'pipe';
    const child = spawn(file, args, { env, stdio: [stdin, 'pipe', 'pipe'], timeout: 20000 });
    let stdout = '';
    let stderr = '';
    child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
    child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
    child.on('error', (err) => resolve({ status: null, stdout, stderr: `spawn ${file}: ${err.message}` }));
    child.on('close', (status) => resolve({ status, stdout, stderr }));
    if (input !== undefined) child.stdin?.end(input);
  });
}

/** At most `limit` reference processes at a time; all are queued at load, each test awaits its own. */
function limited(limit: number): <T>(job: () => Promise<T>) => Promise<T> {
  let active = 0;
  const waiting: (() => void)[] = [];
  return async <T>(job: () => Promise<T>): Promise<T> => {
    if (active >= limit) await new Promise<void>((wake) => waiting.push(wake));
    active++;
    try {
      return await job();
    } finally {
      active--;
      waiting.shift()?.();
    }
  };
}
const slot = limited(4);

/*
 * The reference's errno is visible only as ERRNO= in sd_notify, which needs an AF_UNIX
 * datagram socket; Node has none, so a tiny python3 helper collects it for all error rows
 * in one process.
 */
const NOTIFY_HELPER = `
import json, os, socket, subprocess, sys, tempfile
cases = json.load(sys.stdin)
d = tempfile.mkdtemp(); path = os.path.join(d, 'notify')
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); s.bind(path); s.settimeout(0)
out = []
try:
    for c in cases:
        env = dict(c['env']); env['NOTIFY_SOCKET'] = path
        subprocess.run([c['ref']] + c['argv'], env=env, capture_output=True, timeout=5)
        errno = None
        while True:
            try: msg = s.recv(4096).decode()
            except BlockingIOError: break
            for line in msg.split('\\n'):
                if line.startswith('ERRNO='): errno = int(line[6:])
        out.append(errno)
finally:
    os.unlink(path); os.rmdir(d)
json.dump(out, sys.stdout)
`;

const ERRNO_ROWS = TABLE.filter((r) => r.oursOnly !== true && r.want.kind === 'error');

/** Queued first: it is one process running ~45 more, so it should overlap the row tests. */
const refErrnos = slot(() => {
  const cases = ERRNO_ROWS.map((r) => ({ ref: REF, argv: r.argv, env: refEnv(r) }));
  return run('python3', ['-c', NOTIFY_HELPER], process.env, JSON.stringify(cases));
});

const refRuns = new Map<Row, Promise<Ran>>(
  TABLE.filter((r) => r.oursOnly !== true).map((r) => [r, slot(() => run(REF, r.argv, refEnv(r)))]),
);

async function runReference(row: Row): Promise<Outcome> {
  const r = await (refRuns.get(row) as Promise<Ran>);
  if (r.status === 0 && r.stdout.startsWith('systemd-socket-proxyd [HOST:PORT]\n')) return { kind: 'help' };
  if (r.status === 0 && r.stdout.startsWith('systemd 252 ')) return { kind: 'version' };
  assert.equal(r.status, 1, `unexpected reference result: ${JSON.stringify(r)}`);
  assert.equal(r.stdout, '');
  if (r.stderr === "Didn't get any sockets passed in.\n") return { kind: 'run' };
  assert.match(r.stderr, /^[^\n]+\n$/, 'the reference prints one error line');
  return { kind: 'error', message: r.stderr.slice(0, -1) };
}

function parseOurs(row: Row): Parsed | ProxyError {
  try {
    return parseArgv(row.argv, REF, row.posix === undefined ? {} : { POSIXLY_CORRECT: row.posix });
  } catch (err) {
    assert.ok(err instanceof ProxyError, `expected a ProxyError, got ${String(err)}`);
    return err;
  }
}

function label(row: Row): string {
  const argv = row.argv.map((a) => JSON.stringify(a)).join(' ') || '(no args)';
  return (row.posix === undefined ? '' : 'POSIXLY_CORRECT ') + argv;
}

test('the table is big enough to show every rule', () => {
  assert.ok(TABLE.length >= 40);
  assert.ok(TABLE.filter((r) => r.oursOnly !== true).length >= 40);
});

for (const row of TABLE) {
  test(label(row), async () => {
    const ours = parseOurs(row);
    const want = row.want;

    // Our side, fully.
    if (want.kind === 'error') {
      const got = JSON.stringify(ours, (_k, v: unknown) => (typeof v === 'bigint' ? `${v}n` : v));
      assert.ok(ours instanceof ProxyError, `expected an error, got ${got}`);
      assert.equal(ours.code, 'ERR_USAGE');
      assert.equal(ours.message, want.message);
      assert.equal(ours.errno, want.errno);
    } else {
      assert.ok(!(ours instanceof ProxyError), `unexpected error: ${ours instanceof ProxyError ? ours.message : ''}`);
      if (want.kind === 'run') {
        assert.deepEqual(ours, {
          action: 'run',
          options: {
            connectionsMax: want.c,
            exitIdleTimeUsec: want.idle,
            listen: want.listen,
            proxyProtocol: want.pp,
            drainTimeoutUsec: want.drain,
            metrics: want.metrics,
            noDelay: want.noDelay,
            target: want.target,
            routes: want.routes,
            ...want.extra,
          },
        });
      } else {
        assert.deepEqual(ours, { action: want.kind });
      }
    }

    // The reference, wherever it knows all the options used.
    if (row.oursOnly === true) return;
    const ref = await runReference(row);
    assert.equal(ref.kind, want.kind, `reference outcome: ${JSON.stringify(ref)}`);
    if (ref.kind === 'error' && want.kind === 'error') {
      assert.equal(want.message, ref.message + (row.refSuffix ?? ''));
    }
  });
}

test('errno of every error row matches the reference ERRNO=', async () => {
  assert.ok(ERRNO_ROWS.length >= 20);
  const r = await refErrnos;
  assert.equal(r.status, 0, `python3 helper failed: ${r.stderr}`);
  const errnos = JSON.parse(r.stdout) as (number | null)[];
  assert.equal(errnos.length, ERRNO_ROWS.length);
  ERRNO_ROWS.forEach((row, i) => {
    const ours = parseOurs(row);
    assert.ok(ours instanceof ProxyError);
    assert.equal(ours.errno, errnos[i], `errno for ${label(row)}`);
  });
});

test('glibc messages use the given prog, systemd messages have no prefix', () => {
  assert.throws(() => parseArgv(['--bogus'], 'socket-proxyd'), {
    message: "socket-proxyd: unrecognized option '--bogus'",
  });
  assert.throws(() => parseArgv(['-c'], '/usr/bin/socket-proxyd'), {
    message: "/usr/bin/socket-proxyd: option requires an argument -- 'c'",
  });
  assert.throws(() => parseArgv(['-c', '0', 'x'], 'socket-proxyd'), { message: 'Connection limit is too low.' });
});

test('env defaults to POSIXLY_CORRECT unset; undefined counts as unset', () => {
  assert.deepEqual(parseArgv(['a', '-h'], 'p'), { action: 'help' });
  assert.deepEqual(parseArgv(['a', '-h'], 'p', { POSIXLY_CORRECT: undefined }), { action: 'help' });
  assert.throws(() => parseArgv(['a', '-h'], 'p', { POSIXLY_CORRECT: '' }), { message: 'Too many parameters.' });
});

test('argv is not modified and results are fresh objects', () => {
  const argv = Object.freeze(['x', '--listen=/a', '-c', '3']);
  const a = parseArgv(argv, 'p');
  const b = parseArgv(argv, 'p');
  assert.deepEqual(argv, ['x', '--listen=/a', '-c', '3']);
  assert.ok(a.action === 'run' && b.action === 'run');
  assert.notEqual(a.options.listen, b.options.listen);
});

test('helpText is exact', () => {
  assert.equal(
    helpText('socket-proxyd'),
    `socket-proxyd [OPTIONS...] HOST:PORT
socket-proxyd [OPTIONS...] SOCKET
socket-proxyd [OPTIONS...] NAME=TARGET... [TARGET]

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
`,
  );
  assert.ok(helpText('/x/y').startsWith('/x/y [OPTIONS...] HOST:PORT\n/x/y [OPTIONS...] SOCKET\n'));
  // Fits an 80-column terminal.
  for (const line of helpText('socket-proxyd').split('\n')) assert.ok(line.length <= 80, line);
});
