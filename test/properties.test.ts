/**
 * Bad input (issue #5): property-based tests with fast-check.
 *
 * The pure parsers (argv, addresses, time spans, LISTEN_*) run in-process over
 * thousands of generated inputs: they either return a well-formed result or throw
 * the one error type the CLI turns into one line -- never anything else. Then the
 * real CLI is spawned (about a hundred times, concurrently) with generated argv
 * and LISTEN_* environments, and with odd things at fd 3: it must exit 1 with
 * exactly one line on stderr, and never print a stack trace.
 *
 * Set SOCKET_PROXYD_SEED to replay a failure (fast-check prints the seed and the
 * shrunk counterexample).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { isIP } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import fc from 'fast-check';
import { takeListenFds } from '../src/system/activation.ts';
import { formatAddress, parseAddress } from '../src/config/address.ts';
import { parseArgv } from '../src/config/args.ts';
import { checkRouteName, splitRouteArg } from '../src/config/route.ts';
import { EBADF, EINVAL, ENAMETOOLONG, ENOTSOCK, ERANGE, ProxyError } from '../src/errors.ts';
import { formatTimespan, parseSec, TimespanError, USEC_INFINITY } from '../src/config/timespan.ts';
import { fdOf, makeListener, OURS } from './helpers.ts';

const STRESS = process.env.SOCKET_PROXYD_STRESS === '1';
const seed = process.env.SOCKET_PROXYD_SEED === undefined ? undefined : Number(process.env.SOCKET_PROXYD_SEED);
/** In-process runs per property. */
const RUNS = STRESS ? 50_000 : 3_000;
const params = (numRuns: number): fc.Parameters<unknown> => (seed === undefined ? { numRuns } : { numRuns, seed });

// ---------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------

/** Any text a command line or environment can carry (no NUL: exec cannot pass it). */
const anyText = fc.oneof(
  fc.string({ unit: 'binary', maxLength: 24 }),
  fc.string({ unit: 'binary-ascii', maxLength: 24 }),
  fc.string({ unit: 'grapheme-ascii', maxLength: 12 }),
).map((s) => s.replaceAll('\0', ''));

const digits = fc.stringMatching(/^[0-9]{1,25}$/);
const spanUnits = ['', 's', 'sec', 'm', 'min', 'M', 'h', 'hr', 'd', 'w', 'y', 'ms', 'us', 'µs', 'μs', 'usec', 'seconds', 'minutes', 'months', 'years', 'S', 'ns', 'x'];
const timespanish = fc
  .array(
    fc.tuple(
      fc.constantFrom('', ' ', '\t', '+', '-', '.', ' -'),
      fc.oneof(digits, fc.stringMatching(/^[0-9]{0,4}\.[0-9]{0,8}$/)),
      fc.constantFrom(' ', '', ''),
      fc.constantFrom(...spanUnits),
    ),
    { minLength: 0, maxLength: 4 },
  )
  .map((parts) => parts.map((p) => p.join('')).join(''));

const numberish = fc.oneof(
  digits,
  fc.stringMatching(/^[ \t\n\r\v\f]{0,2}[-+]?(0[xX][0-9a-fA-F]{0,20}|0[0-7]{0,24}|[0-9]{1,22})[a-z ]{0,1}$/),
  fc.integer({ min: -5, max: 70_000 }).map(String),
);

const hostish = fc.oneof(
  fc.constantFrom('127.0.0.1', '::1', '[::1]', '0.0.0.0', 'localhost', 'example.invalid', '', '[', ']', '[]', '[::ffff:1.2.3.4]', 'fe80::1%lo', 'a b', '1.2.3'),
  fc.ipV4(),
  fc.ipV6(),
  fc.ipV6().map((h) => `[${h}]`),
  fc.domain(),
  anyText,
);
const portish = fc.oneof(numberish, fc.constantFrom('http', 'ssh', 'nosuchservice', '', '0', '65535', '65536', '99999999999999999999'), anyText);
const addressish = fc.oneof(
  fc.tuple(hostish, fc.constantFrom(':', ''), portish).map(([h, c, p]) => `${h}${c}${p}`),
  fc.tuple(fc.constantFrom('/', '@'), fc.oneof(anyText, fc.integer({ min: 0, max: 120 }).map((n) => 'x'.repeat(n)))).map(([a, b]) => a + b),
  hostish,
  anyText,
);

const optionish = fc.oneof(
  fc.constantFrom('-c', '-h', '-x', '-', '--', '-ch', '-hc', '-cc', '--help', '--version', '--c', '--co', '--e', '--h', '--v', '--conn', '--exit', '--connections-max', '--exit-idle-time', '--help=1', '--version=', '--listen', '--bogus'),
  fc.tuple(fc.constantFrom('-c', '--connections-max=', '--co=', '-c ', '--c='), numberish).map(([o, v]) => o + v),
  fc.tuple(fc.constantFrom('--exit-idle-time=', '--exit-idle=', '--e=', '--ex='), timespanish).map(([o, v]) => o + v),
  fc.tuple(fc.constantFrom('--listen=', '--l=', '--li='), addressish).map(([o, v]) => o + v),
  fc.tuple(fc.constantFrom('-', '--'), anyText).map(([a, b]) => a + b),
);

const argvArb = fc.array(fc.oneof({ weight: 3, arbitrary: optionish }, { weight: 2, arbitrary: addressish }, { weight: 1, arbitrary: numberish }, { weight: 1, arbitrary: timespanish }, { weight: 1, arbitrary: anyText }), {
  maxLength: 6,
});

/** The errors each parser may throw; anything else is a crash waiting to happen. */
function isUsageError(e: unknown): boolean {
  return e instanceof ProxyError && e.code === 'ERR_USAGE' && (e.errno === EINVAL || e.errno === ERANGE) && e.message.length > 0;
}

function isTargetError(e: unknown): boolean {
  return e instanceof ProxyError && e.code === 'ERR_TARGET' && (e.errno === EINVAL || e.errno === ENAMETOOLONG) && e.message.length > 0;
}

// ---------------------------------------------------------------------------
// Pure parsers, in-process
// ---------------------------------------------------------------------------

test(`argv: ${RUNS} generated command lines parse or fail with a usage error, never anything else`, () => {
  fc.assert(
    fc.property(argvArb, fc.boolean(), (argv, posixlyCorrect) => {
      let parsed;
      try {
        parsed = parseArgv(argv, 'socket-proxyd', posixlyCorrect ? { POSIXLY_CORRECT: '' } : {});
      } catch (e) {
        assert.ok(isUsageError(e), `not a usage error: ${String(e)}`);
        return;
      }
      if (parsed.action !== 'run') return;
      const o = parsed.options;
      assert.ok(Number.isInteger(o.connectionsMax) && o.connectionsMax >= 1 && o.connectionsMax <= 0xffffffff, `connectionsMax ${o.connectionsMax}`);
      assert.ok(o.exitIdleTimeUsec === null || (o.exitIdleTimeUsec >= 0n && o.exitIdleTimeUsec < USEC_INFINITY), 'exit idle time out of range');
      assert.ok(o.target === null || argv.includes(o.target), 'the target is one of the arguments');
      assert.ok(o.target !== null || o.routes.length > 0, 'a default target or a route');
      for (const r of o.routes) assert.ok(argv.includes(`${r.name}=${r.target}`), 'each route is one of the arguments');
      for (const l of o.listen) assert.equal(typeof l, 'string');
    }),
    params(RUNS),
  );
});

test('argv: well-formed command lines in any order give exactly the values asked for', () => {
  const arb = fc.record({
    max: fc.option(fc.integer({ min: 1, max: 0xffffffff })),
    idleSec: fc.option(fc.integer({ min: 0, max: 10_000_000 })),
    listen: fc.array(fc.constantFrom('127.0.0.1:0', '/run/x.sock', '@abc', '[::1]:99'), { maxLength: 3 }),
    target: fc.constantFrom('127.0.0.1:80', 'example.com:443', '/run/backend.sock', '@backend'),
    style: fc.boolean(),
    order: fc.integer({ min: 0, max: 3 }),
  });
  fc.assert(
    fc.property(arb, (r) => {
      const opts: string[][] = [];
      if (r.max !== null) opts.push(r.style ? ['-c', String(r.max)] : [`--connections-max=${r.max}`]);
      if (r.idleSec !== null) opts.push(r.style ? ['--exit-idle-time', `${r.idleSec}s`] : [`--exit-idle-time=${r.idleSec}`]);
      for (const l of r.listen) opts.push(r.style ? ['--listen', l] : [`--listen=${l}`]);
      // GNU permutation: the target may come first, last, or between options.
      const at = Math.min(r.order, opts.length);
      const argv = [...opts.slice(0, at).flat(), r.target, ...opts.slice(at).flat()];
      const parsed = parseArgv(argv, 'p');
      assert.equal(parsed.action, 'run');
      if (parsed.action !== 'run') return;
      assert.equal(parsed.options.target, r.target);
      assert.equal(parsed.options.connectionsMax, r.max ?? 256);
      assert.equal(parsed.options.exitIdleTimeUsec, r.idleSec === null ? null : BigInt(r.idleSec) * 1_000_000n);
      assert.deepEqual(parsed.options.listen, r.listen);
    }),
    params(RUNS),
  );
});

test(`targets: ${RUNS} generated addresses parse to a usable address or fail with a target error`, () => {
  fc.assert(
    fc.property(addressish, fc.boolean(), (text, forListen) => {
      let a;
      try {
        a = parseAddress(text, forListen);
      } catch (e) {
        assert.ok(isTargetError(e), `not a target error: ${String(e)}`);
        return;
      }
      assert.equal(a.text, text);
      if (a.kind === 'unix') {
        assert.ok(a.path.length >= 2 && Buffer.byteLength(a.path) <= 108, `unix path length ${Buffer.byteLength(a.path)}`);
        assert.ok(a.path.startsWith('/') || a.path.startsWith('\0'));
      } else {
        assert.ok(Number.isInteger(a.port) && a.port >= (forListen ? 0 : 1) && a.port <= 65535, `port ${a.port}`);
        assert.ok(a.host.length > 0);
        if (a.kind === 'ip') assert.equal(isIP(a.host), a.family);
        else assert.ok(isIP(a.host) === 0 && !/\s/.test(a.host), `host name ${JSON.stringify(a.host)}`);
      }
    }),
    params(RUNS),
  );
});

test('targets: every IP address and port survives format -> parse unchanged', () => {
  fc.assert(
    fc.property(fc.oneof(fc.ipV4(), fc.ipV6()), fc.integer({ min: 1, max: 65535 }), (host, port) => {
      const a = parseAddress(isIP(host) === 6 ? `[${host}]:${port}` : `${host}:${port}`);
      assert.equal(a.kind, 'ip');
      const b = parseAddress(formatAddress(a));
      assert.equal(b.kind, 'ip');
      if (a.kind !== 'ip' || b.kind !== 'ip') return;
      assert.deepEqual([b.host, b.port, b.family], [a.host, a.port, a.family]);
    }),
    params(RUNS),
  );
});

test(`timespans: ${RUNS} generated spans parse into range or fail with EINVAL/ERANGE`, () => {
  fc.assert(
    fc.property(fc.oneof(timespanish, anyText, fc.constantFrom('infinity', ' infinity ', 'Infinity', '', ' ')), (text) => {
      let usec: bigint;
      try {
        usec = parseSec(text);
      } catch (e) {
        assert.ok(e instanceof TimespanError && (e.errno === EINVAL || e.errno === ERANGE), `not a timespan error: ${String(e)}`);
        assert.ok(!e.message.includes('\n') || text.includes('\n'), 'multi-line message for one-line input');
        return;
      }
      assert.equal(typeof usec, 'bigint');
      assert.ok(usec >= 0n && usec <= USEC_INFINITY, `out of range: ${usec}`);
    }),
    params(RUNS),
  );
});

test('timespans: sums of whole units parse to the sum; format -> parse is the identity', () => {
  const units: [string, bigint][] = [
    ['us', 1n], ['ms', 1000n], ['s', 1_000_000n], ['min', 60_000_000n], ['h', 3_600_000_000n],
    ['d', 86_400_000_000n], ['w', 604_800_000_000n], ['M', 2_629_800_000_000n], ['y', 31_557_600_000_000n],
  ];
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.integer({ min: 0, max: 100_000 }), fc.integer({ min: 0, max: units.length - 1 }), fc.constantFrom('', ' ')), { minLength: 1, maxLength: 5 }),
      (parts) => {
        const text = parts.map(([n, u, sp]) => `${n}${sp}${(units[u] as [string, bigint])[0]}`).join(' ');
        const want = parts.reduce((sum, [n, u]) => sum + BigInt(n) * (units[u] as [string, bigint])[1], 0n);
        assert.equal(parseSec(text), want, text);
      },
    ),
    params(RUNS),
  );
  // Up to 584,542 years: systemd's parse_sec() refuses a component n*unit once n >= (2^64-1)/unit
  // (ERANGE for "584542y", although that is below 2^64-1), and our port does the same, so
  // the top ~17 days of the range do not survive format -> parse -- in systemd either.
  const YEAR = 31_557_600_000_000n;
  fc.assert(
    fc.property(fc.oneof(fc.bigInt({ min: 0n, max: 584_542n * YEAR - 1n }), fc.bigInt({ min: 0n, max: 10n ** 12n })), (usec) => {
      assert.equal(parseSec(formatTimespan(usec)), usec, formatTimespan(usec));
    }),
    params(RUNS),
  );
  assert.throws(() => parseSec(formatTimespan(584_542n * YEAR)), (e: unknown) => e instanceof TimespanError && e.errno === ERANGE);
});

test(`LISTEN_*: ${RUNS} generated environments give no fds or an activation error, and are always consumed`, () => {
  const pid = 4_000_000; // "our" pid; generated values match it now and then
  const envArb = fc.record(
    {
      LISTEN_PID: fc.oneof(numberish, anyText, fc.constant(String(pid)), fc.constant(` ${pid}`), fc.constant(`+${pid}`), fc.constant(`0${pid}`)),
      LISTEN_FDS: fc.oneof(numberish, anyText, fc.constantFrom('0', '1', '1000', '-1', '2147483644', '2147483645', '')),
      LISTEN_FDNAMES: anyText,
    },
    { requiredKeys: [] },
  );
  fc.assert(
    fc.property(envArb, (env: Record<string, string | undefined>) => {
      const copy = { ...env, OTHER: 'kept' };
      let fds;
      try {
        // When LISTEN_PID matches, the fd checks run against this test process's own fds
        // 3...: fstat() must turn down every one that is not a socket (or not open).
        fds = takeListenFds(copy, pid);
      } catch (e) {
        assert.ok(e instanceof ProxyError && (e.code === 'ERR_LISTEN_FDS' || e.code === 'ERR_NOT_STREAM'), `not an activation error: ${String(e)}`);
        assert.ok([EINVAL, EBADF, ENOTSOCK].includes(e.errno));
        fds = null;
      }
      assert.deepEqual(Object.keys(copy), ['OTHER'], 'LISTEN_* left in the environment');
      if (fds !== null && fds.length > 0) {
        assert.ok(env.LISTEN_PID !== undefined && Number(env.LISTEN_PID) === pid, 'fds taken for another pid');
        assert.equal(fds.length, Number(env.LISTEN_FDS), 'as many fds as LISTEN_FDS says');
        fds.forEach((f, i) => assert.equal(f.fd, 3 + i));
      }
    }),
    params(RUNS),
  );
});

// ---------------------------------------------------------------------------
// The real CLI
// ---------------------------------------------------------------------------

interface CliRun {
  code: number | null;
  signal: string | null;
  stdout: string;
  stderr: string;
}

/**
 * Run dist/cli.js with `argv`, an exact environment, and `fds` as fd 3... When
 * `selfPid` is set, LISTEN_PID is the CLI's own pid wrapped in the given prefix and
 * suffix (the pid is only known in the exec'ing shell); otherwise env.LISTEN_PID is
 * passed as it is.
 */
async function runCli(argv: string[], env: Record<string, string>, fds: number[] = [], selfPid?: { prefix: string; suffix: string }): Promise<CliRun> {
  const script = 'if [ -n "${SPD_SELF+x}" ]; then LISTEN_PID="${SPD_PRE}$$${SPD_SUF}"; export LISTEN_PID; fi; unset SPD_SELF SPD_PRE SPD_SUF; exec "$@"';
  const fullEnv: Record<string, string> = { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env };
  if (selfPid !== undefined) Object.assign(fullEnv, { SPD_SELF: '1', SPD_PRE: selfPid.prefix, SPD_SUF: selfPid.suffix });
  const child = spawn('sh', ['-c', script, 'sh', process.execPath, OURS, ...argv], { env: fullEnv, stdio: ['ignore', 'pipe', 'pipe', ...fds] });
  return finish(child);
}

/** Exit 1, exactly one line on stderr, no stack trace, nothing on stdout. */
function assertOneLineFailure(r: CliRun, what: string): void {
  const context = `${what}: exit ${r.code}/${r.signal}, stderr ${JSON.stringify(r.stderr)}`;
  assert.equal(r.signal, null, context);
  assert.equal(r.code, 1, context);
  assert.equal(r.stdout, '', context);
  assert.ok(r.stderr.endsWith('\n') && r.stderr.indexOf('\n') === r.stderr.length - 1, `not exactly one line: ${context}`);
  assert.doesNotMatch(r.stderr, /^\s+at /m, context);
  assert.doesNotMatch(r.stderr, /node:internal|Error:|\.js:\d|\.ts:\d/, context);
}

/** What the CLI must say for argv with no sockets passed, from the pure parsers (null: it would run). */
function expectedFailure(argv: string[]): { exit: 0 | 1; message: string } | null {
  try {
    const parsed = parseArgv(argv, 'socket-proxyd', {});
    if (parsed.action !== 'run') return { exit: 0, message: '' };
    const o = parsed.options;
    const several = o.routes.length + (o.target === null ? 0 : 1) > 1;
    const named = (name: string | null, f: () => unknown): void => {
      try {
        f();
      } catch (e) {
        if (!several) throw e;
        throw new Error(`${name ?? '(default)'}: ${(e as Error).message}`);
      }
    };
    if (o.target !== null) named(null, () => parseAddress(o.target as string));
    for (const r of o.routes) named(r.name, () => parseAddress(r.target));
    for (const l of o.listen) {
      const { name, value } = splitRouteArg(l);
      if (name !== null) checkRouteName(name, `--listen=${l}`);
      parseAddress(value, true);
    }
    // Everything parses: with --listen= it would bind and run, which this test does not want.
    if (parsed.options.listen.length > 0) return null;
    return { exit: 1, message: "Didn't get any sockets passed in." };
  } catch (e) {
    return { exit: 1, message: (e as Error).message };
  }
}

/** How the one line shows a message: control characters C-escaped, so that it stays one line. */
function oneLine(message: string): string {
  return message.replace(/[\x00-\x1f\x7f]/g, (c) => ({ '\n': '\\n', '\t': '\\t', '\r': '\\r' })[c] ?? `\\x${c.charCodeAt(0).toString(16).padStart(2, '0')}`);
}

async function inParallel<T>(items: T[], limit: number, fn: (item: T) => Promise<void>): Promise<void> {
  let next = 0;
  const worker = async (): Promise<void> => {
    while (next < items.length) await fn(items[next++] as T);
  };
  await Promise.all(Array.from({ length: limit }, worker));
}

const CLI_RUNS = STRESS ? 200 : 60;

test(`CLI: ${CLI_RUNS} generated command lines: exit 1 with one line (or 0 for help/version), never a stack trace`, { timeout: 120_000 }, async () => {
  // Sampled (not fc.assert) so that the spawns run concurrently; a failure names the argv.
  const cases = fc
    .sample(argvArb, { numRuns: CLI_RUNS * 4, ...(seed === undefined ? {} : { seed }) })
    .map((argv) => ({ argv, want: expectedFailure(argv) }))
    .filter((c): c is { argv: string[]; want: { exit: 0 | 1; message: string } } => c.want !== null)
    // Mostly failures, a few help/version runs.
    .filter((c, i) => c.want.exit === 1 || i % 10 === 0)
    .slice(0, CLI_RUNS);
  assert.ok(cases.length >= CLI_RUNS / 2, 'the generator produced too few runnable cases');
  let withControl = 0;
  await inParallel(cases, 8, async ({ argv, want }) => {
    const r = await runCli(argv, {});
    const what = `argv ${JSON.stringify(argv)}`;
    if (want.exit === 0) {
      assert.equal(r.code, 0, `${what}: ${r.stderr}`);
      assert.equal(r.stderr, '', what);
      return;
    }
    assertOneLineFailure(r, what);
    if (/[\x00-\x1f\x7f]/.test(want.message)) withControl++;
    assert.equal(r.stderr, `${oneLine(want.message)}\n`, what);
  });
  // Newlines and other control characters in arguments must not break the one-line rule.
  const nl = await runCli(['--connections-max=1\n2', 'x'], {});
  assertOneLineFailure(nl, 'newline in an option value');
  assert.equal(nl.stderr, 'Failed to parse --connections-max= argument: 1\\n2\n');
  const nl2 = await runCli(['foo\nbar:0'], {});
  assertOneLineFailure(nl2, 'newline in the target');
  assert.equal(nl2.stderr, "Invalid address 'foo\\nbar:0': port 0 is out of range (1-65535).\n");
  console.log(`# CLI argv: ${cases.length} runs, ${withControl} with control characters in the message`);
});

test(`CLI: ${CLI_RUNS} generated LISTEN_* environments (no sockets passed): exit 1 with one line`, { timeout: 120_000 }, async () => {
  const envArb = fc.record({
    self: fc.boolean(),
    prefix: fc.constantFrom('', ' ', '+', '0', '\t', 'x', '-'),
    suffix: fc.constantFrom('', ' ', '0', 'x', '\n'),
    pid: fc.oneof(numberish, anyText, fc.constantFrom('1', String(process.pid), '0', '-1', '')),
    fds: fc.option(fc.oneof(numberish, anyText, fc.constantFrom('0', '1', '2', '1000', '-1', '2147483644', '99999999999999999999')), { nil: undefined }),
    names: fc.option(anyText, { nil: undefined }),
    target: fc.constantFrom('127.0.0.1:9', '/run/x.sock', 'localhost:9'),
  });
  const cases = fc.sample(envArb, { numRuns: CLI_RUNS, ...(seed === undefined ? {} : { seed }) });
  await inParallel(cases, 8, async (c) => {
    const env: Record<string, string> = {};
    if (!c.self) env.LISTEN_PID = c.pid;
    if (c.fds !== undefined) env.LISTEN_FDS = c.fds;
    if (c.names !== undefined) env.LISTEN_FDNAMES = c.names;
    const r = await runCli([c.target], env, [], c.self ? { prefix: c.prefix, suffix: c.suffix } : undefined);
    assertOneLineFailure(r, `env ${JSON.stringify(c)}`);
    assert.match(r.stderr, /^(Didn't get any sockets passed in\.|Failed to receive sockets from parent\.|Passed in socket is not a stream socket\.)\n$/, JSON.stringify(c));
  });
});

/** Collect a child's output; SIGKILL it after 10 s (every run here must end by itself). */
async function finish(child: ReturnType<typeof spawn>): Promise<CliRun> {
  let stdout = '';
  let stderr = '';
  child.stdout?.setEncoding('utf8').on('data', (d: string) => (stdout += d));
  child.stderr?.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
  const [code, signal] = (await once(child, 'close')) as [number | null, string | null];
  clearTimeout(timer);
  return { code, signal, stdout, stderr };
}

/** Python puts a socket of the given kind at fd 3 and execs the CLI with LISTEN_PID = its own pid. */
const SOCKET_AT_FD3 = `
import os, socket, sys
kind = sys.argv[1]
if kind == 'udp':
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', 0))
elif kind == 'unix-dgram':
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
elif kind == 'unix-seqpacket':
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET); s.bind('\\0spd-prop-%d' % os.getpid()); s.listen(1)
elif kind == 'connected-tcp':
    l = socket.socket(); l.bind(('127.0.0.1', 0)); l.listen(1)
    s = socket.create_connection(l.getsockname())
elif kind == 'pipe':
    r, w = os.pipe(); s = None; os.dup2(r, 3)
if s is not None:
    os.dup2(s.fileno(), 3)
os.environ['LISTEN_PID'] = str(os.getpid())
os.environ['LISTEN_FDS'] = '1'
os.execv(sys.argv[2], sys.argv[3:])
`;

test('CLI: a non-socket, or the wrong kind of socket, at fd 3: exit 1, one line', { timeout: 60_000 }, async () => {
  const dir = mkdtempSync(join(tmpdir(), 'spd-prop-'));
  const opened: number[] = [];
  try {
    const file = join(dir, 'regular');
    writeFileSync(file, 'not a socket');
    const files: Array<[string, number]> = [
      ['/dev/null', openSync('/dev/null', 'r')],
      ['a regular file', openSync(file, 'r')],
      ['a directory', openSync(dir, 'r')],
    ];
    for (const [, fd] of files) opened.push(fd);
    for (const [what, fd] of files) {
      const r = await runCli(['127.0.0.1:9'], { LISTEN_FDS: '1' }, [fd], { prefix: '', suffix: '' });
      assertOneLineFailure(r, what);
      assert.equal(r.stderr, 'Passed in socket is not a stream socket.\n', what);
    }
    await Promise.all(
      // ('udp' is served since issue 14: test/datagram.test.ts.)
      ['pipe', 'unix-dgram', 'unix-seqpacket', 'connected-tcp'].map(async (kind) => {
        const child = spawn('python3', ['-c', SOCKET_AT_FD3, kind, process.execPath, process.execPath, OURS, '127.0.0.1:9'], {
          env: { PATH: process.env.PATH ?? '/usr/bin:/bin' },
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        const r = await finish(child);
        assertOneLineFailure(r, kind);
        assert.equal(r.stderr, 'Passed in socket is not a stream socket.\n', kind);
      }),
    );
  } finally {
    for (const fd of opened) closeSync(fd);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('CLI: LISTEN_FDS=1000 with one socket, and LISTEN_FDS with the PID of another process', { timeout: 60_000 }, async () => {
  const listener = await makeListener({ kind: 'tcp' });
  try {
    const fd = fdOf(listener.server);
    const many = await runCli(['127.0.0.1:9'], { LISTEN_FDS: '1000' }, [fd], { prefix: '', suffix: '' });
    assertOneLineFailure(many, 'LISTEN_FDS=1000');
    assert.match(many.stderr, /^(Failed to receive sockets from parent\.|Passed in socket is not a stream socket\.)\n$/);
    for (const other of ['1', String(process.pid), String(2 ** 22 + 1)]) {
      const r = await runCli(['127.0.0.1:9'], { LISTEN_FDS: '1', LISTEN_PID: other }, [fd]);
      assertOneLineFailure(r, `LISTEN_PID=${other}`);
      assert.equal(r.stderr, "Didn't get any sockets passed in.\n", `LISTEN_PID=${other}`);
    }
  } finally {
    listener.server.close();
  }
});
