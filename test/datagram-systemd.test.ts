/**
 * UDP under a REAL systemd service manager (systemd --user, as root, in a private mount
 * namespace: ../shared/reference/real-systemd.md): a .socket with ListenDatagram= and
 * ListenStream= starts the proxy on the first datagram, which systemd has queued on the
 * socket and which must be answered; one process serves both kinds; after a restart a
 * datagram sent while the proxy was down waits in systemd's socket for the next start.
 *
 * Needs root and systemd's binaries; without them the test skips (fails under CI).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createSocket, type Socket as UdpSocket } from 'node:dgram';
import { once } from 'node:events';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { managerUnavailable as unavailable, startManager } from './systemd-manager.ts';
import { OURS, echo, roundTrip, startBackend, waitFor } from './helpers.ts';

const SLOW = 15_000;

/** Bind and close a UDP socket to find a port that is free now (systemd binds it next). */
async function freeUdpPort(): Promise<number> {
  const s = createSocket('udp4');
  await new Promise<void>((r) => s.bind(0, '127.0.0.1', () => r()));
  const port = s.address().port;
  s.close();
  return port;
}

test('real systemd: ListenDatagram= starts the proxy on the first datagram and it is answered; ListenStream= in the same process; a datagram sent across a restart is served by the next start', async (t) => {
  const why = unavailable();
  if (why !== null) {
    if (process.env.CI) assert.fail(why);
    t.skip(why);
    return;
  }
  // One port number for a TCP and a UDP echo, so that one HOST:PORT target serves both.
  let tcp = await startBackend(echo);
  let udp: UdpSocket | null = null;
  for (let i = 0; i < 20 && udp === null; i++) {
    const s = createSocket('udp4');
    udp = await new Promise<UdpSocket | null>((resolve) => {
      s.once('error', () => resolve(null));
      s.bind(tcp.port, '127.0.0.1', () => resolve(s));
    });
    if (udp === null) {
      await tcp.close();
      tcp = await startBackend(echo);
    }
  }
  assert.ok(udp !== null, 'a port free for TCP and UDP');
  const backendUdp = udp;
  backendUdp.on('message', (m, r) => backendUdp.send(m, r.port, r.address));

  const manager = await startManager('spd-udp-test');
  const udpPort = await freeUdpPort();
  const log = join(manager.kit, 'proxy.log');
  const client = createSocket('udp4');
  const got: string[] = [];
  client.on('message', (m) => got.push(m.toString()));
  await new Promise<void>((r) => client.bind(0, '127.0.0.1', () => r()));
  try {
    const probe = await startBackend(echo);
    const streamPort = probe.port;
    await probe.close();
    writeFileSync(join(manager.unitDir, 'spd-udp.socket'), `[Socket]\nListenDatagram=127.0.0.1:${udpPort}\nListenStream=127.0.0.1:${streamPort}\n`);
    writeFileSync(
      join(manager.unitDir, 'spd-udp.service'),
      [
        '[Unit]',
        'Requires=spd-udp.socket',
        'After=spd-udp.socket',
        '[Service]',
        'Type=notify',
        `ExecStart=${process.execPath} ${OURS} --idle-timeout=30s 127.0.0.1:${tcp.port}`,
        'Environment=SYSTEMD_LOG_LEVEL=debug',
        `StandardError=append:${log}`,
        '',
      ].join('\n'),
    );
    assert.equal((await manager.systemctl('daemon-reload')).status, 0);
    const started = await manager.systemctl('start', 'spd-udp.socket');
    assert.equal(started.status, 0, started.stderr);
    assert.equal((await manager.systemctl('show', '-P', 'ActiveState', 'spd-udp.service')).stdout.trim(), 'inactive');

    // The first datagram starts the service; it waits on the socket until the proxy reads it.
    client.send('first', udpPort, '127.0.0.1');
    await waitFor(() => got.includes('first'), SLOW, 'the activating datagram answered');
    assert.equal((await manager.systemctl('show', '-P', 'ActiveState', 'spd-udp.service')).stdout.trim(), 'active');
    const pid1 = (await manager.systemctl('show', '-P', 'MainPID', 'spd-udp.service')).stdout.trim();
    assert.match(pid1, /^[1-9][0-9]*$/);

    // The stream socket of the same unit, served by the same process.
    const r = await roundTrip({ host: '127.0.0.1', port: streamPort }, Buffer.from('tcp too'), 5000);
    assert.equal(r.data.toString(), 'tcp too');
    assert.equal((await manager.systemctl('show', '-P', 'MainPID', 'spd-udp.service')).stdout.trim(), pid1, 'the same process');

    // Stop the service only: systemd keeps the socket. A datagram sent now waits there and
    // starts (and is answered by) the next process.
    assert.equal((await manager.systemctl('stop', 'spd-udp.service')).status, 0);
    client.send('while stopped', udpPort, '127.0.0.1');
    await waitFor(() => got.includes('while stopped'), SLOW, 'the datagram sent while stopped answered by the next start');
    const pid2 = (await manager.systemctl('show', '-P', 'MainPID', 'spd-udp.service')).stdout.trim();
    assert.notEqual(pid2, pid1);
    const text = readFileSync(log, 'utf8');
    assert.match(text, /^Receiving datagrams on 127\.0\.0\.1:[0-9]+$/m);
    assert.match(text, /^New flow from 127\.0\.0\.1:[0-9]+$/m);
    await manager.systemctl('stop', 'spd-udp.service', 'spd-udp.socket');
  } finally {
    client.close();
    backendUdp.close();
    await manager.close();
    await tcp.close();
  }
});
