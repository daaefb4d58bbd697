/**
 * The coarse clock: `tick` is performance.now() (ms) as of the last advance, not of now.
 *
 * The data path marks a connection active by storing `tick` (one store per read, no
 * clock read, no timer per connection per chunk). Whoever needs the time to be fresh
 * to a known bound (the sweep, sweep.ts) advances it from its own interval timer,
 * which runs only while connections exist; so `tick` is at most one sweep period old
 * whenever anybody compares against it.
 */
export let tick = 0;

/** Read the real clock once and make it the tick. Returns it. */
export function advanceTick(): number {
  tick = performance.now();
  return tick;
}
