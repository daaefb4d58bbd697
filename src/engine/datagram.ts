/**
 * UDP forwarding: datagram sockets (ListenDatagram=, --listen-datagram=) served
 * with one flow per client address.
 *
 * A flow is a UDP socket of ours connected to the target. The first datagram from
 * a client address opens it; that datagram and every later one from the same
 * address go out on it; whatever the target sends back on it goes to that client
 * from the listening socket, so the client sees replies from the address it sent
 * to. One datagram in, one datagram out: boundaries are kept, up to the 65,507
 * bytes an IPv4 datagram can carry (65,527 over IPv6).
 *
 * Two data paths, one policy. Where the addon of native/udp_flows.c loads (udp-native.ts:
 * linux-x64 and linux-arm64 prebuilt), datagrams of established flows never reach
 * JavaScript: the addon reads the sockets and forwards, and calls in here only for a
 * datagram from an address with no flow (onNativeMiss), for a flow it ended on an
 * error (onNativeEnd), and when asked (open, sweep, counters). Everything else in this
 * file (the cap, resolution, logging, expiry, drain) serves both paths. Elsewhere, or
 * with SOCKET_PROXYD_NATIVE_UDP=0, Node's UDP handles carry every datagram as below.
 *
 * Why the raw UDPWrap handle (uv.ts) and not dgram.Socket: dgram must be told the
 * family and sends through the wrong one on a mismatch (every send fails with
 * EINVAL), it runs a DNS step (a tick) for every send to an address, and it makes a
 * request object per send. The handle takes the family per call and sends the
 * buffer Node handed us for the datagram, without a copy.
 *
 * Memory is bounded without queues: a flow has at most one send to the target and
 * one reply to its client in flight (the kernel took nearly every send at once;
 * one left pending means a full socket buffer, and UDP's answer to that is to drop,
 * which is what we do with the next datagram). A flow whose target name is still
 * being resolved keeps only its first datagram.
 *
 * UDP has no close, so a flow ends after --idle-timeout (default 60 s) without a
 * datagram in either direction, when the target answers with an ICMP error
 * (ECONNREFUSED on the connected socket), or at shutdown. Expiry is coarse: one
 * sweep timer while flows exist, and a datagram only stores the sweep's clock.
 */
import { lookup, type LookupAddress } from 'node:dns';
import { Socket } from 'node:net';
import { getSystemErrorName } from 'node:util';
import { formatAddress, formatPeer, type Address } from '../config/address.ts';
import { EINVAL, ProxyError } from '../errors.ts';
import { LOG_DEBUG, LOG_WARNING } from '../system/log.ts';
import { armIdleTimer, disarmIdleTimer, routeFor, type Proxy } from './proxy.ts';
import type { Route } from '../config/route.ts';
import { strerror } from '../system/strerror.ts';
import { uv, type SendReq, type UdpHandle, type UdpPeer } from './uv.ts';
import { udpNative, udpNativeUnavailable, type NativeListener, type UdpFlowsAddon } from './udp-native.ts';

/** Flows end after this long without a datagram when --idle-timeout= is not given. */
export const DEFAULT_FLOW_IDLE_USEC = 60_000_000n;
/** The sweep runs at least this often (and more often for shorter idle timeouts). */
const SWEEP_MAX_MS = 1000;
const SWEEP_MIN_MS = 10;
/** At the connection limit, one warning per this many ms at most (a flood must not flood the journal). */
const CAP_WARNING_MS = 1000;

const kListener = Symbol('socket-proxyd.datagram-listener');
const kFlow = Symbol('socket-proxyd.flow');

/** One datagram socket we serve. */
export interface DatagramListener {
  readonly proxy: Proxy;
  /**
   * The route its name picked (as for a stream socket): its target, its counters
   * (route.stats) and its log prefix serve every flow of this socket.
   */
  readonly route: Route;
  /** Node's handle on the socket (its data path); null when the addon serves it (set once, at start). */
  handle: ListenHandle | null;
  /** The addon's listener (native data path); null on Node's path (set once, at start). */
  native: NativeListener | null;
  /** Where it receives (getsockname at start). */
  readonly local: UdpPeer;
  /** The socket's family: replies go out with send6() on AF_INET6 (client addresses may be ::ffff:a.b.c.d). */
  readonly ipv6: boolean;
  readonly target: Address;
  /** Flows by client address, then port (no key string built per datagram). */
  readonly flows: Map<string, Map<number, Flow>>;
  /** Flows of this socket open now (the sum of the inner maps' sizes, kept as it changes). */
  open: number;
  /** Native path: flows by the addon's id. */
  readonly byId: Map<number, Flow>;
  /** Native path: flows whose target name is being resolved (the addon has no socket for them yet). */
  readonly resolving: Set<Flow>;
}

interface ListenHandle extends UdpHandle {
  [kListener]: DatagramListener;
}

interface FlowHandle extends UdpHandle {
  [kFlow]: Flow;
}

interface Flow {
  readonly listener: DatagramListener;
  /** The client, as the listening socket reported it. */
  readonly address: string;
  readonly port: number;
  /** Node's path: the socket connected to the target; null while the target's name is being resolved. */
  handle: FlowHandle | null;
  /** Native path: the addon's id for the flow (> 0) once its socket is connected, else 0. */
  id: number;
  /** Native path: the client's address as the addon gave it (a sockaddr), until the flow is opened with it. */
  sockaddr: Uint8Array | null;
  /** The sweep clock (ms) when a datagram last passed, either way. */
  lastActive: number;
  /** While resolving: the first datagram, sent once connected (later ones are dropped). */
  early: Uint8Array | null;
  /** A send to the target / a reply to the client is queued in libuv: drop, don't queue more. */
  sending: boolean;
  replying: boolean;
  closed: boolean;
}

/** Per proxy: the datagram side's shared state. */
interface DatagramState {
  readonly proxy: Proxy;
  readonly listeners: DatagramListener[];
  /** Idle span for flows in ms; null: flows never expire. */
  readonly idleMs: number | null;
  readonly sweepMs: number;
  sweepTimer: NodeJS.Timeout | null;
  /** Cap warnings: when the last one was printed, and datagrams dropped since. */
  lastCapWarning: number;
  droppedAtCap: number;
}

const states = new WeakMap<Proxy, DatagramState>();

/** The sweep's clock (performance.now() ms), read once per sweep, not per datagram. */
let now = 0;

/** The send request for the next send; one left pending is replaced (see sendTo*). */
let sendReq: FlowSendReq | null = null;
/** The one-element list send() wants; reset after each call so it holds no buffer. */
const LIST: Uint8Array[] = [new Uint8Array(0)];
const EMPTY = new Uint8Array(0);

interface FlowSendReq extends SendReq {
  flow: Flow | null;
  toClient: boolean;
}

function newSendReq(): FlowSendReq {
  const req = new uv.SendWrap() as FlowSendReq;
  req.oncomplete = onSendComplete;
  req.buffer = null;
  req.flow = null;
  req.toClient = false;
  return req;
}

function stateOf(proxy: Proxy): DatagramState {
  let state = states.get(proxy);
  if (state !== undefined) return state;
  const usec = proxy.options.idleTimeoutUsec === undefined ? DEFAULT_FLOW_IDLE_USEC : proxy.options.idleTimeoutUsec;
  // 0, like infinity, means no idle timeout (as for stream connections, sweep.ts).
  const idleMs = usec === null || usec === 0n ? null : Number(usec / 1000n);
  state = {
    proxy,
    listeners: [],
    idleMs,
    // Expiry is late by at most two sweeps; short spans get a finer sweep.
    sweepMs: idleMs === null ? SWEEP_MAX_MS : Math.max(SWEEP_MIN_MS, Math.min(SWEEP_MAX_MS, Math.floor(idleMs / 4))),
    sweepTimer: null,
    lastCapWarning: -Infinity,
    droppedAtCap: 0,
  };
  states.set(proxy, state);
  proxy.closeDatagrams = closeDatagrams;
  proxy.stopDatagrams = stopDatagrams;
  proxy.collectDatagramStats = collectDatagramStats;
  return state;
}

/** A datagram socket forwards to an IP target only: Node has no UNIX datagram sockets. */
function checkTarget(target: Address): void {
  if (target.kind === 'unix') {
    throw new ProxyError(
      'ERR_TARGET',
      `Cannot forward datagrams to the UNIX socket ${target.text}: a datagram socket needs a HOST:PORT target.`,
      EINVAL,
    );
  }
}

/**
 * Is this inherited fd a UDP socket? Node's guessHandleType (getsockopt SO_TYPE +
 * getsockname) is reachable only through the ERR_INVALID_FD_TYPE it throws from
 * net.Socket({fd}) for a non-stream fd, before opening anything. Call it only for an
 * fd that already failed to listen as a stream socket: for a stream fd this opens it
 * (and start-up fails anyway).
 */
export function isUdpFd(fd: number): boolean {
  try {
    new Socket({ fd, readable: false, writable: false }).destroy();
  } catch (err) {
    return (err as { code?: string }).code === 'ERR_INVALID_FD_TYPE' && /: UDP$/.test((err as Error).message);
  }
  return false;
}

/**
 * Serve an inherited UDP socket (socket activation). Its family is read from the
 * socket itself (getsockname), not guessed: /proc/net would miss a socket made in
 * another network namespace.
 */
export function listenDatagramOnFd(proxy: Proxy, fd: number, route: Route = routeFor(proxy, null)): DatagramListener {
  checkTarget(route.target);
  const handle = new uv.UDP() as ListenHandle;
  let err = handle.open(fd);
  const out: Record<string, unknown> = {};
  if (err === 0) err = handle.getsockname(out);
  if (err !== 0) {
    handle.close();
    throw new ProxyError('ERR_LISTEN', `Failed to use the datagram socket passed in: ${strerror({ code: getSystemErrorName(err) })}`, -err);
  }
  return startListener(proxy, handle, out.family === 'IPv6', route);
}

/**
 * Bind a UDP socket ourselves (--listen-datagram=[NAME=]ADDRESS): `route` is the one its
 * NAME picked (the default route without one). IPv6 sockets are dual-stack.
 */
export async function listenDatagramOnAddress(
  proxy: Proxy,
  address: Address,
  route: Route = routeFor(proxy, null),
): Promise<DatagramListener> {
  checkTarget(route.target);
  const describe = (why: string, errno: number): ProxyError =>
    new ProxyError('ERR_LISTEN', `Failed to listen on datagram address ${formatAddress(address)}: ${why}`, errno);
  if (address.kind === 'unix') throw describe('UNIX datagram sockets are not supported.', EINVAL);
  let host = address.host;
  let family = address.kind === 'ip' ? address.family : 0;
  if (address.kind === 'name') {
    const found = await new Promise<LookupAddress>((resolve, reject) => {
      lookup(address.host, (e, a, f) => (e === null ? resolve({ address: a, family: f }) : reject(describe(strerror(e), EINVAL))));
    });
    host = found.address;
    family = found.family;
  }
  const handle = new uv.UDP() as ListenHandle;
  const err = family === 6 ? handle.bind6(host, address.port, 0) : handle.bind(host, address.port, 0);
  if (err !== 0) {
    handle.close();
    throw describe(strerror({ code: getSystemErrorName(err) }), -err);
  }
  return startListener(proxy, handle, family === 6, route);
}

function startListener(proxy: Proxy, handle: ListenHandle, ipv6: boolean, route: Route): DatagramListener {
  const state = stateOf(proxy);
  const out: Record<string, unknown> = {};
  handle.getsockname(out);
  const local = out as unknown as UdpPeer;
  const addon = udpNative();
  const logger = proxy.options.logger;
  let native: NativeListener | null = null;
  const listener: DatagramListener = {
    proxy,
    route,
    handle,
    native: null,
    local,
    ipv6,
    target: route.target,
    flows: new Map(),
    open: 0,
    byId: new Map(),
    resolving: new Set(),
  };
  if (addon !== null && typeof handle.fd === 'number' && handle.fd >= 0) {
    // The addon takes a copy of the socket; Node's handle on it is closed.
    let got: NativeListener | number;
    try {
      got = addon.listen(handle.fd, listener, onNativeMiss, onNativeEnd);
    } catch (err) {
      // An N-API failure throws rather than returning an errno: Node's handle must not leak its fd.
      handle.close();
      throw new ProxyError('ERR_LISTEN', `Failed to receive on a datagram socket: ${err instanceof Error ? err.message : String(err)}`, EINVAL);
    }
    handle.close();
    if (typeof got === 'number') {
      throw new ProxyError('ERR_LISTEN', `Failed to receive on a datagram socket: ${strerror({ code: getSystemErrorName(got) })}`, -got);
    }
    native = got;
  } else if (addon === null && logger.maxLevel >= LOG_DEBUG && state.listeners.length === 0) {
    proxy.log(LOG_DEBUG, `Forwarding datagrams with Node's UDP handles (native path unavailable: ${udpNativeUnavailable()})`);
  }
  listener.native = native;
  listener.handle = native === null ? handle : null;
  // Datagrams already queued (the one that made systemd start us) are read in the next poll.
  let err: number;
  if (native !== null) {
    err = (addon as UdpFlowsAddon).start(native);
  } else {
    sendReq ??= newSendReq();
    handle[kListener] = listener;
    handle.onmessage = onClientMessage;
    err = handle.recvStart();
  }
  if (err !== 0) {
    if (native !== null) (addon as UdpFlowsAddon).closeListener(native);
    else handle.close();
    throw new ProxyError('ERR_LISTEN', `Failed to receive on a datagram socket: ${strerror({ code: getSystemErrorName(err) })}`, -err);
  }
  state.listeners.push(listener);
  if (logger.maxLevel >= LOG_DEBUG) {
    route.log(LOG_DEBUG, `Receiving datagrams on ${local.family === 'IPv6' ? `[${local.address}]` : local.address}:${local.port}`);
  }
  return listener;
}

/** Local address of a datagram listener, as getsockname reported it (for embedders and tests). */
export function datagramAddress(listener: DatagramListener): UdpPeer {
  return listener.local;
}

/** A datagram from a client (`handle` is the listening socket). */
function onClientMessage(nread: number, handle: UdpHandle, buf?: Buffer, rinfo?: UdpPeer): void {
  const listener = (handle as ListenHandle)[kListener];
  if (nread < 0 || buf === undefined || rinfo === undefined) {
    // An unconnected socket reports nothing per peer; whatever this is, the socket goes on.
    if (listener.proxy.options.logger.maxLevel >= LOG_DEBUG) {
      listener.route.log(LOG_DEBUG, `Failed to receive a datagram: ${strerror({ code: getSystemErrorName(nread) })}`);
    }
    return;
  }
  let flow = listener.flows.get(rinfo.address)?.get(rinfo.port);
  if (flow === undefined) {
    const opened = openFlow(listener, rinfo.address, rinfo.port, null);
    if (opened === null) return;
    flow = opened;
  }
  flow.lastActive = now;
  if (flow.handle === null) {
    // Still resolving: keep the first datagram only (bounded, and the one that usually matters).
    if (flow.early === null) flow.early = buf;
    return;
  }
  sendToTarget(flow, flow.handle, buf);
}

/**
 * Native path: a datagram from an address with no flow in the addon (`this` is the
 * listener). A new client opens one here; a flow still resolving its target keeps the
 * first datagram only, as on Node's path.
 */
function onNativeMiss(this: DatagramListener, address: string, port: number, sockaddr: Uint8Array, datagram: Uint8Array): void {
  let flow = this.flows.get(address)?.get(port);
  if (flow !== undefined && flow.id !== 0) flow = outOfSync(flow);
  if (flow === undefined) {
    const opened = openFlow(this, address, port, sockaddr);
    if (opened === null) return;
    flow = opened;
  }
  flow.lastActive = now;
  if (flow.id === 0) {
    if (flow.early === null) flow.early = datagram;
    return;
  }
  nativeSend(flow, datagram);
}

/**
 * Native path: the addon missed a client for which we hold an open flow, so it ended that
 * flow without our hearing of it (a failed N-API call on its side). Our record is dropped
 * without a close by its id: the id is dead (the addon's ids carry a generation, so a
 * stale one names no flow, but nothing is sent or closed by it anyway), and the datagram
 * opens a fresh flow. Returns undefined: there is no flow for the client now.
 */
function outOfSync(flow: Flow): undefined {
  const listener = flow.listener;
  // Only our own entry: had the addon reused the id, it would be another client's flow's.
  if (listener.byId.get(flow.id) === flow) listener.byId.delete(flow.id);
  flow.id = 0;
  listener.route.log(LOG_WARNING, `Flow from ${clientName(flow)} was ended by the native data path unreported; opening a new one`);
  endFlow(flow, 0);
  return undefined;
}

/** Native path: the addon ended a flow on an error (`err`, a negative errno; ECONNREFUSED after ICMP). */
function onNativeEnd(this: DatagramListener, id: number, err: number): void {
  const flow = this.byId.get(id);
  if (flow === undefined) return;
  this.byId.delete(id);
  flow.id = 0; // the addon closed it already
  endFlow(flow, err);
}

/** Native path: a flow's first datagram (later ones never come through here). */
function nativeSend(flow: Flow, datagram: Uint8Array): void {
  const listener = flow.listener;
  const r = (udpNative() as UdpFlowsAddon).send(listener.native as NativeListener, flow.id, datagram);
  if (r < 0) endFlow(flow, r);
}

function sendToTarget(flow: Flow, handle: FlowHandle, buf: Uint8Array): void {
  if (flow.sending) return; // the socket buffer is full: drop, as the network would
  const req = sendReq as FlowSendReq;
  LIST[0] = buf;
  const r = handle.send(req, LIST, 1, true);
  LIST[0] = EMPTY;
  if (r >= 0) flow.listener.route.stats.bytesToBackend += buf.length;
  if (r > 0) return;
  if (r === 0) {
    sendQueued(req, flow, buf, false);
    return;
  }
  // Too big for the way to the target (an IPv6 client's 65,527 bytes to an IPv4 target,
  // or a path MTU learnt from ICMP): this datagram is lost, the flow goes on (a new one
  // would give the client a new source port at the target).
  if (r === EMSGSIZE_UV) return;
  // ECONNREFUSED here is the ICMP error of an earlier datagram, reported on this send.
  endFlow(flow, r);
}

/** A datagram from the target on a flow's socket, or an error (`handle` is the flow's socket). */
function onTargetMessage(nread: number, handle: UdpHandle, buf?: Buffer): void {
  const flow = (handle as FlowHandle)[kFlow];
  if (flow.closed) return;
  if (nread < 0 || buf === undefined) {
    // EMSGSIZE: Linux reports a path MTU learnt from ICMP once, on the next receive; the
    // datagram it was about is lost, the flow is fine.
    if (nread !== EMSGSIZE_UV) endFlow(flow, nread);
    return;
  }
  flow.lastActive = now;
  if (flow.replying) return;
  const listener = flow.listener;
  const req = sendReq as FlowSendReq;
  LIST[0] = buf;
  const h = listener.handle as ListenHandle;
  const r = listener.ipv6 ? h.send6(req, LIST, 1, flow.port, flow.address, true) : h.send(req, LIST, 1, flow.port, flow.address, true);
  LIST[0] = EMPTY;
  if (r >= 0) listener.route.stats.bytesToClient += buf.length;
  if (r > 0) return;
  if (r === 0) {
    sendQueued(req, flow, buf, true);
    return;
  }
  // The client's address refuses (EPERM from a firewall, EACCES): the flow itself is fine.
  if (listener.proxy.options.logger.maxLevel >= LOG_DEBUG) {
    listener.route.log(LOG_DEBUG, `Failed to send a reply to ${clientName(flow)}: ${strerror({ code: getSystemErrorName(r) })}`);
  }
}

/**
 * A send libuv queued (the socket buffer was full): the request keeps the buffer alive
 * until it completes, the flow drops that direction's datagrams until then, and the next
 * send gets a fresh request.
 */
function sendQueued(req: FlowSendReq, flow: Flow, buf: Uint8Array, toClient: boolean): void {
  req.buffer = buf;
  req.flow = flow;
  req.toClient = toClient;
  if (toClient) flow.replying = true;
  else flow.sending = true;
  sendReq = newSendReq();
}

/** A queued send finished (or was cancelled by a close). */
function onSendComplete(this: SendReq): void {
  const req = this as FlowSendReq;
  const flow = req.flow;
  req.buffer = null;
  req.flow = null;
  if (flow === null) return;
  if (req.toClient) flow.replying = false;
  else flow.sending = false;
}

function clientName(flow: Flow): string {
  // A dual-stack socket reports IPv4 clients as ::ffff:a.b.c.d; say what the client is.
  return formatPeer(flow.address, flow.port);
}

function openFlow(listener: DatagramListener, address: string, port: number, sockaddr: Uint8Array | null): Flow | null {
  const proxy = listener.proxy;
  const state = stateOf(proxy);
  if (proxy.closed) return null;
  const route = listener.route;
  if (proxy.connections.size + proxy.flows >= proxy.options.connectionsMax) {
    capReached(state, route);
    return null;
  }
  const logger = proxy.options.logger;
  if (state.sweepTimer === null && state.idleMs !== null) {
    now = performance.now();
    state.sweepTimer = setInterval(sweep, state.sweepMs, state);
  }
  const flow: Flow = {
    listener,
    address,
    port,
    handle: null,
    id: 0,
    sockaddr,
    lastActive: now,
    early: null,
    sending: false,
    replying: false,
    closed: false,
  };
  let byPort = listener.flows.get(address);
  if (byPort === undefined) {
    byPort = new Map();
    listener.flows.set(address, byPort);
  }
  byPort.set(port, flow);
  listener.open++;
  proxy.flows++;
  route.stats.flows++;
  disarmIdleTimer(proxy);
  if (logger.maxLevel >= LOG_DEBUG) route.log(LOG_DEBUG, `New flow from ${clientName(flow)}`);

  const target = listener.target;
  if (target.kind === 'ip') {
    // connect(2) on a datagram socket to an IP literal is synchronous: the flow is
    // ready before this datagram is sent, so nothing is ever held for it.
    const err = connectFlow(flow, target.host, target.port, target.family);
    if (err !== 0) {
      endFlow(flow, err);
      return null;
    }
  } else if (target.kind === 'name') {
    if (logger.maxLevel >= LOG_DEBUG) route.log(LOG_DEBUG, `Looking up address info for ${target.host}:${target.port}`);
    if (listener.native !== null) listener.resolving.add(flow);
    (proxy.options.lookup ?? lookup)(target.host, LOOKUP_OPTIONS, (err, addresses) => resolvedFlow(flow, err, addresses));
  }
  return flow;
}

const LOOKUP_OPTIONS = { all: true, order: 'verbatim' } as const;

/** A host-name target resolved: take the first address a socket can be connected to, in order. */
function resolvedFlow(flow: Flow, err: NodeJS.ErrnoException | null, addresses: LookupAddress[]): void {
  if (flow.closed) return;
  flow.listener.resolving.delete(flow);
  if (err !== null || addresses.length === 0) {
    flow.listener.route.log(LOG_WARNING, `Failed to resolve host: ${strerror(err ?? { code: 'ENOTFOUND' })}`);
    endFlow(flow, 0);
    return;
  }
  const port = (flow.listener.target as { port: number }).port;
  let last = 0;
  for (const a of addresses) {
    last = connectFlow(flow, a.address, port, a.family === 6 ? 6 : 4);
    if (last === 0) break;
  }
  if (last !== 0) {
    endFlow(flow, last);
    return;
  }
  const early = flow.early;
  flow.early = null;
  if (early === null) return;
  if (flow.id !== 0) nativeSend(flow, early);
  else sendToTarget(flow, flow.handle as FlowHandle, early);
}

/** Make the flow's socket and connect it; 0 or a negative errno (e.g. ENETUNREACH, EMFILE). */
function connectFlow(flow: Flow, host: string, port: number, family: 4 | 6): number {
  const listener = flow.listener;
  if (listener.native !== null) {
    const id = (udpNative() as UdpFlowsAddon).open(listener.native, flow.sockaddr as Uint8Array, host, port, family === 6, now);
    if (id < 0) return id;
    flow.id = id;
    flow.sockaddr = null; // the addon has its copy
    listener.byId.set(id, flow);
    return 0;
  }
  const handle = new uv.UDP() as FlowHandle;
  handle[kFlow] = flow;
  handle.onmessage = onTargetMessage;
  let err = family === 6 ? handle.connect6(host, port) : handle.connect(host, port);
  if (err === 0) err = handle.recvStart();
  if (err !== 0) {
    handle.close();
    return err;
  }
  flow.handle = handle;
  return 0;
}

/** End a flow: `err` is why (a negative errno), 0 for idle/shutdown. */
function endFlow(flow: Flow, err: number): void {
  if (flow.closed) return;
  flow.closed = true;
  flow.early = null;
  const listener = flow.listener;
  const proxy = listener.proxy;
  const route = listener.route;
  const byPort = listener.flows.get(flow.address);
  if (byPort !== undefined) {
    byPort.delete(flow.port);
    if (byPort.size === 0) listener.flows.delete(flow.address);
  }
  if (flow.handle !== null) flow.handle.close();
  if (flow.id !== 0) {
    listener.byId.delete(flow.id);
    (udpNative() as UdpFlowsAddon).close(listener.native as NativeListener, flow.id);
    flow.id = 0;
  }
  listener.resolving.delete(flow);
  listener.open--;
  proxy.flows--;
  if (err !== 0) {
    const why = strerror({ code: getSystemErrorName(err) });
    if (err === ECONNREFUSED_UV) {
      // The target has no one on that port (ICMP port unreachable): routine for UDP, so debug only.
      if (proxy.options.logger.maxLevel >= LOG_DEBUG) route.log(LOG_DEBUG, `Target refused the flow from ${clientName(flow)}: ${why}`);
    } else {
      route.log(LOG_WARNING, `Failed to forward datagrams from ${clientName(flow)}: ${why}`);
    }
  } else if (proxy.options.logger.maxLevel >= LOG_DEBUG) {
    route.log(LOG_DEBUG, `Flow from ${clientName(flow)} closed`);
  }
  const state = stateOf(proxy);
  if (proxy.flows === 0 && state.sweepTimer !== null) {
    clearInterval(state.sweepTimer);
    state.sweepTimer = null;
  }
  if (proxy.flows === 0 && proxy.connections.size === 0) armIdleTimer(proxy);
}

/** libuv's UV_ECONNREFUSED and UV_EMSGSIZE on Linux. */
const ECONNREFUSED_UV = -111;
const EMSGSIZE_UV = -90;

/**
 * One rate limit for the whole process (a flood on any socket must not flood the
 * journal); the line names the route of the datagram that triggered it.
 */
function capReached(state: DatagramState, route: Route): void {
  const t = performance.now();
  if (t - state.lastCapWarning < CAP_WARNING_MS) {
    state.droppedAtCap++;
    return;
  }
  const more = state.droppedAtCap;
  state.lastCapWarning = t;
  state.droppedAtCap = 0;
  route.log(
    LOG_WARNING,
    more === 0
      ? 'Hit connection limit, dropping datagram from new client.'
      : `Hit connection limit, dropping datagram from new client (and ${more} more since the last warning).`,
  );
}

/**
 * Datagram flows of `route` open now (metrics' per-route gauge): a sum over its sockets,
 * read only when somebody asks.
 */
export function openFlows(proxy: Proxy, route: Route): number {
  const state = states.get(proxy);
  if (state === undefined) return 0;
  let n = 0;
  for (const listener of state.listeners) if (listener.route === route) n += listener.open;
  return n;
}

/** Once per sweep period while flows exist: end the flows idle for longer than the span. */
function sweep(state: DatagramState): void {
  now = performance.now();
  // lastActive is this clock at the last datagram, which is up to one period early:
  // allow one more period so that a flow never ends before the full span.
  const limit = (state.idleMs as number) + state.sweepMs;
  for (const listener of state.listeners) {
    if (listener.native !== null) {
      // The addon stamps its flows with this clock from now on, and ends the idle ones.
      for (const id of (udpNative() as UdpFlowsAddon).sweep(listener.native, now, limit)) {
        const flow = listener.byId.get(id);
        if (flow === undefined) continue;
        listener.byId.delete(id);
        flow.id = 0;
        endFlow(flow, 0);
      }
      for (const flow of listener.resolving) if (now - flow.lastActive >= limit) endFlow(flow, 0);
      continue;
    }
    for (const byPort of listener.flows.values()) {
      for (const flow of byPort.values()) {
        if (now - flow.lastActive >= limit) endFlow(flow, 0);
      }
    }
  }
}

/**
 * Stop reading the datagram sockets (a drain, or the start of shutdown). As for
 * stream sockets, a datagram that arrives now waits in the kernel for the next start
 * (systemd keeps its copy of the socket); replies still go out until the flows close.
 */
function stopDatagrams(this: Proxy): void {
  const state = states.get(this);
  if (state === undefined) return;
  for (const listener of state.listeners) {
    if (listener.native !== null) (udpNative() as UdpFlowsAddon).stop(listener.native);
    else listener.handle?.recvStop();
  }
}

/**
 * Native path: add the addon's byte counters to the routes' (STATUS=, SIGUSR1, a scrape,
 * the statistics at exit): read when somebody asks, never per datagram.
 */
function collectDatagramStats(this: Proxy): void {
  const state = states.get(this);
  if (state === undefined) return;
  for (const listener of state.listeners) {
    if (listener.native === null) continue;
    const [toBackend, toClient] = (udpNative() as UdpFlowsAddon).stats(listener.native);
    listener.route.stats.bytesToBackend += toBackend;
    listener.route.stats.bytesToClient += toClient;
  }
}

/** Shutdown (closeProxy): close the datagram sockets and every flow. */
function closeDatagrams(this: Proxy): void {
  const state = states.get(this);
  if (state === undefined) return;
  collectDatagramStats.call(this);
  for (const listener of state.listeners) {
    listener.handle?.close();
    for (const byPort of listener.flows.values()) {
      for (const flow of byPort.values()) endFlow(flow, 0);
    }
    if (listener.native !== null) (udpNative() as UdpFlowsAddon).closeListener(listener.native);
  }
  state.listeners.length = 0;
  if (state.sweepTimer !== null) clearInterval(state.sweepTimer);
  state.sweepTimer = null;
}
