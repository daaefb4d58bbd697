/**
 * One proxied connection: connect to the target, then forward both directions
 * byte-exact until both are done, half-close included.
 *
 * The data path, and why it looks the way it does:
 *
 * - Reads use `onread` (a caller-supplied buffer) instead of 'data' events. The
 *   default path allocates a fresh 64 KiB ArrayBuffer per read and shrinks it,
 *   which costs CPU and page faults; `onread` reads into memory we own.
 * - Memory we own may be handed to `write()`. When the write completes at once
 *   (the common case: the kernel took it all), the buffer is free again. When it
 *   does not, the pending write still points into the buffer, so it must not be
 *   read into again: the direction stops reading until the destination drains.
 *   That also bounds memory: at most one chunk in flight per direction, the rest
 *   waits in the kernel's socket buffers, where it belongs.
 * - Idle connections must cost almost nothing, so a connection has no buffer of
 *   its own until it moves bulk data. Small reads land in one buffer shared by all
 *   connections (SHARED) and are copied out before writing (a copy of a few hundred
 *   bytes comes from Node's buffer pool). A large read into SHARED is copied into a
 *   bulk buffer from a small free list, and the direction reads into that buffer
 *   directly for as long as its reads fill it (the socket had more waiting: a
 *   bulk transfer in full flow). A read that does not fill it (the socket is
 *   drained, the burst may be over) or a write that does not complete at once
 *   gives the buffer back, so a connection that goes quiet never sits on one.
 *   Under load nearly every read fills the buffer, so the extra copy is rare.
 * - Bulk buffers are 512 KiB: the cost per chunk is mostly the kernel's
 *   (a write to TCP loopback runs the receiver's path too), so bigger chunks mean
 *   fewer of them. Measured with iperf3 on loopback, proxy CPU per GiB: 64 KiB
 *   0.95-0.98 s, 256 KiB 0.59-0.71 s, 512 KiB 0.52-0.57 s, 1 MiB 0.48-0.55 s;
 *   the reference (splice, 256 KiB pipes) 0.49-0.53 s.
 * - Handlers are module-level functions; they find their connection through the
 *   socket's kConn field, so no closures are created per connection or per chunk.
 *
 * Ownership rule, the one thing never to break: a buffer is read into only when
 * no pending write references it. SHARED is never passed to write(); a bulk
 * buffer is read into again only after the destination reported writableLength 0
 * right after the write, and one a pending write holds goes back to the free list
 * only on the destination's 'drain' (or once both sockets are closed).
 */
import { Socket, type SocketConstructorOpts } from 'node:net';
import { LOG_DEBUG, LOG_ERR } from './log.ts';
import { strerror } from './strerror.ts';
import type { Address } from './address.ts';

/** Size of the shared buffer and of each bulk buffer. */
export const BUFFER_SIZE = 512 * 1024;
/** A read into SHARED of at least this many bytes is copied into a bulk buffer. */
const BULK_THRESHOLD = 16 * 1024;
/** Free bulk buffers kept for reuse (4 MiB; beyond this they are left to the GC). */
const FREE_LIST_MAX = 8;

const SHARED: Buffer = Buffer.allocUnsafeSlow(BUFFER_SIZE);
const freeBuffers: Buffer[] = [];

function takeBuffer(): Buffer {
  return freeBuffers.pop() ?? Buffer.allocUnsafeSlow(BUFFER_SIZE);
}

function giveBuffer(buf: Buffer): void {
  if (freeBuffers.length < FREE_LIST_MAX) freeBuffers.push(buf);
}

/**
 * Node calls the onread buffer factory as a plain function right after the read
 * callback of the same socket returns (or when a socket gets its handle), so the
 * callback leaves the socket's next buffer here. Every other time it is SHARED.
 */
let nextBuffer: Buffer = SHARED;

function bufferFactory(): Buffer {
  const buf = nextBuffer;
  nextBuffer = SHARED;
  return buf;
}

/** What the engine provides to each connection. */
export interface ConnectionOwner {
  readonly target: Address;
  readonly log: (level: number, message: string) => void;
  /** Called exactly once, when both sockets of the connection are closed. */
  readonly release: (conn: Connection) => void;
  /** Resolves a host name to the addresses to try, in order (getaddrinfo order). */
  readonly resolve: (conn: Connection) => void;
}

export interface Connection {
  readonly owner: ConnectionOwner;
  readonly client: ProxySocket;
  backend: ProxySocket | null;
  /** Backend is connected and forwarding has started. */
  connected: boolean;
  /** Per direction: the bulk buffer being read into, or null while using SHARED. */
  clientBuf: Buffer | null;
  backendBuf: Buffer | null;
  /** Per direction: the bulk buffer a pending write holds, given back on 'drain'. */
  clientPending: Buffer | null;
  backendPending: Buffer | null;
  /** Per direction: reading stopped until the destination drains (see sweepStalled). */
  clientStalled: boolean;
  backendStalled: boolean;
  clientClosed: boolean;
  backendClosed: boolean;
  released: boolean;
  /** For host-name targets: the resolved addresses still to try. */
  candidates: string[];
  candidateIndex: number;
}

const kConn = Symbol('socket-proxyd.connection');

export interface ProxySocket extends Socket {
  [kConn]: Connection;
}

/** Node's private stream handle, as far as we touch it. */
export interface StreamHandle {
  close(callback?: () => void): void;
  getpeername?(out: Record<string, unknown>): number;
}

// `handle`, `onread` and `pauseOnCreate` are real Socket options that @types/node
// does not declare for the constructor.
interface InternalSocketOptions extends SocketConstructorOpts {
  handle?: StreamHandle;
  pauseOnCreate?: boolean;
  writableHighWaterMark?: number;
}

/**
 * writableHighWaterMark 1: every write that does not complete at once sets
 * needDrain, so 'drain' reliably tells us the pending write released its buffer.
 */
const WRITE_HWM = 1;

const CLIENT_ONREAD = { buffer: bufferFactory, callback: onClientRead };
const BACKEND_ONREAD = { buffer: bufferFactory, callback: onBackendRead };

/** Take over an accepted client handle and start connecting to the target. */
export function startConnection(owner: ConnectionOwner, handle: StreamHandle): Connection {
  const options: InternalSocketOptions = {
    handle,
    allowHalfOpen: true,
    // The client is not read until the backend is connected (as the reference):
    // nothing is buffered for a backend that may never answer.
    pauseOnCreate: true,
    readable: true,
    writable: true,
    writableHighWaterMark: WRITE_HWM,
    onread: CLIENT_ONREAD,
  };
  const client = new Socket(options) as ProxySocket;
  const conn: Connection = {
    owner,
    client,
    backend: null,
    connected: false,
    clientBuf: null,
    backendBuf: null,
    clientPending: null,
    backendPending: null,
    clientStalled: false,
    backendStalled: false,
    clientClosed: false,
    backendClosed: false,
    released: false,
    candidates: [],
    candidateIndex: 0,
  };
  client[kConn] = conn;
  client.on('error', onClientError);
  client.on('end', onClientEnd);
  client.on('close', onClientClose);
  client.on('drain', onClientDrain);

  const target = owner.target;
  if (target.kind === 'name') owner.resolve(conn);
  else connectBackend(conn, target.kind === 'unix' ? { path: target.path } : { host: target.host, port: target.port });
  return conn;
}

interface ConnectTo {
  path?: string;
  host?: string;
  port?: number;
}

function connectBackend(conn: Connection, to: ConnectTo): void {
  const backend = new Socket({
    allowHalfOpen: true,
    writableHighWaterMark: WRITE_HWM,
    onread: BACKEND_ONREAD,
  } as InternalSocketOptions) as ProxySocket;
  backend[kConn] = conn;
  conn.backend = backend;
  conn.backendClosed = false;
  backend.on('connect', onBackendConnect);
  backend.on('error', onBackendError);
  backend.on('end', onBackendEnd);
  backend.on('close', onBackendClose);
  backend.on('drain', onBackendDrain);
  // An IP literal or a path: Node connects without any DNS lookup.
  if (to.path !== undefined) backend.connect({ path: to.path });
  else backend.connect({ host: to.host as string, port: to.port as number });
}

/** Called by the owner's resolver with the addresses for a host-name target. */
export function resolved(conn: Connection, err: unknown, addresses: string[]): void {
  if (conn.released || conn.client.destroyed) return;
  if (err !== null || addresses.length === 0) {
    conn.owner.log(LOG_ERR, `Failed to resolve host: ${strerror(err ?? { code: 'ENOTFOUND' })}`);
    conn.client.destroy();
    return;
  }
  conn.candidates = addresses;
  conn.candidateIndex = 0;
  tryNextCandidate(conn);
}

function tryNextCandidate(conn: Connection): void {
  const host = conn.candidates[conn.candidateIndex++] as string;
  const target = conn.owner.target as { port: number };
  connectBackend(conn, { host, port: target.port });
}

function onBackendConnect(this: ProxySocket): void {
  const conn = this[kConn];
  conn.connected = true;
  conn.candidates = [];
  if (conn.client.destroyed) {
    this.destroy();
    return;
  }
  conn.client.resume();
}

function onBackendError(this: ProxySocket, err: Error): void {
  const conn = this[kConn];
  if (this !== conn.backend) return;
  if (!conn.connected) {
    // A host name may have more addresses: try them in order, like a client would.
    if (conn.candidateIndex < conn.candidates.length && !conn.client.destroyed) {
      tryNextCandidate(conn);
      return;
    }
    conn.owner.log(LOG_ERR, `Failed to connect to remote host: ${strerror(err)}`);
    conn.client.destroy();
    return;
  }
  // A reset or error on either side ends the whole connection, as in the reference.
  conn.owner.log(LOG_DEBUG, `Backend connection failed: ${strerror(err)}`);
  conn.client.destroy();
}

function onClientError(this: ProxySocket, err: Error): void {
  const conn = this[kConn];
  conn.owner.log(LOG_DEBUG, `Client connection failed: ${strerror(err)}`);
  conn.backend?.destroy();
}

/**
 * Forward one read. `src` is the socket that was read from; `buf` holds `n` new bytes.
 * Returns false to stop reading until the destination drains.
 */
function forwardRead(src: ProxySocket, dest: ProxySocket, n: number, buf: Buffer, fromClient: boolean): boolean {
  if (dest.destroyed || dest.writableEnded) {
    // The other side is gone: nothing can be delivered any more.
    src.destroy();
    return false;
  }
  const conn = src[kConn];
  // `buf` is what the factory handed out for this read: SHARED or this direction's buffer.
  let own: Buffer | null = null;
  let chunk: Buffer;
  if (buf === SHARED) {
    if (n >= BULK_THRESHOLD) {
      own = takeBuffer();
      SHARED.copy(own, 0, 0, n);
      chunk = own.subarray(0, n);
    } else {
      // Never hand SHARED itself to write(): copy the few bytes out.
      chunk = Buffer.allocUnsafe(n);
      SHARED.copy(chunk, 0, 0, n);
    }
  } else {
    own = buf;
    chunk = buf.subarray(0, n);
  }

  dest.write(chunk);
  if (dest.writableLength !== 0) {
    // The pending write holds `own` (if any) until 'drain' gives it back; the next
    // read, once reading resumes, goes to SHARED.
    if (fromClient) {
      conn.clientBuf = null;
      conn.clientPending = own;
      conn.clientStalled = true;
    } else {
      conn.backendBuf = null;
      conn.backendPending = own;
      conn.backendStalled = true;
    }
    markStalled(conn);
    nextBuffer = SHARED;
    return false;
  }
  if (own !== null && n < own.length) {
    // The read did not fill the buffer: the socket is drained for now and the
    // transfer may be over. Give the buffer back rather than keep it while idle.
    giveBuffer(own);
    own = null;
  }
  if (fromClient) conn.clientBuf = own;
  else conn.backendBuf = own;
  nextBuffer = own ?? SHARED;
  return true;
}

function onClientRead(this: ProxySocket, n: number, buf: Buffer): boolean {
  return forwardRead(this, this[kConn].backend as ProxySocket, n, buf, true);
}

function onBackendRead(this: ProxySocket, n: number, buf: Buffer): boolean {
  return forwardRead(this, this[kConn].client, n, buf, false);
}

/** The backend took everything we wrote: the client may be read again. */
function onBackendDrain(this: ProxySocket): void {
  const conn = this[kConn];
  if (this !== conn.backend) return;
  // The write that held the buffer is complete: nothing references it any more.
  if (conn.clientPending !== null) {
    giveBuffer(conn.clientPending);
    conn.clientPending = null;
  }
  conn.clientStalled = false;
  unmarkStalled(conn);
  if (!conn.client.readableEnded) conn.client.resume();
}

function onClientDrain(this: ProxySocket): void {
  const conn = this[kConn];
  if (conn.backendPending !== null) {
    giveBuffer(conn.backendPending);
    conn.backendPending = null;
  }
  conn.backendStalled = false;
  unmarkStalled(conn);
  const backend = conn.backend;
  if (backend !== null && conn.connected && !backend.readableEnded) backend.resume();
}

/**
 * Was this "EOF" really a reset? libuv reports a TCP reset that arrives behind unread
 * data as EOF (its POLLHUP short-cut), and a half-close must not be passed on for a peer
 * that is gone. Before we have sent our own FIN, a peer that half-closed leaves the socket
 * in CLOSE_WAIT, where getpeername() works; after a reset it is CLOSED: ENOTCONN.
 */
function peerReset(sock: ProxySocket): boolean {
  if (sock.writableEnded) return false;
  const handle = (sock as unknown as { _handle: StreamHandle | null })._handle;
  return handle?.getpeername !== undefined && handle.getpeername({}) !== 0;
}

/**
 * Connections with a direction that stopped reading while its destination holds a
 * write. libuv takes a socket that is not read (and has no write of its own pending)
 * out of epoll entirely, so a reset from that peer would go unnoticed for as long as
 * the destination does not drain -- forever for a backend that never reads. The
 * reference keeps such fds registered and sees the reset. We look instead: once a
 * second, only while some direction is stalled, with the same check as on EOF.
 */
const stalled = new Set<Connection>();
let sweepTimer: NodeJS.Timeout | null = null;
const SWEEP_INTERVAL_MS = 1000;

function markStalled(conn: Connection): void {
  stalled.add(conn);
  if (sweepTimer === null) {
    sweepTimer = setInterval(sweepStalled, SWEEP_INTERVAL_MS);
    sweepTimer.unref();
  }
}

function unmarkStalled(conn: Connection): void {
  if (conn.clientStalled || conn.backendStalled) return;
  stalled.delete(conn);
  if (stalled.size === 0 && sweepTimer !== null) {
    clearInterval(sweepTimer);
    sweepTimer = null;
  }
}

function sweepStalled(): void {
  for (const conn of stalled) {
    // Destroying a socket closes it; its close handler takes the other side down.
    if (conn.clientStalled && !conn.client.destroyed && peerReset(conn.client)) conn.client.destroy();
    const backend = conn.backend;
    if (conn.backendStalled && backend !== null && !backend.destroyed && peerReset(backend)) backend.destroy();
  }
}

/** EOF from the client: shut down the backend's write side once our writes are out. */
function onClientEnd(this: ProxySocket): void {
  const conn = this[kConn];
  // A reset: tear down both sides now (the close handler takes the backend with it).
  if (peerReset(this)) this.destroy();
  else conn.backend?.end();
}

function onBackendEnd(this: ProxySocket): void {
  const conn = this[kConn];
  if (this !== conn.backend) return;
  if (peerReset(this)) this.destroy();
  else conn.client.end();
}

/**
 * A socket that closes after both its directions finished normally leaves the other
 * alone: it finishes (or has finished) by itself, flushing what it still holds. One
 * that closes any other way (error, reset, destroyed) takes the other down with it.
 */
function closedCleanly(sock: ProxySocket): boolean {
  return sock.readableEnded && sock.writableFinished;
}

function onClientClose(this: ProxySocket): void {
  const conn = this[kConn];
  conn.clientClosed = true;
  const backend = conn.backend;
  if (backend !== null && !backend.destroyed && !closedCleanly(this)) backend.destroy();
  maybeRelease(conn);
}

function onBackendClose(this: ProxySocket): void {
  const conn = this[kConn];
  if (this !== conn.backend) return;
  conn.backendClosed = true;
  if (conn.connected && !conn.client.destroyed && !closedCleanly(this)) conn.client.destroy();
  maybeRelease(conn);
}

function maybeRelease(conn: Connection): void {
  if (conn.released || !conn.clientClosed) return;
  if (conn.backend !== null && !conn.backendClosed) return;
  conn.released = true;
  conn.clientStalled = false;
  conn.backendStalled = false;
  unmarkStalled(conn);
  // Bulk buffers are free once both sockets are closed: no write can be pending.
  if (conn.clientBuf !== null) giveBuffer(conn.clientBuf);
  if (conn.backendBuf !== null) giveBuffer(conn.backendBuf);
  if (conn.clientPending !== null) giveBuffer(conn.clientPending);
  if (conn.backendPending !== null) giveBuffer(conn.backendPending);
  conn.clientBuf = null;
  conn.backendBuf = null;
  conn.clientPending = null;
  conn.backendPending = null;
  conn.owner.release(conn);
}

/** Tear a connection down now (shutdown of the proxy). */
export function destroyConnection(conn: Connection): void {
  conn.client.destroy();
  conn.backend?.destroy();
}
