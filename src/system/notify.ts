/**
 * sd_notify(3) from the proxy's own process.
 *
 * Node has no AF_UNIX datagram sockets, so the datagram is sent by a tiny N-API
 * addon of ours (native/sd_notify.c, prebuilt in prebuilds/). It must come from
 * this very pid: systemd's default NotifyAccess=main drops messages from any
 * other process, which rules out spawning systemd-notify.
 */
import { createRequire } from 'node:module';
import { getSystemErrorName } from 'node:util';

interface NotifyAddon {
  /** 0 on success, else a positive errno. */
  send(socketPath: string, message: Buffer | string): number;
}

/** sizeof(sockaddr_un.sun_path); like libsystemd we need room for a NUL. */
const SUN_PATH_MAX = 108;
/** setTimeout() silently fires at once above this (TimeoutOverflowWarning). */
const MAX_TIMER_MS = 2 ** 31 - 1;
const USEC_INFINITY = 2n ** 64n - 1n;
/** Bounds the dedupe memory if a caller somehow produces endless distinct reasons. */
const MAX_REMEMBERED = 64;

// undefined: not tried yet; null: tried and failed (never retried: dlopen
// failures do not heal, and retrying would pay the cost on every ping).
let addon: NotifyAddon | null | undefined;
let addonFailure = '';
let errorHandler: ((message: string) => void) | undefined;
const reported = new Set<string>();

export function setNotifyErrorHandler(fn: (message: string) => void): void {
  errorHandler = fn;
}

/** Returns false so callers can `return fail(...)`. Each distinct reason is reported once. */
function fail(reason: string): false {
  if (!reported.has(reason) && reported.size < MAX_REMEMBERED) {
    reported.add(reason);
    try {
      errorHandler?.(reason);
    } catch {
      // notify() promises never to throw, even if the hook does.
    }
  }
  return false;
}

function loadAddon(): NotifyAddon | null {
  if (addon !== undefined) return addon;
  // Both src/system/ (type-stripped) and dist/system/ (compiled) sit two levels
  // below the package root, so one relative path serves both.
  const require = createRequire(import.meta.url);
  const file = `../../prebuilds/${process.platform}-${process.arch}/sd_notify.node`;
  try {
    const loaded: unknown = require(file);
    if (
      typeof loaded === 'object' &&
      loaded !== null &&
      'send' in loaded &&
      typeof loaded.send === 'function'
    ) {
      addon = loaded as NotifyAddon;
      return addon;
    }
    addonFailure = `sd_notify: ${file} does not export send()`;
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    addonFailure = `sd_notify: cannot load native addon ${file}: ${msg.split('\n')[0]}`;
  }
  addon = null;
  return null;
}

/** Send one sd_notify(3) datagram (e.g. "READY=1\nSTATUS=...") to $NOTIFY_SOCKET. No-op (returns false) when NOTIFY_SOCKET
 *  is unset/empty. Never throws: a failure (addon missing, ENOENT, ECONNREFUSED, ...) returns false and calls the optional
 *  onError hook once per distinct failure with a one-line reason. The addon is loaded lazily on the first real send,
 *  so nothing native is loaded when NOTIFY_SOCKET is unset. */
export function notify(state: string): boolean {
  const target = process.env['NOTIFY_SOCKET'];
  if (target === undefined || target === '') return false;
  // Validate here (the addon checks again) so the reason is specific. Newer
  // systemd also knows "vsock:..." addresses; systemd 252 does not.
  if (target[0] !== '/' && target[0] !== '@') {
    return fail(`sd_notify: NOTIFY_SOCKET=${target} is neither an absolute path nor an @abstract name`);
  }
  const len = Buffer.byteLength(target);
  if (len < 2 || len >= SUN_PATH_MAX) {
    return fail(`sd_notify: NOTIFY_SOCKET=${target} has invalid length ${len} (must be 2..${SUN_PATH_MAX - 1} bytes)`);
  }

  const native = loadAddon();
  if (native === null) return fail(addonFailure);

  let errno: number;
  try {
    errno = native.send(target, state);
  } catch (err) {
    // Only wrong argument types throw, which the checks above rule out.
    return fail(`sd_notify: ${err instanceof Error ? err.message : String(err)}`);
  }
  if (errno === 0) return true;
  return fail(`sd_notify: sending to ${target} failed: ${errnoName(errno)}`);
}

function errnoName(errno: number): string {
  try {
    return getSystemErrorName(-errno);
  } catch {
    return `errno ${errno}`;
  }
}

/** Watchdog ping period in ms (half of WATCHDOG_USEC, as sd_watchdog_enabled+sd-event do), or null when WATCHDOG_USEC
 *  is unset/invalid/0, or WATCHDOG_PID is set and is not `pid`. Pure. */
export function watchdogPeriodMs(env: Record<string, string | undefined>, pid: number): number | null {
  const usecText = env['WATCHDOG_USEC'];
  // sd_watchdog_enabled() parses with safe_atou64; systemd always writes plain
  // decimal, so we accept exactly that and call anything else invalid.
  if (usecText === undefined || !/^[0-9]{1,20}$/.test(usecText)) return null;
  const usec = BigInt(usecText);
  if (usec === 0n || usec >= USEC_INFINITY) return null;

  // A set WATCHDOG_PID that does not parse as a positive pid disables the
  // watchdog (sd_watchdog_enabled returns an error), as does another pid's.
  const pidText = env['WATCHDOG_PID'];
  if (pidText !== undefined) {
    if (!/^[0-9]{1,10}$/.test(pidText) || Number(pidText) <= 0 || Number(pidText) !== pid) return null;
  }

  // Half the timeout, in whole ms, at least 1. Clamped to what setTimeout can
  // hold: pinging earlier than needed is harmless, overflowing fires at once.
  const ms = usec / 2000n;
  if (ms > BigInt(MAX_TIMER_MS)) return MAX_TIMER_MS;
  return ms < 1n ? 1 : Number(ms);
}
