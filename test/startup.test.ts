/**
 * What a new user meets first, through the real CLI (dist/cli.js, `npm run build` first):
 * the Node.js version check, --listen= addresses and their errors, NODE_OPTIONS that
 * turn deprecations into exceptions, and SIGUSR1 (Node's default would open a debugger).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, readlinkSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { join } from 'node:path';
import { OURS, ROOT, echo, roundTrip, runProxy, startBackend, startProxy, tempDir, waitFor } from './helpers.ts';

const tmp = tempDir();
process.on('exit', () => tmp.cleanup());

const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { engines: { node: string } };

// ---------------------------------------------------------------------------------------------
// The Node.js version

/** Run dist/cli.js under `node`, optionally pretending (before anything else loads) to be `version`. */
function runCli(node: string, args: string[], env: Record<string, string> = {}, version?: string): { status: number | null; stdout: string; stderr: string } {
  const pretend = version === undefined ? [] : ['--import', `data:text/javascript,Object.defineProperty(process.versions,"node",{value:"${version}"})`];
  const r = spawnSync(node, [...pretend, OURS, ...args], { encoding: 'utf8', timeout: 10_000, env: { PATH: process.env.PATH ?? '/usr/bin:/bin', ...env } });
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function tooOldLine(version: string, path: string): string {
  assert.match(pkg.engines.node, /^>=\d+\.\d+$/, 'engines is ">=MAJOR.MINOR"');
  return `Node.js v${version} (${path}) is too old: socket-proxyd needs Node.js ${pkg.engines.node}. Run it with a newer node (in a unit: its absolute path in ExecStart=, or Environment=PATH=).\n`;
}

const SYSTEM_NODE = '/usr/bin/node';

test('Node.js older than engines: one line naming the version, its path and what is needed; exit 1 (the real Node 20)', (t) => {
  if (!existsSync(SYSTEM_NODE)) {
    if (process.env.CI) assert.fail(`${SYSTEM_NODE} (Debian's nodejs, an old Node) is needed for this test`);
    t.skip(`${SYSTEM_NODE} is not installed`);
    return;
  }
  const version = spawnSync(SYSTEM_NODE, ['-p', 'process.versions.node'], { encoding: 'utf8' }).stdout.trim();
  const [major, minor] = version.split('.').map(Number) as [number, number];
  const [needMajor, needMinor] = pkg.engines.node.slice(2).split('.').map(Number) as [number, number];
  if (major > needMajor || (major === needMajor && minor >= needMinor)) {
    if (process.env.CI) assert.fail(`${SYSTEM_NODE} is v${version}, not older than ${pkg.engines.node}`);
    t.skip(`${SYSTEM_NODE} is v${version}, not older than ${pkg.engines.node}`);
    return;
  }
  // The same command line that, without the check, starts and serves (and fails every @abstract target).
  const sock = join(tmp.dir, 'old-node.sock');
  const r = runCli(SYSTEM_NODE, [`--listen=${sock}`, '@some-abstract-backend']);
  assert.equal(r.stderr, tooOldLine(version, SYSTEM_NODE));
  assert.equal(r.status, 1);
  assert.equal(r.stdout, '');
  assert.ok(!existsSync(sock), 'nothing was started');
  // Before anything else: --version and --help are refused the same way.
  assert.equal(runCli(SYSTEM_NODE, ['--version']).stderr, tooOldLine(version, SYSTEM_NODE));
});

test('Node.js version check: the boundary is engines exactly; journal priority <3> when stderr is the journal', () => {
  const [needMajor, needMinor] = pkg.engines.node.slice(2).split('.').map(Number) as [number, number];
  for (const old of [`${needMajor}.${needMinor - 1}.9`, `${needMajor - 2}.99.0`, '9.0.0']) {
    const r = runCli(process.execPath, ['--version'], {}, old);
    assert.equal(r.stderr, tooOldLine(old, process.execPath), old);
    assert.equal(r.status, 1, old);
  }
  for (const fine of [`${needMajor}.${needMinor}.0`, `${needMajor + 1}.0.0`, `${needMajor + 10}.1.2`]) {
    const r = runCli(process.execPath, ['--version'], {}, fine);
    assert.equal(r.stderr, '', fine);
    assert.match(r.stdout, /^socket-proxyd \d/, fine);
    assert.equal(r.status, 0, fine);
  }
  // stderr is a file here; JOURNAL_STREAM naming it gets the error priority prefix.
  const log = join(tmp.dir, 'journal-stand-in.log');
  const fd = spawnSync('sh', ['-c', `exec 2>'${log}'; stat -L -c '%d:%i' /dev/stderr`], { encoding: 'utf8' });
  const devIno = fd.stdout.trim();
  const old = `${needMajor}.0.0`;
  spawnSync('sh', ['-c', `exec 2>>'${log}'; exec "$@"`, 'sh', process.execPath, '--import', `data:text/javascript,Object.defineProperty(process.versions,"node",{value:"${old}"})`, OURS, '--version'], {
    env: { PATH: process.env.PATH ?? '/usr/bin:/bin', JOURNAL_STREAM: devIno },
  });
  assert.equal(readFileSync(log, 'utf8'), `<3>${tooOldLine(old, process.execPath)}`);
});

// ---------------------------------------------------------------------------------------------
// Node's compile cache: V8 code loaded from disk, so never from a directory another user can write

test('compile cache: made writable by us alone in a fresh TMPDIR; a node-compile-cache dir others can write, or a symlink, is not used', () => {
  const cacheFiles = (dir: string): string[] => readdirSync(dir, { recursive: true }).map(String);
  // A fresh TMPDIR: the cache directory is made, writable by us alone, and filled (the speed-up stays).
  const fresh = join(tmp.dir, 'cc-fresh');
  mkdirSync(fresh);
  const r = runCli(process.execPath, ['--version'], { TMPDIR: fresh });
  assert.equal(r.status, 0, r.stderr);
  const made = lstatSync(join(fresh, 'node-compile-cache'));
  assert.ok(made.isDirectory());
  assert.equal(made.uid, process.getuid?.());
  assert.equal(made.mode & 0o022, 0, `mode ${(made.mode & 0o777).toString(8)}`);
  assert.ok(cacheFiles(join(fresh, 'node-compile-cache')).length > 0, 'the cache is used');
  // Made first by someone else in a shared /tmp: world-writable (and, as root, another
  // user's). Whoever can write there could plant code that runs as the proxy's user.
  const planted = join(tmp.dir, 'cc-planted');
  const theirs = join(planted, 'node-compile-cache');
  mkdirSync(theirs, { recursive: true });
  chmodSync(theirs, 0o777);
  if (process.getuid?.() === 0) chownSync(theirs, 65534, 65534);
  const r2 = runCli(process.execPath, ['--version'], { TMPDIR: planted });
  assert.equal(r2.status, 0, r2.stderr);
  assert.match(r2.stdout, /^socket-proxyd \d/);
  assert.deepEqual(cacheFiles(theirs), [], 'nothing read from or written into a directory others can write');
  // A symlink in its place is not followed.
  const linked = join(tmp.dir, 'cc-link');
  const elsewhere = join(tmp.dir, 'cc-elsewhere');
  mkdirSync(linked);
  mkdirSync(elsewhere, { mode: 0o700 });
  symlinkSync(elsewhere, join(linked, 'node-compile-cache'));
  const r3 = runCli(process.execPath, ['--version'], { TMPDIR: linked });
  assert.equal(r3.status, 0, r3.stderr);
  assert.deepEqual(cacheFiles(elsewhere), [], 'the symlink was not followed');
});

// ---------------------------------------------------------------------------------------------
// --listen= addresses

/** Listening sockets of a process, from /proc: "tcp6 [::]:8080", "tcp 127.0.0.1:80", "unix /path". */
function listeningSockets(pid: number): string[] {
  const inodes = new Set<string>();
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    try {
      const m = /^socket:\[(\d+)\]$/.exec(readlinkSync(`/proc/${pid}/fd/${fd}`));
      if (m !== null) inodes.add(m[1] as string);
    } catch {
      // closed meanwhile
    }
  }
  const out: string[] = [];
  for (const proto of ['tcp', 'tcp6']) {
    for (const line of readFileSync(`/proc/net/${proto}`, 'utf8').split('\n').slice(1)) {
      const f = line.trim().split(/\s+/);
      // local_address rem_address st ... inode (field 9); 0A = LISTEN
      if (f.length < 10 || f[3] !== '0A' || !inodes.has(f[9] as string)) continue;
      const [hex, portHex] = (f[1] as string).split(':') as [string, string];
      const allZero = /^0+$/.test(hex);
      const host = proto === 'tcp6' ? (allZero ? '[::]' : `[${hex}]`) : hex.match(/../g)!.reverse().map((b) => parseInt(b, 16)).join('.');
      out.push(`${proto} ${host}:${parseInt(portHex, 16)}`);
    }
  }
  for (const line of readFileSync('/proc/net/unix', 'utf8').split('\n').slice(1)) {
    const f = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path; Flags 00010000 = __SO_ACCEPTCON
    if (f.length < 7 || f[3] !== '00010000' || !inodes.has(f[6] as string)) continue;
    out.push(`unix ${f[7] ?? '(unnamed)'}`);
  }
  return out.sort();
}

/** A TCP port that was free a moment ago (bound on port 0 and released). */
async function freePort(): Promise<number> {
  const s = createServer();
  await new Promise<void>((res) => s.listen({ port: 0, host: '::', ipv6Only: false }, res));
  const port = (s.address() as { port: number }).port;
  await new Promise((res) => s.close(res));
  return port;
}

test('--listen=PORT (bare port) listens on every address, dual-stack [::]:PORT, like ListenStream=PORT', async () => {
  const backend = await startBackend(echo);
  let port = 0;
  let p: Awaited<ReturnType<typeof startProxy>> | null = null;
  try {
    // The port was free a moment ago; another process may take it meanwhile: try a few.
    for (let attempt = 0; attempt < 5 && p === null; attempt++) {
      port = await freePort();
      const q = await startProxy({ args: [`--listen=${port}`, backend.address] });
      await waitFor(() => listeningSockets(q.pid).length > 0 || q.child.exitCode !== null, 5000, 'listening');
      if (q.child.exitCode === null) p = q;
      else assert.match(q.stderr(), /Address already in use/, q.stderr());
    }
    assert.ok(p !== null);
    assert.deepEqual(listeningSockets(p.pid), [`tcp6 [::]:${port}`]);
    for (const host of ['127.0.0.1', '::1']) {
      const r = await roundTrip({ host, port }, Buffer.from(`via ${host}`), 5000);
      assert.equal(r.data.toString(), `via ${host}`);
    }
    assert.equal(p.stderr(), '');
  } finally {
    await p?.stop();
    await backend.close();
  }
});

test('--listen=/missing-dir/x.sock reports the real cause, not libuv\'s EACCES', async () => {
  const missing = join(tmp.dir, 'no-such-dir', 'x.sock');
  let r = await runProxy({ args: [`--listen=${missing}`, '127.0.0.1:1'] });
  assert.equal(r.stderr, `Failed to listen on ${missing}: No such file or directory\n`);
  assert.equal(r.code, 1);
  const file = join(tmp.dir, 'a-file');
  writeFileSync(file, '');
  r = await runProxy({ args: [`--listen=${file}/x.sock`, '127.0.0.1:1'] });
  assert.equal(r.stderr, `Failed to listen on ${file}/x.sock: Not a directory\n`);
  assert.equal(r.code, 1);
  // A real permission problem still says so (needs a user the directory does not let in).
  if (process.getuid?.() === 0) {
    const locked = join(tmp.dir, 'locked');
    mkdirSync(locked);
    chmodSync(locked, 0o555);
    chmodSync(tmp.dir, 0o755);
    r = await runProxy({ args: [`--listen=${locked}/x.sock`, '127.0.0.1:1'], wrapper: ['setpriv', '--reuid=65534', '--regid=65534', '--clear-groups'] });
    assert.equal(r.stderr, `Failed to listen on ${locked}/x.sock: Permission denied\n`);
    assert.equal(r.code, 1);
  }
});

// ---------------------------------------------------------------------------------------------
// NODE_OPTIONS

test('NODE_OPTIONS=--throw-deprecation --pending-deprecation: one line and exit 1, not a stack trace', async () => {
  const sock = join(tmp.dir, 'deprecation.sock');
  const r = await runProxy({ args: [`--listen=${sock}`, '127.0.0.1:1'], env: { NODE_OPTIONS: '--throw-deprecation --pending-deprecation' } });
  assert.equal(
    r.stderr,
    'process.binding() is deprecated under --pending-deprecation (DEP0111) and --throw-deprecation makes that fatal, but socket-proxyd needs it: run it without --throw-deprecation.\n',
  );
  assert.equal(r.code, 1);
  // Either flag alone: it runs and serves (with --pending-deprecation, Node's own warning as usual).
  const backend = await startBackend(echo);
  try {
    for (const [flags, warned] of [['--throw-deprecation', false], ['--pending-deprecation', true]] as const) {
      const p = await startProxy({ args: [backend.address], listen: [{ kind: 'tcp' }], env: { NODE_OPTIONS: flags } });
      try {
        const got = await roundTrip(p.listeners[0]!.connectOptions, Buffer.from(flags), 5000);
        assert.equal(got.data.toString(), flags);
        assert.equal(/\[DEP0111\] DeprecationWarning/.test(p.stderr()), warned, p.stderr());
        assert.equal(p.child.exitCode, null);
      } finally {
        await p.stop();
      }
    }
  } finally {
    await backend.close();
  }
});

// ---------------------------------------------------------------------------------------------
// SIGUSR1

test('SIGUSR1 opens no debugger: the proxy keeps running and serving, and listens on nothing new', async () => {
  const backend = await startBackend(echo);
  const own = join(tmp.dir, 'usr1.sock');
  const p = await startProxy({ args: [`--listen=${own}`, backend.address], listen: [{ kind: 'tcp' }] });
  try {
    const via = p.listeners[0]!.connectOptions;
    assert.equal((await roundTrip(via, Buffer.from('before'), 5000)).data.toString(), 'before');
    const before = listeningSockets(p.pid);
    assert.equal(before.length, 2, before.join(', '));
    for (let i = 0; i < 3; i++) {
      process.kill(p.pid, 'SIGUSR1');
      // Node's inspector, when it reacts, listens within a few ms; give it ample time.
      await new Promise((r) => setTimeout(r, 300));
    }
    assert.equal(p.child.exitCode, null, 'still running');
    assert.deepEqual(listeningSockets(p.pid), before, 'no new listening socket (the inspector would add 127.0.0.1:9229)');
    assert.doesNotMatch(p.stderr(), /Debugger|inspector/i);
    assert.equal((await roundTrip(via, Buffer.from('after'), 5000)).data.toString(), 'after');
    assert.equal((await roundTrip({ path: own }, Buffer.from('own'), 5000)).data.toString(), 'own');
    // Its job (issue 13): one statistics line per signal, nothing else.
    assert.match(p.stderr(), /^(?:Statistics: [^\n]+\n){3}$/);
  } finally {
    await p.stop();
    await backend.close();
  }
});
