/**
 * systemd time spans: a faithful port of `parse_sec()` (= `parse_time(t, &usec, USEC_PER_SEC)`) and of
 * `format_timespan(buf, l, t, 1)` from systemd's src/basic/time-util.c (v252). `--exit-idle-time=` must
 * accept and reject exactly what the reference systemd-socket-proxyd does, so this follows the C code
 * step by step (including its quirks, which are noted where they occur) instead of a tidier grammar.
 * The differential tests in test/timespan.test.ts compare it with `systemd-analyze timespan`.
 *
 * All arithmetic is in bigint so that the usec_t (uint64) overflow checks behave as in C.
 */

import { EINVAL, ERANGE } from '../errors.ts';

/** usec_t's "infinity": UINT64_MAX. Finite spans are at most USEC_INFINITY - 1. */
export const USEC_INFINITY: bigint = 2n ** 64n - 1n;

const USEC_PER_MSEC = 1_000n;
const USEC_PER_SEC = 1_000_000n;
const USEC_PER_MINUTE = 60n * USEC_PER_SEC;
const USEC_PER_HOUR = 60n * USEC_PER_MINUTE;
const USEC_PER_DAY = 24n * USEC_PER_HOUR;
const USEC_PER_WEEK = 7n * USEC_PER_DAY;
const USEC_PER_MONTH = 2_629_800n * USEC_PER_SEC; // 30.44 days
const USEC_PER_YEAR = 31_557_600n * USEC_PER_SEC; // 365.25 days

const LLONG_MAX = 2n ** 63n - 1n;
const LLONG_MIN = -(2n ** 63n);

/** systemd's WHITESPACE. Note: no \v or \f, although strtoll() skips those (see strtoll below). */
const WHITESPACE = ' \t\n\r';
/** isspace() in the C locale: what strtoll() skips before the number. */
const C_SPACE = ' \t\n\v\f\r';

/**
 * extract_multiplier()'s table. Order matters: the first suffix that is a prefix of the text wins, so
 * "ms" is tried before "m", and "5mins" parses as "5min" followed by a stray "s" (which is then an error).
 */
const MULTIPLIERS: ReadonlyArray<readonly [suffix: string, usec: bigint]> = [
  ['seconds', USEC_PER_SEC],
  ['second', USEC_PER_SEC],
  ['sec', USEC_PER_SEC],
  ['s', USEC_PER_SEC],
  ['minutes', USEC_PER_MINUTE],
  ['minute', USEC_PER_MINUTE],
  ['min', USEC_PER_MINUTE],
  ['months', USEC_PER_MONTH],
  ['month', USEC_PER_MONTH],
  ['M', USEC_PER_MONTH],
  ['msec', USEC_PER_MSEC],
  ['ms', USEC_PER_MSEC],
  ['m', USEC_PER_MINUTE],
  ['hours', USEC_PER_HOUR],
  ['hour', USEC_PER_HOUR],
  ['hr', USEC_PER_HOUR],
  ['h', USEC_PER_HOUR],
  ['days', USEC_PER_DAY],
  ['day', USEC_PER_DAY],
  ['d', USEC_PER_DAY],
  ['weeks', USEC_PER_WEEK],
  ['week', USEC_PER_WEEK],
  ['w', USEC_PER_WEEK],
  ['years', USEC_PER_YEAR],
  ['year', USEC_PER_YEAR],
  ['y', USEC_PER_YEAR],
  ['usec', 1n],
  ['us', 1n],
  ['\u03bcs', 1n], // GREEK SMALL LETTER MU
  ['\u00b5s', 1n], // MICRO SIGN
];

/** Thrown by parseSec. `errno` is what systemd's parse_sec() would return (negated): EINVAL or ERANGE. */
export class TimespanError extends Error {
  readonly errno: number;
  constructor(text: string, errno: number) {
    super(`Failed to parse time span '${text}': ${errno === ERANGE ? 'Numerical result out of range' : 'Invalid argument'}`);
    this.name = 'TimespanError';
    this.errno = errno;
  }
}

function skipChars(t: string, i: number, set: string): number {
  while (i < t.length && set.includes(t.charAt(i))) i++;
  return i;
}

function isDigit(c: string): boolean {
  return c >= '0' && c <= '9' && c.length === 1;
}

function skipDigits(t: string, i: number): number {
  while (i < t.length && isDigit(t.charAt(i))) i++;
  return i;
}

/**
 * glibc strtoll(p, &end, 10): optional C-locale whitespace, optional sign, decimal digits. With no
 * digits, `end` is the start position and the value 0 (that is how ".5" reaches the fraction code).
 * `overflow` stands for errno == ERANGE.
 */
function strtoll(t: string, start: number): { value: bigint; end: number; overflow: boolean } {
  let i = skipChars(t, start, C_SPACE);
  let negative = false;
  const sign = t.charAt(i);
  if (sign === '+' || sign === '-') {
    negative = sign === '-';
    i++;
  }
  const digitsEnd = skipDigits(t, i);
  if (digitsEnd === i) return { value: 0n, end: start, overflow: false };
  const magnitude = BigInt(t.slice(i, digitsEnd));
  const value = negative ? -magnitude : magnitude;
  return { value, end: digitsEnd, overflow: value > LLONG_MAX || value < LLONG_MIN };
}

/**
 * Parses a systemd time span ("5min 30s", "1.5h", "500ms", "10" = seconds, "infinity") into
 * microseconds. Throws TimespanError with errno 22 (EINVAL) for syntax errors and 34 (ERANGE) for
 * negative numbers and overflow, exactly where systemd's parse_sec() returns those.
 */
export function parseSec(text: string): bigint {
  // parse_sec() sees a C string: anything after a NUL does not exist for it.
  const nul = text.indexOf('\0');
  const t = nul === -1 ? text : text.slice(0, nul);
  const fail = (errno: number): TimespanError => new TimespanError(text, errno);

  let p = skipChars(t, 0, WHITESPACE);
  if (t.startsWith('infinity', p)) {
    if (skipChars(t, p + 'infinity'.length, WHITESPACE) !== t.length) throw fail(EINVAL);
    return USEC_INFINITY;
  }

  let usec = 0n;
  for (let something = false; ; ) {
    p = skipChars(t, p, WHITESPACE);
    if (p === t.length) {
      if (!something) throw fail(EINVAL);
      break;
    }

    // Don't allow "-0". (A "-" hidden behind \v or \f gets past this and strtoll() parses it; "-0"
    // is then accepted as 0 and anything else is negative and rejected below, as in systemd.)
    if (t.charAt(p) === '-') throw fail(ERANGE);

    const { value: l, end: e, overflow } = strtoll(t, p);
    if (overflow) throw fail(ERANGE);
    if (l < 0n) throw fail(ERANGE);

    const hasDot = t.charAt(e) === '.';
    if (hasDot) p = skipDigits(t, e + 1);
    else if (e === p) throw fail(EINVAL);
    else p = e;

    // Whitespace is allowed between a number and its unit; without a unit the default (seconds) applies.
    let multiplier = USEC_PER_SEC;
    const unitStart = skipChars(t, p, WHITESPACE);
    let s = unitStart;
    for (const [suffix, unit] of MULTIPLIERS) {
      if (t.startsWith(suffix, unitStart)) {
        multiplier = unit;
        s = unitStart + suffix.length;
        break;
      }
    }
    // Don't allow "12.34.56", but accept "12.34 .56" or "12.34s.56".
    if (s === p && s !== t.length) throw fail(EINVAL);
    p = s;

    // Same checks as C: note that l >= USEC_INFINITY / multiplier is rejected even when the product
    // would still fit, and that a finite total can reach at most USEC_INFINITY - 1.
    if (l >= USEC_INFINITY / multiplier) throw fail(ERANGE);
    let k = l * multiplier;
    if (k >= USEC_INFINITY - usec) throw fail(ERANGE);
    usec += k;
    something = true;

    if (hasDot) {
      // Each fractional digit adds digit * (multiplier / 10^n), truncating: "0.0000001s" is 0.
      let m = multiplier / 10n;
      let b = e + 1;
      for (; isDigit(t.charAt(b)); b++, m /= 10n) {
        k = BigInt(t.charCodeAt(b) - 48) * m;
        if (k >= USEC_INFINITY - usec) throw fail(ERANGE);
        usec += k;
      }
      // Don't allow "0.-0", "3.+1", "3. 1", "3.sec" or "3.hoge".
      if (b === e + 1) throw fail(EINVAL);
    }
  }
  return usec;
}

/** format_timespan()'s table (note "month", not "M", so the output stays parseable and unambiguous). */
const FORMAT_UNITS: ReadonlyArray<readonly [suffix: string, usec: bigint]> = [
  ['y', USEC_PER_YEAR],
  ['month', USEC_PER_MONTH],
  ['w', USEC_PER_WEEK],
  ['d', USEC_PER_DAY],
  ['h', USEC_PER_HOUR],
  ['min', USEC_PER_MINUTE],
  ['s', USEC_PER_SEC],
  ['ms', USEC_PER_MSEC],
  ['us', 1n],
];

/**
 * systemd's format_timespan() with accuracy 1 µs (what `systemd-analyze timespan` prints as "Human"):
 * exact, so parseSec(formatTimespan(x)) === x for every span systemd itself parses back (below
 * 584542 years: parse_sec() refuses a count of years at or above USEC_INFINITY / USEC_PER_YEAR).
 * Examples: "5min 20s", "500ms", "1.500000s", "infinity", "0".
 */
export function formatTimespan(usec: bigint): string {
  if (usec === USEC_INFINITY) return 'infinity';
  if (usec <= 0n) return '0';

  const parts: string[] = [];
  let t = usec;
  for (const [suffix, unit] of FORMAT_UNITS) {
    if (t <= 0n) break;
    if (t < unit) continue;
    const a = t / unit;
    const b = t % unit;
    // Below a minute, a remainder is shown as a decimal of the current unit ("1.500000s", "1.500ms").
    if (t < USEC_PER_MINUTE && b > 0n) {
      let decimals = 0;
      for (let cc = unit; cc > 1n; cc /= 10n) decimals++;
      if (decimals > 0) {
        parts.push(`${a}.${b.toString().padStart(decimals, '0')}${suffix}`);
        break;
      }
    }
    parts.push(`${a}${suffix}`);
    t = b;
  }
  return parts.join(' ');
}
