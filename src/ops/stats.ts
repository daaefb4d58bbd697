/**
 * The counters an operator sees: the live STATUS= line, the SIGUSR1 log line and
 * the Prometheus endpoint (metrics.ts) all read the same object.
 *
 * Counting is on the data path, so it is kept to plain integer adds on fields of
 * one object per engine (per route, once there are routes): no timers, no clocks,
 * no allocation. Text is built only when somebody asks (a STATUS= tick, SIGUSR1, a
 * scrape). JavaScript numbers count bytes exactly up to 2^53 (8 PiB).
 */

export interface Stats {
  /** Connections accepted and forwarded (those refused by the limit are not counted here). */
  accepted: number;
  /** Connections accepted and closed at once because --connections-max were open. */
  refused: number;
  /** Connections closed because the backend could not be resolved or connected to. */
  backendFailures: number;
  /** Datagram flows opened (one per client address, datagram.ts). */
  flows: number;
  /** Bytes read from clients and forwarded to the backend (datagram payloads included). */
  bytesToBackend: number;
  /** Bytes read from the backend and forwarded to clients. */
  bytesToClient: number;
}

export function createStats(): Stats {
  return { accepted: 0, refused: 0, backendFailures: 0, flows: 0, bytesToBackend: 0, bytesToClient: 0 };
}

/**
 * What STATUS= shows: the connection counters (bytes change too often to be a status).
 * Datagram flows only once there has been one, so a stream-only proxy's line stays short;
 * clients waiting for their backend only when they can (`waiting` given: --connect-retry=).
 */
export function statusSummary(stats: Stats, open: number, flowsOpen = 0, waiting?: number): string {
  const flows = stats.flows === 0 ? '' : `, ${flowsOpen} flows open, ${stats.flows} flows opened`;
  const wait = waiting === undefined ? '' : `, ${waiting} waiting for backend`;
  return `${open} open${wait}, ${stats.accepted} accepted, ${stats.refused} refused by limit, ${stats.backendFailures} backend failures${flows}`;
}

/** The SIGUSR1 log line: the status counters plus bytes forwarded each way. */
export function statisticsLine(stats: Stats, open: number, flowsOpen = 0, waiting?: number): string {
  return (
    `Statistics: ${statusSummary(stats, open, flowsOpen, waiting)}, ` +
    `${stats.bytesToBackend} bytes client->backend, ${stats.bytesToClient} bytes backend->client`
  );
}
