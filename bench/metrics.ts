// The cost of --metrics (issue 13): the keep-alive HTTP benchmark (wrk -t1 -c32 through ours to
// nginx on TCP, as benchmark 2) with ours started plain and with --metrics=/path, the latter
// scraped every 100 ms over its UNIX socket during the run. The two alternate (plain, metrics,
// plain, metrics, ...) in one run, so slow drift in the machine's other load hits both alike;
// the result is the ratio of the medians.
//
//   node bench/metrics.ts [--runs N] [--seconds S] [--no-write]     (Node 22; npm run build first)
//
// Prints a markdown table and writes it into bench/RESULTS.md as its own block (bench/run.ts
// keeps that block when it rewrites the file).
//
// Bounded: every wrk run has a hard limit, the whole script stops after 240 s.
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startNginxHttp } from './backends.ts';
import { installCleanupHandlers, killAll, runBounded, sampleUsage, startActivated, foreignLoad, which } from './procs.ts';
import { OURS_CLI, REPO } from './proxies.ts';

const args = process.argv.slice(2);
const opt = (name: string, dflt: number): number => {
  const i = args.indexOf(name);
  return i === -1 ? dflt : Number(args[i + 1]);
};
const RUNS = opt('--runs', 7);
const SECONDS = opt('--seconds', 2);
const SCRAPE_MS = 100;

installCleanupHandlers();
const overall = setTimeout(() => {
  console.error('bench/metrics.ts: over 240 s, giving up');
  killAll();
  process.exit(2);
}, 240_000);

for (const tool of ['wrk', 'nginx']) {
  if (which(tool) === null) {
    console.error(`${tool} is not installed: run bench/setup.sh`);
    process.exit(1);
  }
}

function scrape(socketPath: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path: '/metrics', agent: false }, (res) => {
      let n = 0;
      res.on('data', (d: Buffer) => (n += d.length));
      res.on('end', () => (res.statusCode === 200 ? resolve(n) : reject(new Error(`HTTP ${res.statusCode}`))));
    });
    req.on('error', reject);
    req.end();
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

const dir = mkdtempSync(path.join(tmpdir(), 'spd-bench-metrics-'));
const metricsSock = path.join(dir, 'metrics.sock');
const nginx = await startNginxHttp(dir);
const target = `127.0.0.1:${nginx.port}`;
const plain = await startActivated([process.execPath, OURS_CLI, '-c', '100000', target]);
const withMetrics = await startActivated([process.execPath, OURS_CLI, '-c', '100000', `--metrics=${metricsSock}`, target]);

const results = { plain: { rps: [] as number[], cpu: [] as number[] }, metrics: { rps: [] as number[], cpu: [] as number[] } };
let scrapes = 0;
const SCRAPE_COST_N = 1000;
let scrapeCpuUs = NaN;
let scrapeBytes = 0;
const loads: number[] = [];
try {
  for (let i = 0; i < 50 && (await scrape(metricsSock).catch(() => -1)) < 0; i++) await sleep(50);
  // Warm-up, both.
  for (const p of [plain, withMetrics]) await runBounded('wrk', ['-t1', '-c32', '-d1s', `http://127.0.0.1:${p.port}/`], 15_000);
  for (let run = 0; run < RUNS; run++) {
    // Alternate which goes first, so that neither always runs right after the other.
    const pair = [['plain', plain], ['metrics', withMetrics]] as const;
    for (const [name, p] of run % 2 === 0 ? pair : [pair[1], pair[0]]) {
      let scraping = name === 'metrics';
      const scraper = (async () => {
        while (scraping) {
          const t = performance.now();
          scrapeBytes = await scrape(metricsSock);
          scrapes++;
          await sleep(Math.max(0, SCRAPE_MS - (performance.now() - t)));
        }
      })();
      const load = foreignLoad();
      const u0 = sampleUsage(p.pid, false).cpuSec;
      const r = await runBounded('wrk', ['-t1', '-c32', `-d${SECONDS}s`, `http://127.0.0.1:${p.port}/`], (SECONDS + 10) * 1000);
      const cpu = sampleUsage(p.pid, false).cpuSec - u0;
      loads.push(load.stop());
      scraping = false;
      await scraper;
      const rps = Number(/Requests\/sec:\s+([\d.]+)/.exec(r.stdout)?.[1]);
      const requests = Number(/(\d+) requests in/.exec(r.stdout)?.[1]);
      if (!Number.isFinite(rps) || rps <= 0) throw new Error(`wrk: ${r.stdout}${r.stderr}`);
      results[name].rps.push(rps);
      results[name].cpu.push((cpu / requests) * 1e6);
      console.error(`run ${run + 1}/${RUNS} ${name}: ${rps.toFixed(0)} req/s, ${((cpu / requests) * 1e6).toFixed(1)} µs CPU/request`);
    }
  }
  // The proxy's CPU per scrape, measured on its own (idle proxy, 1000 scrapes back to back):
  // CPU time is much less disturbed by other load than throughput is.
  const u0 = sampleUsage(withMetrics.pid, false).cpuSec;
  for (let i = 0; i < SCRAPE_COST_N; i++) await scrape(metricsSock);
  scrapeCpuUs = ((sampleUsage(withMetrics.pid, false).cpuSec - u0) / SCRAPE_COST_N) * 1e6;
} finally {
  await plain.stop(500);
  await withMetrics.stop(500);
  await nginx.stop();
  rmSync(dir, { recursive: true, force: true });
  clearTimeout(overall);
}

const rpsPlain = median(results.plain.rps);
const rpsMetrics = median(results.metrics.rps);
const cpuPlain = median(results.plain.cpu);
const cpuMetrics = median(results.metrics.cpu);
const ratios = results.metrics.rps.map((r, i) => r / (results.plain.rps[i] as number));
// A proxy that is the bottleneck runs one core flat out: scraping takes this share of it.
const scrapesPerSec = 1000 / SCRAPE_MS;
const coreSharePct = (scrapesPerSec * scrapeCpuUs) / 1e4;
const lines = [
  `### 8. \`--metrics\` scraped every ${SCRAPE_MS} ms: HTTP keep-alive through ours (wrk)`,
  '',
  `Measured ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')} by \`node bench/metrics.ts --runs ${RUNS} --seconds ${SECONDS}\` (${os.availableParallelism()} cores, ${os.release()}). ` +
    `wrk -t1 -c32 -d${SECONDS}s keep-alive to nginx (1 worker, \`return 200\`) on TCP, through ours started plain and through ours with \`--metrics=/path\`, ` +
    `the latter scraped every ${SCRAPE_MS} ms (a new connection per scrape) for the whole run; the two alternate, ${RUNS} runs each. Target: requests/s with metrics within 5% of without.`,
  '',
  `| | ours | ours --metrics, scraped every ${SCRAPE_MS} ms | ratio |`,
  '| --- | ---: | ---: | ---: |',
  `| requests/s (median of ${RUNS}) | ${rpsPlain.toFixed(0)} | ${rpsMetrics.toFixed(0)} | ${(rpsMetrics / rpsPlain).toFixed(3)} |`,
  `| proxy CPU µs/request (median) | ${cpuPlain.toFixed(1)} | ${cpuMetrics.toFixed(1)} | ${(cpuMetrics / cpuPlain).toFixed(3)} |`,
  '',
  `- Per-pair ratios (metrics/plain, requests/s, each pair run back to back): ${ratios.map((r) => r.toFixed(3)).join(' ')}; their median ${median(ratios).toFixed(3)}.`,
  `- Proxy CPU per scrape, measured on its own (idle proxy, ${SCRAPE_COST_N} scrapes back to back, each a new connection): ${scrapeCpuUs.toFixed(0)} µs. ` +
    `${scrapesPerSec} scrapes a second take ${coreSharePct.toFixed(2)}% of one core: what a proxy that is the bottleneck (one core flat out) loses in throughput at most. ` +
    `This is the steadier figure: CPU time moves much less with other load than throughput does.`,
  `- ${scrapes} scrapes of ${scrapeBytes} bytes during the runs. Other load on the machine during the runs: median ${median(loads).toFixed(2)} cores (max ${Math.max(...loads).toFixed(2)}) of ${os.availableParallelism()}` +
    (median(loads) > 0.25 ? ': the machine was shared, so throughput ratios of single runs are noisy; CPU per request and per scrape are the steadier guide.' : '.'),
];
const block = ['<!-- bench:metrics-scrape -->', ...lines, '<!-- /bench:metrics-scrape -->'].join('\n');
console.log(lines.join('\n'));
if (!args.includes('--no-write')) {
  const file = path.join(REPO, 'bench', 'RESULTS.md');
  const old = existsSync(file) ? readFileSync(file, 'utf8') : '';
  const a = old.indexOf('<!-- bench:metrics-scrape -->');
  const b = old.indexOf('<!-- /bench:metrics-scrape -->');
  const out = a >= 0 && b > a ? old.slice(0, a) + block + old.slice(b + '<!-- /bench:metrics-scrape -->'.length) : `${old.trimEnd()}\n\n${block}\n`;
  writeFileSync(file, out);
  console.error(`written to ${file}`);
}
process.exit(0);
