#!/usr/bin/env node
// Entry point. It runs in the process systemd started (LISTEN_PID must stay ours),
// so it never spawns a wrapper. Node's compile cache makes repeated starts
// cheaper; it is enabled before the rest of the program is loaded.
import module from 'node:module';

module.enableCompileCache?.();
const { main } = await import('./main.ts');
main(process.argv.slice(2));
