// Benchmark suite: socket-proxyd (ours) against systemd-socket-proxyd (ref), plus socat, haproxy
// and nginx-stream when installed, in one run, in front of the same backends, on loopback.
//
//   node bench/run.ts [--quick] [--only NAME[,NAME...]] [--proxies ours,ref,...] [--runs N]
//                     [--results FILE] [--no-write] [--no-setup] [--profile] [--nice]
//
// NAME: bulk, http, newconn, idle, pingpong, coldstart, split.  Proxies: ours, ref, socat,
// haproxy, nginx-stream, direct (no proxy: a baseline), and on request the flavours of ours:
// ours-nagle (--nodelay=no), ours-routes (three routes by socket name), ours-pp2
// (--proxy-protocol=v2, in http and newconn only) and ours-resilience (--idle-timeout=1h
// --keepalive=1min --connect-timeout=5s).  See bench/README.md; what a flavour costs against
// plain ours is measured best by bench/pairs.ts.
import { mkdtempSync, rmSync, mkdirSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { foreignLoad, installCleanupHandlers, killAll, onCleanup, runBounded, waitQuiet, which } from './procs.ts';
import { DEFAULT_PROXIES, PROXIES, PROXY_NAMES, REPO, refVersion, setProfileDir } from './proxies.ts';
import { summarizeProfiles } from './profile.ts';
import type { ProxyName } from './proxies.ts';
import { benchBulk, benchColdstart, benchHttp, benchIdle, benchNewconn, benchPingpong, benchSplit, smoke } from './benchmarks.ts';
import type { Config } from './benchmarks.ts';
import { machineInfo, sectionMarkdown, targetsOf, targetsTable, writeResults } from './report.ts';
import type { Section } from './report.ts';

const BENCHES = {
  bulk: benchBulk,
  http: benchHttp,
  newconn: benchNewconn,
  idle: benchIdle,
  pingpong: benchPingpong,
  coldstart: benchColdstart,
  split: benchSplit,
} as const;
type BenchName = keyof typeof BENCHES;
const ORDER = Object.keys(BENCHES) as BenchName[];

function usage(msg: string): never {
  process.stderr.write(
    `${msg}\nusage: node bench/run.ts [--quick] [--only ${ORDER.join(',')}] [--proxies ${PROXY_NAMES.join(',')}] [--runs N] [--results FILE] [--no-write] [--no-setup] [--profile] [--nice]\n`,
  );
  process.exit(2);
}

function parseArgs(argv: string[]): { quick: boolean; only: BenchName[]; proxies: ProxyName[] | null; runs: number | null; results: string | null; write: boolean; setup: boolean; profile: boolean; nice: boolean } {
  const o = { quick: false, only: [...ORDER], proxies: null as ProxyName[] | null, runs: null as number | null, results: null as string | null, write: true, setup: true, profile: false, nice: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i] as string;
    const [flag, inline] = a.startsWith('--') && a.includes('=') ? [a.slice(0, a.indexOf('=')), a.slice(a.indexOf('=') + 1)] : [a, undefined];
    const value = (): string => {
      const v = inline ?? argv[++i];
      if (v === undefined) usage(`${flag} needs a value`);
      return v;
    };
    if (flag === '--quick') o.quick = true;
    else if (flag === '--no-write') o.write = false;
    else if (flag === '--no-setup') o.setup = false;
    else if (flag === '--profile') o.profile = true;
    else if (flag === '--nice') o.nice = true;
    else if (flag === '--only') {
      const names = value().split(',').filter(Boolean);
      for (const n of names) if (!(n in BENCHES)) usage(`unknown benchmark ${n}`);
      o.only = ORDER.filter((n) => names.includes(n));
    } else if (flag === '--proxies') {
      const names = value().split(',').filter(Boolean);
      for (const n of names) if (!(PROXY_NAMES as readonly string[]).includes(n)) usage(`unknown proxy ${n}`);
      o.proxies = PROXY_NAMES.filter((n) => names.includes(n));
    } else if (flag === '--runs') {
      o.runs = Number(value());
      if (!Number.isInteger(o.runs) || o.runs < 1 || o.runs > 20) usage('--runs must be 1..20');
    } else if (flag === '--results') o.results = value();
    else if (flag === '-h' || flag === '--help') usage('');
    else usage(`unknown argument ${a}`);
  }
  return o;
}

async function main(): Promise<void> {
  const args = parseArgs(process.argv.slice(2));
  installCleanupHandlers();
  const t0 = Date.now();
  const log = (s: string): void => {
    process.stderr.write(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)}s] ${s}\n`);
  };

  let missing = ['wrk', 'nginx', 'iperf3'].filter((t) => !which(t));
  if (missing.length > 0 && args.setup && process.getuid?.() === 0) {
    log(`missing tools: ${missing.join(', ')}: running bench/setup.sh (apt-get)`);
    const r = await runBounded('sh', [path.join(REPO, 'bench', 'setup.sh')], 300_000, { stdio: ['ignore', 'pipe', 'pipe'] });
    process.stderr.write(r.stdout + r.stderr);
    missing = missing.filter((t) => !which(t));
  }
  if (missing.length > 0) log(`missing tools: ${missing.join(', ')}; install them with \`sh bench/setup.sh\` as root (apt-get). Benchmarks needing them are skipped.`);

  if (args.nice) {
    // Every child inherits the bench's nice value: proxies, backends and load tools alike.
    try {
      os.setPriority(-10);
      log('running at nice -10: other processes on the machine disturb the figures less (and are slowed down)');
    } catch (e) {
      log(`--nice: ${(e as Error).message} (needs root)`);
    }
  }

  // A run that overran its budget is stopped whatever it is doing (and everything is killed).
  const budgetMs = args.quick ? 118_000 : 590_000;
  setTimeout(() => {
    log(`time budget of ${budgetMs / 1000} s exceeded: aborting`);
    killAll();
    process.exit(4);
  }, budgetMs).unref();

  // Quick mode compares ours with the reference only (plus the no-proxy baseline), to stay < 2 min.
  const wanted = args.proxies ?? (args.quick ? (['ours', 'ref', 'direct'] as ProxyName[]) : [...DEFAULT_PROXIES]);
  const proxies: ProxyName[] = [];
  const skipped: string[] = [];
  for (const name of wanted) {
    const why = PROXIES[name].unavailable();
    if (why === null) proxies.push(name);
    else skipped.push(`${name}: ${why}`);
  }
  const dir = mkdtempSync(path.join(os.tmpdir(), 'socket-proxyd-bench-'));
  onCleanup(() => rmSync(dir, { recursive: true, force: true }));
  const cfg: Config = {
    quick: args.quick,
    runs: args.runs ?? (args.quick ? 1 : 5),
    bulkSec: args.quick ? 1 : 2,
    httpSec: args.quick ? 1 : 2,
    newconnSec: args.quick ? 1 : 2,
    idleCount: args.quick ? 2000 : 8000,
    idleDeadlineMs: args.quick ? 8000 : 15000,
    pingCount: args.quick ? 2000 : 10000,
    pingWarmup: 500,
    coldIters: args.quick ? 5 : 10,
    connMax: 100000,
    dir,
    proxies,
    log,
    // repeats stop 60% into the time budget, so that a busy machine cannot push a run past it
    retry: { left: 0, until: Date.now() + budgetMs * 0.6, repeated: 0, noisy: 0 },
  };
  const sections: Section[] = [];
  let quietLeftMs = args.quick ? 10_000 : 90_000;
  try {
    log(`proxies: ${proxies.join(', ')}${skipped.length ? `; skipped: ${skipped.join('; ')}` : ''}`);
    const sm = await smoke(cfg);
    for (const f of sm.failed) skipped.push(`${f} (failed the smoke test)`);
    cfg.proxies = sm.ok;
    if (sm.failed.length) log(`smoke test failed for: ${sm.failed.join('; ')}`);
    for (const name of args.only) {
      log(`${name}: start`);
      const profDir = path.join(REPO, 'bench', 'out', 'profiles', name);
      if (args.profile) {
        rmSync(profDir, { recursive: true, force: true });
        mkdirSync(profDir, { recursive: true });
        setProfileDir(profDir);
      }
      // Another test suite on this shared machine skews everything: give it a bounded time to finish.
      const q = await waitQuiet(0.25, Math.min(quietLeftMs, 30_000));
      quietLeftMs -= q.waitedMs;
      if (q.load >= 0.25) log(`the machine is busy: ${q.load.toFixed(2)} cores used by processes outside the bench; figures will be noisy`);
      else if (q.waitedMs > 600) log(`waited ${(q.waitedMs / 1000).toFixed(1)} s for the machine to be quiet`);
      cfg.retry.left = args.quick ? 2 : 5; // repeats of disturbed measurements, per benchmark
      const load = foreignLoad();
      const before = { ...cfg.retry };
      let sec: Section;
      try {
        sec = await BENCHES[name](cfg);
      } catch (e) {
        // one broken benchmark must not lose the others' results
        log(`${name} failed: ${(e as Error).message}`);
        sec = { id: name, short: name, title: name, when: new Date().toISOString(), mode: 'failed', notes: [`failed: ${(e as Error).message.slice(0, 300)}`], rows: [] };
      }
      const other = load.stop();
      const repeated = cfg.retry.repeated - before.repeated;
      const noisy = cfg.retry.noisy - before.noisy;
      sec.notes.push(
        `Other load on the machine while this ran (processes outside the bench): ${other.toFixed(2)} cores on average; ` +
          `${repeated} measurement${repeated === 1 ? '' : 's'} repeated because of it, ${noisy} kept although disturbed (> 0.25 cores).`,
      );
      if (skipped.length) sec.notes.push(`Not measured: ${skipped.join('; ')}.`);
      sec.notes.push('Ours and ref are started by socket activation (fd 3, LISTEN_FDS=1, LISTEN_PID), with `-c 100000`; socat, haproxy (nbthread 1) and nginx-stream (1 worker, master_process off) bind their own 127.0.0.1 port.');
      sections.push(sec);
      log(`${name}: done`);
      process.stdout.write(`\n${sectionMarkdown(sec, PROXY_NAMES)}\n`);
      if (args.profile) {
        setProfileDir(null);
        process.stdout.write(`\nCPU profile of ours in ${name} (${path.relative(process.cwd(), profDir)}):\n\n${summarizeProfiles(profDir)}\n`);
      }
    }
  } finally {
    killAll(); // and removes dir
  }

  const targets = sections.flatMap(targetsOf);
  process.stdout.write(`\n## Targets (ours vs ref, medians)\n\n${targetsTable(targets)}\n\n`);
  if (args.write && args.profile) log('--profile: results not written (profiling slows ours down)');
  else if (args.write) {
    // A quick run must not overwrite the committed full results.
    const file = args.results ?? (args.quick ? path.join(REPO, 'bench', 'out', 'RESULTS-quick.md') : path.join(REPO, 'bench', 'RESULTS.md'));
    mkdirSync(path.dirname(file), { recursive: true });
    writeResults(
      file,
      sections,
      ORDER,
      PROXY_NAMES,
      machineInfo(refVersion()),
      'Written by `node bench/run.ts` (see bench/README.md for what each benchmark measures and the caveats: 2 cores are shared by the load generator, the proxy and the backend). Where a target is missed, bench/ANALYSIS.md says where the time or memory goes, from profiles.',
    );
    log(`results written to ${path.relative(process.cwd(), file) || file}`);
  }
  log(`total ${((Date.now() - t0) / 1000).toFixed(0)} s`);
}

main().catch((e: unknown) => {
  process.stderr.write(`bench failed: ${e instanceof Error ? (e.stack ?? e.message) : String(e)}\n`);
  killAll();
  process.exitCode = 1;
});
