/**
 * The UDP behaviour tests again, on Node's UDP handles: the data path that serves where
 * the native addon (native/udp_flows.c) cannot load (another platform or architecture, a
 * missing prebuild). SOCKET_PROXYD_NATIVE_UDP=0 selects it, in this process (the in-process
 * engine tests) and in every proxy started here (test/helpers.ts passes it on); the tests
 * themselves check which path served (test/datagram.test.ts: assertPath).
 */
process.env['SOCKET_PROXYD_NATIVE_UDP'] = '0';
// Imported only now, so that the variable is set before anything reads it.
await import('./datagram.test.ts');
await import('./datagram-engine.test.ts');
