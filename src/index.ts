/**
 * socket-proxyd as a library: embed the proxy in a Node program.
 *
 *   import { createProxy, listenOnAddress, parseAddress, createLogger } from 'socket-proxyd';
 *   const proxy = createProxy({ target: parseAddress('127.0.0.1:8080'), connectionsMax: 256,
 *                               exitIdleTimeUsec: null, logger: createLogger(process.env) });
 *   await listenOnAddress(proxy, parseAddress('127.0.0.1:80'));
 *   ...
 *   closeProxy(proxy);
 */
export { parseAddress, parseListenAddress, formatAddress, type Address } from './config/address.ts';
export { takeListenFds, type ListenFd } from './system/activation.ts';
export { parseArgv, helpText, type Options, type Parsed } from './config/args.ts';
export { ProxyError, type ProxyErrorCode } from './errors.ts';
export { createLogger, parseLogLevel, type Logger } from './system/log.ts';
export {
  armIdleTimer,
  closeProxy,
  createProxy,
  drainProxy,
  listenOnAddress,
  listenOnFd,
  routeFor,
  totalStats,
  type LookupFunction,
  type Proxy,
  type ProxyOptions,
} from './engine/proxy.ts';
export { assignRoutes, checkRouteName, splitRouteArg, type Route, type RouteSpec, type SocketSpec } from './config/route.ts';
export { parseSec, formatTimespan, USEC_INFINITY } from './config/timespan.ts';
export { statisticsLine, statusSummary, type Stats } from './ops/stats.ts';
