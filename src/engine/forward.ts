/**
 * One proxied connection: once connect.ts has a backend for it, forward both
 * directions byte-exact until both are done, half-close included.
 *
 * The two sockets are Node's libuv stream handles, not net.Sockets (why: uv.ts).
 * The data path, and why it looks the way it does:
 *
 * - Reads go into memory we own (`useUserBuffer`; the read callback returns the
 *   buffer for the next read). Node's default allocates a fresh 64 KiB
 *   ArrayBuffer per read and shrinks it, which costs CPU and page faults.
 * - Memory we own is handed to `writeBuffer()`. When the write completes at once
 *   (the common case: the kernel took it all), the buffer is free again. When it
 *   does not, the pending write still points into the buffer, so it must not be
 *   read into again: the direction stops reading until the write completes.
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
 *   handle's kConn field, so no closures are created per connection or per chunk.
 *   Write requests are reused until one is left pending.
 *
 * Ownership rule, the one thing never to break: a buffer is read into only when
 * no pending write references it. SHARED is never passed to writeBuffer(); a bulk
 * buffer is read into again only when the write from it completed at once, and one
 * a pending write holds goes back to the free list only when that write completes
 * (or once both handles are closed, which cancels it). And the buffer a read went
 * into is always the one the connection names for that direction: every callback
 * that changes conn.clientBuf/backendBuf returns the same buffer to the handle, and
 * an empty read (n = 0) changes neither.
 */
import { LOG_DEBUG, LOG_ERR } from '../system/log.ts';
import { strerror } from '../system/strerror.ts';
import { clientBytesWaiting, headerFor, isFallback, MSG_FALLBACK_V1, MSG_FALLBACK_V2, type ProxyProtocolVersion } from './proxy-protocol.ts';
import { uv, UV_ENOTCONN, UV_EOF, type ShutdownReq, type StreamHandle, type WriteReq } from './uv.ts';
import { getSystemErrorName } from 'node:util';
import { tick } from './clock.ts';
import type { Address } from '../config/address.ts';
import type { BackendPolicy } from './connect.ts';
import type { Stats } from '../ops/stats.ts';

export type { StreamHandle } from './uv.ts';

/** Size of the shared buffer and of each bulk buffer. */
export const BUFFER_SIZE = 512 * 1024;
/** A read into SHARED of at least this many bytes is copied into a bulk buffer. */
const BULK_THRESHOLD = 16 * 1024;
/** Free bulk buffers kept for reuse (4 MiB; beyond this they are left to the GC). */
const FREE_LIST_MAX = 8;

const SHARED: Buffer = Buffer.allocUnsafeSlow(BUFFER_SIZE);
/** The two buffers of a header-and-data writev(), emptied after each call so it holds neither. */
const EMPTY: Buffer = Buffer.alloc(0);
const PAIR: Buffer[] = [EMPTY, EMPTY];
const freeBuffers: Buffer[] = [];

function takeBuffer(): Buffer {
  return freeBuffers.pop() ?? Buffer.allocUnsafeSlow(BUFFER_SIZE);
}

function giveBuffer(buf: Buffer): void {
  if (freeBuffers.length < FREE_LIST_MAX) freeBuffers.push(buf);
}

const state = uv.state;
const kReadBytesOrError = uv.kReadBytesOrError;
const kLastWriteWasAsync = uv.kLastWriteWasAsync;

/**
 * The write request for the next write. A write the kernel takes at once never
 * touches its request object, so one serves every such write; a write left
 * pending keeps its request, and a fresh one takes its place.
 */
let writeReq: WriteReq = uv.WriteWrap === undefined ? (null as unknown as WriteReq) : newWriteReq();
// (Without the bindings, createProxy() throws before any connection exists: see uv.ts.)

function newWriteReq(): WriteReq {
  const req = new uv.WriteWrap();
  req.oncomplete = onWriteComplete;
  req.buffer = null;
  return req;
}

/** What the engine provides to each connection (BackendPolicy: how connect.ts establishes its backend). */
export interface ConnectionOwner extends BackendPolicy {
  readonly target: Address;
  /** Set TCP_NODELAY on a TCP backend socket (the engine does the accepted one). */
  readonly noDelay: boolean;
  readonly log: (level: number, message: string) => void;
  /** Called exactly once, when both handles of the connection are closed. */
  readonly release: (conn: Connection) => void;
  /** Resolves a host name to the addresses to try, in order (getaddrinfo order). */
  readonly resolve: (conn: Connection) => void;
  /** PROXY protocol header to send each backend first: 0 none, 1 v1, 2 v2. */
  readonly proxyProtocol: ProxyProtocolVersion;
  /** Counters: bytes each way and backend failures are counted here (stats.ts). */
  readonly stats: Stats;
}

/**
 * One connection. Fields named client* describe the direction read from the
 * client (client -> backend), backend* the direction read from the backend.
 */
export interface Connection {
  readonly owner: ConnectionOwner;
  readonly client: ProxyHandle;
  backend: ProxyHandle | null;
  /** Per direction: the bulk buffer being read into, or null while using SHARED. */
  clientBuf: Buffer | null;
  backendBuf: Buffer | null;
  /** Per direction: a write is pending; the source is not read until it completes. */
  clientStalled: boolean;
  backendStalled: boolean;
  /** Per direction: the bulk buffer the pending write holds, given back when it completes. */
  clientPending: Buffer | null;
  backendPending: Buffer | null;
  /** Per direction: the source sent EOF, and the destination's write side is being shut down. */
  clientEof: boolean;
  backendEof: boolean;
  /** Per direction: that shutdown completed; the direction is done. */
  clientDone: boolean;
  backendDone: boolean;
  /** Both handles are closed or closing; nothing is forwarded any more. */
  closing: boolean;
  /** Handles whose close callback has not run yet. */
  openHandles: number;
  /** For host-name targets: the resolved addresses still to try. */
  candidates: string[];
  candidateIndex: number;
  /**
   * The coarse clock (clock.ts) at the last data moved either way, for --idle-timeout=;
   * -1 until the backend is connected (establishing is bounded by connect.ts's options).
   */
  lastActive: number;
  /** connect.ts: the --connect-timeout= timer of the attempt in flight. */
  connectTimer: NodeJS.Timeout | null;
  /** connect.ts, with --connect-retry=: when the wait for the backend ends (performance.now() ms). */
  deadline: number;
  /** connect.ts: queued waiting for the backend (not connecting now). */
  waiting: boolean;
  /** sweep.ts: the TCP backend is to get --keepalive= at the next sweep. */
  keepAlivePending: boolean;
  /** The PROXY protocol header not sent yet: it goes out with the client's first bytes, or alone (sendHeader). */
  header: Buffer | null;
}

const kConn = Symbol('socket-proxyd.connection');

export interface ProxyHandle extends StreamHandle {
  [kConn]: Connection;
}

/** The connection a handle of ours belongs to. */
export function connectionOf(handle: StreamHandle): Connection {
  return (handle as ProxyHandle)[kConn];
}

/** Take over an accepted client handle; connect.ts's establish() then finds it a backend. */
export function startConnection(owner: ConnectionOwner, handle: StreamHandle): Connection {
  const client = handle as ProxyHandle;
  const conn: Connection = {
    owner,
    client,
    backend: null,
    clientBuf: null,
    backendBuf: null,
    clientStalled: false,
    backendStalled: false,
    clientPending: null,
    backendPending: null,
    clientEof: false,
    backendEof: false,
    clientDone: false,
    backendDone: false,
    closing: false,
    openHandles: 1,
    candidates: [],
    candidateIndex: 0,
    lastActive: -1,
    connectTimer: null,
    deadline: 0,
    waiting: false,
    keepAlivePending: false,
    header: null,
  };
  client[kConn] = conn;
  // The client is not read until the backend is connected (as the reference):
  // nothing is buffered for a backend that may never answer.
  client.onread = onClientRead;
  return conn;
}

/** Make a new, not yet connected, backend handle the connection's (connect.ts). */
export function adoptBackend(conn: Connection, handle: StreamHandle): void {
  const backend = handle as ProxyHandle;
  backend[kConn] = conn;
  backend.onread = onBackendRead;
  conn.backend = backend;
  conn.openHandles++;
}

/** Give up a backend handle whose connect failed or timed out (a pending connect is cancelled). */
export function dropBackend(conn: Connection): void {
  if (conn.backend === null) return;
  closeHandle(conn.backend);
  conn.backend = null;
}

/**
 * The backend connected (connect.ts): send the PROXY header if asked, then forward.
 * From here the connection is subject to --idle-timeout= and --keepalive=.
 */
export function established(conn: Connection, backend: ProxyHandle): void {
  conn.lastActive = tick;
  const owner = conn.owner;
  // Set by the next sweep, within a second: a connection that ends sooner never needs it
  // (sweep.ts). After connect in any case: before it, libuv would apply a fixed 60 s.
  if (owner.keepAliveSec > 0 && backend instanceof uv.TCP) conn.keepAlivePending = true;
  if (owner.proxyProtocol !== 0) {
    const header = headerFor(owner.proxyProtocol, conn.client);
    if (header === null) {
      // The client reset while we connected: nothing to forward, and no honest header.
      fail(conn, conn.client, UV_ENOTCONN);
      return;
    }
    if (isFallback(owner.proxyProtocol, header)) owner.log(LOG_DEBUG, owner.proxyProtocol === 1 ? MSG_FALLBACK_V1 : MSG_FALLBACK_V2);
    conn.header = header;
    // When the client's first bytes are already waiting (a client that speaks first, like
    // HTTP or TLS, has usually sent them while we connected), the header goes in front of
    // them in the same write: their read comes in the next poll phase (forwardRead).
    // Otherwise it goes alone, now (a backend that speaks first waits for it). A header of
    // its own costs a write and a segment of its own: ~10 µs per connection on UNIX, ~30 µs
    // on TCP loopback, where the sender runs the receiver's path too (bench/ANALYSIS.md).
    if (!clientBytesWaiting() && !sendHeader(conn, backend)) return;
  }
  const client = conn.client;
  client.useUserBuffer(SHARED);
  backend.useUserBuffer(SHARED);
  let err = client.readStart();
  if (err !== 0) {
    fail(conn, client, err);
    return;
  }
  err = backend.readStart();
  if (err !== 0) fail(conn, backend, err);
}

/**
 * Write the pending PROXY protocol header alone: one write, so it leaves in one segment
 * (nginx reads it with a single peek, haproxy rejects a short one). A fresh socket's send
 * buffer is empty, so the kernel takes it at once; should it not, libuv finishes the write
 * before any later one (the client's bytes, a shutdown). A failure is logged at error
 * level, as upstream does, and ends the connection. Returns false if it was torn down.
 */
function sendHeader(conn: Connection, backend: ProxyHandle): boolean {
  const header = conn.header as Buffer;
  conn.header = null;
  const req = writeReq;
  const err = backend.writeBuffer(req, header);
  if (err !== 0) {
    writeReq = newWriteReq();
    headerFailed(conn, err);
    return false;
  }
  if (state[kLastWriteWasAsync] !== 0) {
    // Left pending: the request keeps the header alive and reports to its own handler.
    req.buffer = header;
    req.oncomplete = onHeaderWriteComplete;
    writeReq = newWriteReq();
  }
  return true;
}

function onHeaderWriteComplete(this: WriteReq, status: number, handle: StreamHandle): void {
  this.buffer = null;
  const conn = (handle as ProxyHandle)[kConn];
  if (conn.closing || status >= 0) return;
  headerFailed(conn, status);
}

function headerFailed(conn: Connection, err: number): void {
  conn.owner.log(LOG_ERR, `Failed to write to remote host: ${strerror(errnoCode(err))}`);
  teardown(conn);
}

function errnoCode(status: number): { code: string } {
  return { code: getSystemErrorName(status) };
}

/** A read on the client (`this`): forward it, or handle EOF / an error. Returns the next read buffer. */
function onClientRead(this: StreamHandle): Buffer | undefined {
  const n = state[kReadBytesOrError] as number;
  const client = this as ProxyHandle;
  const conn = client[kConn];
  if (n > 0) return forwardRead(conn, client, conn.backend as ProxyHandle, n, true);
  // 0: the read found nothing (EAGAIN after a read that filled the buffer). The
  // handle must keep the buffer it has, which is the one conn.clientBuf names.
  if (n === 0) return undefined;
  readEnded(conn, client, n, true);
  return SHARED;
}

function onBackendRead(this: StreamHandle): Buffer | undefined {
  const n = state[kReadBytesOrError] as number;
  const backend = this as ProxyHandle;
  const conn = backend[kConn];
  if (n > 0) return forwardRead(conn, backend, conn.client, n, false);
  if (n === 0) return undefined;
  readEnded(conn, backend, n, false);
  return SHARED;
}

/**
 * Forward one read of `n` bytes from `src` to `dest`. Returns the buffer the next
 * read of `src` goes into.
 */
function forwardRead(conn: Connection, src: ProxyHandle, dest: ProxyHandle, n: number, fromClient: boolean): Buffer {
  if (conn.closing) return SHARED;
  // The read went into what the previous call returned: this direction's bulk buffer, or SHARED.
  let own = fromClient ? conn.clientBuf : conn.backendBuf;
  // The client's first bytes take the pending PROXY header along, in front, in one write.
  let header = fromClient ? conn.header : null;
  const withHeader = header !== null;
  let chunk: Buffer;
  if (own === null) {
    if (n >= BULK_THRESHOLD) {
      own = takeBuffer();
      SHARED.copy(own, 0, 0, n);
      chunk = own.subarray(0, n);
    } else if (header === null) {
      // Never hand SHARED itself to a write: copy the few bytes out.
      chunk = Buffer.allocUnsafe(n);
      SHARED.copy(chunk, 0, 0, n);
    } else {
      // The usual first read (an HTTP request, a TLS hello): the header and the bytes in
      // one buffer, one plain write (a writev costs more, and a second allocation).
      conn.header = null;
      const h = header.length;
      chunk = Buffer.allocUnsafe(h + n);
      header.copy(chunk, 0, 0, h);
      SHARED.copy(chunk, h, 0, n);
      header = null;
    }
  } else {
    chunk = n === own.length ? own : own.subarray(0, n);
  }

  const req = writeReq;
  let err: number;
  if (header === null) {
    err = dest.writeBuffer(req, chunk);
  } else {
    conn.header = null;
    PAIR[0] = header;
    PAIR[1] = chunk;
    err = dest.writev(req, PAIR, true);
    PAIR[0] = EMPTY;
    PAIR[1] = EMPTY;
  }
  if (err !== 0) {
    // A write that failed after queueing part of itself disposed of its request's
    // native half: start over with a fresh request rather than reuse that object.
    writeReq = newWriteReq();
    if (own !== null) giveBuffer(own);
    if (fromClient) conn.clientBuf = null;
    else conn.backendBuf = null;
    if (withHeader) headerFailed(conn, err);
    else fail(conn, dest, err);
    return SHARED;
  }
  // The only per-read costs of the statistics and of --idle-timeout=: one add, one store.
  conn.lastActive = tick;
  if (fromClient) conn.owner.stats.bytesToBackend += n;
  else conn.owner.stats.bytesToClient += n;
  if (state[kLastWriteWasAsync] !== 0) {
    // The pending write holds `req` and `chunk` (and `own`, if any) until it
    // completes; until then this direction does not read. The next read, once
    // reading resumes, goes to SHARED.
    req.buffer = header === null ? chunk : [header, chunk];
    writeReq = newWriteReq();
    src.readStop();
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
    return SHARED;
  }
  if (own !== null && n < own.length) {
    // The read did not fill the buffer: the socket is drained for now and the
    // transfer may be over. Give the buffer back rather than keep it while idle.
    giveBuffer(own);
    own = null;
  }
  if (fromClient) conn.clientBuf = own;
  else conn.backendBuf = own;
  return own ?? SHARED;
}

/**
 * A write or shutdown on `handle` completed. Returns its connection if there is more
 * to do: not when the connection is closing (closing cancels pending requests;
 * buffers are given back once both handles are closed), nor after an error.
 */
function completed(status: number, handle: StreamHandle): Connection | null {
  const conn = (handle as ProxyHandle)[kConn];
  if (conn.closing) return null;
  if (status < 0) {
    fail(conn, handle, status);
    return null;
  }
  return conn;
}

/** A pending write to `handle` completed: its buffer is free, and its source may be read again. */
function onWriteComplete(this: WriteReq, status: number, handle: StreamHandle): void {
  this.buffer = null;
  const conn = completed(status, handle);
  if (conn === null) return;
  // A slow reader that takes data is not idle (a write completing late is rare: no cost on the fast path).
  conn.lastActive = tick;
  const dest = handle as ProxyHandle;
  let src: ProxyHandle;
  if (dest === conn.backend) {
    src = conn.client;
    if (conn.clientPending !== null) giveBuffer(conn.clientPending);
    conn.clientPending = null;
    conn.clientStalled = false;
  } else {
    src = conn.backend as ProxyHandle;
    if (conn.backendPending !== null) giveBuffer(conn.backendPending);
    conn.backendPending = null;
    conn.backendStalled = false;
  }
  unmarkStalled(conn);
  const err = src.readStart();
  if (err !== 0) fail(conn, src, err);
}

/**
 * `src` reported EOF or a read error. EOF passes the half-close on: the
 * destination's write side is shut down once the writes before it are out
 * (libuv queues the shutdown behind them). Anything else ends the connection.
 */
function readEnded(conn: Connection, src: ProxyHandle, n: number, fromClient: boolean): void {
  if (conn.closing) return;
  // Nothing reads from src again: reading is never restarted after EOF or an error
  // (onWriteComplete only restarts a direction that stopped for a write, and a
  // stopped direction cannot see EOF). So its bulk buffer can go back now, even on
  // libuv's end-of-stream path where Node ignores the buffer onread returns.
  const own = fromClient ? conn.clientBuf : conn.backendBuf;
  if (own !== null) giveBuffer(own);
  if (fromClient) conn.clientBuf = null;
  else conn.backendBuf = null;
  if (n !== UV_EOF) {
    fail(conn, src, n);
    return;
  }
  // A reset: tear down both sides now.
  if (peerReset(src, fromClient ? conn.backendEof : conn.clientEof)) {
    teardown(conn);
    return;
  }
  const dest = fromClient ? (conn.backend as ProxyHandle) : conn.client;
  // A client that half-closed without a byte: its header still goes first. (The header
  // waits for a read only when the addon saw bytes waiting: this is the net should a
  // read bring EOF instead.)
  if (fromClient && conn.header !== null && !sendHeader(conn, dest)) return;
  if (fromClient) conn.clientEof = true;
  else conn.backendEof = true;
  const req = new uv.ShutdownWrap();
  req.oncomplete = onShutdownComplete;
  const err = dest.shutdown(req);
  if (err !== 0) fail(conn, dest, err);
}

/** The write side of `handle` is shut down: that direction is done. */
function onShutdownComplete(this: ShutdownReq, status: number, handle: StreamHandle): void {
  const conn = completed(status, handle);
  if (conn === null) return;
  if (handle === conn.backend) conn.clientDone = true;
  else conn.backendDone = true;
  // Both directions finished normally: nothing is left to read or to write.
  if (conn.clientDone && conn.backendDone) teardown(conn);
}

/**
 * Was this "EOF" really a reset? libuv reports a TCP reset that arrives behind unread
 * data as EOF (its POLLHUP short-cut), and a half-close must not be passed on for a peer
 * that is gone. Before we have sent our own FIN, a peer that half-closed leaves the socket
 * in CLOSE_WAIT, where getpeername() works; after a reset it is CLOSED: ENOTCONN.
 * `shutDown`: we have already sent our FIN to this peer, so ENOTCONN proves nothing.
 */
export function peerReset(handle: StreamHandle, shutDown: boolean): boolean {
  if (shutDown) return false;
  return handle.getpeername !== undefined && handle.getpeername({}) !== 0;
}

/** An error on `handle` ends the whole connection, as in the reference. */
function fail(conn: Connection, handle: StreamHandle, err: number): void {
  if (conn.closing) return;
  const role = handle === conn.client ? 'Client' : 'Backend';
  conn.owner.log(LOG_DEBUG, `${role} connection failed: ${strerror(errnoCode(err))}`);
  teardown(conn);
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
    if (conn.clientStalled && peerReset(conn.client, conn.backendEof)) teardown(conn);
    else if (conn.backendStalled && conn.backend !== null && peerReset(conn.backend, conn.clientEof)) teardown(conn);
  }
}

/** Close both handles (any pending write or connect is cancelled); release once both are closed. */
function teardown(conn: Connection): void {
  if (conn.closing) return;
  conn.closing = true;
  conn.clientStalled = false;
  conn.backendStalled = false;
  unmarkStalled(conn);
  closeHandle(conn.client);
  if (conn.backend !== null) closeHandle(conn.backend);
}

function closeHandle(handle: ProxyHandle): void {
  handle.close(onHandleClose);
}

function onHandleClose(this: StreamHandle): void {
  const conn = (this as ProxyHandle)[kConn];
  if (--conn.openHandles !== 0 || !conn.closing) return;
  // Both handles are closed: no write can be pending, every buffer is free.
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
  teardown(conn);
}
