/**
 * Graceful drain and live status under a REAL systemd service manager (systemd --user,
 * run as root in a private mount namespace: ../shared/reference/real-systemd.md).
 * A .socket/.service pair with --drain-timeout=; `systemctl restart` while a transfer
 * runs: the transfer completes byte-exact although it outlasts TimeoutStopSec= (the
 * proxy extends it with EXTEND_TIMEOUT_USEC=), a client that connects during the drain
 * waits in systemd's socket and is served by the next start, and `systemctl status`
 * shows the STATUS= lines; `systemctl kill -s USR1` logs the statistics line.
 *
 * Everything of this manager is private to the test: its runtime directory (not under
 * /tmp: PrivateTmp would hide it), its unit directory (XDG_CONFIG_HOME), its sockets.
 * Needs root and systemd's binaries; without them the test skips (fails under CI).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { managerUnavailable as unavailable, startManager } from './systemd-manager.ts';
import { OURS, connect, randomBytes, readAll, sha256, startBackend, waitFor } from './helpers.ts';

const SLOW = 15_000;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Poll an async condition every 100 ms until it holds; fail after `ms`. */
async function until(cond: () => Promise<boolean>, what: string, ms = SLOW): Promise<void> {
  const deadline = performance.now() + ms;
  while (!(await cond())) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/** "stream N" gets N KiB paced over `ms` then EOF; anything else is echoed. */
async function streamingBackend(ms: number): Promise<Awaited<ReturnType<typeof startBackend>> & { sent: Buffer[] }> {
  const sent: Buffer[] = [];
  const backend = await startBackend((s) => {
    s.once('data', (d: Buffer) => {
      const m = /^stream ([0-9]+)\n$/.exec(d.toString());
      if (m === null) {
        s.write(d);
        s.pipe(s);
        return;
      }
      const payload = randomBytes(Number(m[1]) * 1024);
      sent.push(payload);
      const piece = Math.ceil(payload.length / 20);
      let i = 0;
      const timer = setInterval(() => {
        if (s.destroyed) return clearInterval(timer);
        s.write(payload.subarray(i * piece, (i + 1) * piece));
        if (++i === 20) {
          clearInterval(timer);
          s.end();
        }
      }, ms / 20);
    });
  });
  return Object.assign(backend, { sent });
}

test('real systemd: restart while a transfer runs drains it past TimeoutStopSec=, the next start serves a client that came during the drain, systemctl status shows STATUS=', async (t) => {
  const why = unavailable();
  if (why !== null) {
    if (process.env.CI) assert.fail(why);
    t.skip(why);
    return;
  }
  const backend = await streamingBackend(5000);
  const manager = await startManager('spd-ops-test');
  const path = join(manager.kit, 'proxy.sock');
  const log = join(manager.kit, 'proxy.log');
  try {
    writeFileSync(join(manager.unitDir, 'spd-drain.socket'), `[Socket]\nListenStream=${path}\n`);
    writeFileSync(
      join(manager.unitDir, 'spd-drain.service'),
      [
        '[Unit]',
        'Requires=spd-drain.socket',
        'After=spd-drain.socket',
        '[Service]',
        'Type=notify',
        `ExecStart=${process.execPath} ${OURS} --drain-timeout=30s ${backend.address}`,
        // Shorter than the transfer: only EXTEND_TIMEOUT_USEC= keeps systemd from killing the drain.
        'TimeoutStopSec=2s',
        `StandardError=append:${log}`,
        '',
      ].join('\n'),
    );
    assert.equal((await manager.systemctl('daemon-reload')).status, 0);
    const started = await manager.systemctl('start', 'spd-drain.socket');
    assert.equal(started.status, 0, started.stderr);

    // The first client activates the service and starts a 5 s transfer.
    const c = await connect({ path });
    const reading = readAll(c, 60_000);
    c.write('stream 512\n');
    await once(c, 'data');
    const pid1 = (await manager.systemctl('show', '-P', 'MainPID', 'spd-drain.service')).stdout.trim();
    assert.match(pid1, /^[1-9][0-9]*$/);
    await until(
      async () => /Status: "Processing requests: 1 open, 1 accepted, 0 refused by limit, 0 backend failures"/.test((await manager.systemctl('status', 'spd-drain.service')).stdout),
      'the live STATUS= in systemctl status',
      5000,
    );

    // Restart: systemd sends SIGTERM and waits for the drain.
    const t0 = performance.now();
    const restarted = manager.systemctl('restart', 'spd-drain.service');
    let draining = '';
    await until(
      async () => {
        draining = (await manager.systemctl('status', 'spd-drain.service')).stdout;
        return /Status: "Draining 1 connection\.\.\."/.test(draining);
      },
      'Draining in systemctl status',
      5000,
    );
    assert.match(draining, /deactivating \(stop-sigterm\)/);
    // A client during the drain: queued in systemd's copy of the socket, not refused.
    const late: Socket = await connect({ path });
    late.write('late\n');
    let lateReply = '';
    late.on('data', (d: Buffer) => (lateReply += d.toString()));

    const r = await reading;
    c.end();
    assert.equal(r.ended, 'eof');
    assert.equal(sha256(r.data), sha256(backend.sent[0] as Buffer), 'the transfer completed byte-exact');
    const transferMs = performance.now() - t0;
    assert.ok(transferMs > 2500, `the drain outlasted TimeoutStopSec=2s (${transferMs.toFixed(0)} ms)`);
    await waitFor(() => lateReply === 'late\n', SLOW, 'the late client served by the next start');
    assert.equal((await restarted).status, 0, 'systemctl restart succeeded');
    const pid2 = (await manager.systemctl('show', '-P', 'MainPID', 'spd-drain.service')).stdout.trim();
    assert.notEqual(pid2, pid1, 'a new process serves the late client');
    await until(
      async () => /Status: "Processing requests: 1 open, 1 accepted, /.test((await manager.systemctl('status', 'spd-drain.service')).stdout),
      'the new start\'s STATUS=',
      5000,
    );
    // `systemctl kill -s USR1`: the statistics line in the service's log, the service still running.
    assert.equal((await manager.systemctl('kill', '-s', 'USR1', 'spd-drain.service')).status, 0);
    await until(async () => /^Statistics: 1 open, 1 accepted, 0 refused by limit, 0 backend failures, 5 bytes client->backend, 5 bytes backend->client$/m.test(readFileSync(log, 'utf8')), 'the statistics line', 5000);
    assert.equal((await manager.systemctl('is-active', 'spd-drain.service')).stdout.trim(), 'active');
    late.destroy();
    const logText = readFileSync(log, 'utf8');
    assert.match(logText, /^Draining 1 connection for up to 30s\.\.\.$/m);
    assert.doesNotMatch(logText, /Drain timeout reached/);
    // The first run ended cleanly (a SIGKILL by TimeoutStopSec= would show as a failure).
    assert.equal((await manager.systemctl('show', '-P', 'Result', 'spd-drain.service')).stdout.trim(), 'success');
  } finally {
    // Also after a failure: no proxy may outlive the test (the manager's own stop would wait for a drain).
    await manager.systemctl('kill', '-s', 'KILL', 'spd-drain.service');
    await manager.systemctl('stop', 'spd-drain.service', 'spd-drain.socket');
    await manager.close();
    await backend.close();
  }
});
