/**
 * Node's libuv stream handles, the layer net.Socket is built on, typed as far as
 * we use them. This is the one file that touches Node's private bindings.
 *
 * Why go below net.Socket: a proxied connection is two sockets that only move
 * bytes. A net.Socket brings a Readable and a Writable state, listener tables,
 * a handle wrapper and a tick of deferred work for every connect and write; for
 * a proxy that is most of the CPU spent per connection outside the kernel and
 * most of the memory an idle connection costs. The handles underneath do exactly
 * what we need: read into a buffer we own (`useUserBuffer`, the mechanism behind
 * net's `onread` option), write a buffer, shut down, close.
 *
 * Stability: these are the bindings lib/net.js itself uses (tcp_wrap, pipe_wrap,
 * stream_wrap, and udp_wrap under dgram), reachable through `process.binding`, which Node keeps for exactly
 * these modules (an allow-list; deprecated in documentation only, DEP0111). Their
 * shape has not changed since Node 12. `engines` pins the majors we test on, and
 * loadBindings() checks every member we call at start-up, so a Node that changed
 * them fails with one clear line instead of misbehaving on the first connection.
 */
import { ProxyError, EINVAL } from '../errors.ts';

/** A connected (or connecting) TCP or UNIX stream socket: Node's TCPWrap or PipeWrap. */
export interface StreamHandle {
  /** Called with `this` the handle after each read; the byte count or a negative errno is in streamBaseState. */
  /** Must be a function (C++ checks); it returns the buffer for the next read, or undefined to keep the current one. */
  onread: (this: StreamHandle) => Buffer | undefined;
  /** Read into this buffer from now on (the read callback may return the next one). */
  useUserBuffer(buf: Uint8Array): void;
  readStart(): number;
  readStop(): number;
  /** 0 or a negative errno; whether it completed at once is in streamBaseState[kLastWriteWasAsync]. */
  writeBuffer(req: WriteReq, buf: Uint8Array): number;
  /** One writev(2) of several buffers (allBuffers true: every chunk is a buffer); as writeBuffer otherwise. */
  writev(req: WriteReq, chunks: Uint8Array[], allBuffers: true): number;
  shutdown(req: ShutdownReq): number;
  close(callback?: (this: StreamHandle) => void): void;
  getpeername?(out: Record<string, unknown>): number;
}

export interface TcpHandle extends StreamHandle {
  connect(req: ConnectReq, address: string, port: number): number;
  connect6(req: ConnectReq, address: string, port: number): number;
  /**
   * uv_tcp_nodelay(): TCP_NODELAY on (true) or off; 0 or a negative errno. On a handle
   * with no socket yet (before connect) libuv only records it and sets the option when
   * it creates the socket, so the connect path costs no extra call.
   */
  setNoDelay(enable: boolean): number;
  /**
   * uv_tcp_keepalive(): SO_KEEPALIVE with TCP_KEEPIDLE = delay seconds (libuv also sets
   * TCP_KEEPINTVL = 1 and TCP_KEEPCNT = 10); 0 or a negative errno. Only on a connected
   * socket: before connect libuv records the flag but applies a fixed 60 s delay.
   */
  setKeepAlive(enable: boolean, delaySeconds: number): number;
}

export interface PipeHandle extends StreamHandle {
  connect(req: ConnectReq, path: string): number;
}

/** A write in flight: C++ calls oncomplete(status, handle) when it completes later. */
export interface WriteReq {
  oncomplete: (this: WriteReq, status: number, handle: StreamHandle) => void;
  /** Keeps the written buffer(s) alive while the kernel has not taken it all (C++ holds only pointers). */
  buffer: Uint8Array | Uint8Array[] | null;
}

export interface ShutdownReq {
  oncomplete: (this: ShutdownReq, status: number, handle: StreamHandle) => void;
}

export interface ConnectReq {
  oncomplete: (this: ConnectReq, status: number, handle: StreamHandle) => void;
}

/**
 * A UDP socket: Node's UDPWrap (the handle under dgram.Socket). Unlike dgram, it
 * takes the family per call (send vs send6), which is what lets us adopt an
 * inherited socket of either family, and it sends a buffer we hand it without a
 * DNS step or a request object per datagram.
 */
export interface UdpHandle {
  /**
   * Called with `this` the handle for every datagram: the buffer (exactly nread bytes,
   * freshly allocated by Node, ours to keep) and the sender; nread < 0 is an error
   * (ECONNREFUSED after an ICMP port unreachable on a connected socket) and no buffer.
   */
  onmessage: (this: UdpHandle, nread: number, handle: UdpHandle, buf?: Buffer, rinfo?: UdpPeer) => void;
  /** The socket's fd (-1 before one is open), for the native data path to take a copy of. */
  readonly fd: number;
  open(fd: number): number;
  bind(address: string, port: number, flags: number): number;
  bind6(address: string, port: number, flags: number): number;
  /** Synchronous: connect(2) on a datagram socket only sets the peer. */
  connect(address: string, port: number): number;
  connect6(address: string, port: number): number;
  /**
   * send(req, [buf], 1, hasCallback) on a connected socket, send(req, [buf], 1, port,
   * address, hasCallback) otherwise. Returns length + 1 when the kernel took it at
   * once, 0 when it is queued (req.oncomplete runs later), or a negative errno.
   */
  send(req: SendReq, list: Uint8Array[], count: number, hasCallback: boolean): number;
  send(req: SendReq, list: Uint8Array[], count: number, port: number, address: string, hasCallback: boolean): number;
  send6(req: SendReq, list: Uint8Array[], count: number, port: number, address: string, hasCallback: boolean): number;
  recvStart(): number;
  recvStop(): number;
  getsockname(out: Record<string, unknown>): number;
  close(callback?: () => void): void;
}

export interface UdpPeer {
  address: string;
  family: string;
  port: number;
}

/** A queued datagram send: the buffer must stay alive until oncomplete (C++ holds a pointer). */
export interface SendReq {
  oncomplete: (this: SendReq, status: number, sent: number) => void;
  buffer: Uint8Array | null;
}

export interface Bindings {
  readonly UDP: new () => UdpHandle;
  readonly SendWrap: new () => SendReq;
  readonly TCP: new (type: number) => TcpHandle;
  readonly Pipe: new (type: number) => PipeHandle;
  readonly TCPConnectWrap: new () => ConnectReq;
  readonly PipeConnectWrap: new () => ConnectReq;
  readonly WriteWrap: new () => WriteReq;
  readonly ShutdownWrap: new () => ShutdownReq;
  /** TCP.constants.SOCKET / Pipe.constants.SOCKET: a handle for an outgoing connection. */
  readonly TCP_SOCKET: number;
  readonly PIPE_SOCKET: number;
  /** Shared with C++: results of the last read and write. */
  readonly state: Int32Array;
  readonly kReadBytesOrError: number;
  readonly kLastWriteWasAsync: number;
}

/** libuv's UV_EOF: what a read reports for an orderly end of stream. */
export const UV_EOF = -4095;
/** libuv's UV_ENOTCONN on Linux: a socket whose peer has gone (getpeername after a reset). */
export const UV_ENOTCONN = -107;

type Binding = Record<string, unknown>;

function member<T>(binding: Binding, name: string, kind: 'function' | 'number' | 'object'): T {
  const value = binding[name];
  if (typeof value !== kind) {
    throw new ProxyError('ERR_NODE_INTERNALS', `This Node.js (${process.version}) lacks ${name}, which socket-proxyd needs.`, EINVAL);
  }
  return value as T;
}

type EmitWarning = (this: NodeJS.Process, warning: string | Error, ...rest: unknown[]) => void;

/** What a process.binding() call warned about, held back by bindingsQuietly(). */
let heldWarnings: Array<[string | Error, unknown[]]> = [];

function holdWarning(warning: string | Error, ...rest: unknown[]): void {
  heldWarnings.push([warning, rest]);
}

/**
 * Call process.binding() with its deprecation warning (DEP0111, emitted only under
 * --pending-deprecation) held back. Node would emit it on the next tick, and with
 * --throw-deprecation throw it there: an uncaught exception and a stack trace out of
 * reach of any try/catch. Instead: under --throw-deprecation that is one clear error
 * (reported at start-up like every other); otherwise the warning is emitted as Node
 * would have.
 */
function bindingsQuietly(binding: (name: string) => Binding, names: readonly string[]): Binding[] {
  const emitWarning = process.emitWarning as EmitWarning;
  heldWarnings = [];
  let got: Binding[];
  process.emitWarning = holdWarning as typeof process.emitWarning;
  try {
    got = names.map(binding);
  } finally {
    process.emitWarning = emitWarning as typeof process.emitWarning;
  }
  const held = heldWarnings;
  heldWarnings = [];
  if (held.length > 0 && process.throwDeprecation === true) {
    throw new ProxyError(
      'ERR_NODE_INTERNALS',
      'process.binding() is deprecated under --pending-deprecation (DEP0111) and --throw-deprecation makes that fatal, but socket-proxyd needs it: run it without --throw-deprecation.',
      EINVAL,
    );
  }
  for (const [warning, rest] of held) emitWarning.call(process, warning, ...rest);
  return got;
}

function loadBindings(): Bindings {
  const binding = (process as unknown as { binding?: (name: string) => Binding }).binding;
  if (typeof binding !== 'function') {
    throw new ProxyError('ERR_NODE_INTERNALS', `This Node.js (${process.version}) lacks process.binding, which socket-proxyd needs.`, EINVAL);
  }
  const [tcp, pipe, stream] = bindingsQuietly(binding, ['tcp_wrap', 'pipe_wrap', 'stream_wrap']) as [Binding, Binding, Binding];
  const tcpConstants = member<Binding>(tcp, 'constants', 'object');
  const pipeConstants = member<Binding>(pipe, 'constants', 'object');
  const TCP = member<Bindings['TCP']>(tcp, 'TCP', 'function');
  const Pipe = member<Bindings['Pipe']>(pipe, 'Pipe', 'function');
  for (const proto of [TCP.prototype as Binding, Pipe.prototype as Binding]) {
    for (const name of ['useUserBuffer', 'readStart', 'readStop', 'writeBuffer', 'shutdown', 'close', 'connect']) {
      member(proto, name, 'function');
    }
  }
  member(TCP.prototype as Binding, 'connect6', 'function');
  member(TCP.prototype as Binding, 'setNoDelay', 'function');
  const udp = binding('udp_wrap');
  const UDP = member<Bindings['UDP']>(udp, 'UDP', 'function');
  for (const name of ['open', 'bind', 'bind6', 'connect', 'connect6', 'send', 'send6', 'recvStart', 'recvStop', 'getsockname', 'close']) {
    member(UDP.prototype as Binding, name, 'function');
  }
  return {
    UDP,
    SendWrap: member(udp, 'SendWrap', 'function'),
    TCP,
    Pipe,
    TCPConnectWrap: member(tcp, 'TCPConnectWrap', 'function'),
    PipeConnectWrap: member(pipe, 'PipeConnectWrap', 'function'),
    WriteWrap: member(stream, 'WriteWrap', 'function'),
    ShutdownWrap: member(stream, 'ShutdownWrap', 'function'),
    TCP_SOCKET: member(tcpConstants, 'SOCKET', 'number'),
    PIPE_SOCKET: member(pipeConstants, 'SOCKET', 'number'),
    state: member(stream, 'streamBaseState', 'object'),
    kReadBytesOrError: member(stream, 'kReadBytesOrError', 'number'),
    kLastWriteWasAsync: member(stream, 'kLastWriteWasAsync', 'number'),
  };
}

let loaded: Bindings | null = null;
let loadError: ProxyError | null = null;
try {
  loaded = loadBindings();
} catch (err) {
  loadError =
    err instanceof ProxyError
      ? err
      : new ProxyError('ERR_NODE_INTERNALS', `Cannot load Node.js stream bindings: ${(err as Error).message}`, EINVAL);
}

/**
 * The bindings, resolved once at load so the data path reads plain constants. On a
 * Node without them this is empty and checkBindings() (called by createProxy) throws.
 */
export const uv: Bindings = loaded ?? ({} as Bindings);

export function checkBindings(): void {
  if (loadError !== null) throw loadError;
}
