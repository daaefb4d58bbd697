/**
 * The native data path for UDP flows (native/udp_flows.c, prebuilt in prebuilds/),
 * loaded the first time a datagram socket is served, with Node's UDP handles
 * (datagram.ts) as the fallback when it cannot be.
 *
 * Why native: Node's UDP receive path costs about 5 µs per datagram above the
 * kernel's work (a 64 KiB allocation, a Buffer and an address object, and a call into
 * JavaScript for every datagram), which kept us behind nginx's stream module
 * (bench/ANALYSIS.md, benchmark 10). The addon reads datagrams of established flows
 * in batches and sends them on without JavaScript; every decision (the cap, name
 * resolution, logging, counters, expiry) stays in datagram.ts.
 *
 * SOCKET_PROXYD_NATIVE_UDP=0 in the environment keeps Node's path (the tests run the
 * UDP behaviour tests on both paths with it).
 */
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { fileURLToPath } from 'node:url';

/** A datagram socket the addon serves (an opaque N-API external). */
export interface NativeListener {
  readonly __udpFlowsListener: never;
}

/** Called with the DatagramListener as `this`: a datagram from an address with no flow. */
export type MissCallback = (address: string, port: number, sockaddr: Uint8Array, datagram: Uint8Array) => void;
/** A flow the addon ended by an error (a negative errno, e.g. ECONNREFUSED after ICMP port unreachable). */
export type EndCallback = (id: number, err: number) => void;

export interface UdpFlowsAddon {
  /** Serve a copy (dup) of `fd`; the caller closes its own. A listener, or a negative errno. */
  listen(fd: number, receiver: object, onMiss: MissCallback, onEnd: EndCallback): NativeListener | number;
  /** Read the socket (0 or a negative errno); stop(): leave datagrams in the kernel (a drain). */
  start(l: NativeListener): number;
  stop(l: NativeListener): number;
  /**
   * A flow for the client at `sockaddr` (as onMiss gave it), connected to host:port: its id or a
   * negative errno. Ids are integers in 1 .. 2^53 - 1 and never handed out twice: a stale one
   * names no flow (send: -ENOENT; close: nothing).
   */
  open(l: NativeListener, sockaddr: Uint8Array, host: string, port: number, ipv6: boolean, nowMs: number): number;
  /** Send on a flow: 0 (sent, or dropped on a full buffer as UDP does) or a negative errno (the flow is broken). */
  send(l: NativeListener, id: number, datagram: Uint8Array): number;
  /** End a flow (no onEnd). */
  close(l: NativeListener, id: number): void;
  /** Set the clock datagrams are stamped with; end and return the flows idle for `limitMs` or longer. */
  sweep(l: NativeListener, nowMs: number, limitMs: number): number[];
  /** Counters since the last call: bytes to the target, bytes to clients, and the datagrams of each. */
  stats(l: NativeListener): [number, number, number, number];
  /** End every flow (no onEnd) and close the socket. */
  closeListener(l: NativeListener): void;
}

const NAMES = ['listen', 'start', 'stop', 'open', 'send', 'close', 'sweep', 'stats', 'closeListener'] as const;

// undefined: not tried yet; null: tried, and Node's path serves (a dlopen failure does not heal).
let addon: UdpFlowsAddon | null | undefined;
let why = '';

/**
 * The prebuild for this machine. src/engine/ and tsc's dist/engine/ are two levels
 * below the package root, the CLI's bundle (dist/main.js) one: look in both places.
 */
function addonPath(): string | null {
  const here = fileURLToPath(new URL('.', import.meta.url));
  for (const up of ['../../', '../']) {
    const file = `${here}${up}prebuilds/${process.platform}-${process.arch}/udp_flows.node`;
    if (existsSync(file)) return file;
  }
  return null;
}

/** The addon, or null (then udpNativeUnavailable() says why). Loaded once, on first use. */
export function udpNative(): UdpFlowsAddon | null {
  if (addon !== undefined) return addon;
  addon = null;
  if (process.env['SOCKET_PROXYD_NATIVE_UDP'] === '0') {
    why = 'SOCKET_PROXYD_NATIVE_UDP=0';
    return null;
  }
  const file = addonPath();
  if (file === null) {
    why = `no prebuilds/${process.platform}-${process.arch}/udp_flows.node`;
    return null;
  }
  try {
    const loaded = createRequire(import.meta.url)(file) as Record<string, unknown>;
    const missing = NAMES.filter((n) => typeof loaded[n] !== 'function');
    if (missing.length > 0) why = `${file} lacks ${missing.join(', ')}`;
    else addon = loaded as unknown as UdpFlowsAddon;
  } catch (err) {
    why = `cannot load ${file}: ${(err instanceof Error ? err.message : String(err)).split('\n')[0]}`;
  }
  return addon;
}

/** Why Node's UDP path serves (for a debug line); empty while the addon does. */
export function udpNativeUnavailable(): string {
  return why;
}
