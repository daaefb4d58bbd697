#!/usr/bin/env node
// Entry point. It runs in the process systemd started (LISTEN_PID must stay ours),
// so it never spawns a wrapper.
//
// First the Node.js version: `#!/usr/bin/env node` runs whatever `node` comes first in
// PATH, and under systemd that is often the distribution's older one, on which the
// proxy would start and then fail on connections (Node 20 cannot reach @abstract
// targets). So this file checks before it loads anything, and it is written so that
// older Nodes can run the check too: no static import, no top-level await, no syntax
// newer than they parse. The bundle (main.js) is loaded only on a Node we support.
//
// Keep NODE_MIN in step with "engines" in package.json (test/startup.test.ts checks).
const NODE_MIN = [22, 12] as const;

function nodeTooOld(version: string): boolean {
  const parts = version.split('.');
  const major = Number(parts[0]);
  const minor = Number(parts[1]);
  return major < NODE_MIN[0] || (major === NODE_MIN[0] && minor < NODE_MIN[1]);
}

/** One line on stderr, with the journal's error priority when stderr is the journal, then exit 1. */
function refuseOldNode(): void {
  const line =
    'Node.js v' + process.versions.node + ' (' + process.execPath + ') is too old: socket-proxyd needs Node.js >=' +
    NODE_MIN.join('.') + '. Run it with a newer node (in a unit: its absolute path in ExecStart=, or Environment=PATH=).';
  const journal = process.env.JOURNAL_STREAM;
  import('node:fs')
    .then(function (fs) {
      const st = fs.fstatSync(2, { bigint: true });
      return journal !== undefined && journal === String(st.dev) + ':' + String(st.ino);
    })
    .catch(function () {
      return false;
    })
    .then(function (toJournal) {
      process.stderr.write((toJournal ? '<3>' : '') + line + '\n', function () {
        process.exit(1);
      });
    });
}

/**
 * Where Node's compile cache may live, or null for none. The cache is V8 code loaded from
 * disk: whoever can write its directory can run code as us (under systemd, often root).
 * Node's default, os.tmpdir()/node-compile-cache, is a name in /tmp that any user can
 * create first, and Node uses it whoever owns it. So: the default only if it is a real
 * directory of ours that nobody else can write (made so if missing); otherwise no cache.
 * NODE_COMPILE_CACHE / NODE_DISABLE_COMPILE_CACHE in the environment are the user's call.
 */
function compileCacheDir(): string | undefined | null {
  if (process.env.NODE_COMPILE_CACHE || process.env.NODE_DISABLE_COMPILE_CACHE) return undefined;
  const fs = process.getBuiltinModule('node:fs');
  const dir = process.getBuiltinModule('node:path').join(process.getBuiltinModule('node:os').tmpdir(), 'node-compile-cache');
  try {
    fs.mkdirSync(dir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') return null;
  }
  try {
    const st = fs.lstatSync(dir);
    return st.isDirectory() && st.uid === process.geteuid!() && (st.mode & 0o022) === 0 ? dir : null;
  } catch (err) {
    return null;
  }
}

if (nodeTooOld(process.versions.node)) {
  refuseOldNode();
} else {
  // Node's compile cache makes repeated starts cheaper; enabled before the rest is loaded.
  const cacheDir = compileCacheDir();
  if (cacheDir !== null) process.getBuiltinModule('node:module').enableCompileCache(cacheDir);
  import('./main.ts').then(function (m) {
    return m.main(process.argv.slice(2));
  });
}
