// Small load tools run as separate processes by bench/run.ts, so that they do not share an event
// loop with the orchestrator or with each other:
//   node bench/tools.ts echo [--unix PATH] [--split]       echo backend; prints "READY {json}";
//                                                           --split: each echo in two writes
//   node bench/tools.ts pingpong --port P --count N ...    one connection, 64-byte round trips
//   node bench/tools.ts idle --port P --count N ...        opens N connections, each echoes a few
//                                                           bytes, holds them until stdin closes
// Every loop is bounded in count and in time (--deadline-ms).
import net from 'node:net';
import { unlinkSync } from 'node:fs';

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 && i + 1 < process.argv.length ? (process.argv[i + 1] as string) : def;
}
function num(name: string, def: number): number {
  const v = Number(arg(name, String(def)));
  if (!Number.isFinite(v)) throw new Error(`--${name} must be a number`);
  return v;
}

function pct(sorted: Float64Array, p: number): number {
  if (sorted.length === 0) return NaN;
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil((p / 100) * sorted.length) - 1));
  return sorted[i] as number;
}

// A hard stop for every tool, whatever happens to the sockets.
function hardDeadline(ms: number): void {
  setTimeout(() => {
    process.stderr.write(`tools: hard deadline ${ms} ms reached\n`);
    process.exit(3);
  }, ms).unref();
}

/**
 * --split: the echo of each read goes out in two writes, its first half now and the rest on the
 * next loop turn, like a server that writes a response's headers and then its body (nginx:
 * writev, then sendfile). TCP_NODELAY is on, so they leave as two segments; a proxy without
 * TCP_NODELAY then holds the second until the client ACKs the first. Whatever arrives while a
 * second half waits is queued behind it, so bytes never reorder.
 */
interface SplitConn extends net.Socket {
  queued: Buffer[] | null;
}

function splitEcho(this: SplitConn, d: Buffer): void {
  if (this.queued !== null) {
    this.queued.push(d);
    return;
  }
  const half = d.length >> 1;
  if (half === 0) {
    this.write(d);
    return;
  }
  this.write(d.subarray(0, half));
  this.queued = [d.subarray(half)];
  setImmediate(flushSplit, this);
}

function flushSplit(c: SplitConn): void {
  const q = c.queued ?? [];
  c.queued = null;
  if (!c.destroyed) c.write(q.length === 1 ? (q[0] as Buffer) : Buffer.concat(q));
}

function echo(): void {
  const unixPath = arg('unix', '');
  const split = process.argv.includes('--split');
  hardDeadline(num('deadline-ms', 15 * 60_000));
  const server = net.createServer({ noDelay: true }, (c) => {
    if (split) {
      (c as SplitConn).queued = null;
      c.on('data', splitEcho);
    } else {
      c.on('data', (d) => c.write(d));
    }
    c.on('error', () => c.destroy());
  });
  server.on('error', (e) => {
    process.stderr.write(`echo: ${e.message}\n`);
    process.exit(1);
  });
  const ready = (): void => {
    const a = server.address();
    process.stdout.write(`READY ${JSON.stringify(typeof a === 'string' ? { path: a } : { port: a?.port })}\n`);
  };
  if (unixPath !== '') {
    try {
      unlinkSync(unixPath);
    } catch {
      // not there
    }
    server.listen({ path: unixPath }, 4096, ready);
  } else {
    server.listen({ host: '127.0.0.1', port: 0 }, 4096, ready);
  }
  // The orchestrator closes our stdin (or dies): stop then.
  process.stdin.on('end', () => process.exit(0));
  process.stdin.on('error', () => process.exit(0));
  process.stdin.resume();
}

function pingpong(): void {
  const port = num('port', 0);
  const count = num('count', 10000);
  const warmup = num('warmup', 500);
  const size = num('size', 64);
  const deadlineMs = num('deadline-ms', 10000);
  hardDeadline(deadlineMs + 2000);
  const msg = Buffer.alloc(size, 0x61);
  const rtt = new Float64Array(count);
  let done = 0; // completed round trips, warm-up included
  let got = 0;
  let t0 = 0n;
  const deadline = Date.now() + deadlineMs;
  let finished = false;
  const finish = (err: string | null): void => {
    if (finished) return;
    finished = true;
    const n = Math.max(0, done - warmup);
    const s = rtt.slice(0, n).sort();
    process.stdout.write(
      `${JSON.stringify({ ok: err === null && n === count, error: err, count: n, p50us: pct(s, 50), p99us: pct(s, 99), maxus: pct(s, 100), meanus: n > 0 ? s.reduce((a, b) => a + b, 0) / n : NaN })}\n`,
      () => process.exit(0),
    );
  };
  const c = net.connect({ port, host: '127.0.0.1', noDelay: true }, () => {
    t0 = process.hrtime.bigint();
    c.write(msg);
  });
  c.on('data', (d) => {
    got += d.length;
    if (got < size) return;
    if (got > size) return finish(`got ${got} bytes for a ${size}-byte message`);
    const t1 = process.hrtime.bigint();
    if (done >= warmup) rtt[done - warmup] = Number(t1 - t0) / 1000;
    done++;
    got = 0;
    if (done >= warmup + count || Date.now() > deadline) {
      c.destroy();
      return finish(done >= warmup + count ? null : 'deadline');
    }
    t0 = process.hrtime.bigint();
    c.write(msg);
  });
  c.on('error', (e) => finish(e.message));
  c.on('end', () => finish('EOF'));
}

function idle(): void {
  const port = num('port', 0);
  const count = num('count', 8000);
  const concurrency = num('concurrency', 200);
  const deadlineMs = num('deadline-ms', 20000);
  // holding time is bounded too: the orchestrator closes stdin long before this
  hardDeadline(deadlineMs + 60_000);
  const msg = Buffer.from('hello\n');
  const sockets: net.Socket[] = [];
  let started = 0;
  let inflight = 0;
  let served = 0;
  let failed = 0;
  let reported = false;
  const t0 = Date.now();
  const report = (): void => {
    if (reported) return;
    reported = true;
    clearInterval(ticker);
    const open = sockets.filter((s) => !s.destroyed).length;
    process.stdout.write(`${JSON.stringify({ served, failed, open, attempted: started, elapsedMs: Date.now() - t0 })}\n`);
  };
  const next = (): void => {
    while (!reported && inflight < concurrency && started < count && Date.now() - t0 < deadlineMs) {
      started++;
      inflight++;
      let echoed = 0;
      let settled = false;
      const settle = (ok: boolean): void => {
        if (settled) return;
        settled = true;
        inflight--;
        if (ok) served++;
        else failed++;
        if (served + failed >= count) report();
        else next();
      };
      const s = net.connect({ port, host: '127.0.0.1' }, () => s.write(msg));
      sockets.push(s);
      s.on('data', (d) => {
        echoed += d.length;
        if (echoed >= msg.length) settle(true);
      });
      s.on('error', () => settle(false));
      s.on('close', () => settle(false));
    }
  };
  // Connections stuck in a proxy's backlog never echo: the deadline ends the attempt.
  const ticker = setInterval(() => {
    if (Date.now() - t0 >= deadlineMs) report();
  }, 100);
  next();
  const closeAll = (): void => {
    report();
    for (const s of sockets) s.destroy();
    setTimeout(() => process.exit(0), 50);
  };
  process.stdin.on('end', closeAll);
  process.stdin.on('error', closeAll);
  process.stdin.resume();
}

const mode = process.argv[2];
if (mode === 'echo') echo();
else if (mode === 'pingpong') pingpong();
else if (mode === 'idle') idle();
else {
  process.stderr.write('usage: node bench/tools.ts echo|pingpong|idle [options]\n');
  process.exit(2);
}
