/**
 * Routes: which target a listening socket's connections go to, chosen by the socket's
 * name (FileDescriptorName= in its .socket unit, passed as LISTEN_FDNAMES; or the NAME
 * of --listen=NAME=ADDRESS), never by its position: when several socket units start one
 * service, the order of the fds is undefined (sd_listen_fds(3)).
 *
 *   socket-proxyd web=/run/nginx.sock db=/run/postgresql/.s.PGSQL.5432 [DEFAULT-TARGET]
 *
 * Grammar (a drop-in still: every command line the reference accepts means what it meant,
 * unless it has an `=` before any `/`/`@` start, which no working reference target has):
 * an argument that starts with `/` or `@` is a plain UNIX/abstract address even if it holds
 * `=`; otherwise the first `=` splits NAME from the rest. NAME follows FileDescriptorName='s
 * rules (printable ASCII, no `:`, at most 255 characters) and must not be empty.
 *
 * This file holds the pure part (splitting, name rules, matching sockets to routes) and
 * the Route object the engine hands each connection as its owner (see proxy.ts); per-route
 * state that features need (counters, per-target retry state) belongs on Route.
 */
import type { Address } from './address.ts';
import { EINVAL, ProxyError } from '../errors.ts';
import type { ConnectionOwner } from '../engine/forward.ts';
import type { Proxy } from '../engine/proxy.ts';
import type { Stats } from '../ops/stats.ts';

/** FDNAME_MAX in systemd: the longest name FileDescriptorName= accepts. */
export const FDNAME_MAX = 255;

/** What a log line about a default-route connection is prefixed with when there are several routes. */
export const DEFAULT_ROUTE_LABEL = '(default)';

/** One route as configured: `name` null is the default route (the plain TARGET). */
export interface RouteSpec {
  readonly name: string | null;
  readonly target: Address;
}

/**
 * A route at run time: every connection accepted on one of its sockets has it as owner,
 * so forward.ts logs and resolves through it without knowing routes exist.
 */
export interface Route extends ConnectionOwner {
  /** null: the default route (plain TARGET), taken by sockets without a route of their own. */
  readonly name: string | null;
  readonly target: Address;
  readonly proxy: Proxy;
  /**
   * Prefix of every log line about one of this route's connections: "" with a single
   * route (so every line is exactly the reference's), "NAME: " or "(default): " otherwise.
   */
  readonly prefix: string;
  /** This route's counters (stats.ts): per route, so metrics can label them by route. */
  readonly stats: Stats;
  /** Connections of this route open now (counted in the proxy's limit too). */
  open: number;
}

/**
 * Split `NAME=VALUE` (a positional or a --listen= value). Returns name null for a plain
 * value. The name is not checked here: see checkRouteName().
 */
export function splitRouteArg(text: string): { name: string | null; value: string } {
  if (text.startsWith('/') || text.startsWith('@')) return { name: null, value: text };
  const eq = text.indexOf('=');
  if (eq < 0) return { name: null, value: text };
  return { name: text.slice(0, eq), value: text.slice(eq + 1) };
}

/**
 * systemd's fdname_is_valid() plus "not empty": a name no socket can carry would make a
 * route that can never match. `arg` is the whole argument, quoted in the message.
 * Throws ProxyError('ERR_USAGE').
 */
export function checkRouteName(name: string, arg: string): void {
  let why: string | null = null;
  if (name === '') why = 'empty name';
  else if (name.length > FDNAME_MAX) why = `name longer than ${FDNAME_MAX} characters`;
  else if (name.includes(':')) why = "name contains ':'";
  else if (/[^\x20-\x7e]/.test(name)) why = 'name is not printable ASCII';
  if (why !== null) {
    throw new ProxyError('ERR_USAGE', `Invalid route '${arg}': ${why} (names follow FileDescriptorName= rules).`, EINVAL);
  }
}

/** A listening socket as the route check sees it. */
export interface SocketSpec {
  /** Its name; undefined or "" for an unnamed socket (it takes the default route). */
  readonly name: string | undefined;
  /** How to name it in a message when it has no name: "fd 3", "--listen=127.0.0.1:80". */
  readonly where: string;
}

/**
 * Pick each socket's route, by name, and refuse a configuration that would misroute:
 * a socket without a route (its name has none and there is no default), or a named
 * route no socket carries (a typo must not send traffic to the default target).
 * Returns, per socket, the index into `routes`. Throws ProxyError('ERR_ROUTE').
 */
export function assignRoutes(routes: readonly { readonly name: string | null }[], sockets: readonly SocketSpec[]): number[] {
  const byName = new Map<string, number>();
  let fallback = -1;
  routes.forEach((r, i) => {
    if (r.name === null) fallback = i;
    else byName.set(r.name, i);
  });
  const used = new Set<number>();
  const picked = sockets.map((s) => {
    const named = s.name === undefined || s.name === '' ? undefined : byName.get(s.name);
    const i = named ?? fallback;
    if (i < 0) {
      const message =
        s.name === undefined || s.name === ''
          ? `No route for the unnamed socket ${s.where}: give a plain TARGET as the default route.`
          : `No route for socket '${s.name}' (${s.where}): give ${s.name}=TARGET, or a plain TARGET as the default route.`;
      throw new ProxyError('ERR_ROUTE', message, EINVAL);
    }
    used.add(i);
    return i;
  });
  routes.forEach((r, i) => {
    if (r.name === null || used.has(i)) return;
    const names = [...new Set(sockets.map((s) => s.name).filter((n) => n !== undefined && n !== ''))];
    const seen = names.length === 0 ? 'no socket has a name' : `socket names: ${names.map((n) => `'${n}'`).join(', ')}`;
    throw new ProxyError('ERR_ROUTE', `Route '${r.name}' matches no socket (${seen}).`, EINVAL);
  });
  return picked;
}
