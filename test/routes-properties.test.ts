/**
 * The route grammar (issue 12) under generated input, with fast-check, in the style of
 * properties.test.ts: `NAME=TARGET` positionals, `--listen=NAME=ADDRESS`, LISTEN_FDNAMES.
 * In-process, the parser and the socket-to-route check either give a result that obeys
 * every rule or throw the one error type the CLI prints as one line, and each error is
 * justified by the input. Then the real CLI runs generated bad configurations with real
 * sockets passed in: exit 1, exactly the expected line, never a stack trace.
 *
 * SOCKET_PROXYD_SEED replays a failure.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import fc from 'fast-check';
import { parseAddress } from '../src/config/address.ts';
import { parseArgv } from '../src/config/args.ts';
import { EINVAL, ProxyError } from '../src/errors.ts';
import { assignRoutes, checkRouteName, DEFAULT_ROUTE_LABEL, splitRouteArg } from '../src/config/route.ts';
import { runProxy } from './helpers.ts';

const STRESS = process.env.SOCKET_PROXYD_STRESS === '1';
const seed = process.env.SOCKET_PROXYD_SEED === undefined ? undefined : Number(process.env.SOCKET_PROXYD_SEED);
const RUNS = STRESS ? 50_000 : 3_000;
const params = (numRuns: number): fc.Parameters<unknown> => (seed === undefined ? { numRuns } : { numRuns, seed });

/** FileDescriptorName='s rules (systemd fdname_is_valid()), not empty, written independently of src/. */
const VALID_NAME = /^[\x20-\x39\x3b-\x7e]{1,255}$/;

const goodName = fc.oneof(
  fc.constantFrom('web', 'db', 'web.socket', 'db.socket', 'a', 'x y', '-', '#1', 'unknown'),
  fc.stringMatching(/^[a-z0-9._-]{1,8}$/),
);
const nameish = fc.oneof(
  { weight: 4, arbitrary: goodName },
  {
    weight: 1,
    arbitrary: fc.oneof(
      fc.constantFrom('', ':', 'a:b', 'tab\there', 'new\nline', 'del\x7f', 'é', '\u{1F600}', 'n'.repeat(255), 'n'.repeat(256)),
      fc.string({ unit: 'binary', maxLength: 6 }).map((s) => s.replaceAll('\0', '').replaceAll('=', '')),
    ),
  },
);
const targetish = fc.oneof(
  fc.constantFrom('/run/x.sock', '127.0.0.1:9', '@abs', '[::1]:80', 'localhost:9', '/run/a=b.sock', '@c=d'),
  fc.constantFrom('', 'host:99999', `/${'p'.repeat(120)}`, 'a b:1', '[::1'),
);
const positional = fc.oneof(
  { weight: 3, arbitrary: fc.tuple(nameish, targetish).map(([n, t]) => `${n}=${t}`) },
  { weight: 2, arbitrary: targetish },
);
const argvArb = fc.record({
  positionals: fc.array(positional, { maxLength: 5 }),
  listen: fc.array(fc.oneof(fc.tuple(nameish, fc.constantFrom('127.0.0.1:0', '/run/l.sock')).map(([n, a]) => `${n}=${a}`), fc.constantFrom('127.0.0.1:0', '/run/l=x.sock')), { maxLength: 2 }),
  c: fc.option(fc.integer({ min: 1, max: 9 }), { nil: undefined }),
});

function argvOf(r: { positionals: string[]; listen: string[]; c: number | undefined }): string[] {
  // "--" first: a name may start with "-" ("-=TARGET"), which would otherwise be an option.
  return [...(r.c === undefined ? [] : ['-c', String(r.c)]), ...r.listen.map((l) => `--listen=${l}`), '--', ...r.positionals];
}

/** NAME of a NAME=TARGET positional, by the rule; null for a plain TARGET. */
function nameOf(arg: string): string | null {
  if (arg.startsWith('/') || arg.startsWith('@') || !arg.includes('=')) return null;
  return arg.slice(0, arg.indexOf('='));
}

test(`routes: ${RUNS} generated command lines give rule-abiding routes or a justified usage error`, () => {
  fc.assert(
    fc.property(argvArb, (r) => {
      const argv = argvOf(r);
      const plain = r.positionals.filter((p) => nameOf(p) === null);
      let parsed;
      try {
        parsed = parseArgv(argv, 'socket-proxyd');
      } catch (e) {
        assert.ok(e instanceof ProxyError && e.code === 'ERR_USAGE' && e.errno === EINVAL, `not a usage error: ${String(e)}`);
        const m = e.message;
        if (m === 'Not enough parameters.') assert.equal(r.positionals.length, 0);
        else if (m === 'Too many parameters.') assert.ok(plain.length >= 2);
        else if (m.startsWith("Invalid route '")) {
          const arg = r.positionals.find((p) => m.startsWith(`Invalid route '${p}': `));
          assert.ok(arg !== undefined, m);
          assert.ok(!VALID_NAME.test(nameOf(arg) as string), `${JSON.stringify(arg)}: the name is valid`);
        } else {
          const dup = /^Route '(.*)' is given twice\.$/s.exec(m);
          assert.ok(dup !== null, `unexpected message ${JSON.stringify(m)}`);
          assert.ok(r.positionals.filter((p) => nameOf(p) === dup[1]).length >= 2);
        }
        return;
      }
      assert.equal(parsed.action, 'run');
      if (parsed.action !== 'run') return;
      const o = parsed.options;
      assert.ok(plain.length <= 1);
      assert.equal(o.target, plain[0] ?? null, 'the plain TARGET is the default route');
      assert.deepEqual(
        o.routes.map((x) => `${x.name}=${x.target}`),
        r.positionals.filter((p) => nameOf(p) !== null),
        'every NAME=TARGET, in order, split at the first =',
      );
      for (const x of o.routes) assert.match(x.name, VALID_NAME);
      assert.equal(new Set(o.routes.map((x) => x.name)).size, o.routes.length, 'names are distinct');
      assert.deepEqual(o.listen, r.listen, '--listen values stay raw');
    }),
    params(RUNS),
  );
});

test(`routes: ${RUNS} generated route/socket sets: each socket gets its name's route (else the default), or a justified ERR_ROUTE`, () => {
  const arb = fc.record({
    routes: fc.uniqueArray(goodName, { maxLength: 4 }),
    withDefault: fc.boolean(),
    sockets: fc.array(fc.option(fc.oneof(goodName, fc.constant('')), { nil: undefined }), { minLength: 1, maxLength: 5 }),
  });
  fc.assert(
    fc.property(arb, ({ routes, withDefault, sockets }) => {
      const specs = [...(withDefault ? [{ name: null }] : []), ...routes.map((name) => ({ name }))];
      const socks = sockets.map((name, i) => ({ name, where: `fd ${i + 3}` }));
      let picked: number[];
      try {
        picked = assignRoutes(specs, socks);
      } catch (e) {
        assert.ok(e instanceof ProxyError && e.code === 'ERR_ROUTE' && e.errno === EINVAL, String(e));
        assert.ok(!e.message.includes('\n'));
        const unrouted = socks.find((s) => !withDefault && (s.name === undefined || s.name === '' || !routes.includes(s.name)));
        const unused = routes.find((n) => !sockets.includes(n));
        if (e.message.startsWith('No route for')) {
          assert.ok(unrouted !== undefined, e.message);
          assert.ok(e.message.includes(unrouted.where));
        } else {
          assert.equal(unrouted, undefined, 'a socket without a route is reported first');
          assert.equal(e.message.split("'")[1], unused, e.message);
        }
        return;
      }
      socks.forEach((s, i) => {
        const route = specs[picked[i] as number];
        assert.ok(route !== undefined);
        if (s.name !== undefined && routes.includes(s.name)) assert.equal(route.name, s.name);
        else assert.equal(route.name, null, 'the default route');
      });
      for (const name of routes) assert.ok(sockets.includes(name), `route ${name} without a socket was accepted`);
    }),
    params(RUNS),
  );
});

/** The line the CLI must print for these args and socket names, from the pure parts; null: it would run. */
function expectedLine(argv: string[], names: (string | undefined)[]): string | null {
  try {
    const parsed = parseArgv(argv, 'socket-proxyd');
    if (parsed.action !== 'run') return null;
    const o = parsed.options;
    const several = o.routes.length + (o.target === null ? 0 : 1) > 1;
    const check = (name: string | null, text: string): void => {
      try {
        parseAddress(text);
      } catch (e) {
        if (!several) throw e;
        throw new Error(`${name ?? DEFAULT_ROUTE_LABEL}: ${(e as Error).message}`);
      }
    };
    if (o.target !== null) check(null, o.target);
    for (const x of o.routes) check(x.name, x.target);
    const listen = o.listen.map((l) => {
      const { name, value } = splitRouteArg(l);
      if (name !== null) checkRouteName(name, `--listen=${l}`);
      parseAddress(value, true);
      return { name: name ?? undefined, where: `--listen=${l}` };
    });
    assignRoutes(
      [...(o.target === null ? [] : [{ name: null }]), ...o.routes],
      [...names.map((name, i) => ({ name, where: `fd ${i + 3}` })), ...listen],
    );
    return null;
  } catch (e) {
    return (e as Error).message;
  }
}

const CLI_RUNS = STRESS ? 150 : 30;

test(`routes CLI: ${CLI_RUNS} generated bad configurations with real sockets passed: exit 1, the expected line`, { timeout: 120_000 }, async () => {
  const arb = fc.record({
    // Valid targets only, and no --listen: the failure comes from the routes themselves.
    positionals: fc.array(
      fc.oneof(
        fc.tuple(nameish, fc.constantFrom('/run/x.sock', '127.0.0.1:9', '@abs')).map(([n, t]) => `${n}=${t}`),
        fc.constantFrom('/run/d=x.sock', '127.0.0.1:9'),
      ),
      { minLength: 1, maxLength: 4 },
    ),
    sockets: fc.array(fc.option(goodName, { nil: undefined }), { minLength: 1, maxLength: 3 }),
    names: fc.boolean(),
  });
  const cases = fc
    .sample(arb, { numRuns: CLI_RUNS * 6, ...(seed === undefined ? {} : { seed }) })
    .map((c) => {
      const names = c.names ? c.sockets.map((n) => n ?? '') : c.sockets.map(() => undefined);
      const fdnames = c.names ? names.join(':') : undefined;
      return { ...c, fdnames, line: expectedLine(['--', ...c.positionals], names) };
    })
    .filter((c): c is typeof c & { line: string } => c.line !== null)
    .slice(0, CLI_RUNS);
  assert.ok(cases.length >= CLI_RUNS * 0.8, `too few bad configurations generated: ${cases.length}`);
  const kinds = new Set<string>();
  for (let i = 0; i < cases.length; i += 6) {
    await Promise.all(
      cases.slice(i, i + 6).map(async (c) => {
        const r = await runProxy({
          args: ['--', ...c.positionals],
          listen: c.sockets.map(() => ({ kind: 'tcp' }) as const),
          env: c.fdnames === undefined ? {} : { LISTEN_FDNAMES: c.fdnames },
        });
        const what = `${JSON.stringify(c.positionals)} LISTEN_FDNAMES=${JSON.stringify(c.fdnames)}`;
        assert.equal(r.signal, null, what);
        assert.equal(r.code, 1, `${what}: ${r.stderr}`);
        assert.equal(r.stdout, '');
        const escaped = c.line.replace(/[\x00-\x1f\x7f]/g, (ch) => ({ '\n': '\\n', '\t': '\\t', '\r': '\\r' })[ch] ?? `\\x${ch.charCodeAt(0).toString(16).padStart(2, '0')}`);
        assert.equal(r.stderr, `${escaped}\n`, what);
        kinds.add(c.line.replace(/'.*/s, ''));
      }),
    );
  }
  // The sample covers the kinds of start-up error, not just one.
  assert.ok(kinds.size >= 3, `kinds of error seen: ${[...kinds].join(' | ')}`);
});
