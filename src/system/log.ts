/**
 * Logging the systemd way: one line per event on stderr, filtered by
 * SYSTEMD_LOG_LEVEL (names or numbers, as systemd accepts them; default info).
 * When stderr is the journal (JOURNAL_STREAM names stderr's device:inode) each
 * line carries the sd-daemon(3) "<N>" priority prefix, so `journalctl -p` works.
 *
 * Writes are synchronous (fs.writeSync): a log line must not be lost when we exit
 * right after it, and lines are rare (nothing is logged per successful connection
 * at the default level).
 */
import { fstatSync, writeSync } from 'node:fs';

export const LOG_EMERG = 0;
export const LOG_ALERT = 1;
export const LOG_CRIT = 2;
export const LOG_ERR = 3;
export const LOG_WARNING = 4;
export const LOG_NOTICE = 5;
export const LOG_INFO = 6;
export const LOG_DEBUG = 7;

const LEVEL_NAMES = ['emerg', 'alert', 'crit', 'err', 'warning', 'notice', 'info', 'debug'];

export interface Logger {
  /** Maximum level that is printed (LOG_ERR .. LOG_DEBUG). */
  readonly maxLevel: number;
  log(level: number, message: string): void;
}

/**
 * systemd's log_level_from_string(): a name, or a number 0..7 as safe_atou() reads it
 * (leading white space and "+" allowed, base from the prefix: "0x7", "07"). Names are
 * case-sensitive, as in systemd ("err", not "error"). Returns -1 if invalid.
 */
export function parseLogLevel(text: string): number {
  const byName = LEVEL_NAMES.indexOf(text);
  if (byName >= 0) return byName;
  const m = /^[ \t\n\v\f\r]*\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))$/.exec(text);
  if (m === null) return -1;
  const n = m[1] !== undefined ? parseInt(m[1], 16) : m[2] !== undefined ? parseInt(m[2], 8) : Number(m[3]);
  return n <= LOG_DEBUG ? n : -1;
}

/** True when fd 2 is the journal stream systemd connected us to. */
export function stderrIsJournal(journalStream: string | undefined): boolean {
  if (!journalStream) return false;
  const m = /^([0-9]+):([0-9]+)$/.exec(journalStream);
  if (m === null) return false;
  try {
    const st = fstatSync(2, { bigint: true });
    return st.dev === BigInt(m[1] as string) && st.ino === BigInt(m[2] as string);
  } catch {
    return false;
  }
}

interface StderrLogger extends Logger {
  prefix: boolean;
}

function stderrLog(this: StderrLogger, level: number, message: string): void {
  if (level > this.maxLevel) return;
  const line = this.prefix ? `<${level}>${message}\n` : `${message}\n`;
  try {
    writeSync(2, line);
  } catch {
    // stderr gone (EPIPE, closed): nothing sensible left to report to.
  }
}

export function createLogger(env: Record<string, string | undefined>): Logger {
  const wanted = env.SYSTEMD_LOG_LEVEL;
  // As log_parse_environment(): set but unparsable (even empty) is reported and ignored.
  const parsed = wanted === undefined ? LOG_INFO : parseLogLevel(wanted);
  const bad = parsed < 0;
  const logger: StderrLogger = {
    maxLevel: bad ? LOG_INFO : parsed,
    prefix: stderrIsJournal(env.JOURNAL_STREAM),
    log: stderrLog,
  };
  // systemd's words and level (a warning), so a typo in Environment= is visible.
  if (bad) logger.log(LOG_WARNING, `Failed to parse log level '${wanted}'. Ignoring.`);
  return logger;
}
