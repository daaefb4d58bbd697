/**
 * Shared by the notify tests (test/notify.test.ts, test/notify-arm64.test.ts):
 * - startReceiver: a stand-in for systemd's notify socket; runs
 *   test/fixtures/notify_recv.py (a UNIX datagram socket with SO_PASSCRED, bound
 *   with the exact name length as PID 1 does) and reports what arrives;
 * - gccIdent: which GCC built a prebuild, to know when a rebuild must match it byte for byte.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { createInterface } from 'node:readline';

const receiverScript = join(import.meta.dirname, 'fixtures', 'notify_recv.py');

export interface Datagram {
  payload: string;
  /** The sender's pid from SCM_CREDENTIALS. */
  pid: number | null;
}

export interface Receiver {
  /** Resolves with every datagram once the receiver has exited (COUNT received, or TIMEOUT_S of silence). */
  done: Promise<Datagram[]>;
  /** Resolves with the next datagram not yet taken by next(); rejects if the receiver exits first. */
  next(): Promise<Datagram>;
}

/** Starts the receiver on `address` (a path or "@abstract"); resolves once it is bound. Bounded: it exits after
 *  `count` datagrams or `timeoutS` seconds of silence, and is killed 5 s after that at the latest. */
export async function startReceiver(address: string, count = 1, timeoutS = 5): Promise<Receiver> {
  const child = spawn('python3', [receiverScript, address, String(count), String(timeoutS)], {
    stdio: ['ignore', 'pipe', 'inherit'],
    timeout: (timeoutS + 5) * 1000,
  });
  const lines = createInterface({ input: child.stdout });
  const got: Datagram[] = [];
  let taken = 0;
  let exited = false;
  let wake: () => void = () => {};
  let markReady: () => void = () => {};
  let markFailed: (e: Error) => void = () => {};
  const ready = new Promise<void>((resolve, reject) => {
    markReady = resolve;
    markFailed = reject;
  });
  lines.on('line', (line) => {
    const msg = JSON.parse(line) as { ready?: boolean } & Datagram;
    if (msg.ready === true) markReady();
    else got.push({ payload: msg.payload, pid: msg.pid });
    wake();
  });
  const done = new Promise<Datagram[]>((resolve) => {
    child.on('close', (code) => {
      exited = true;
      markFailed(new Error(`receiver exited (${code}) before binding`));
      wake();
      resolve(got);
    });
  });
  async function next(): Promise<Datagram> {
    while (got.length <= taken) {
      if (exited) throw new Error(`notify receiver exited after ${got.length} datagram(s)`);
      await new Promise<void>((resolve) => (wake = resolve));
    }
    return got[taken++] as Datagram;
  }
  await ready;
  return { done, next };
}

/** The "(Debian 12.2.0-14+deb12u1) 12.2.0" part of a GCC ident, from `gcc --version` or an ELF .comment. */
export function gccIdent(text: string): string | null {
  const m = /(?:GCC:|gcc) (\([^\0\n]*?\) [^\s\0]+)/.exec(text);
  return m?.[1] ?? null;
}
