/**
 * The documentation a sysadmin relies on when swapping systemd-socket-proxyd for
 * socket-proxyd: the unit files in examples/ and the man page man/socket-proxyd.8.
 *
 * - examples/: `systemd-analyze verify` must accept every unit without a word. verify
 *   insists that ExecStart='s binary exists, and /usr/local/bin/socket-proxyd is not
 *   installed here, so the test verifies copies of the real files in which only that
 *   path is rewritten to an executable wrapper around dist/cli.js (a control run shows
 *   the unrewritten copy is refused for exactly that reason). nginx.service is a stub
 *   in the same directory (verify adds the units' directory to its search path), so the
 *   result does not depend on whether nginx is installed; the examples' own
 *   nginx.service.d/ drop-ins are loaded onto it (a control run proves it).
 *   The ExecStart= command lines must also be accepted by our CLI and serve traffic.
 * - man page: groff -man -ww renders it without warnings, and it documents every
 *   option --help lists, the environment, exit status, examples and differences.
 * - README.md: names every option of --help and shows only ExecStart= lines of examples/.
 *
 * Missing tools (groff, systemd-analyze) fail the test loudly; nothing is skipped.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { chmodSync, cpSync, existsSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { helpText } from '../src/config/args.ts';
import { parseSec } from '../src/config/timespan.ts';
import { OURS, ROOT, echo, roundTrip, startBackend, startProxy, tempDir } from './helpers.ts';

const EXAMPLES = join(ROOT, 'examples');
const MAN_PAGE = join(ROOT, 'man', 'socket-proxyd.8');
/** Where the examples say the proxy is installed. */
const INSTALLED = '/usr/local/bin/socket-proxyd';

const tmp = tempDir();
process.on('exit', () => tmp.cleanup());

/** Run a tool; a missing tool is a failure with a hint, never a skip. */
function run(cmd: string, args: string[], hint: string): { status: number | null; stdout: string; stderr: string } {
  const r = spawnSync(cmd, args, { encoding: 'utf8', timeout: 30_000, env: { ...process.env, LC_ALL: 'C.UTF-8', MANWIDTH: '80' } });
  if (r.error !== undefined) assert.fail(`${cmd} could not be run (${r.error.message}): ${hint}`);
  return { status: r.status, stdout: r.stdout, stderr: r.stderr };
}

function filesUnder(dir: string): string[] {
  return readdirSync(dir, { recursive: true, encoding: 'utf8' })
    .filter((f) => statSync(join(dir, f)).isFile())
    .sort();
}

/** Non-comment, non-empty lines of a unit file. */
function directives(path: string): string[] {
  return readFileSync(path, 'utf8')
    .split('\n')
    .map((l) => l.trim())
    .filter((l) => l !== '' && !l.startsWith('#'));
}

function execStart(path: string): string[] {
  const line = directives(path).find((l) => l.startsWith('ExecStart='));
  assert.ok(line !== undefined, `${path} has ExecStart=`);
  return line.slice('ExecStart='.length).split(/\s+/);
}

const EXPECTED_FILES: Record<string, string[]> = {
  'nginx-unix': ['nginx.conf', 'proxy-to-nginx.service', 'proxy-to-nginx.socket'],
  'nginx-namespace': ['nginx.conf', 'nginx.service.d/private-network.conf', 'proxy-to-nginx.service', 'proxy-to-nginx.socket'],
  'idle-exit': ['nginx.conf', 'nginx.service.d/stop-when-unneeded.conf', 'proxy-to-nginx.service', 'proxy-to-nginx.socket'],
  'lazy-start': ['nginx.conf', 'proxy-to-nginx.service', 'proxy-to-nginx.socket'],
};

/** The routes example (issue 12): two named socket units, one service for both. */
const ROUTES = 'routes';
const ROUTES_FILES = ['nginx.conf', 'proxy-db.socket', 'proxy-routes.service', 'proxy-web.socket'];
const ROUTES_UNITS = ['proxy-web.socket', 'proxy-db.socket', 'proxy-routes.service'];
const ROUTES_EXEC = ['web=/run/nginx.sock', 'db=/run/postgresql/.s.PGSQL.5432'];

// ---------------------------------------------------------------------------------------------
// examples/

/** Examples that are not about nginx, each with its own tests below. */
const OTHER_EXAMPLES: Record<string, string[]> = {
  'dns-udp': ['dnsmasq.d/port-5353.conf', 'proxy-to-dns.service', 'proxy-to-dns.socket'],
  [ROUTES]: ROUTES_FILES,
};

test('examples/: the man page\'s two examples plus the idle-exit one, all Type=notify', () => {
  assert.deepEqual(readdirSync(EXAMPLES).sort(), [...Object.keys(EXPECTED_FILES), ...Object.keys(OTHER_EXAMPLES)].sort());
  for (const [dir, files] of Object.entries(OTHER_EXAMPLES)) assert.deepEqual(filesUnder(join(EXAMPLES, dir)), files, dir);
  for (const [dir, files] of Object.entries(EXPECTED_FILES)) {
    assert.deepEqual(filesUnder(join(EXAMPLES, dir)), files, dir);
    const service = directives(join(EXAMPLES, dir, 'proxy-to-nginx.service'));
    for (const want of ['Type=notify', 'Requires=nginx.service', 'After=nginx.service', 'Requires=proxy-to-nginx.socket', 'PrivateNetwork=yes']) {
      assert.ok(service.includes(want), `${dir}: ${want}`);
    }
    assert.equal(execStart(join(EXAMPLES, dir, 'proxy-to-nginx.service'))[0], INSTALLED, `${dir}: ExecStart= runs ${INSTALLED}`);
    const triggerLimits = dir === 'idle-exit' ? ['TriggerLimitIntervalSec=2s', 'TriggerLimitBurst=20'] : [];
    assert.deepEqual(directives(join(EXAMPLES, dir, 'proxy-to-nginx.socket')), ['[Socket]', 'ListenStream=80', ...triggerLimits, '[Install]', 'WantedBy=sockets.target']);
  }
  assert.deepEqual(execStart(join(EXAMPLES, 'nginx-unix', 'proxy-to-nginx.service')).slice(1), ['/run/nginx/socket']);
  const ns = directives(join(EXAMPLES, 'nginx-namespace', 'proxy-to-nginx.service'));
  assert.ok(ns.includes('JoinsNamespaceOf=nginx.service'));
  assert.deepEqual(execStart(join(EXAMPLES, 'nginx-namespace', 'proxy-to-nginx.service')).slice(1), ['127.0.0.1:8080']);
  assert.ok(directives(join(EXAMPLES, 'nginx-namespace', 'nginx.service.d', 'private-network.conf')).includes('PrivateNetwork=yes'));
  // Lazy start (issue 11): waits for the backend, bounds connects, idle and dead peers.
  assert.deepEqual(execStart(join(EXAMPLES, 'lazy-start', 'proxy-to-nginx.service')).slice(1), [
    '--connect-retry=30s',
    '--connect-timeout=5s',
    '--idle-timeout=1h',
    '--keepalive=5min',
    '/run/nginx/socket',
  ]);
  const idleArgs = execStart(join(EXAMPLES, 'idle-exit', 'proxy-to-nginx.service')).slice(1);
  assert.ok(idleArgs.some((a) => a.startsWith('--exit-idle-time=')), 'idle-exit passes --exit-idle-time=');
  assert.deepEqual(directives(join(EXAMPLES, 'idle-exit', 'nginx.service.d', 'stop-when-unneeded.conf')), [
    '[Unit]',
    'StopWhenUnneeded=yes',
    'StartLimitIntervalSec=60s',
    'StartLimitBurst=30',
  ]);
});

/** The directives of one [Section] of a unit file. */
function sectionOf(path: string, name: string): string[] {
  const lines = directives(path);
  const start = lines.indexOf(`[${name}]`);
  if (start < 0) return [];
  const end = lines.findIndex((l, i) => i > start && l.startsWith('['));
  return lines.slice(start + 1, end < 0 ? undefined : end);
}

function value(lines: string[], key: string): string | undefined {
  return lines.find((l) => l.startsWith(`${key}=`))?.slice(key.length + 1);
}

test('examples/: the proxy runs unprivileged (DynamicUser=yes), never as root; no NoDelay=yes (the proxy sets it)', () => {
  for (const dir of Object.keys(EXPECTED_FILES)) {
    const service = join(EXAMPLES, dir, 'proxy-to-nginx.service');
    const svc = sectionOf(service, 'Service');
    assert.equal(value(svc, 'DynamicUser'), 'yes', `${dir}: DynamicUser=yes`);
    assert.ok(!svc.some((l) => /^User=(root|0)$/.test(l)), `${dir}: not User=root`);
    // The comment says what the backend's socket must allow and points to SECURITY.
    const text = readFileSync(service, 'utf8');
    assert.match(text, /SO_PEERCRED/);
    assert.match(text, /SECURITY in socket-proxyd\(8\)/);
    assert.ok(!readFileSync(join(EXAMPLES, dir, 'proxy-to-nginx.socket'), 'utf8').includes('NoDelay='), `${dir}: no NoDelay=`);
  }
  assert.match(readFileSync(join(EXAMPLES, 'nginx-unix', 'proxy-to-nginx.service'), 'utf8'), /mode 0666[\s\S]*SupplementaryGroups=/);
});

test('examples/: idle exit sets start limits that its --exit-idle-time cannot trip, in both units, and the socket\'s trigger limit', () => {
  const dir = join(EXAMPLES, 'idle-exit');
  const idleArg = execStart(join(dir, 'proxy-to-nginx.service')).find((a) => a.startsWith('--exit-idle-time='));
  assert.ok(idleArg !== undefined);
  const idleUsec = parseSec(idleArg.slice('--exit-idle-time='.length));
  for (const file of ['proxy-to-nginx.service', join('nginx.service.d', 'stop-when-unneeded.conf')]) {
    // StartLimit*= belong in [Unit] (in [Service] systemd only accepts the old names, with a warning).
    const unit = sectionOf(join(dir, file), 'Unit');
    const interval = value(unit, 'StartLimitIntervalSec');
    const burst = value(unit, 'StartLimitBurst');
    assert.ok(interval !== undefined && burst !== undefined, `${file}: StartLimitIntervalSec= and StartLimitBurst= in [Unit]`);
    // At most one start per idle period: the burst must exceed interval / idle time (the comment's rule),
    // and the example's values must allow the short idle time the comment promises (3 s).
    const intervalUsec = parseSec(interval);
    assert.ok(BigInt(burst) * idleUsec > intervalUsec, `${file}: ${burst} starts per ${interval} allow ${idleArg}`);
    assert.ok(BigInt(burst) * 3_000_000n > intervalUsec, `${file}: allows an idle time of 3 s`);
  }
  const socket = sectionOf(join(dir, 'proxy-to-nginx.socket'), 'Socket');
  assert.equal(value(socket, 'TriggerLimitIntervalSec'), '2s');
  assert.equal(value(socket, 'TriggerLimitBurst'), '20');
  assert.match(readFileSync(join(dir, 'proxy-to-nginx.service'), 'utf8'), /trigger-limit-hit/);
});

/** The commented-out alternatives each example service shows for naming a suitable node. */
function nodeAlternatives(service: string): { path: string; execStart: string } {
  const text = readFileSync(service, 'utf8');
  const path = /^#\s+(Environment=PATH=\S+)$/m.exec(text)?.[1];
  const exec = /^#\s+(ExecStart=\/\S+\/node \S+\/dist\/cli\.js .*)$/m.exec(text)?.[1];
  assert.ok(path !== undefined && exec !== undefined, `${service}: shows Environment=PATH= and ExecStart=/.../node .../dist/cli.js`);
  return { path, execStart: exec };
}

test('examples/: each service shows how to run the right Node (Environment=PATH= or node\'s absolute path), and both verify', () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { engines: { node: string } };
  for (const dir of Object.keys(EXPECTED_FILES)) {
    const service = join(EXAMPLES, dir, 'proxy-to-nginx.service');
    const alt = nodeAlternatives(service);
    assert.ok(readFileSync(service, 'utf8').includes(`Node.js ${pkg.engines.node.replace('>=', '>= ')}`), `${dir}: names the Node.js needed`);
    // The same arguments as the real ExecStart=, and a PATH that keeps systemd's directories.
    assert.deepEqual(alt.execStart.split(/\s+/).slice(2), execStart(service).slice(1));
    for (const d of ['/usr/local/bin', '/usr/bin', '/bin']) assert.ok(alt.path.split(/[=:]/).includes(d), `${dir}: PATH keeps ${d}`);
    // Uncommented, with the paths made real here, systemd-analyze verify accepts each variant.
    const nodeDir = join(tmp.dir, `node-${dir}`, 'bin');
    mkdirSync(nodeDir, { recursive: true });
    const node = join(nodeDir, 'node');
    writeFileSync(node, `#!/bin/sh\nexec '${process.execPath}' "$@"\n`);
    chmodSync(node, 0o755);
    const asPath = stage(dir, `node-path-${dir}`);
    const file = asPath.units[1] as string;
    writeFileSync(file, readFileSync(file, 'utf8').replace('[Service]\n', `[Service]\n${alt.path.replace(/=\/opt\/node-v22\/bin:/, `=${nodeDir}:`)}\n`));
    assert.match(readFileSync(file, 'utf8'), new RegExp(`^Environment=PATH=${nodeDir}:`, 'm'));
    let r = verify(asPath.units);
    assert.equal(r.stderr, '', `${dir} with Environment=PATH=`);
    const direct = stage(dir, `node-direct-${dir}`, false);
    const file2 = direct.units[1] as string;
    const line = alt.execStart.replace(/^ExecStart=\S+ \S+/, `ExecStart=${node} ${OURS}`);
    writeFileSync(file2, readFileSync(file2, 'utf8').replace(/^ExecStart=.*$/m, line));
    r = verify(direct.units);
    assert.equal(r.stderr, '', `${dir} with ${line}`);
  }
});

test('examples/routes: two socket units with FileDescriptorName= start one service that routes by name', () => {
  const dir = join(EXAMPLES, ROUTES);
  assert.deepEqual(filesUnder(dir), ROUTES_FILES);
  for (const [unit, port, name] of [['proxy-web.socket', 80, 'web'], ['proxy-db.socket', 5432, 'db']] as const) {
    assert.deepEqual(directives(join(dir, unit)), [
      '[Socket]',
      `ListenStream=${port}`,
      `FileDescriptorName=${name}`,
      'Service=proxy-routes.service',
      '[Install]',
      'WantedBy=sockets.target',
    ]);
  }
  const service = directives(join(dir, 'proxy-routes.service'));
  for (const want of ['Type=notify', 'Sockets=proxy-web.socket proxy-db.socket', 'Requires=proxy-web.socket proxy-db.socket', 'PrivateNetwork=yes']) {
    assert.ok(service.includes(want), want);
  }
  const exec = execStart(join(dir, 'proxy-routes.service'));
  assert.equal(exec[0], INSTALLED);
  assert.deepEqual(exec.slice(1), ROUTES_EXEC);
});

/**
 * Copy one example to a fresh directory, with a stub nginx.service beside it and, unless
 * `rewrite` is false, ExecStart='s binary pointed at an executable wrapper of dist/cli.js.
 */
function stage(dir: string, name: string, rewrite = true): { where: string; units: string[] } {
  const routes = dir === ROUTES;
  const where = join(tmp.dir, name);
  cpSync(join(EXAMPLES, dir), where, { recursive: true });
  const bin = join(tmp.dir, 'bin', 'socket-proxyd');
  if (!existsSync(bin)) {
    mkdirSync(join(tmp.dir, 'bin'), { recursive: true });
    writeFileSync(bin, `#!/bin/sh\nexec '${process.execPath}' '${OURS}' "$@"\n`);
    chmodSync(bin, 0o755);
  }
  for (const stub of routes ? ['nginx.service', 'postgresql.service'] : ['nginx.service']) {
    writeFileSync(join(where, stub), '[Unit]\nDescription=stand-in for verification\n\n[Service]\nExecStart=/bin/true\n');
  }
  const units = (routes ? ROUTES_UNITS : ['proxy-to-nginx.socket', 'proxy-to-nginx.service']).map((u) => join(where, u));
  if (rewrite) {
    const service = units.at(-1) as string;
    const text = readFileSync(service, 'utf8');
    assert.ok(text.includes(`ExecStart=${INSTALLED} `));
    writeFileSync(service, text.replaceAll(`ExecStart=${INSTALLED} `, `ExecStart=${bin} `));
  }
  return { where, units };
}

function verify(units: string[]): { status: number | null; stderr: string } {
  const r = run('systemd-analyze', ['verify', ...units], 'systemd-analyze (package systemd) is needed to check examples/');
  return { status: r.status, stderr: r.stdout + r.stderr };
}

test('examples/: systemd-analyze verify accepts every unit (copies with ExecStart= pointed at an existing binary)', () => {
  for (const dir of [...Object.keys(EXPECTED_FILES), ROUTES]) {
    const { units } = stage(dir, `verify-${dir}`);
    const r = verify(units);
    assert.equal(r.stderr, '', `${dir}: systemd-analyze verify says nothing`);
    assert.equal(r.status, 0, dir);
  }
});

test('examples/: the verification is real (controls: missing binary, unknown key, drop-ins are read)', () => {
  // As shipped, ExecStart='s binary is not installed here: verify refuses it.
  const asShipped = verify(stage('nginx-unix', 'control-unrewritten', false).units);
  assert.notEqual(asShipped.status, 0);
  assert.match(asShipped.stderr, new RegExp(`Command ${INSTALLED} is not executable`));

  // A misspelled directive in the service is reported (so an empty stderr means something).
  const typo = stage('nginx-namespace', 'control-typo');
  const service = typo.units[1] as string;
  writeFileSync(service, readFileSync(service, 'utf8').replace(/^JoinsNamespaceOf=/m, 'JoinNamespaceOf='));
  assert.match(verify(typo.units).stderr, /Unknown key 'JoinNamespaceOf'/);

  // The examples' nginx.service.d/ drop-ins are loaded onto nginx.service.
  const dropIn = stage('idle-exit', 'control-dropin');
  const conf = join(dropIn.where, 'nginx.service.d', 'stop-when-unneeded.conf');
  writeFileSync(conf, readFileSync(conf, 'utf8').replace(/^StopWhenUnneeded=/m, 'StopWhenUneeded='));
  assert.match(verify(dropIn.units).stderr, /stop-when-unneeded\.conf:\d+: Unknown key 'StopWhenUneeded'/);
});

test('examples/: each ExecStart= command line is accepted by socket-proxyd and serves traffic', async () => {
  const sock = join(tmp.dir, 'nginx.sock');
  const unixBackend = await startBackend(echo, { path: sock });
  const tcpBackend = await startBackend(echo);
  try {
    for (const dir of Object.keys(EXPECTED_FILES)) {
      // Same options; only the target moves to a test backend (/run/nginx/socket, 127.0.0.1:8080).
      const args = execStart(join(EXAMPLES, dir, 'proxy-to-nginx.service'))
        .slice(1)
        .map((a) => (a === '/run/nginx/socket' ? sock : a === '127.0.0.1:8080' ? tcpBackend.address : a));
      const p = await startProxy({ args, listen: [{ kind: 'tcp' }] });
      try {
        const r = await roundTrip(p.listeners[0]!.connectOptions, Buffer.from(`via ${dir}`), 5000);
        assert.equal(r.data.toString(), `via ${dir}`, `${dir}: ${args.join(' ')}; stderr: ${p.stderr()}`);
        assert.equal(p.stderr(), '');
      } finally {
        await p.stop();
      }
    }
  } finally {
    await unixBackend.close();
    await tcpBackend.close();
  }
});

test('examples/dns-udp: ListenDatagram= + ListenStream= verified by systemd-analyze; its command line serves both', async () => {
  const dir = join(EXAMPLES, 'dns-udp');
  assert.deepEqual(directives(join(dir, 'proxy-to-dns.socket')), ['[Socket]', 'ListenDatagram=53', 'ListenStream=53', '[Install]', 'WantedBy=sockets.target']);
  const service = directives(join(dir, 'proxy-to-dns.service'));
  for (const want of ['Type=notify', 'Requires=dnsmasq.service', 'Requires=proxy-to-dns.socket']) assert.ok(service.includes(want), want);
  const argv = execStart(join(dir, 'proxy-to-dns.service'));
  assert.equal(argv[0], INSTALLED);

  // verify, on a copy with ExecStart= pointed at an executable and a stand-in dnsmasq.service.
  const where = join(tmp.dir, 'verify-dns-udp');
  cpSync(dir, where, { recursive: true });
  stage('nginx-unix', 'verify-dns-udp-bin'); // makes the wrapper binary
  const bin = join(tmp.dir, 'bin', 'socket-proxyd');
  writeFileSync(join(where, 'dnsmasq.service'), '[Unit]\nDescription=stand-in for verification\n\n[Service]\nExecStart=/bin/true\n');
  const unit = join(where, 'proxy-to-dns.service');
  writeFileSync(unit, readFileSync(unit, 'utf8').replaceAll(`ExecStart=${INSTALLED} `, `ExecStart=${bin} `));
  const r = verify([join(where, 'proxy-to-dns.socket'), unit]);
  assert.equal(r.stderr, '', 'systemd-analyze verify says nothing');
  assert.equal(r.status, 0);
  // Control: a typo in the socket unit is reported.
  writeFileSync(join(where, 'proxy-to-dns.socket'), readFileSync(join(where, 'proxy-to-dns.socket'), 'utf8').replace(/^ListenDatagram=/m, 'ListenDatagrams='));
  assert.match(verify([join(where, 'proxy-to-dns.socket'), unit]).stderr, /Unknown key 'ListenDatagrams'/);

  // The same options serve a UDP and a TCP socket passed in (fds 3 and 4), to test backends.
  const { createSocket } = await import('node:dgram');
  const udpEcho = createSocket('udp4');
  const tcpBackend = await startBackend(echo);
  await new Promise<void>((res, rej) => {
    udpEcho.once('error', rej);
    udpEcho.bind(tcpBackend.port, '127.0.0.1', () => res());
  }).catch(() => assert.fail('UDP port of the TCP backend is taken; rerun'));
  udpEcho.on('message', (m, ri) => udpEcho.send(m, ri.port, ri.address));
  const listenUdp = createSocket('udp4');
  await new Promise<void>((res) => listenUdp.bind(0, '127.0.0.1', () => res()));
  const key = Object.getOwnPropertySymbols(listenUdp).find((k) => k.description === 'state symbol') as symbol;
  const udpFd = (listenUdp as unknown as Record<symbol, { handle: { fd: number } }>)[key]!.handle.fd;
  const args = argv.slice(1).map((a) => (a === '127.0.0.1:5353' ? tcpBackend.address : a));
  const p = await startProxy({ args, listen: [{ kind: 'tcp' }], fds: [udpFd] });
  const udpPort = listenUdp.address().port;
  listenUdp.close();
  const client = createSocket('udp4');
  try {
    const got = new Promise<Buffer>((res) => client.once('message', (m) => res(m)));
    client.send('dns-ish', udpPort, '127.0.0.1');
    assert.equal((await got).toString(), 'dns-ish');
    const t = await roundTrip(p.listeners[0]!.connectOptions, Buffer.from('over tcp'), 5000);
    assert.equal(t.data.toString(), 'over tcp');
    assert.equal(p.stderr(), '');
  } finally {
    client.close();
    udpEcho.close();
    await tcpBackend.close();
    await p.stop();
  }
});

test('examples/routes: its ExecStart= line, with both sockets passed as systemd does (names, either order), reaches both backends', async () => {
  const web = await startBackend((s) => s.end('nginx\n'), { path: join(tmp.dir, 'nginx.sock') });
  const db = await startBackend((s) => s.end('postgres\n'), { path: join(tmp.dir, 'pgsql.sock') });
  try {
    const args = execStart(join(EXAMPLES, ROUTES, 'proxy-routes.service'))
      .slice(1)
      .map((a) => a.replace('/run/nginx.sock', web.address).replace('/run/postgresql/.s.PGSQL.5432', db.address));
    for (const names of [['web', 'db'], ['db', 'web']]) {
      const p = await startProxy({ args, listen: [{ kind: 'tcp' }, { kind: 'tcp' }], env: { LISTEN_FDNAMES: names.join(':') } });
      try {
        for (const [i, name] of names.entries()) {
          const r = await roundTrip(p.listeners[i]!.connectOptions, Buffer.alloc(0), 5000);
          assert.equal(r.data.toString(), name === 'web' ? 'nginx\n' : 'postgres\n', `${names.join(':')}: ${p.stderr()}`);
        }
        assert.equal(p.stderr(), '');
      } finally {
        await p.stop();
      }
    }
  } finally {
    await web.close();
    await db.close();
  }
});

// ---------------------------------------------------------------------------------------------
// man/socket-proxyd.8

/** The page as plain text (no bold/underline), 80 columns. */
function renderMan(): string {
  const r = run('groff', ['-man', '-Tascii', '-P-c', '-P-b', '-P-u', '-rLL=80n', MAN_PAGE], 'apt-get install groff-base');
  assert.equal(r.status, 0, r.stderr);
  return r.stdout;
}

/** The text of one top-level section of the rendered page. */
function section(text: string, title: string): string {
  const lines = text.split('\n');
  const start = lines.indexOf(title);
  assert.ok(start >= 0, `section ${title} exists`);
  const end = lines.findIndex((l, i) => i > start && /^[A-Z]/.test(l));
  return lines.slice(start + 1, end < 0 ? undefined : end).join('\n');
}

const squash = (s: string): string => s.replace(/\s+/g, ' ');

test('man page: groff -man -ww renders it without a single warning', () => {
  const r = run('groff', ['-man', '-Tutf8', '-ww', '-z', MAN_PAGE], 'groff is needed to check the man page: apt-get install groff-base');
  assert.equal(r.stderr, '', 'no warnings');
  assert.equal(r.status, 0);
  // Control: the same check does report a broken page.
  const broken = join(tmp.dir, 'broken.8');
  writeFileSync(broken, `${readFileSync(MAN_PAGE, 'utf8')}\n.XYZZY\n\\fBunclosed\n`);
  const b = run('groff', ['-man', '-Tutf8', '-ww', '-z', broken], 'apt-get install groff-base');
  assert.match(b.stderr, /warning/);
  // man(1) renders it too (the way users read it).
  const m = run('man', ['-l', MAN_PAGE], 'man-db is needed: apt-get install man-db');
  assert.equal(m.status, 0, m.stderr);
  assert.match(m.stdout, /socket-proxyd/);
});

test('man page: documents exactly the options of --help, with the same synopsis and defaults', () => {
  const help = helpText('socket-proxyd');
  const text = renderMan();
  const helpLong = [...new Set(help.match(/--[a-z][a-z-]*/g) ?? [])].sort();
  assert.deepEqual(helpLong, [
    '--connect-retry',
    '--connect-timeout',
    '--connections-max',
    '--drain-timeout',
    '--exit-idle-time',
    '--help',
    '--idle-timeout',
    '--keepalive',
    '--listen',
    '--listen-datagram',
    '--metrics',
    '--nodelay',
    '--proxy-protocol',
    '--version',
  ]);
  const options = section(text, 'OPTIONS');
  // Option tags are the lines indented by exactly 7 spaces.
  const tags = options.split('\n').filter((l) => /^ {7}-/.test(l));
  const manLong = [...new Set(tags.join(' ').match(/--[a-z][a-z-]*/g) ?? [])].sort();
  assert.deepEqual(manLong, helpLong, 'the same long options');
  const helpShort = [...new Set(help.match(/(?<=^ {2})-[a-z]\b/gm) ?? [])].sort();
  assert.deepEqual(helpShort, ['-c', '-h']);
  for (const short of helpShort) assert.ok(tags.some((t) => t.trimStart().startsWith(short)), `${short} documented`);
  // Synopsis: the same three forms as --help's first lines.
  const synopsis = squash(section(text, 'SYNOPSIS'));
  for (const line of help.split('\n').slice(0, 3)) assert.ok(synopsis.includes(squash(line)), `synopsis has: ${line}`);
  // The default connection limit agrees.
  assert.match(help, /default: 256/);
  assert.match(squash(options), /default: 256/);
  // The version in the title line is the package's.
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { version: string; man: string[] };
  assert.match(text.trimEnd().split('\n').at(-1) ?? '', new RegExp(`socket-proxyd ${pkg.version.replaceAll('.', '\\.')}\\b`));
  assert.deepEqual(pkg.man, ['./man/socket-proxyd.8']);
});

test('man page: sections, environment, exit status, examples and differences from v252', () => {
  const text = renderMan();
  for (const title of ['NAME', 'SYNOPSIS', 'DESCRIPTION', 'OPTIONS', 'EXIT STATUS', 'ENVIRONMENT', 'EXAMPLES', 'SECURITY', 'DIFFERENCES FROM SYSTEMD-SOCKET-PROXYD 252', 'SEE ALSO']) {
    section(text, title);
  }
  const env = section(text, 'ENVIRONMENT');
  for (const v of ['LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES', 'NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID', 'SYSTEMD_LOG_LEVEL', 'JOURNAL_STREAM']) {
    assert.match(env, new RegExp(`^ {7}.*\\b${v}\\b`, 'm'), `${v} is an entry of ENVIRONMENT`);
  }
  for (const word of ['READY=1', 'STOPPING=1', 'ERRNO=', 'WATCHDOG=1', '<3>', '<4>']) assert.ok(env.includes(word), `ENVIRONMENT mentions ${word}`);
  const exit = section(text, 'EXIT STATUS');
  assert.match(exit, /^ {7}0\b/m);
  assert.match(exit, /^ {7}1\b/m);

  // Every directive of the examples' services and drop-ins is shown in EXAMPLES.
  const examples = section(text, 'EXAMPLES');
  const shown = new Set(examples.split('\n').map((l) => l.trim()));
  for (const dir of Object.keys(EXPECTED_FILES)) {
    for (const file of ['proxy-to-nginx.service', 'proxy-to-nginx.socket']) {
      for (const line of directives(join(EXAMPLES, dir, file))) {
        assert.ok(shown.has(line), `EXAMPLES shows ${relative(EXAMPLES, join(EXAMPLES, dir, file))}: ${line}`);
      }
    }
  }
  for (const line of directives(join(EXAMPLES, 'idle-exit', 'nginx.service.d', 'stop-when-unneeded.conf'))) assert.ok(shown.has(line), line);
  for (const file of ['proxy-to-dns.service', 'proxy-to-dns.socket']) {
    for (const line of directives(join(EXAMPLES, 'dns-udp', file))) assert.ok(shown.has(line), `EXAMPLES shows dns-udp/${file}: ${line}`);
  }
  for (const file of ROUTES_UNITS) {
    for (const line of directives(join(EXAMPLES, ROUTES, file))) assert.ok(shown.has(line), `EXAMPLES shows routes/${file}: ${line}`);
  }
  // The ROUTES section: the grammar, the checks, the log prefix, and the \${PORT} case.
  const routes = squash(section(text, 'ROUTES'));
  for (const point of ['NAME=TARGET', 'FileDescriptorName=', 'LISTEN_FDNAMES', 'at most one', 'always a plain', 'given twice', 'matches no socket', '(default):', 'whole process', '${PORT}']) {
    assert.ok(routes.includes(point), `ROUTES mentions: ${point}`);
  }
  assert.ok(shown.has('JoinsNamespaceOf=nginx.service'));

  // The right Node.js: both ways, shown in EXAMPLES.
  assert.match(examples, /^ +Environment=PATH=\/opt\/node-v22\/bin:/m);
  assert.match(examples, /^ +ExecStart=\/opt\/node-v22\/bin\/node \S+\/dist\/cli\.js /m);
  for (const dir of Object.keys(EXPECTED_FILES)) assert.ok(shown.has(nodeAlternatives(join(EXAMPLES, dir, 'proxy-to-nginx.service')).path));
  // Start limits with idle exit: explained, and the trigger limit's state named.
  assert.ok(squash(examples).includes('trigger-limit-hit'));
  for (const line of directives(join(EXAMPLES, 'idle-exit', 'proxy-to-nginx.socket'))) assert.ok(shown.has(line), line);
  // --listen= serves its sockets in addition to passed ones.
  const listen = squash(section(text, 'OPTIONS'));
  assert.match(listen, /--listen=\[NAME=\]ADDRESS Listen on ADDRESS too\b.*Sockets passed in by systemd are served as well/);
  assert.ok(!/instead of on sockets/.test(listen));
  // SECURITY
  const security = squash(section(text, 'SECURITY'));
  for (const word of ['SO_PEERCRED', 'peer authentication', 'DynamicUser=yes', 'User=', 'SupplementaryGroups=', 'never as root', 'SIGUSR1']) {
    assert.ok(security.includes(word), `SECURITY mentions ${word}`);
  }
  const diff = squash(section(text, 'DIFFERENCES FROM SYSTEMD-SOCKET-PROXYD 252'));
  for (const point of [
    'hard cap',
    'half-close',
    'READY=1 and STOPPING=1 are sent',
    '[::1]:80',
    'tried in order',
    'refused at start-up',
    'also armed at start-up',
    'somaxconn',
    'busy-looping',
    'TCP_NODELAY is set on both TCP sockets',
    'SIGTERM and SIGINT are handled',
    'a UNIX socket',
  ]) {
    assert.ok(diff.includes(point), `DIFFERENCES mentions: ${point}`);
  }
});

test('README agrees: the options of --help, and it points to the man page and examples/ that exist', () => {
  const readme = readFileSync(join(ROOT, 'README.md'), 'utf8');
  for (const option of new Set(helpText('socket-proxyd').match(/--[a-z][a-z-]*/g) ?? [])) {
    assert.ok(readme.includes(option), `README mentions ${option}`);
  }
  assert.ok(readme.includes('man/socket-proxyd.8') && existsSync(MAN_PAGE));
  assert.ok(readme.includes('examples/') && existsSync(EXAMPLES));
  // The example in the README is one of ours, verbatim.
  const shown: string[] = readme.match(/^(ExecStart|Environment)=.*$/gm) ?? [];
  const ours = Object.keys(EXPECTED_FILES).flatMap((dir) => {
    const service = join(EXAMPLES, dir, 'proxy-to-nginx.service');
    const alt = nodeAlternatives(service);
    return [`ExecStart=${execStart(service).join(' ')}`, alt.path, alt.execStart];
  });
  const dns = join(EXAMPLES, 'dns-udp', 'proxy-to-dns.service');
  ours.push(`ExecStart=${execStart(dns).join(' ')}`);
  ours.push(`ExecStart=${execStart(join(EXAMPLES, ROUTES, 'proxy-routes.service')).join(' ')}`);
  assert.ok(shown.includes(ours.at(-1) as string), "the README shows the routes example's ExecStart=");
  for (const point of ['FileDescriptorName=', 'LISTEN_FDNAMES', '${PORT}', '(default):', 'given twice', 'matches no socket']) {
    assert.ok(readme.includes(point), `README on routes mentions ${point}`);
  }
  for (const line of shown) assert.ok(ours.includes(line), `README's ${line} is one of examples/`);
  // The right Node under systemd: both ways are shown, in the systemd section.
  const systemd = readme.slice(readme.indexOf('## With systemd'), readme.indexOf('\n## ', readme.indexOf('## With systemd') + 1));
  assert.match(systemd, /^Environment=PATH=\/.*$/m);
  assert.match(systemd, /^ExecStart=\/\S+\/node \S+\/dist\/cli\.js /m);
  assert.match(systemd, /is too old: socket-proxyd needs Node\.js >=/);
  // --listen= adds sockets; it does not replace the passed ones.
  const listenRow = readme.split('\n').find((l) => l.startsWith('| `--listen='));
  assert.ok(listenRow !== undefined && /in addition to/.test(listenRow) && !/instead of/.test(listenRow), listenRow);
  // What an activation costs (issue 9): stated with the figures of bench/RESULTS.md, so that a
  // re-measurement that moves them by more than the noise (25%) makes the README say so.
  const cost = systemd.slice(systemd.indexOf('**What an activation costs.**'));
  assert.ok(cost.length > 0, 'README, systemd section: what an activation costs');
  const results = readFileSync(join(ROOT, 'bench', 'RESULTS.md'), 'utf8');
  const cold = /^\| exec → first byte forwarded, ms \| ([\d.]+)\b[^|]*\| ([\d.]+)\b/m.exec(results);
  const idle = /^\| proxy RSS before, MiB \| ([\d.]+) \| ([\d.]+) \|/m.exec(results);
  assert.ok(cold !== null && idle !== null, 'RESULTS.md has the cold start and idle RSS rows');
  const said = {
    coldOurs: /\*\*(\d+) ms\*\*\s+for\s+ours/.exec(cost)?.[1],
    coldRef: /\*\*(\d+) ms\*\*\s+for\s+the\s+C\s+reference/.exec(cost)?.[1],
    rssOurs: /\*\*(\d+) MiB RSS\*\*\s+against/.exec(cost)?.[1],
    rssRef: /the\s+reference's\s+\*\*(\d+) MiB\*\*/.exec(cost)?.[1],
  };
  const measured = { coldOurs: cold[1], coldRef: cold[2], rssOurs: idle[1], rssRef: idle[2] };
  for (const key of Object.keys(said) as Array<keyof typeof said>) {
    const r = Number(said[key]) / Number(measured[key]);
    assert.ok(r > 0.75 && r < 1.25, `README's ${key} (${String(said[key])}) agrees with bench/RESULTS.md (${measured[key]})`);
  }
  assert.ok(cost.includes('--exit-idle-time') && cost.includes('file-backed'), 'why, and what to do about it');
  // Security: the peer-credentials consequence and what to do about it.
  const security = readme.slice(readme.indexOf('## Security'), readme.indexOf('\n## ', readme.indexOf('## Security') + 1));
  for (const word of ['SO_PEERCRED', 'peer', 'DynamicUser=yes', 'User=', 'SupplementaryGroups=', 'root']) assert.ok(security.includes(word), `README Security: ${word}`);
});

// ---------------------------------------------------------------------------------------------
// LICENSE

test('LICENSE: the MIT licence package.json names, in the repository and in the package npm packs', () => {
  const pkg = JSON.parse(readFileSync(join(ROOT, 'package.json'), 'utf8')) as { license: string };
  assert.equal(pkg.license, 'MIT');
  const text = readFileSync(join(ROOT, 'LICENSE'), 'utf8');
  assert.match(text, /^MIT License\n\nCopyright \(c\) \d{4} /);
  assert.match(text, /Permission is hereby granted, free of charge/);
  assert.match(text, /THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND/);
  const r = run('npm', ['pack', '--dry-run', '--json', '--ignore-scripts'], 'npm is needed');
  assert.equal(r.status, 0, r.stderr);
  const files = (JSON.parse(r.stdout) as Array<{ files: Array<{ path: string }> }>)[0]!.files.map((f) => f.path);
  assert.ok(files.includes('LICENSE'), files.join(' '));
  assert.ok(files.includes('man/socket-proxyd.8') && files.includes('dist/cli.js'));
});
