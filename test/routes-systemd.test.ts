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
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Socket } from 'node:net';
import { OURS, roundTrip, startBackend } from './helpers.ts';

const SYSTEMD = '/lib/systemd/systemd';
const SLOW = 15_000;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

function unavailable(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (a systemd --user manager in a private mount namespace)';
  for (const tool of [SYSTEMD, '/usr/bin/systemctl', '/usr/bin/unshare', '/usr/bin/nsenter']) {
    if (!existsSync(tool)) return `${tool} is missing`;
  }
  return null;
}

type Run = { status: number | null; stdout: string; stderr: string };

/** A private systemd --user manager (the recipe of real-systemd.md, as test/ops-systemd.test.ts). */
async function startManager(): Promise<{ unitDir: string; kit: string; systemctl(...args: string[]): Promise<Run>; close(): Promise<void> }> {
  const kit = mkdtempSync('/run/spd-routes-test-');
  const runtime = join(kit, 'runtime');
  const config = join(kit, 'config');
  const unitDir = join(config, 'systemd', 'user');
  mkdirSync(runtime, { mode: 0o700 });
  mkdirSync(unitDir, { recursive: true });
  mkdirSync(join(kit, 'run-systemd', 'system'), { recursive: true });
  const env: NodeJS.ProcessEnv = { ...process.env, XDG_RUNTIME_DIR: runtime, XDG_CONFIG_HOME: config };
  delete env.NOTIFY_SOCKET;
  delete env.NODE_TEST_CONTEXT;
  const procs: ChildProcess[] = [];
  const holder = spawn('unshare', ['-m', '--propagation', 'private', 'sh', '-c', `mount --bind ${kit}/run-systemd /run/systemd && exec sleep 300`], {
    stdio: 'ignore',
  });
  procs.push(holder);
  await sleep(300);
  procs.push(spawn('nsenter', ['-t', String(holder.pid), '-m', SYSTEMD, '--user', '--log-target=console'], { env, stdio: 'ignore' }));
  const systemctl = (...args: string[]): Promise<Run> =>
    new Promise((resolve) => {
      const child = spawn('systemctl', ['--user', ...args], { env, stdio: ['ignore', 'pipe', 'pipe'], timeout: 60_000 });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      child.on('close', (status) => resolve({ status, stdout, stderr }));
    });
  const deadline = performance.now() + SLOW;
  while ((await systemctl('show-environment')).status !== 0) {
    if (performance.now() > deadline) throw new Error('the systemd --user manager did not start');
    await sleep(100);
  }
  return {
    unitDir,
    kit,
    systemctl,
    async close() {
      for (const p of procs.reverse()) {
        if (p.exitCode === null && p.signalCode === null) {
          p.kill('SIGTERM');
          await Promise.race([once(p, 'exit'), sleep(3000)]);
          if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
        }
      }
      rmSync(kit, { recursive: true, force: true });
    },
  };
}

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
  const manager = await startManager();
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
