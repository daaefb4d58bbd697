/**
 * A REAL systemd service manager for tests, on a machine whose PID 1 is not systemd:
 * `systemd --user` as root in a private mount namespace where /run/systemd/system exists
 * (the recipe of ../shared/reference/real-systemd.md). Units go in `unitDir`; everything
 * lives under `kit` (in /run, not /tmp: PrivateTmp=yes would hide it from a service).
 *
 * Shared by every test that needs a real manager (routes, ops, datagram, PROXY protocol).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { once } from 'node:events';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';

const SYSTEMD = '/lib/systemd/systemd';
const START_TIMEOUT_MS = 15_000;
const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Why a real manager cannot run here, or null. */
export function managerUnavailable(): string | null {
  if (process.getuid?.() !== 0) return 'needs root (a systemd --user manager in a private mount namespace)';
  for (const tool of [SYSTEMD, '/usr/bin/systemctl', '/usr/bin/unshare', '/usr/bin/nsenter']) {
    if (!existsSync(tool)) return `${tool} is missing`;
  }
  return null;
}

export interface Run {
  status: number | null;
  stdout: string;
  stderr: string;
}

export interface Manager {
  /** ~/.config/systemd/user of this manager */
  unitDir: string;
  /** a private directory under /run for the test's files; removed by close() */
  kit: string;
  systemctl(...args: string[]): Promise<Run>;
  /** kills the manager and the namespace (in reverse order of start), removes `kit` */
  close(): Promise<void>;
}

export async function startManager(prefix: string): Promise<Manager> {
  const kit = mkdtempSync(`/run/${prefix}-`);
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
  const close = async (): Promise<void> => {
    for (const p of [...procs].reverse()) {
      if (p.exitCode === null && p.signalCode === null) {
        p.kill('SIGTERM');
        await Promise.race([once(p, 'exit'), sleep(3000)]);
        if (p.exitCode === null && p.signalCode === null) p.kill('SIGKILL');
      }
    }
    rmSync(kit, { recursive: true, force: true });
  };
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
  const deadline = performance.now() + START_TIMEOUT_MS;
  while ((await systemctl('show-environment')).status !== 0) {
    if (performance.now() > deadline) {
      await close();
      throw new Error('the systemd --user manager did not start');
    }
    await sleep(100);
  }
  return { unitDir, kit, systemctl, close };
}
