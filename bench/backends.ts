// Backends that every proxy forwards to: nginx (HTTP, on TCP and a UNIX socket), iperf3 (bulk),
// and the Node echo server from bench/tools.ts (ping-pong, idle connections, smoke test).
import { writeFileSync, mkdirSync } from 'node:fs';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { start, freePort, waitTcpListening, waitFile, which } from './procs.ts';
import type { Spawned } from './procs.ts';

export const TOOLS = path.join(import.meta.dirname, 'tools.ts');

export interface Backend {
  port: number;
  unixPath: string;
  stop: () => Promise<void>;
  alive: () => boolean;
  log: () => string;
}

function alive(s: Spawned): () => boolean {
  return () => s.child.exitCode === null && s.child.signalCode === null;
}

/** Node echo server, on TCP (port 0) or on a UNIX socket; `split`: each echo in two writes. */
export async function startEcho(unixPath = '', split = false): Promise<Backend> {
  const s = start(process.execPath, [TOOLS, 'echo', ...(unixPath ? ['--unix', unixPath] : []), ...(split ? ['--split'] : [])], {
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const deadline = Date.now() + 5000;
  while (Date.now() < deadline) {
    const m = /READY (\{.*\})/.exec(s.stdout());
    if (m) {
      const info = JSON.parse(m[1] as string) as { port?: number; path?: string };
      return {
        port: info.port ?? 0,
        unixPath,
        alive: alive(s),
        log: () => s.stderr(),
        stop: () => s.stop(500),
      };
    }
    if (!alive(s)()) break;
    await sleep(10);
  }
  await s.stop(100);
  throw new Error(`echo backend did not start: ${s.stderr()}`);
}

/**
 * nginx serving a small fixed response, on 127.0.0.1:port and on a UNIX socket; and the same on
 * ppPort and ppUnixPath, where it expects a PROXY protocol header first (for ours-pp2).
 */
export async function startNginxHttp(dir: string): Promise<Backend & { ppPort: number; ppUnixPath: string }> {
  const nginx = which('nginx');
  if (nginx === null) throw new Error('nginx not installed: run bench/setup.sh');
  const port = await freePort();
  const ppPort = await freePort();
  const unixPath = path.join(dir, 'nginx-http.sock');
  const ppUnixPath = path.join(dir, 'nginx-http-pp.sock');
  const tmp = path.join(dir, 'nginx-tmp');
  mkdirSync(tmp, { recursive: true });
  const cfg = path.join(dir, 'nginx-http.conf');
  writeFileSync(
    cfg,
    [
      'daemon off;',
      'master_process off;',
      'worker_processes 1;',
      'worker_rlimit_nofile 20000;',
      `pid ${dir}/nginx-http.pid;`,
      `error_log ${dir}/nginx-http.log warn;`,
      'events { worker_connections 16000; }',
      'http {',
      '  access_log off;',
      // keep-alive connections must stay open for the whole run, or wrk would reconnect
      '  keepalive_requests 100000000;',
      '  keepalive_timeout 600s;',
      `  client_body_temp_path ${tmp}/body;`,
      `  proxy_temp_path ${tmp}/proxy;`,
      `  fastcgi_temp_path ${tmp}/fastcgi;`,
      `  uwsgi_temp_path ${tmp}/uwsgi;`,
      `  scgi_temp_path ${tmp}/scgi;`,
      '  server {',
      `    listen 127.0.0.1:${port} backlog=4096;`,
      `    listen unix:${unixPath} backlog=4096;`,
      `    listen 127.0.0.1:${ppPort} backlog=4096 proxy_protocol;`,
      `    listen unix:${ppUnixPath} backlog=4096 proxy_protocol;`,
      '    location / { default_type text/plain; return 200 "hello from nginx via the proxy under test\\n"; }',
      '  }',
      '}',
      '',
    ].join('\n'),
  );
  const s = start(nginx, ['-p', dir, '-e', `${dir}/nginx-http.log`, '-c', cfg]);
  if (!(await waitTcpListening(port)) || !(await waitFile(unixPath)) || !(await waitTcpListening(ppPort)) || !(await waitFile(ppUnixPath))) {
    await s.stop(100);
    throw new Error(`nginx did not start: ${s.stderr()}`);
  }
  return { port, unixPath, ppPort, ppUnixPath, alive: alive(s), log: () => s.stderr(), stop: () => s.stop(1000) };
}

/** iperf3 server (TCP only). One test at a time; restartable after a failed test. */
export async function startIperf(): Promise<Backend & { restart: () => Promise<void> }> {
  const bin = which('iperf3');
  if (bin === null) throw new Error('iperf3 not installed: run bench/setup.sh');
  const port = await freePort();
  let s: Spawned | null = null;
  const launch = async (): Promise<void> => {
    s = start(bin, ['-s', '-B', '127.0.0.1', '-p', String(port)]);
    if (!(await waitTcpListening(port))) throw new Error(`iperf3 -s did not start: ${s.stderr()}`);
  };
  await launch();
  return {
    port,
    unixPath: '',
    alive: () => s !== null && alive(s)(),
    log: () => s?.stderr() ?? '',
    stop: async () => {
      await s?.stop(500);
    },
    restart: async () => {
      await s?.stop(200);
      await launch();
    },
  };
}

/** The small file nginx serves in the split-reply benchmark: 38 bytes, as in issue 9's report. */
export const STATIC_FILE = '/static.txt';
const STATIC_BODY = 'a small static file served by nginx.\n\n';

/**
 * nginx serving a small static file with `sendfile on`, so every response is two writes:
 * the headers (writev), then the body (sendfile). `port` speaks HTTP/1.1, `h2Port` HTTP/2
 * over cleartext with prior knowledge (h2c, what `h2load http://...` speaks). nginx sets
 * TCP_NODELAY on its own keep-alive sockets (`tcp_nodelay on`, the default), so the two
 * writes leave it as two segments: what a proxy does with them is what is measured.
 */
export async function startNginxStatic(dir: string): Promise<Backend & { h2Port: number }> {
  const nginx = which('nginx');
  if (nginx === null) throw new Error('nginx not installed: run bench/setup.sh');
  const port = await freePort();
  let h2Port = await freePort();
  while (h2Port === port) h2Port = await freePort();
  const root = path.join(dir, 'nginx-static-www');
  const tmp = path.join(dir, 'nginx-static-tmp');
  mkdirSync(root, { recursive: true });
  mkdirSync(tmp, { recursive: true });
  writeFileSync(path.join(root, STATIC_FILE.slice(1)), STATIC_BODY);
  const cfg = path.join(dir, 'nginx-static.conf');
  writeFileSync(
    cfg,
    [
      'daemon off;',
      'master_process off;',
      'worker_processes 1;',
      'worker_rlimit_nofile 20000;',
      `pid ${dir}/nginx-static.pid;`,
      `error_log ${dir}/nginx-static.log warn;`,
      'events { worker_connections 16000; }',
      'http {',
      '  access_log off;',
      '  sendfile on;', // headers by writev, body by sendfile: two writes per response
      '  tcp_nopush off;', // (the default) no TCP_CORK that would merge them again
      '  tcp_nodelay on;', // (the default)
      '  keepalive_requests 100000000;',
      '  keepalive_timeout 600s;',
      `  client_body_temp_path ${tmp}/body;`,
      `  proxy_temp_path ${tmp}/proxy;`,
      `  fastcgi_temp_path ${tmp}/fastcgi;`,
      `  uwsgi_temp_path ${tmp}/uwsgi;`,
      `  scgi_temp_path ${tmp}/scgi;`,
      '  server {',
      `    listen 127.0.0.1:${port} backlog=4096;`,
      `    listen 127.0.0.1:${h2Port} http2 backlog=4096;`,
      `    root ${root};`,
      '    default_type text/plain;',
      '  }',
      '}',
      '',
    ].join('\n'),
  );
  const s = start(nginx, ['-p', dir, '-e', `${dir}/nginx-static.log`, '-c', cfg]);
  if (!(await waitTcpListening(port)) || !(await waitTcpListening(h2Port))) {
    await s.stop(100);
    throw new Error(`nginx did not start: ${s.stderr()}`);
  }
  return { port, h2Port, unixPath: '', alive: alive(s), log: () => s.stderr(), stop: () => s.stop(1000) };
}
