// Results model, medians, markdown tables and bench/RESULTS.md.
import { readFileSync, writeFileSync, existsSync } from 'node:fs';
import os from 'node:os';
import type { ProxyName } from './proxies.ts';

export interface TargetSpec {
  /** shown in the table, e.g. ">= 1.9x ref" */
  text: string;
  /** given the medians of ours and ref (or of `against`) */
  check: (ours: number, ref: number) => boolean;
  /** the check compares with ref (or `against`), so it cannot be judged without a result for it */
  needsRef: boolean;
  /** compare with this proxy's median instead of ref's, e.g. direct */
  against?: ProxyName;
  /** judge this proxy's median instead of ours', e.g. ours-pp2 against ours */
  subject?: ProxyName;
  /**
   * Judge the median of the per-run ratios subject/against (check(ratio, 1)) instead of the
   * ratio of the medians: each run measures both back to back, so the machine's drift
   * between runs, which moves both alike, cancels (as in bench/pairs.ts).
   */
  paired?: boolean;
}

/** The median of the per-run ratios of `subject` to `against`, or NaN without pairs. */
export function pairedRatio(row: Row, subject: ProxyName, against: ProxyName): number {
  const a = row.values[subject] ?? [];
  const b = row.values[against] ?? [];
  if (a.length === 0 || a.length !== b.length) return NaN;
  return median(a.map((x, i) => x / (b[i] as number)));
}

export interface Row {
  label: string;
  digits: number;
  values: Partial<Record<ProxyName, number[]>>;
  /** text appended to a cell, e.g. "3333/8000 served" */
  notes: Partial<Record<ProxyName, string>>;
  /** show ours/ref (meaningless for e.g. error counts) */
  ratio: boolean;
  target?: TargetSpec;
}

export interface Section {
  id: string;
  /** for the targets summary */
  short: string;
  title: string;
  when: string;
  mode: string;
  notes: string[];
  rows: Row[];
}

export function newRow(label: string, digits: number, opts: { ratio?: boolean; target?: TargetSpec } = {}): Row {
  return { label, digits, values: {}, notes: {}, ratio: opts.ratio ?? true, ...(opts.target ? { target: opts.target } : {}) };
}

export function push(row: Row, proxy: ProxyName, v: number): void {
  if (!Number.isFinite(v)) return;
  (row.values[proxy] ??= []).push(v);
}

export function median(xs: readonly number[] | undefined): number {
  if (xs === undefined || xs.length === 0) return NaN;
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 === 1 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

function fmt(v: number, digits: number): string {
  if (!Number.isFinite(v)) return '–';
  if (Math.abs(v) >= 1000 && digits <= 1) return Math.round(v).toLocaleString('en-US');
  return v.toFixed(digits);
}

function cell(row: Row, p: ProxyName, withRange: boolean): string {
  const xs = row.values[p];
  let s = fmt(median(xs), row.digits);
  if (withRange && xs !== undefined && xs.length > 1) {
    s += ` (${fmt(Math.min(...xs), row.digits)}–${fmt(Math.max(...xs), row.digits)})`;
  }
  const note = row.notes[p];
  if (note) s += s === '–' ? ` ${note}`.trim() : ` ${note}`;
  return s === '' ? '–' : s;
}

export interface TargetResult {
  section: string;
  label: string;
  ours: string;
  ref: string;
  ratio: string;
  target: string;
  met: string;
}

export function evaluate(row: Row): { ratio: string; met: string } {
  const o = median(row.values.ours);
  const r = median(row.values.ref);
  const ratio = row.ratio && Number.isFinite(o) && Number.isFinite(r) && r !== 0 ? `${(o / r).toFixed(2)}x` : '–';
  let met = '';
  if (row.target) {
    const subject = row.target.subject ?? 'ours';
    const s = median(row.values[subject]);
    const base = row.target.against ?? 'ref';
    const b = median(row.values[base]);
    if (!Number.isFinite(s)) met = `n/a (no result for ${subject})`;
    else if (row.target.needsRef && !Number.isFinite(b)) met = `n/a (no result for ${base})`;
    else if (row.target.paired) {
      const pr = pairedRatio(row, subject, base);
      met = !Number.isFinite(pr) ? `n/a (${subject} and ${base} not measured in the same runs)` : row.target.check(pr, 1) ? 'yes' : '**NO**';
    } else met = row.target.check(s, b) ? 'yes' : '**NO**';
  }
  return { ratio, met };
}

export function sectionTable(sec: Section, proxies: readonly ProxyName[]): string {
  const others = proxies.filter((p) => p !== 'ours' && p !== 'ref');
  const present = others.filter((p) => sec.rows.some((r) => r.values[p] !== undefined || r.notes[p] !== undefined));
  const head = ['metric', 'ours', 'ref', 'ours/ref', 'target', 'met', ...present];
  const lines = [`| ${head.join(' | ')} |`, `|${head.map((h) => (h === 'metric' ? '---' : '---:')).join('|')}|`];
  for (const row of sec.rows) {
    const { ratio, met } = evaluate(row);
    lines.push(
      `| ${[
        row.label,
        cell(row, 'ours', true),
        cell(row, 'ref', true),
        ratio,
        row.target?.text ?? '',
        met,
        // A proxy measured in every run (ours-nagle, ours-routes, ours-pp2) shows its range too.
        ...present.map((p) => cell(row, p, (row.values[p]?.length ?? 0) > 1)),
      ].join(' | ')} |`,
    );
  }
  return lines.join('\n');
}

export function sectionMarkdown(sec: Section, proxies: readonly ProxyName[]): string {
  const notes = sec.notes.map((n) => `- ${n}`).join('\n');
  return [
    `### ${sec.title}`,
    '',
    `_${sec.when}, ${sec.mode}_`,
    '',
    sectionTable(sec, proxies),
    '',
    notes,
    '',
  ].join('\n');
}

export function targetsOf(sec: Section): TargetResult[] {
  return sec.rows
    .filter((r) => r.target !== undefined)
    .map((r) => {
      const { ratio, met } = evaluate(r);
      // A target on another proxy (ours-pp2 against ours) names both and shows their ratio.
      const subject = r.target?.subject;
      if (subject !== undefined && subject !== 'ours') {
        const against = r.target?.against ?? 'ref';
        const a = median(r.values[subject]);
        const b = median(r.values[against]);
        const pr = r.target?.paired ? pairedRatio(r, subject, against) : NaN;
        return {
          section: sec.short,
          label: `${r.label}: ${subject} vs ${against}`,
          ours: `${cell(r, subject, false)} (${subject})`,
          ref: `${cell(r, against, false)} (${against})`,
          ratio: Number.isFinite(pr)
            ? `${pr.toFixed(2)}x (median of per-run ratios)`
            : Number.isFinite(a) && Number.isFinite(b) && b !== 0
              ? `${(a / b).toFixed(2)}x`
              : '–',
          target: r.target?.text ?? '',
          met,
        };
      }
      return {
        section: sec.short,
        label: r.label,
        ours: cell(r, 'ours', false),
        ref: cell(r, 'ref', false),
        ratio,
        target: r.target?.text ?? '',
        met,
      };
    });
}

export function targetsTable(rows: readonly TargetResult[]): string {
  const lines = [
    '| benchmark | metric | ours | ref | ours/ref | target | met |',
    '|---|---|---:|---:|---:|---:|---:|',
    ...rows.map((t) => `| ${t.section} | ${t.label} | ${t.ours} | ${t.ref} | ${t.ratio} | ${t.target} | ${t.met} |`),
  ];
  return lines.join('\n');
}

// ---------------------------------------------------------------- RESULTS.md
// The file keeps one block per benchmark between markers, so that `--only NAME` replaces just
// that benchmark's block and leaves the others (each block says when and how it was measured).
// The targets summary at the top is rebuilt from the JSON each block carries in a comment.

const BEGIN = (id: string): string => `<!-- bench:${id} -->`;
const END = (id: string): string => `<!-- /bench:${id} -->`;

export interface Machine {
  lines: string[];
}

export function machineInfo(refVersion: string): Machine {
  const cpu = os.cpus()[0]?.model ?? '?';
  return {
    lines: [
      `- nproc: ${os.availableParallelism()}, memory: ${(os.totalmem() / 2 ** 30).toFixed(0)} GiB`,
      `- kernel: ${os.type()} ${os.release()}`,
      `- CPU: ${cpu}`,
      `- node: ${process.version} (${process.execPath.replace(/^.*\/node_modules\//, 'node_modules/')})`,
      `- reference: \`/lib/systemd/systemd-socket-proxyd\`, ${refVersion}`,
    ],
  };
}

export function writeResults(file: string, sections: readonly Section[], order: readonly string[], proxies: readonly ProxyName[], machine: Machine, header: string): void {
  const blocks = new Map<string, string>();
  const others: string[] = [];
  if (existsSync(file)) {
    const old = readFileSync(file, 'utf8');
    for (const id of order) {
      const a = old.indexOf(BEGIN(id));
      const b = old.indexOf(END(id));
      if (a >= 0 && b > a) blocks.set(id, old.slice(a, b + END(id).length));
    }
    for (const m of old.matchAll(/<!-- bench:([\w-]+) -->/g)) {
      const id = m[1] as string;
      const b = old.indexOf(END(id));
      if (!order.includes(id) && b > (m.index ?? 0)) others.push(old.slice(m.index, b + END(id).length));
    }
  }
  for (const sec of sections) {
    const json = JSON.stringify(targetsOf(sec)).replaceAll('--', '\\u002d\\u002d');
    blocks.set(sec.id, [BEGIN(sec.id), `<!-- targets:${json} -->`, sectionMarkdown(sec, proxies), END(sec.id)].join('\n'));
  }
  const targets: TargetResult[] = [];
  for (const id of order) {
    const m = /<!-- targets:(.*) -->/.exec(blocks.get(id) ?? '');
    if (m) targets.push(...(JSON.parse(m[1] as string) as TargetResult[]));
  }
  const out = [
    '# socket-proxyd benchmark results',
    '',
    header,
    '',
    `Last updated ${new Date().toISOString().replace(/\.\d+Z$/, 'Z')} on:`,
    '',
    ...machine.lines,
    '',
    '## Targets',
    '',
    targetsTable(targets),
    '',
    '## All results',
    '',
    'Cells are medians over the runs; for ours and ref the range (min–max) follows in parentheses.',
    '',
    ...order.flatMap((id) => {
      const b = blocks.get(id);
      return b ? [b, ''] : [];
    }),
    // Blocks that other scripts write (bench/metrics.ts) are kept as they were, after these.
    ...others.flatMap((b) => [b, '']),
  ].join('\n');
  writeFileSync(file, out);
}
