// Enqueues JOBS no-op jobs into graphile-worker on DATABASE_URL (a fresh database that
// `mobile-loadtest jobs` made), drains them with its runner, and prints one JSON line:
// jobs per second of the drain's wall time, the figure the Rust side reports. The
// runner is configured for throughput as graphile-worker's performance guide says:
// a local queue (a batch of jobs locked per fetch) and batched completion (250 ms, the
// value its documentation suggests starting from), with the same concurrency (512) and
// pool size (20) as mobile-worker's run.
//   DATABASE_URL=postgres://... JOBS=200000 node bench.js
'use strict';
const { Logger, run, makeWorkerUtils } = require('graphile-worker');

// Quiet, as mobile-worker's run is: a log line per job would cost more than the job.
const quiet = new Logger(() => () => {});

const connectionString = process.env.DATABASE_URL;
if (!connectionString) throw new Error('DATABASE_URL is not set');
const jobs = Number(process.env.JOBS || 200000);
const batch = 5000;

async function main() {
  const utils = await makeWorkerUtils({ connectionString, logger: quiet });
  await utils.migrate();
  const enqueueStarted = process.hrtime.bigint();
  for (let done = 0; done < jobs; done += batch) {
    const n = Math.min(batch, jobs - done);
    await utils.withPgClient(client =>
      client.query(
        `SELECT graphile_worker.add_jobs(array_agg(
           json_populate_record(null::graphile_worker.job_spec,
             json_build_object('identifier', 'noop', 'payload', json_build_object('n', i), 'max_attempts', 3))))
         FROM generate_series(1, $1) i`,
        [n],
      ),
    );
  }
  const enqueueSeconds = Number(process.hrtime.bigint() - enqueueStarted) / 1e9;
  const left = async () =>
    utils.withPgClient(async client => {
      const { rows } = await client.query('SELECT count(*)::int AS n FROM graphile_worker.jobs');
      return rows[0].n;
    });

  const cpuBefore = process.cpuUsage();
  const started = process.hrtime.bigint();
  const runner = await run({
    connectionString,
    concurrency: 512,
    maxPoolSize: 20,
    pollInterval: 1000,
    noHandleSignals: true,
    logger: quiet,
    preset: {
      worker: {
        localQueue: { size: 512 },
        completeJobBatchDelay: 250,
        failJobBatchDelay: 250,
      },
    },
    taskList: { noop: async () => {} },
  });
  const deadline = Date.now() + 600_000;
  for (;;) {
    const remaining = await left();
    if (remaining === 0) break;
    if (Date.now() > deadline) throw new Error(`${remaining} jobs left after 10 minutes`);
    await new Promise(resolve => setTimeout(resolve, 20));
  }
  const drainSeconds = Number(process.hrtime.bigint() - started) / 1e9;
  const cpu = process.cpuUsage(cpuBefore);
  await runner.stop();
  await utils.release();
  console.log(
    JSON.stringify({
      jobs,
      enqueue_seconds: enqueueSeconds,
      drain_seconds: drainSeconds,
      jobs_per_second: jobs / drainSeconds,
      node_cpu_seconds: (cpu.user + cpu.system) / 1e6,
    }),
  );
}

main().catch(error => {
  console.error(error);
  process.exit(1);
});
