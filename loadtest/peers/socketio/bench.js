// Socket.IO with its Redis adapter, measured the way `mobile-loadtest ws` measures
// mobile-gateway's fan-out: SUBSCRIBERS clients in one room on one server process,
// MESSAGES events of 100 bytes published through Redis (the emitter, as another
// service would), never more than WINDOW events ahead of the slowest client. The
// figure is deliveries per second of the server's CPU time.
//
//   node bench.js [subscribers] [messages]      (prints one JSON line)
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { Server } from 'socket.io';
import { createAdapter } from '@socket.io/redis-adapter';
import { Emitter } from '@socket.io/redis-emitter';
import { createClient } from 'redis';
import { io as connect } from 'socket.io-client';

const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379';
const BODY = 'a message of exactly one hundred bytes, which is about what a chat line is, give or take a word....';
const WINDOW = 100;

if (process.argv[2] === 'server') {
  const port = Number(process.argv[3]);
  const pub = createClient({ url: REDIS_URL });
  const sub = pub.duplicate();
  await Promise.all([pub.connect(), sub.connect()]);
  const httpServer = createServer();
  const server = new Server(httpServer, { adapter: createAdapter(pub, sub), transports: ['websocket'] });
  server.on('connection', (socket) => socket.join(String(socket.handshake.query.room)));
  httpServer.listen(port, '127.0.0.1', () => process.stdout.write('listening\n'));
} else {
  const subscribers = Number(process.argv[2] ?? 1000);
  const messages = Number(process.argv[3] ?? 2000);
  const port = 20000 + Math.floor(Math.random() * 10000);
  const server = spawn(process.execPath, [new URL(import.meta.url).pathname, 'server', String(port)], {
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  await new Promise((resolve) => server.stdout.once('data', resolve));
  const cpu = () => {
    const fields = readFileSync(`/proc/${server.pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return (Number(fields[11]) + Number(fields[12])) / 100;
  };

  const counts = new Array(subscribers).fill(0);
  const clients = [];
  for (let i = 0; i < subscribers; i += 1) {
    const client = connect(`http://127.0.0.1:${port}`, { transports: ['websocket'], query: { room: 'conv' } });
    client.on('event', () => { counts[i] += 1; });
    clients.push(client);
    if (i % 100 === 99) await new Promise((r) => setTimeout(r, 50));
  }
  await Promise.all(clients.map((c) => (c.connected ? null : new Promise((r) => c.once('connect', r)))));
  await new Promise((r) => setTimeout(r, 1000));

  const redis = createClient({ url: REDIS_URL });
  await redis.connect();
  const emitter = new Emitter(redis);
  const slowest = () => counts.reduce((a, b) => Math.min(a, b), Infinity);
  const cpuBefore = cpu();
  const started = process.hrtime.bigint();
  for (let n = 0; n < messages; n += 1) {
    while (n - slowest() >= WINDOW) await new Promise((r) => setImmediate(r));
    emitter.to('conv').emit('event', { seq: n, body: BODY });
  }
  while (slowest() < messages) await new Promise((r) => setTimeout(r, 5));
  const wall = Number(process.hrtime.bigint() - started) / 1e9;
  const serverCpu = cpu() - cpuBefore;
  const deliveries = counts.reduce((a, b) => a + b, 0);
  process.stdout.write(`${JSON.stringify({
    peer: 'socket.io 4.8 + @socket.io/redis-adapter 8.3',
    subscribers,
    messages,
    deliveries,
    wall_seconds: wall,
    server_cpu_seconds: serverCpu,
    deliveries_per_second: deliveries / wall,
    deliveries_per_server_cpu_second: deliveries / serverCpu,
  })}\n`);
  clients.forEach((c) => c.close());
  await redis.quit();
  server.kill();
  process.exit(0);
}
