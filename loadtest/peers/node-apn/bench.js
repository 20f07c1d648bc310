// Sends PUSHES alerts with CONCURRENCY in flight through @parse/node-apn to the fake
// APNs that `mobile-loadtest push` started, then prints one JSON line: the pushes per
// second of this process's own CPU time, as the Rust side measures itself.
//   APNS_URL=https://127.0.0.1:PORT APNS_KEY_FILE=... APNS_CA_FILE=... node bench.js
'use strict';
const fs = require('fs');
const apn = require('@parse/node-apn');

const env = name => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set`);
  return value;
};
const url = new URL(env('APNS_URL'));
const pushes = Number(process.env.PUSHES || 100000);
const concurrency = Number(process.env.CONCURRENCY || 256);
const token = 'ab'.repeat(32);

const provider = new apn.Provider({
  token: { key: env('APNS_KEY_FILE'), keyId: env('APNS_KEY_ID'), teamId: env('APNS_TEAM_ID') },
  production: true,
  address: url.hostname,
  port: Number(url.port),
  ca: fs.readFileSync(env('APNS_CA_FILE')),
});

// The same alert mobile-worker sends: title, body and two data fields.
function notification() {
  const note = new apn.Notification();
  note.topic = env('APNS_TOPIC');
  note.pushType = 'alert';
  note.alert = {
    title: 'Ada',
    body: 'a message of about the length a chat preview has, give or take',
  };
  note.payload = { conversation_id: '0193a6f0-0000-7000-8000-000000000000', seq: '42' };
  return note;
}

async function sendOne() {
  const result = await provider.send(notification(), token);
  return result.failed.length === 0;
}

async function main() {
  // Warm-up: the connection and the provider token.
  if (!(await sendOne())) throw new Error('the warm-up push failed');
  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  let next = 0;
  let failures = 0;
  async function lane() {
    while (next < pushes) {
      next += 1;
      if (!(await sendOne())) failures += 1;
    }
  }
  await Promise.all(Array.from({ length: concurrency }, lane));
  const wall = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  const cpuSeconds = (cpu.user + cpu.system) / 1e6;
  await provider.shutdown();
  console.log(
    JSON.stringify({
      pushes,
      concurrency,
      failures,
      wall_seconds: wall,
      client_cpu_seconds: cpuSeconds,
      pushes_per_second: pushes / wall,
      pushes_per_client_cpu_second: pushes / Math.max(cpuSeconds, 0.01),
    }),
  );
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
