// What a flavour of ours costs against plain ours, to within a few percent on a shared machine:
// the keep-alive HTTP benchmark (2) and the new-connections benchmark (3) through `ours` and
// through the flavour (default `ours-resilience`: issue 11's --idle-timeout=1h --keepalive=1min
// --connect-timeout=5s), in pairs run back to back, alternating which of the two goes first,
// with the C reference measured after each pair as the anchor. The result is the median of
// the per-pair ratios, with their range: slow drift in the machine's other load hits both
// halves of a pair alike, where medians over separate runs would compare different moments.
//
//   node bench/pairs.ts [--with FLAVOUR] [--only http,newconn,newconn-rate] [--backends unix,tcp] [--pairs N]
//                       [--seconds S] [--no-anchor] [--profile] [--no-write] [--options 'OPT ...']
//
// CPU is the proxy's, every thread, from /proc/PID/task/*/schedstat (nanoseconds; utime+stime
// counts 10 ms ticks, ±3% over one measurement, too coarse for a 5% question), per request
// (keep-alive) or per connection (new connections: each request is a new connection).
// newconn-rate offers new connections at a fixed rate (h2load) instead of as fast as wrk can:
// the steadier measure of what a flavour adds per connection (RATE_PER_S says why).
//
// Writes its block into bench/RESULTS.md (bench/run.ts keeps it). Bounded: every wrk and
// h2load run has a hard limit and the whole script stops after 600 s. With --profile, ours and the flavour run
// under --cpu-prof and their hottest functions are printed side by side; nothing is written.
// --options starts ours-resilience with these options instead of issue 11's three (e.g. one of
// them, to see which one costs); nothing is written either.
import { existsSync, mkdirSync, readFileSync, rmSync, mkdtempSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { execFile, execFileSync } from 'node:child_process';
import { startNginxHttp } from './backends.ts';
import { HTTP_CONNS, HTTP_THREADS, NEWCONN_CONNS, wrk } from './benchmarks.ts';
import { foreignLoad, installCleanupHandlers, killAll, schedCpuSec, waitQuiet, which } from './procs.ts';
import { FLAVOURS, PROXIES, REPO, RESILIENCE_OPTIONS, refVersion, setProfileDir, setResilienceOptions } from './proxies.ts';
import type { ProxyName, RunningProxy, Target } from './proxies.ts';
import { summarizeProfiles } from './profile.ts';

const BUDGET_MS = 600_000;
/** The target per flavour: issue 11's options within 5%, issue 10's PROXY header within 10%. */
const WITHIN_OF: Partial<Record<ProxyName, number>> = { 'ours-pp2': 0.1 };
/** Each flavour's block number in RESULTS.md. */
const BLOCK_OF: Partial<Record<ProxyName, number>> = { 'ours-resilience': 11, 'ours-pp2': 12 };
/**
 * newconn-rate: new connections offered at this fixed rate (h2load --h1 -r), below what any
 * proxy here saturates at. At saturation (wrk, newconn) a proxy's CPU per connection depends
 * on how many connections each event-loop turn batches, which swings with every other
 * process on the machine (the same binary measured 32-73 µs in one run); at a fixed rate
 * every proxy runs the same turns, and the difference is the flavour's own work.
 */
const RATE_PER_S = 2000;
const RATE_TICK_MS = 10;

function usage(msg: string): never {
  process.stderr.write(
    `${msg}\nusage: node bench/pairs.ts [--with ${FLAVOURS.join('|')}] [--only http,newconn,newconn-rate] [--backends unix,tcp] [--pairs N] [--seconds S] [--no-anchor] [--profile] [--no-write] [--options 'OPT ...']\n`,
  );
  process.exit(2);
}

const argv = process.argv.slice(2);
const o = { flavour: 'ours-resilience' as ProxyName, only: ['http', 'newconn'], backends: ['unix', 'tcp'], pairs: 6, seconds: 2, anchor: true, profile: false, write: true, options: null as string[] | null };
for (let i = 0; i < argv.length; i++) {
  const a = argv[i] as string;
  const value = (): string => argv[++i] ?? usage(`${a} needs a value`);
  if (a === '--with') {
    const v = value();
    if (!(FLAVOURS as readonly string[]).includes(v)) usage(`--with: not a flavour of ours: ${v}`);
    o.flavour = v as ProxyName;
  } else if (a === '--only') {
    o.only = value().split(',');
    for (const b of o.only) if (b !== 'http' && b !== 'newconn' && b !== 'newconn-rate') usage(`--only: unknown benchmark ${b}`);
  } else if (a === '--backends') {
    o.backends = value().split(',');
    for (const b of o.backends) if (b !== 'unix' && b !== 'tcp') usage(`--backends: unknown backend ${b}`);
  } else if (a === '--pairs') {
    o.pairs = Number(value());
    if (!Number.isInteger(o.pairs) || o.pairs < 1 || o.pairs > 20) usage('--pairs must be 1..20');
  } else if (a === '--seconds') {
    o.seconds = Number(value());
    if (!Number.isInteger(o.seconds) || o.seconds < 1 || o.seconds > 10) usage('--seconds must be 1..10');
  } else if (a === '--no-anchor') o.anchor = false;
  else if (a === '--profile') o.profile = true;
  else if (a === '--no-write') o.write = false;
  else if (a === '--options') o.options = value().split(' ').filter(Boolean);
  else usage(a === '-h' || a === '--help' ? '' : `unknown argument ${a}`);
}

if (o.options !== null) {
  if (o.flavour !== 'ours-resilience') usage('--options applies to ours-resilience only');
  setResilienceOptions(o.options);
}

const FLAVOUR_TEXT: Partial<Record<ProxyName, string>> = {
  'ours-resilience': o.options === null ? `ours with \`${RESILIENCE_OPTIONS.join(' ')}\` (issue 11)` : `ours with \`${o.options.join(' ')}\` (--options: not issue 11's set)`,
  'ours-nagle': 'ours with `--nodelay=no`',
  'ours-routes': 'ours with three routes by socket name, traffic on one',
};

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length === 0 ? NaN : s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

const fmt = (x: number, d = 1): string => (Number.isFinite(x) ? x.toFixed(d) : '–');
const range = (xs: readonly number[], d = 3): string => `${fmt(Math.min(...xs), d)}–${fmt(Math.max(...xs), d)}`;

interface Sample {
  rps: number;
  /** proxy CPU µs per request (keep-alive) or per connection (new connections) */
  cpuUs: number;
  errors: number;
}

type Bench = 'http' | 'newconn' | 'newconn-rate';

interface Combo {
  bench: Bench;
  backend: 'unix' | 'tcp';
  base: Sample[];
  flav: Sample[];
  ref: Sample[];
  /** other load on the machine during each pair (cores) */
  load: number[];
  /** what the flavour check (e.g. SO_KEEPALIVE read back) found, or '' */
  check: string;
}

/**
 * New connections at RATE_PER_S for `seconds`: h2load --h1 opens RATE_TICK_MS' share every
 * tick, one request per connection (-n = -c), each closed after its response.
 */
function h2loadRate(port: number, seconds: number): Promise<{ rps: number; requests: number; errors: number; non2xx: number } | string> {
  const perTick = Math.round((RATE_PER_S * RATE_TICK_MS) / 1000);
  const n = Math.round(RATE_PER_S * seconds);
  const args = ['--h1', '-t', '1', '-n', String(n), '-c', String(n), '-r', String(perTick), `--rate-period=${RATE_TICK_MS}ms`, `http://127.0.0.1:${port}/`];
  return new Promise((resolve) => {
    execFile('h2load', args, { encoding: 'utf8', timeout: (seconds + 20) * 1000 }, (err, stdout) => {
      const m = /requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored/.exec(stdout);
      const codes = /status codes: (\d+) 2xx/.exec(stdout);
      if (err !== null || m === null || codes === null) {
        resolve(`h2load failed: ${err?.message ?? ''} ${stdout.slice(-300)}`);
        return;
      }
      const ok = Number(m[1]);
      resolve({ rps: ok / seconds, requests: ok, errors: Number(m[2]) + Number(m[3]), non2xx: ok - Number(codes[1]) });
    });
  });
}

/** One load run against `p` (wrk, or h2load at a fixed rate); its CPU from schedstat around it. */
async function measure(p: RunningProxy, bench: Bench, seconds = o.seconds): Promise<Sample> {
  const close = bench !== 'http';
  const c0 = schedCpuSec(p.pid);
  const r =
    bench === 'newconn-rate'
      ? await h2loadRate(p.port, seconds)
      : await wrk(p.port, HTTP_THREADS, close ? NEWCONN_CONNS : HTTP_CONNS, seconds, close ? ['-H', 'Connection: close'] : []);
  const cpu = schedCpuSec(p.pid) - c0;
  if (typeof r === 'string') throw new Error(`${p.name}: ${r}`);
  if (!p.alive()) throw new Error(`${p.name} exited: ${p.log().slice(-300)}`);
  return { rps: r.rps, cpuUs: (cpu / Math.max(1, r.requests)) * 1e6, errors: r.errors + r.non2xx };
}

/**
 * ours-resilience: that the options are in effect, read back from the kernel while one
 * keep-alive connection is held through it: the accepted socket (and the backend socket, on
 * TCP) carry a keepalive timer (`ss -o`), which plain ours's do not.
 */
async function checkKeepalive(p: RunningProxy, target: Target): Promise<string> {
  if (!which('ss')) return 'ss not installed: SO_KEEPALIVE not read back';
  const sock = net.connect(p.port, '127.0.0.1');
  try {
    await new Promise<void>((resolve, reject) => {
      sock.once('error', reject);
      sock.once('data', () => resolve());
      sock.write('GET / HTTP/1.1\r\nHost: bench\r\n\r\n');
      setTimeout(() => reject(new Error('no reply within 3 s')), 3000).unref();
    });
    // The backend side gets keepalive at the next sweep, within a second (src/engine/sweep.ts).
    await new Promise((resolve) => setTimeout(resolve, 1300));
    const lines = execFileSync('ss', ['-tnoH', 'state', 'established']).toString().split('\n');
    const local = lines.filter((l) => l.split(/\s+/)[2]?.endsWith(`:${p.port}`));
    const backend = target.kind === 'tcp' ? lines.filter((l) => l.split(/\s+/)[3]?.endsWith(`:${target.port}`) && l.includes('timer:(keepalive')) : [];
    const ka = local.filter((l) => l.includes('timer:(keepalive'));
    const timer = /timer:\(keepalive,[^)]*\)/.exec(ka[0] ?? '')?.[0] ?? 'none';
    if (ka.length === 0) throw new Error(`ours-resilience: no keepalive timer on the accepted socket: ${local.join(' | ').slice(0, 300)}`);
    if (target.kind === 'tcp' && backend.length === 0) throw new Error('ours-resilience: no keepalive timer on any backend socket');
    return `keepalive read back (\`ss -o\`) on the accepted socket (${timer})${target.kind === 'tcp' ? ' and on the backend socket' : ' (the backend is a UNIX socket: no keepalive there)'}`;
  } finally {
    sock.destroy();
  }
}

installCleanupHandlers();
const t0 = Date.now();
const log = (s: string): void => {
  process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)}s] ${s}\n`);
};
setTimeout(() => {
  log(`over ${BUDGET_MS / 1000} s: giving up`);
  killAll();
  process.exit(2);
}, BUDGET_MS).unref();

for (const tool of ['wrk', 'nginx']) if (which(tool) === null) usage(`${tool} is not installed: run bench/setup.sh`);
for (const n of ['ours', o.flavour, ...(o.anchor ? ['ref' as const] : [])] as ProxyName[]) {
  const why = PROXIES[n].unavailable();
  if (why !== null) usage(`${n}: ${why}`);
}

const dir = mkdtempSync(path.join(os.tmpdir(), 'spd-bench-pairs-'));
const profRoot = path.join(REPO, 'bench', 'out', 'profiles', 'pairs');
const combos: Combo[] = [];
const quiet = await waitQuiet(0.25, 10_000);
log(`other load before starting: ${quiet.load.toFixed(2)} cores`);
const ng = await startNginxHttp(dir);
try {
  for (const bench of o.only as Bench[]) {
    const close = bench !== 'http';
    for (const backend of o.backends as ('unix' | 'tcp')[]) {
      // pp*: nginx's listeners that expect a PROXY protocol header, for ours-pp2
      const target: Target = backend === 'unix' ? { kind: 'unix', path: ng.unixPath, ppPath: ng.ppUnixPath } : { kind: 'tcp', port: ng.port, ppPort: ng.ppPort };
      const c: Combo = { bench, backend, base: [], flav: [], ref: [], load: [], check: '' };
      const running: RunningProxy[] = [];
      try {
        const startOne = async (name: ProxyName): Promise<RunningProxy> => {
          if (o.profile) {
            const d = path.join(profRoot, `${bench}-${backend}`, name);
            rmSync(d, { recursive: true, force: true });
            mkdirSync(d, { recursive: true });
            setProfileDir(name === 'ref' ? null : d);
          }
          const p = await PROXIES[name].start(target, dir, 100000);
          running.push(p);
          return p;
        };
        const base = await startOne('ours');
        const flav = await startOne(o.flavour);
        const ref = o.anchor ? await startOne('ref') : null;
        setProfileDir(null);
        if (o.flavour === 'ours-resilience' && (o.options === null || o.options.some((x) => x.startsWith('--keepalive=')))) c.check = await checkKeepalive(flav, target);
        for (const p of running) await measure(p, bench, 1);
        for (let i = 0; i < o.pairs; i++) {
          const load = foreignLoad();
          // Alternate which goes first, so that neither always runs right after the other.
          const first = i % 2 === 0 ? base : flav;
          const second = first === base ? flav : base;
          const a = await measure(first, bench);
          const b = await measure(second, bench);
          c.base.push(first === base ? a : b);
          c.flav.push(first === base ? b : a);
          c.load.push(load.stop());
          if (ref !== null) c.ref.push(await measure(ref, bench));
          const r = (c.flav.at(-1) as Sample).cpuUs / (c.base.at(-1) as Sample).cpuUs;
          log(`${bench} ${backend} pair ${i + 1}/${o.pairs}: CPU µs/${close ? 'conn' : 'req'} ours ${fmt((c.base.at(-1) as Sample).cpuUs)}, ${o.flavour} ${fmt((c.flav.at(-1) as Sample).cpuUs)} (${fmt(r, 3)}), ref ${fmt(c.ref.at(-1)?.cpuUs ?? NaN)}; other load ${fmt(c.load.at(-1) as number, 2)} cores`);
        }
      } finally {
        await Promise.all(running.map((p) => p.stop()));
      }
      combos.push(c);
    }
  }
} finally {
  await ng.stop();
  rmSync(dir, { recursive: true, force: true });
}

// ---------------------------------------------------------------- report

const commit = (() => {
  try {
    return execFileSync('git', ['-C', REPO, 'rev-parse', '--short', 'HEAD']).toString().trim();
  } catch {
    return '?';
  }
})();
const BENCH_TEXT: Record<Bench, string> = {
  http: '2. keep-alive, per request',
  newconn: '3. new connections, per connection',
  'newconn-rate': `3. new connections at a fixed ${RATE_PER_S.toLocaleString('en')}/s, per connection`,
};
const what = (c: Combo): string => `${BENCH_TEXT[c.bench]}, nginx on ${c.backend === 'unix' ? 'UNIX socket' : 'TCP'}`;
const WITHIN = WITHIN_OF[o.flavour] ?? 0.05;
const flavText = FLAVOUR_TEXT[o.flavour] ?? o.flavour;
const rows: string[] = [];
const notes: string[] = [];
let allWithin = true;
for (const c of combos) {
  const cpuRatios = c.flav.map((s, i) => s.cpuUs / (c.base[i] as Sample).cpuUs);
  const rpsRatios = c.flav.map((s, i) => s.rps / (c.base[i] as Sample).rps);
  const m = median(cpuRatios);
  const within = m <= 1 + WITHIN;
  allWithin &&= within;
  const baseCpu = median(c.base.map((s) => s.cpuUs));
  const refCpu = median(c.ref.map((s) => s.cpuUs));
  const errors = [...c.base, ...c.flav, ...c.ref].reduce((n, s) => n + s.errors, 0);
  rows.push(
    `| ${what(c)} | ${fmt(baseCpu)} | ${fmt(median(c.flav.map((s) => s.cpuUs)))} | **${fmt(m, 3)}** (${range(cpuRatios)}) | ${within ? 'yes' : '**NO**'} | ` +
      `${fmt(median(rpsRatios), 3)} (${range(rpsRatios)}) | ${o.anchor ? `${fmt(refCpu)} | ${fmt(baseCpu / refCpu, 2)}x` : '– | –'} | ${fmt(median(c.load), 2)} (${range(c.load, 2)}) |`,
  );
  notes.push(
    `- ${what(c)}: CPU ratios per pair ${cpuRatios.map((r) => r.toFixed(3)).join(' ')}; ` +
      `ours ${c.base.map((s) => fmt(s.cpuUs)).join(' ')} µs, ${o.flavour} ${c.flav.map((s) => fmt(s.cpuUs)).join(' ')} µs` +
      `${o.anchor ? `, ref ${c.ref.map((s) => fmt(s.cpuUs)).join(' ')} µs` : ''}; ${c.bench === 'http' ? 'requests' : 'connections'}/s ours ${fmt(median(c.base.map((s) => s.rps)), 0)}, ${o.flavour} ${fmt(median(c.flav.map((s) => s.rps)), 0)}` +
      `${o.anchor ? `, ref ${fmt(median(c.ref.map((s) => s.rps)), 0)}` : ''} (medians); errors ${errors} (wrk or h2load).${c.check ? ` ${c.check[0]?.toUpperCase()}${c.check.slice(1)}.` : ''}`,
  );
}
const loads = combos.flatMap((c) => c.load);
const id = `pairs-${o.flavour}`;
const lines = [
  `### ${BLOCK_OF[o.flavour] ?? 13}. ${o.flavour}: what it costs against plain ours (keep-alive and new connections, paired runs)`,
  '',
  `Measured ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')} at ${commit} by \`node bench/pairs.ts --with ${o.flavour} --pairs ${o.pairs} --seconds ${o.seconds}\` ` +
    `(${os.availableParallelism()} cores, ${os.release()}, ${process.version}, reference ${refVersion()}). ` +
    `${o.flavour} is ${flavText}. For each benchmark and backend: ours, ${o.flavour} and ref started side by side in front of the same nginx (1 worker, \`return 200\`), each warmed up 1 s; then ${o.pairs} pairs ` +
    `of \`wrk -t${HTTP_THREADS} -d${o.seconds}s\` runs (keep-alive: \`-c${HTTP_CONNS}\`; new connections: \`-c${NEWCONN_CONNS} -H 'Connection: close'\`, one new client and backend connection per request` +
    `${o.only.includes('newconn-rate') ? `; at a fixed rate: \`h2load --h1 -r ${(RATE_PER_S * RATE_TICK_MS) / 1000} --rate-period=${RATE_TICK_MS}ms\`, ${RATE_PER_S} new connections/s for ${o.seconds} s, one request each` : ''}), ` +
    `ours and ${o.flavour} back to back, alternating which goes first, ref after each pair as the anchor. ` +
    `Proxy CPU from /proc/PID/task/*/schedstat (all threads, ns). Target: the median of the per-pair CPU ratios within ${WITHIN * 100}% (<= ${(1 + WITHIN).toFixed(2)}).`,
  '',
  `| benchmark, backend | ours CPU µs | ${o.flavour} CPU µs | CPU ratio, median of pairs (range) | within ${WITHIN * 100}% | throughput ratio (range) | ref CPU µs | ours/ref CPU | other load, cores (range) |`,
  '| --- | ---: | ---: | ---: | :---: | ---: | ---: | ---: | ---: |',
  ...rows,
  '',
  ...notes,
  `- Other load on the machine (processes outside the bench, during each pair): median ${fmt(median(loads), 2)} cores, max ${fmt(Math.max(...loads), 2)} of ${os.availableParallelism()}` +
    (median(loads) > 0.25
      ? ': the machine was shared, so throughput ratios swing; CPU per request/connection, compared within a pair, is the steadier figure.'
      : '.'),
  ...(allWithin ? [] : [`- Not within ${WITHIN * 100}% everywhere: bench/ANALYSIS.md says where the cost comes from (\`--profile\`, \`--options\` with one option at a time, \`strace -c\`).`]),
];
console.log(lines.join('\n'));
console.log(`\n${allWithin ? 'all within' : 'NOT all within'} ${WITHIN * 100}%`);

if (o.profile) {
  for (const c of combos) {
    for (const name of ['ours', o.flavour]) {
      const d = path.join(profRoot, `${c.bench}-${c.backend}`, name);
      console.log(`\nCPU profile of ${name}, ${what(c)} (${path.relative(process.cwd(), d)}):\n\n${summarizeProfiles(d)}`);
    }
  }
  log('--profile: results not written (profiling slows ours down)');
} else if (o.options !== null) {
  log('--options: results not written (not the set issue 11 measures)');
} else if (o.write) {
  const block = [`<!-- bench:${id} -->`, ...lines, `<!-- /bench:${id} -->`].join('\n');
  const file = path.join(REPO, 'bench', 'RESULTS.md');
  const old = existsSync(file) ? readFileSync(file, 'utf8') : '';
  const a = old.indexOf(`<!-- bench:${id} -->`);
  const b = old.indexOf(`<!-- /bench:${id} -->`);
  writeFileSync(file, a >= 0 && b > a ? old.slice(0, a) + block + old.slice(b + `<!-- /bench:${id} -->`.length) : `${old.trimEnd()}\n\n${block}\n`);
  log(`written to ${file}`);
}
log(`total ${((Date.now() - t0) / 1000).toFixed(0)} s`);
process.exit(0);
