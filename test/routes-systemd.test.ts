/**
 * Routes (issue 12) under a REAL systemd service manager (systemd --user, as root, in a private
 * mount namespace: ../shared/reference/real-systemd.md): two socket units with
 * FileDescriptorName= start one service (Sockets=), systemd passes LISTEN_FDNAMES, and each
 * socket reaches its own backend, whichever socket starts the service.
 *
 * Needs root and systemd's binaries; without them the test skips (fails under CI).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { managerUnavailable as unavailable, startManager } from './systemd-manager.ts';
import { OURS, roundTrip, startBackend } from './helpers.ts';

const SLOW = 15_000;

/** A backend that sends "TAG\n" and then echoes. */
function tagged(tag: string, where: { path?: string } = {}): ReturnType<typeof startBackend> {
  return startBackend((s: Socket) => {
    s.write(`${tag}\n`);
    s.pipe(s);
  }, where);
}

async function freeTcpPort(): Promise<number> {
  const probe = await startBackend(() => {});
  const port = probe.port;
  await probe.close();
  return port;
}

test('real systemd: two socket units with FileDescriptorName= start one service; each socket reaches its own backend', async (t) => {
  const why = unavailable();
  if (why !== null) {
    if (process.env.CI) assert.fail(why);
    t.skip(why);
    return;
  }
  const manager = await startManager('spd-routes-test');
  const web = await tagged('web', { path: join(manager.kit, 'nginx.sock') });
  const db = await tagged('db');
  const log = join(manager.kit, 'proxy.log');
  try {
    const webPort = await freeTcpPort();
    const dbPort = await freeTcpPort();
    for (const [name, port] of [['web', webPort], ['db', dbPort]] as const) {
      writeFileSync(
        join(manager.unitDir, `spd-${name}.socket`),
        `[Socket]\nListenStream=127.0.0.1:${port}\nFileDescriptorName=${name}\nService=spd-routes.service\n`,
      );
    }
    writeFileSync(
      join(manager.unitDir, 'spd-routes.service'),
      [
        '[Unit]',
        'Requires=spd-web.socket spd-db.socket',
        'After=spd-web.socket spd-db.socket',
        '[Service]',
        'Type=notify',
        'Sockets=spd-web.socket spd-db.socket',
        // Routes in the other order than Sockets=: matching by position would cross them.
        `ExecStart=${process.execPath} ${OURS} db=${db.address} web=${web.address}`,
        'Environment=SYSTEMD_LOG_LEVEL=debug',
        `StandardError=append:${log}`,
        '',
      ].join('\n'),
    );
    assert.equal((await manager.systemctl('daemon-reload')).status, 0);
    const started = await manager.systemctl('start', 'spd-web.socket', 'spd-db.socket');
    assert.equal(started.status, 0, started.stderr);
    assert.equal((await manager.systemctl('show', '-P', 'ActiveState', 'spd-routes.service')).stdout.trim(), 'inactive');

    // The db socket starts the service (its connection waits in systemd's socket), then web.
    for (let round = 0; round < 2; round++) {
      const order = round === 0 ? (['db', 'web'] as const) : (['web', 'db'] as const);
      for (const name of order) {
        const payload = Buffer.from(`${name} round ${round}`);
        const r = await roundTrip({ host: '127.0.0.1', port: name === 'web' ? webPort : dbPort }, payload, SLOW);
        assert.equal(r.data.toString(), `${name}\n${payload.toString()}`, `${name}, round ${round}: ${readFileSync(log, 'utf8')}`);
      }
      assert.equal((await manager.systemctl('show', '-P', 'ActiveState', 'spd-routes.service')).stdout.trim(), 'active');
      // Round two: a fresh start, activated by the other socket first.
      assert.equal((await manager.systemctl('stop', 'spd-routes.service')).status, 0);
    }
    // With two routes the debug lines name the route; nothing was refused or failed.
    const text = readFileSync(log, 'utf8');
    assert.match(text, /^web: New connection from 127\.0\.0\.1:[0-9]+$/m);
    assert.match(text, /^db: New connection from 127\.0\.0\.1:[0-9]+$/m);
    assert.doesNotMatch(text, /No route|matches no socket|Failed/);
    await manager.systemctl('stop', 'spd-routes.service', 'spd-web.socket', 'spd-db.socket');
  } finally {
    await manager.close();
    await web.close();
    await db.close();
  }
});
