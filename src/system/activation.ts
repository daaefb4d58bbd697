/**
 * Socket activation: the listening fds systemd passes (sd_listen_fds(3)).
 *
 * Same rules as sd_listen_fds(1): LISTEN_PID must be our pid (otherwise the
 * variables were meant for a parent and we got none), LISTEN_FDS counts fds from
 * 3, LISTEN_FDNAMES names them, and all three are removed from our environment so
 * that nothing we spawn inherits them by mistake.
 *
 * Node cannot ask a socket for SO_TYPE or SO_ACCEPTCONN, so the "is it a listening
 * stream socket" check is split: fstat() here rejects every non-socket (Node aborts
 * on listen({fd}) of some of those), and the engine maps listen() errors on
 * datagram/seqpacket/connected sockets to the same message.
 */
import { fstatSync } from 'node:fs';
import { EBADF, EINVAL, ENOTSOCK, ProxyError } from '../errors.ts';

export const SD_LISTEN_FDS_START = 3;

export interface ListenFd {
  readonly fd: number;
  /** From LISTEN_FDNAMES, when given (the reference ignores names; we use them in messages). */
  readonly name: string | undefined;
}

export const MSG_NO_SOCKETS = "Didn't get any sockets passed in.";
export const MSG_RECEIVE_FAILED = 'Failed to receive sockets from parent.';
export const MSG_NOT_STREAM = 'Passed in socket is not a stream socket.';

/**
 * Read and consume LISTEN_*. Returns [] when none were passed to us (the caller
 * decides whether that is an error). Throws ProxyError for a malformed environment
 * or a passed fd that is not a socket.
 */
export function takeListenFds(env: Record<string, string | undefined>, pid: number): ListenFd[] {
  const pidText = env.LISTEN_PID;
  const fdsText = env.LISTEN_FDS;
  const namesText = env.LISTEN_FDNAMES;
  delete env.LISTEN_PID;
  delete env.LISTEN_FDS;
  delete env.LISTEN_FDNAMES;

  if (pidText === undefined) return [];
  // parse_pid(): a positive decimal; garbage is an error, not "not for us".
  if (!/^\s*\+?[0-9]+$/.test(pidText) || Number(pidText) < 1) {
    throw new ProxyError('ERR_LISTEN_FDS', MSG_RECEIVE_FAILED, EINVAL);
  }
  if (Number(pidText) !== pid) return [];
  if (fdsText === undefined) return [];
  if (!/^\s*[-+]?[0-9]+$/.test(fdsText)) throw new ProxyError('ERR_LISTEN_FDS', MSG_RECEIVE_FAILED, EINVAL);
  const n = Number(fdsText);
  if (n <= 0 || n > 0x7fffffff - SD_LISTEN_FDS_START) {
    throw new ProxyError('ERR_LISTEN_FDS', MSG_RECEIVE_FAILED, EINVAL);
  }

  const names = namesText === undefined ? [] : namesText.split(':');
  // First every fd must be open (sd_listen_fds() sets FD_CLOEXEC on each and fails
  // on the first closed one), then each must be a socket.
  const isSocket: boolean[] = [];
  for (let fd = SD_LISTEN_FDS_START; fd < SD_LISTEN_FDS_START + n; fd++) {
    try {
      isSocket.push(fstatSync(fd).isSocket());
    } catch {
      throw new ProxyError('ERR_LISTEN_FDS', MSG_RECEIVE_FAILED, EBADF);
    }
  }
  const fds: ListenFd[] = [];
  for (let i = 0; i < n; i++) {
    if (!isSocket[i]) throw new ProxyError('ERR_NOT_STREAM', MSG_NOT_STREAM, ENOTSOCK);
    fds.push({ fd: SD_LISTEN_FDS_START + i, name: names[i] });
  }
  return fds;
}
