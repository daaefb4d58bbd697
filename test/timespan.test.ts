/**
 * parseSec / formatTimespan against the real thing: every input is also fed to `systemd-analyze timespan`
 * (v252 here), which runs systemd's parse_time(..., USEC_PER_SEC) and format_timespan(..., 1), and prints
 * either the µs value and the "Human" form, or strerror() of the failure (so EINVAL and ERANGE are
 * distinguishable). The table also carries literal expectations so it means something without the oracle.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFile, spawnSync } from 'node:child_process';
import { parseSec, formatTimespan, TimespanError, USEC_INFINITY } from '../src/config/timespan.ts';
import { prng } from './helpers.ts';

const EINVAL = 22;
const ERANGE = 34;

type Outcome = { usec: bigint; human: string } | { errno: number };

const hasOracle = spawnSync('systemd-analyze', ['--version'], { stdio: 'ignore', timeout: 10_000 }).status === 0;
const oracleSkip = hasOracle ? false : 'systemd-analyze is not installed (literal expectations still checked)';

function ours(input: string): Outcome {
  try {
    const usec = parseSec(input);
    return { usec, human: formatTimespan(usec) };
  } catch (err) {
    if (err instanceof TimespanError) return { errno: err.errno };
    throw err;
  }
}

function runAnalyze(inputs: readonly string[]): Promise<{ failed: boolean; stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(
      'systemd-analyze',
      ['--no-pager', 'timespan', '--', ...inputs],
      // LC_ALL=C: English strerror() text, which is how we tell EINVAL from ERANGE.
      { encoding: 'utf8', timeout: 10_000, env: { ...process.env, LC_ALL: 'C', SYSTEMD_COLORS: '0' } },
      (err, stdout, stderr) => {
        if (err && typeof err.code !== 'number') reject(err); // spawn failure or timeout, not an exit status
        else resolve({ failed: err !== null, stdout, stderr });
      },
    );
  });
}

/**
 * `systemd-analyze timespan A B C` prints a block per input and stops at the first one that fails, so run
 * the batch, record the failure, and restart after it: one process per failure plus one.
 */
async function oracle(inputs: readonly string[]): Promise<Outcome[]> {
  const out: Outcome[] = [];
  while (out.length < inputs.length) {
    const rest = inputs.slice(out.length);
    const { failed, stdout, stderr } = await runAnalyze(rest);
    // The µs label is "us" in the C locale and "μs" in UTF-8 ones.
    const usecs = [...stdout.matchAll(/^ {6}(?:us|μs): (\d+)$/gm)].map((m) => BigInt(m[1] ?? ''));
    const humans = [...stdout.matchAll(/^ {3}Human: (.*)$/gm)].map((m) => m[1] ?? '');
    assert.equal(usecs.length, humans.length, `unparseable oracle output: ${stdout}`);
    assert.ok(usecs.length <= rest.length, `more results than inputs: ${stdout}`);
    usecs.forEach((usec, i) => out.push({ usec, human: humans[i] ?? '' }));
    if (!failed) {
      assert.equal(usecs.length, rest.length, `oracle succeeded but printed too few results: ${stdout}`);
      break;
    }
    const reason = /: (Invalid argument|Numerical result out of range)$/m.exec(stderr);
    assert.ok(reason, `unexpected oracle failure for ${JSON.stringify(rest[usecs.length])}: ${stderr}`);
    out.push({ errno: reason[1] === 'Invalid argument' ? EINVAL : ERANGE });
  }
  return out;
}

/** Compares against the oracle in a few parallel batches; returns a readable list of mismatches. */
async function mismatches(inputs: readonly string[], batches: number): Promise<string[]> {
  // Each failing input costs one systemd-analyze process, so ask about each distinct input once.
  const unique = [...new Set(inputs)];
  const size = Math.ceil(unique.length / batches);
  const chunks: string[][] = [];
  for (let i = 0; i < unique.length; i += size) chunks.push(unique.slice(i, i + size));
  const answers = (await Promise.all(chunks.map(oracle))).flat();
  const byInput = new Map(unique.map((input, i) => [input, answers[i]] as const));
  const results = inputs.map((input) => byInput.get(input));
  const show = (o: Outcome | undefined): string =>
    o === undefined ? 'missing' : 'errno' in o ? `errno ${o.errno}` : `${o.usec} (${o.human})`;
  const bad: string[] = [];
  inputs.forEach((input, i) => {
    const mine = ours(input);
    const theirs = results[i];
    if (!theirs || show(mine) !== show(theirs)) {
      bad.push(`${JSON.stringify(input)}: ours ${show(mine)}, systemd ${show(theirs)}`);
    }
  });
  return bad;
}

const INF = USEC_INFINITY;
const MIN = 60_000_000n;
const HOUR = 3_600_000_000n;
const YEAR = 31_557_600_000_000n;

/** [input, expected µs or errno name]. */
const TABLE: ReadonlyArray<readonly [string, bigint | 'EINVAL' | 'ERANGE']> = [
  // bare numbers are seconds
  ['0', 0n],
  ['5', 5_000_000n],
  ['00012', 12_000_000n],
  ['1.5', 1_500_000n],
  ['+5s', 5_000_000n],
  ['+0', 0n],
  // several components, with and without spaces
  ['5min 30s', 5n * MIN + 30_000_000n],
  ['2h30min', 2n * HOUR + 30n * MIN],
  ['5minutes30seconds', 330_000_000n],
  ['1s5ms', 1_005_000n],
  ['3 5s', 8_000_000n],
  ['5 min30', 5n * MIN + 30_000_000n],
  ['1 M', 2_629_800_000_000n],
  ['5 5 5 5', 20_000_000n],
  ['1y1y', 63_115_200_000_000n],
  ['1msec1usec', 1_001n],
  ['0000000000000000000000000000001s', 1_000_000n],
  // decimals
  ['.5s', 500_000n],
  ['1.5h', 5_400_000_000n],
  ['0.0000001s', 0n],
  ['0.000001s', 1n],
  ['1.999999999s', 1_999_999n],
  ['0.5us', 0n],
  ['1.5M', 3_944_700_000_000n],
  ['12.34s.56', 12_900_000n],
  ['12.34 .56', 12_900_000n],
  ['5.s', 'EINVAL'],
  ['5.', 'EINVAL'],
  ['12.34.56', 'EINVAL'],
  ['3. 1', 'EINVAL'],
  ['0.-0', 'EINVAL'],
  ['3.+1', 'EINVAL'],
  ['+.5', 'EINVAL'],
  ['1 .5', 1_500_000n],
  ['.', 'EINVAL'],
  // every unit spelling
  ['1seconds', 1_000_000n],
  ['1second', 1_000_000n],
  ['1sec', 1_000_000n],
  ['1s', 1_000_000n],
  ['1minutes', MIN],
  ['1minute', MIN],
  ['1min', MIN],
  ['1m', MIN],
  ['1months', 2_629_800_000_000n],
  ['1month', 2_629_800_000_000n],
  ['1M', 2_629_800_000_000n],
  ['1msec', 1_000n],
  ['1ms', 1_000n],
  ['1hours', HOUR],
  ['1hour', HOUR],
  ['1hr', HOUR],
  ['1h', HOUR],
  ['1days', 86_400_000_000n],
  ['1day', 86_400_000_000n],
  ['1d', 86_400_000_000n],
  ['1weeks', 604_800_000_000n],
  ['1week', 604_800_000_000n],
  ['1w', 604_800_000_000n],
  ['1years', 31_557_600_000_000n],
  ['1year', 31_557_600_000_000n],
  ['1y', 31_557_600_000_000n],
  ['1usec', 1n],
  ['1us', 1n],
  ['1\u00b5s', 1n], // MICRO SIGN
  ['1\u03bcs', 1n], // GREEK SMALL LETTER MU
  // wrong units
  ['5S', 'EINVAL'],
  ['5ns', 'EINVAL'],
  ['5nsec', 'EINVAL'],
  ['5mins', 'EINVAL'],
  ['5secs', 'EINVAL'],
  ['5 x', 'EINVAL'],
  ['s', 'EINVAL'],
  ['1e3s', 'EINVAL'],
  ['0x10s', 'EINVAL'],
  ['1,5s', 'EINVAL'],
  ['5s,', 'EINVAL'],
  ['++5', 'EINVAL'],
  ['+ 5', 'EINVAL'],
  // whitespace: systemd skips " \t\n\r"; strtoll() additionally skips \v and \f before a number
  [' 5s ', 5_000_000n],
  ['\t5\ts\n', 5_000_000n],
  ['\r\n5s', 5_000_000n],
  ['\f5', 5_000_000n],
  ['\v-0', 0n],
  ['\v-1', 'ERANGE'],
  ['5\v', 'EINVAL'],
  ['5 \vs', 'EINVAL'],
  // empty
  ['', 'EINVAL'],
  ['   ', 'EINVAL'],
  ['\t', 'EINVAL'],
  // infinity
  ['infinity', INF],
  ['  infinity\t\n', INF],
  ['infinity ', INF],
  ['Infinity', 'EINVAL'],
  ['INFINITY', 'EINVAL'],
  ['inf', 'EINVAL'],
  ['infinityx', 'EINVAL'],
  ['infinity\v', 'EINVAL'],
  ['infinity 5', 'EINVAL'],
  ['5 infinity', 'EINVAL'],
  // negative
  ['-1', 'ERANGE'],
  ['-0', 'ERANGE'],
  ['-', 'ERANGE'],
  [' -5s', 'ERANGE'],
  ['1h-5m', 'ERANGE'],
  ['5 -3', 'ERANGE'],
  ['5-3', 'EINVAL'],
  // near 2^64
  ['9223372036854775807us', 9_223_372_036_854_775_807n],
  ['9223372036854775808us', 'ERANGE'],
  ['99999999999999999999', 'ERANGE'],
  ['9223372036854775807us 9223372036854775807us', INF - 1n],
  ['9223372036854775807us 9223372036854775807us 1us', 'ERANGE'],
  ['9223372036854775807us 9223372036854775807us 0.9us', INF - 1n],
  ['18446744073708s', 18_446_744_073_708_000_000n],
  ['18446744073709s', 'ERANGE'],
  ['18446744073708s 1.551614s', INF - 1n],
  ['18446744073708s 1.551615s', 'ERANGE'],
  ['584541y', 18_446_711_061_600_000_000n],
  ['584542y', 'ERANGE'],
  ['99999999999999.s', 'ERANGE'],
];

test('table: literal expectations', () => {
  assert.ok(TABLE.length >= 60);
  for (const [input, expected] of TABLE) {
    const got = ours(input);
    if (typeof expected === 'bigint') {
      assert.deepEqual(got, { usec: expected, human: formatTimespan(expected) }, JSON.stringify(input));
    } else {
      assert.deepEqual(got, { errno: expected === 'EINVAL' ? EINVAL : ERANGE }, JSON.stringify(input));
    }
  }
});

test('table: same result, errno and Human form as systemd-analyze timespan', { skip: oracleSkip }, async () => {
  assert.deepEqual(await mismatches(TABLE.map(([input]) => input), 2), []);
});

test('errno: EINVAL for syntax, ERANGE for negative numbers and overflow (as in parse_time())', () => {
  const expectErrno = (input: string, errno: number): void => {
    assert.throws(
      () => parseSec(input),
      (err: unknown) => err instanceof TimespanError && err instanceof Error && err.errno === errno,
      `${JSON.stringify(input)} should fail with errno ${errno}`,
    );
  };
  // `if (!something) return -EINVAL;`: nothing but whitespace.
  expectErrno('', EINVAL);
  expectErrno(' \t', EINVAL);
  // "infinity" followed by anything but WHITESPACE.
  expectErrno('infinity s', EINVAL);
  // `else if (e == p) return -EINVAL;`: no number where one must start.
  expectErrno('s', EINVAL);
  expectErrno('5s x', EINVAL);
  // `if (s == p && *s != '\0') return -EINVAL;`: junk glued to a number.
  expectErrno('1e3', EINVAL);
  expectErrno('1.2.3', EINVAL);
  // `if (b == e + 1) return -EINVAL;`: a dot without digits.
  expectErrno('5.s', EINVAL);
  // `if (*p == '-') return -ERANGE;` and `if (l < 0) return -ERANGE;`
  expectErrno('-0', ERANGE);
  expectErrno('1s -1s', ERANGE);
  expectErrno('\f-7', ERANGE);
  // strtoll() overflow: `if (errno > 0) return -errno;`
  expectErrno('9223372036854775808', ERANGE);
  // `(usec_t) l >= USEC_INFINITY / multiplier` rejects 7014504M although 7014504 months fit in 64 bits.
  expectErrno('7014504M', ERANGE);
  assert.equal(parseSec('7014503M'), 7014503n * 2_629_800_000_000n);
  // `k >= USEC_INFINITY - usec`: the sum may reach at most USEC_INFINITY - 1.
  expectErrno('9223372036854775807us 9223372036854775808us', ERANGE);
  expectErrno('18446744073708s 0.551615s 1s', ERANGE);
  // the range checks come before the "dot without digits" check
  expectErrno('99999999999999.s', ERANGE);
  // The message names the input, like systemd-analyze's.
  assert.throws(() => parseSec('5S'), { message: "Failed to parse time span '5S': Invalid argument" });
  assert.throws(() => parseSec('-1'), { message: "Failed to parse time span '-1': Numerical result out of range" });
});


const UNITS = [
  'seconds', 'second', 'sec', 's', 'minutes', 'minute', 'min', 'm', 'months', 'month', 'M', 'msec', 'ms',
  'hours', 'hour', 'hr', 'h', 'days', 'day', 'd', 'weeks', 'week', 'w', 'years', 'year', 'y', 'usec', 'us',
  '\u00b5s', '\u03bcs',
];
const BAD_UNITS = ['S', 'ns', 'nsec', 'mins', 'Min', 'hrs', 'e3', 'x', ',', 'secs', 'mo', '\u00b5', '\u03bc', 'Y'];
const JUNK = [',', '.', '-', '+', 'x', '\v', '\f', '\u00e9', ' ', '\t', '0x', 'infinity'];
// Values at or next to USEC_INFINITY / multiplier for the units, and to strtoll()'s LLONG_MAX.
const EDGE_NUMBERS = [
  '9223372036854775807', '9223372036854775808', '18446744073709', '18446744073708', '584541', '584542',
  '307445734561', '307445734560', '213503982', '213503981', '30500568', '30500567', '7014504', '7014503',
  '5124095576', '18446744073709551',
];
const WS = [' ', '\t', '\n', '\r', '  '];

function randomSpan(rnd: () => number): string {
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)] as T;
  const digits = (n: number): string => Array.from({ length: n }, () => String(Math.floor(rnd() * 10))).join('');
  if (rnd() < 0.04) return pick(['infinity', ' infinity ', 'infinity5', 'Infinity', '\tinfinity\n', 'infinity\f']);
  let s = rnd() < 0.15 ? pick(WS) : '';
  const components = rnd() < 0.6 ? 1 : rnd() < 0.75 ? 2 : 3;
  for (let i = 0; i < components; i++) {
    const r = rnd();
    if (r < 0.05) s += '+';
    else if (r < 0.065) s += '-';
    else if (r < 0.08) s += pick(['\v', '\f', '\v-', '\f+']);
    const n = rnd();
    if (n < 0.7) s += digits(1 + Math.floor(rnd() * 3));
    else if (n < 0.78) s += pick(EDGE_NUMBERS);
    else if (n < 0.88) s += '0';
    else if (n < 0.93) s += digits(15 + Math.floor(rnd() * 7));
    // else: no integer part
    if (rnd() < 0.3) s += '.' + digits(rnd() < 0.1 ? 0 : 1 + Math.floor(rnd() * 8));
    if (rnd() < 0.25) s += pick(WS);
    const u = rnd();
    if (u < 0.78) s += pick(UNITS);
    else if (u < 0.83) s += pick(BAD_UNITS);
    if (rnd() < 0.04) s += pick(JUNK);
    if (i + 1 < components) s += pick(['', '', ' ', '  ', '\t']);
  }
  if (rnd() < 0.15) s += pick(WS);
  return s;
}

test('300 seeded random spans agree with systemd-analyze timespan', { skip: oracleSkip }, async () => {
  const rnd = prng(0x5eed_2520);
  const inputs = Array.from({ length: 300 }, () => randomSpan(rnd));
  // Make sure the generator exercises all three outcomes, so agreement means something.
  const outcomes = inputs.map(ours);
  const count = (pred: (o: Outcome) => boolean): number => outcomes.filter(pred).length;
  assert.ok(count((o) => 'usec' in o) >= 60, 'too few valid spans generated');
  assert.ok(count((o) => 'errno' in o && o.errno === EINVAL) >= 30, 'too few EINVAL spans generated');
  assert.ok(count((o) => 'errno' in o && o.errno === ERANGE) >= 20, 'too few ERANGE spans generated');
  assert.deepEqual(await mismatches(inputs, 3), []);
});

test('formatTimespan: systemd format_timespan(accuracy 1) forms that round-trip through parseSec', () => {
  const cases: ReadonlyArray<readonly [bigint, string]> = [
    [0n, '0'],
    [1n, '1us'],
    [500_000n, '500ms'],
    [1_500n, '1.500ms'],
    [1_500_000n, '1.500000s'],
    [320_000_000n, '5min 20s'],
    [61_500_000n, '1min 1.500000s'],
    [5_400_000_000n, '1h 30min'],
    [2_629_800_000_000n, '1month'],
    [31_557_600_000_000n + 604_800_000_000n + 86_400_000_000n, '1y 1w 1d'],
    [584541n * YEAR + 11n * 2_629_800_000_000n, '584541y 11month'],
    [INF, 'infinity'],
  ];
  for (const [usec, text] of cases) {
    assert.equal(formatTimespan(usec), text);
    assert.equal(parseSec(text), usec, `round trip of ${text}`);
  }
  // systemd's own quirk: from 584542 years on, "Ny" is rejected (l >= USEC_INFINITY / multiplier), so the
  // largest spans format fine but do not parse back -- in systemd just the same.
  assert.equal(formatTimespan(INF - 1n), '584542y 2w 2d 20h 1min 49.551614s');
  assert.throws(() => parseSec(formatTimespan(INF - 1n)), { errno: ERANGE });

  const rnd = prng(42);
  for (let i = 0; i < 300; i++) {
    const bits = BigInt(Math.floor(rnd() * 2 ** 32)) * BigInt(Math.floor(rnd() * 2 ** 32));
    const usec = (bits >> BigInt(Math.floor(rnd() * 64))) % (584542n * YEAR);
    assert.equal(parseSec(formatTimespan(usec)), usec, `round trip of ${usec}`);
  }
});
