// `--profile`: ours runs under `node --cpu-prof`, one directory per benchmark; afterwards the
// profiles of a benchmark are merged and its hottest functions (self time) are printed, to show the
// engineer working on the data path where ours spends its CPU. Profiling slows ours down: the
// figures of a profiled run are not the ones to compare.
import { readdirSync, readFileSync } from 'node:fs';
import path from 'node:path';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
}

interface CpuProfile {
  nodes: ProfileNode[];
  startTime: number;
  endTime: number;
  samples?: number[];
}

function where(url: string, line: number): string {
  if (url === '') return '';
  const u = url.replace(/^file:\/\//, '');
  const rel = u.startsWith('/') ? path.relative(path.resolve(import.meta.dirname, '..'), u) : u;
  return `${rel}:${line + 1}`;
}

/** Markdown table of the top functions by self time over all *.cpuprofile files in dir. */
export function summarizeProfiles(dir: string, top = 20): string {
  let files: string[] = [];
  try {
    files = readdirSync(dir).filter((f) => f.endsWith('.cpuprofile'));
  } catch {
    return '(no profiles)';
  }
  if (files.length === 0) return '(no profiles written: did ours exit through its SIGTERM handler?)';
  const self = new Map<string, number>();
  let total = 0;
  for (const f of files) {
    const prof = JSON.parse(readFileSync(path.join(dir, f), 'utf8')) as CpuProfile;
    for (const n of prof.nodes) {
      const hits = n.hitCount ?? 0;
      if (hits === 0) continue;
      const name = n.callFrame.functionName || '(anonymous)';
      const key = `${name}\t${where(n.callFrame.url, n.callFrame.lineNumber)}`;
      self.set(key, (self.get(key) ?? 0) + hits);
      total += hits;
    }
  }
  const idle = [...self].filter(([k]) => k.startsWith('(idle)')).reduce((a, [, v]) => a + v, 0);
  const busy = Math.max(1, total - idle);
  const rows = [...self]
    .filter(([k]) => !k.startsWith('(idle)'))
    .sort((a, b) => b[1] - a[1])
    .slice(0, top)
    .map(([k, v]) => {
      const [fn, loc] = k.split('\t');
      return `| ${((100 * v) / busy).toFixed(1)}% | \`${fn}\` | ${loc ?? ''} |`;
    });
  return [
    `${files.length} profile(s), ${total} samples, ${((100 * idle) / Math.max(1, total)).toFixed(0)}% idle; share of the non-idle samples:`,
    '',
    '| self | function | where |',
    '|---:|---|---|',
    ...rows,
  ].join('\n');
}
