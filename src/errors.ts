/**
 * Errors with stable codes. Every failure the CLI reports is a ProxyError: its
 * message is the one line printed (matching systemd-socket-proxyd's wording where
 * the reference has one), `errno` is what we send as ERRNO= to the service
 * manager, and `code` is stable for programs that embed the proxy.
 */

/** Linux errno values we report (sd_notify ERRNO=, exit paths). */
export const EINVAL = 22;
export const ERANGE = 34;
export const ENAMETOOLONG = 36;
export const EBADF = 9;
export const ENOTSOCK = 88;

export type ProxyErrorCode =
  | 'ERR_USAGE' // bad command line (getopt-level or a bad option value)
  | 'ERR_TARGET' // the TARGET can never work
  | 'ERR_LISTEN_FDS' // socket activation environment is wrong
  | 'ERR_NOT_STREAM' // a passed fd is not a listening stream socket
  | 'ERR_LISTEN' // --listen address could not be bound
  | 'ERR_ROUTE' // a socket without a route, or a named route without a socket
  | 'ERR_NODE_INTERNALS'; // this Node.js lacks the stream bindings the data path uses (src/engine/uv.ts)

export class ProxyError extends Error {
  readonly code: ProxyErrorCode;
  readonly errno: number;
  constructor(code: ProxyErrorCode, message: string, errno: number = EINVAL) {
    super(message);
    this.name = 'ProxyError';
    this.code = code;
    this.errno = errno;
  }
}
