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

/** systemd's log_level_from_string(): a name, or a number 0..7. Returns -1 if invalid. */
export function parseLogLevel(text: string): number {
  const byName = LEVEL_NAMES.indexOf(text);
  if (byName >= 0) return byName;
  if (/^[0-9]+$/.test(text)) {
    const n = Number(text);
    if (n <= LOG_DEBUG) return n;
  }
  return -1;
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
  let maxLevel = LOG_INFO;
  const wanted = env.SYSTEMD_LOG_LEVEL;
  let bad = false;
  if (wanted !== undefined && wanted !== '') {
    const parsed = parseLogLevel(wanted);
    if (parsed >= 0) maxLevel = parsed;
    else bad = true;
  }
  const logger: StderrLogger = {
    maxLevel,
    prefix: stderrIsJournal(env.JOURNAL_STREAM),
    log: stderrLog,
  };
  // systemd ignores an unparsable level after saying so (at debug level); we say it at warning
  // level because a typo in a unit file's Environment= should be visible.
  if (bad) logger.log(LOG_WARNING, `Failed to parse log level '${wanted}', ignoring.`);
  return logger;
}
