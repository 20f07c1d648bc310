//! The worker's benchmarks: `images`, `push` and `jobs`.
//!
//! - **images**: a generated 12-megapixel JPEG (4000 × 3000, photo-like: gradients
//!   and grain) turned into the three variants by `mobile_media::render`,
//!   against three `vipsthumbnail` calls on the same file (`--size 2048`, `1024`, `256`,
//!   `[Q=80,strip]`, `VIPS_CONCURRENCY=1`). Both are measured in CPU seconds, so the
//!   figure is "images per core-second" whatever else the machine does; ours from
//!   this process's CPU time, vips's from the CPU time of its (waited-for) processes.
//! - **push**: the fake APNs in a child process (`mobile-loadtest fake-apns`), TLS and
//!   HTTP/2, and `mobile_worker::push::apns::Apns` sending `--pushes` notifications,
//!   `--concurrency` at a time over its one connection. Pushes per second of wall time
//!   and per CPU-second of the client process. The fake runs pinned to CPU 1;
//!   run the benchmark as `taskset -c 0 mobile-loadtest push` to give the client CPU 0.
//!   Each of `--rounds` rounds then runs the peer (`--peer node-apn`, or `none`):
//!   `@parse/node-apn` sending the same alerts to the same fake, on CPU 0 too.
//! - **jobs**: `--jobs` no-op jobs enqueued in batches, then drained by
//!   `mobile_worker::queue::Queue` (concurrency 512) on this machine's PostgreSQL.
//!   Jobs per second of wall time, PostgreSQL included. Each round then runs the peer
//!   (`--peer graphile-worker`, or `none`) on a fresh database of the same server.

use std::{
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures_util::{StreamExt as _, stream};
use image::{DynamicImage, Rgb, RgbImage, codecs::jpeg::JpegEncoder};
use mobile_db::{
    jobs::{self, JobKind},
    push::Notification,
};
use mobile_media as images;
use mobile_worker::{
    metrics::WorkerMetrics,
    push::apns::Apns,
    queue::{Done, Handler, JobFuture, Kind, Lease, Queue, QueueSettings},
    settings::ApnsSettings,
};
use serde_json::json;
use tokio::io::AsyncBufReadExt as _;
use tokio_util::sync::CancellationToken;

use crate::{Flags, procs::sibling};

/// CPU seconds of this process: its own (`self`) and its waited-for children's.
fn cpu_seconds() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // After the state field: utime, stime, cutime, cstime are the 12th to 15th
    // numbers (USER_HZ = 100).
    let at = |i: usize| fields.get(i).copied().unwrap_or(0.0) / 100.0;
    (at(10) + at(11), at(12) + at(13))
}

fn save(out: &Path, name: &str, result: &serde_json::Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(out)?;
    let path = out.join(format!("{name}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(result)?)?;
    println!("{}", serde_json::to_string_pretty(result)?);
    eprintln!("written to {}", path.display());
    Ok(())
}

/// A photo-like 12 MP JPEG: smooth gradients (what cameras mostly see) with grain
/// (so it does not compress to nothing), at quality 90.
fn photo(width: u32, height: u32) -> anyhow::Result<Vec<u8>> {
    let mut seed = 0x2545_f491_u32;
    let image = RgbImage::from_fn(width, height, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let grain = (seed % 24) as i32 - 12;
        let channel = |base: u32| u8::try_from((base as i32 + grain).clamp(0, 255)).unwrap_or(0);
        Rgb([
            channel(x * 255 / width),
            channel(y * 255 / height),
            channel(((x + y) / 2) * 255 / width.max(height)),
        ])
    });
    let mut out = Vec::new();
    JpegEncoder::new_with_quality(&mut out, 90).encode_image(&DynamicImage::ImageRgb8(image))?;
    Ok(out)
}

pub async fn images(flags: &Flags) -> anyhow::Result<()> {
    let rounds = flags.number("rounds", 8)?;
    let dir = std::env::temp_dir().join(format!("mobile-bench-images-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let original = photo(4000, 3000)?;
    let input = dir.join("photo.jpg");
    std::fs::write(&input, &original)?;
    eprintln!("12 MP JPEG: {} bytes; {rounds} rounds each", original.len());

    // Ours: decode once, resize in cascade, encode three (one thread).
    let source = Arc::new(original);
    let (ours_cpu, ours_wall) = tokio::task::spawn_blocking({
        let source = source.clone();
        move || -> anyhow::Result<(f64, f64)> {
            images::render(&source, 50_000_000, 80)?; // warm-up
            let (cpu_before, _) = cpu_seconds();
            let started = Instant::now();
            for _ in 0..rounds {
                let variants = images::render(&source, 50_000_000, 80)?;
                anyhow::ensure!(variants.len() == 3);
            }
            Ok((
                cpu_seconds().0 - cpu_before,
                started.elapsed().as_secs_f64(),
            ))
        }
    })
    .await??;

    // vipsthumbnail: three calls per image, one thread each.
    let vips =
        which("vipsthumbnail").context("vipsthumbnail not found: apt-get install libvips-tools")?;
    let run_vips = |size: u32| {
        let out = dir.join(format!("vips-{size}.jpg"));
        let status = std::process::Command::new(&vips)
            .arg(&input)
            .args(["--size", &size.to_string()])
            .arg("-o")
            .arg(format!("{}[Q=80,strip]", out.display()))
            .env("VIPS_CONCURRENCY", "1")
            .status();
        match status {
            Ok(s) if s.success() => Ok(()),
            Ok(s) => bail!("vipsthumbnail exited with {s}"),
            Err(e) => bail!("vipsthumbnail: {e}"),
        }
    };
    for size in [2048, 1024, 256] {
        run_vips(size)?; // warm-up (page cache, shared libraries)
    }
    let (_, children_before) = cpu_seconds();
    let started = Instant::now();
    for _ in 0..rounds {
        for size in [2048, 1024, 256] {
            run_vips(size)?;
        }
    }
    let vips_wall = started.elapsed().as_secs_f64();
    let vips_cpu = cpu_seconds().1 - children_before;
    let _ = std::fs::remove_dir_all(&dir);

    let rounds_f = rounds as f64;
    let ours_per_core = rounds_f / ours_cpu.max(0.01);
    let vips_per_core = rounds_f / vips_cpu.max(0.01);
    let result = json!({
        "scenario": "images",
        "input": "4000x3000 JPEG q90, generated",
        "rounds": rounds,
        "ours": { "cpu_seconds": ours_cpu, "wall_seconds": ours_wall, "images_per_core_second": ours_per_core },
        "vipsthumbnail": { "cpu_seconds": vips_cpu, "wall_seconds": vips_wall, "images_per_core_second": vips_per_core },
        "ratio": ours_per_core / vips_per_core,
    });
    save(&flags.out_dir(), "images", &result)
}

fn which(name: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|dir| Path::new(dir).join(name))
        .find(|path| path.is_file())
}

/// `mobile-loadtest fake-apns`: serves the test fake until killed, after printing one
/// JSON line with its URL, key file and certificate.
pub async fn fake_apns() -> anyhow::Result<()> {
    let fake = mobile_testkit::FakeApns::start("com.example.bench").await;
    let line = json!({
        "base_url": fake.base_url(),
        "key_file": fake.key_file(),
        "ca_file": fake.ca_file(),
    });
    println!("{line}");
    std::future::pending::<()>().await;
    Ok(())
}

pub async fn push(flags: &Flags) -> anyhow::Result<()> {
    let pushes = flags.number("pushes", 100_000)?;
    let concurrency = usize::try_from(flags.number("concurrency", 256)?)?;
    let rounds = flags.number("rounds", 3)?;
    let peer = Peer::from_flag(flags, "node-apn")?;

    // The fake gets CPU 1 to itself; run this process under `taskset -c 0` so the two
    // do not compete for a core (see BENCHMARKS.md). The peer runs on CPU 0 too.
    let mut child = tokio::process::Command::new("taskset")
        .args(["-c", "1"])
        .arg(sibling("mobile-loadtest")?)
        .arg("fake-apns")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let stdout = child.stdout.take().context("fake stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let line = lines
        .next_line()
        .await?
        .context("the fake APNs said nothing")?;
    let fake: serde_json::Value = serde_json::from_str(&line)?;
    let text = |key: &str| fake[key].as_str().map(str::to_owned).context("fake field");
    let settings = ApnsSettings {
        key_file: text("key_file")?.into(),
        key_id: mobile_testkit::TEST_APNS_KEY_ID.into(),
        team_id: mobile_testkit::TEST_APNS_TEAM_ID.into(),
        topic: "com.example.bench".into(),
        base_url: text("base_url")?,
        sandbox_base_url: text("base_url")?,
    };
    let ca = std::fs::read(text("ca_file")?)?;
    let apns = Arc::new(Apns::new(
        &settings,
        mobile_worker::push::http_client(Some(&ca))?,
    )?);
    let peer_env = [
        ("APNS_URL", settings.base_url.clone()),
        ("APNS_KEY_FILE", text("key_file")?),
        ("APNS_CA_FILE", text("ca_file")?),
        ("APNS_KEY_ID", settings.key_id.clone()),
        ("APNS_TEAM_ID", settings.team_id.clone()),
        ("APNS_TOPIC", settings.topic.clone()),
        ("PUSHES", pushes.to_string()),
        ("CONCURRENCY", concurrency.to_string()),
    ];

    // Alternating, so a drift of the machine hits both.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let run = push_round(&apns, pushes, concurrency).await?;
        eprintln!(
            "round {round}: mobile-worker {:.0} pushes per client CPU-s",
            run["pushes_per_client_cpu_second"]
                .as_f64()
                .unwrap_or(f64::NAN)
        );
        ours.push(run);
        if let Some(peer) = &peer {
            let run = peer
                .run(&["taskset", "-c", "0", "node", "bench.js"], &peer_env)
                .await?;
            eprintln!(
                "round {round}: node-apn {:.0} pushes per client CPU-s",
                run["pushes_per_client_cpu_second"]
                    .as_f64()
                    .unwrap_or(f64::NAN)
            );
            theirs.push(run);
        }
    }
    drop(child);

    let key = "pushes_per_client_cpu_second";
    let result = json!({
        "scenario": "push",
        "pushes": pushes,
        "concurrency": concurrency,
        "rounds": rounds,
        "mobile_worker": ours,
        "node_apn": theirs,
        "median_pushes_per_client_cpu_second": median_of(&ours, key),
        "node_apn_median_pushes_per_client_cpu_second": median_of(&theirs, key),
        "ratio_of_medians": ratio(median_of(&ours, key), median_of(&theirs, key)),
    });
    save(&flags.out_dir(), "push", &result)
}

/// One timed run of the worker's own APNs client.
async fn push_round(
    apns: &Arc<Apns>,
    pushes: u64,
    concurrency: usize,
) -> anyhow::Result<serde_json::Value> {
    let notification = Notification {
        user_id: mobile_domain::UserId::new(),
        title: "Ada".into(),
        body: "a message of about the length a chat preview has, give or take".into(),
        data: Some(json!({ "conversation_id": uuid::Uuid::now_v7().to_string(), "seq": "42" })),
        collapse_id: None,
        thread_id: None,
        kind: mobile_db::push::PushKind::Alert,
        localized: None,
        badge: None,
        unread_badge: false,
        message_id: None,
    };
    let token = "ab".repeat(32);
    // Warm-up: the connection and the provider token.
    apns.send(&token, false, &notification).await?;

    let (cpu_before, _) = cpu_seconds();
    let started = Instant::now();
    let failures = stream::iter(0..pushes)
        .map(|_| {
            let apns = apns.clone();
            let notification = &notification;
            let token = &token;
            async move { apns.send(token, false, notification).await.is_err() }
        })
        .buffer_unordered(concurrency)
        .filter(|failed| std::future::ready(*failed))
        .count()
        .await;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds().0 - cpu_before;
    Ok(json!({
        "failures": failures,
        "wall_seconds": wall,
        "client_cpu_seconds": cpu,
        "pushes_per_second": pushes as f64 / wall,
        "pushes_per_client_cpu_second": pushes as f64 / cpu.max(0.01),
    }))
}

/// A peer under `loadtest/peers/<name>` (Node.js, installed by
/// `loadtest/peers/install.sh`), run once per round; it prints one JSON line.
struct Peer {
    dir: std::path::PathBuf,
}

impl Peer {
    /// `--peer <name>` (default `default`), or `--peer none` for no peer.
    fn from_flag(flags: &Flags, default: &str) -> anyhow::Result<Option<Self>> {
        let name = flags.text("peer", default);
        if name == "none" {
            return Ok(None);
        }
        let dir = Path::new("loadtest/peers").join(&name);
        if !dir.join("node_modules").exists() {
            bail!(
                "the {name} peer is not installed: run loadtest/peers/install.sh (from the repository root)"
            );
        }
        Ok(Some(Self { dir }))
    }

    async fn run(
        &self,
        command: &[&str],
        env: &[(&str, String)],
    ) -> anyhow::Result<serde_json::Value> {
        let (program, args) = command.split_first().context("a command")?;
        let output = tokio::process::Command::new(program)
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(&self.dir)
            .stderr(std::process::Stdio::inherit())
            .output()
            .await
            .context("run node (is Node.js installed?)")?;
        if !output.status.success() {
            bail!(
                "the peer in {} failed: {}",
                self.dir.display(),
                output.status
            );
        }
        let stdout = String::from_utf8(output.stdout)?;
        let last = stdout.lines().last().context("the peer printed nothing")?;
        Ok(serde_json::from_str(last)?)
    }
}

/// The median of `key` over runs.
fn median_of(runs: &[serde_json::Value], key: &str) -> f64 {
    let mut values: Vec<f64> = runs.iter().filter_map(|run| run[key].as_f64()).collect();
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

fn ratio(ours: f64, theirs: f64) -> f64 {
    if theirs > 0.0 {
        ours / theirs
    } else {
        f64::NAN
    }
}

/// A handler that does nothing: what is left is the queue's own cost. It runs under a
/// real kind (the queue does not care which) on a database of its own.
struct Noop;

impl Handler for Noop {
    fn run(&self, _job: jobs::Job, _lease: Lease) -> JobFuture {
        Box::pin(async { Ok(Done::Complete) })
    }
}

const BENCH_KIND: JobKind = JobKind::PushSend;

pub async fn jobs(flags: &Flags) -> anyhow::Result<()> {
    let count = flags.number("jobs", 200_000)?;
    let rounds = flags.number("rounds", 3)?;
    let peer = Peer::from_flag(flags, "graphile-worker")?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/mobile_bench_jobs".to_owned());
    let peer_url = {
        let options: sqlx::postgres::PgConnectOptions = database_url.parse()?;
        let name = options.get_database().unwrap_or("mobile_bench_jobs");
        database_url.replacen(name, &format!("{name}_graphile"), 1)
    };

    // Alternating, on the same PostgreSQL, each run on a fresh database.
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for round in 1..=rounds {
        let run = jobs_round(&database_url, count).await?;
        eprintln!(
            "round {round}: mobile-worker {:.0} jobs/s",
            run["jobs_per_second"].as_f64().unwrap_or(f64::NAN)
        );
        ours.push(run);
        if let Some(peer) = &peer {
            crate::ws::fresh_database(&peer_url).await?.close().await;
            let env = [
                ("DATABASE_URL", peer_url.clone()),
                ("JOBS", count.to_string()),
            ];
            let run = peer.run(&["node", "bench.js"], &env).await?;
            eprintln!(
                "round {round}: graphile-worker {:.0} jobs/s",
                run["jobs_per_second"].as_f64().unwrap_or(f64::NAN)
            );
            theirs.push(run);
        }
    }

    let key = "jobs_per_second";
    let result = json!({
        "scenario": "jobs",
        "jobs": count,
        "rounds": rounds,
        "mobile_worker": ours,
        "graphile_worker": theirs,
        "median_jobs_per_second": median_of(&ours, key),
        "graphile_worker_median_jobs_per_second": median_of(&theirs, key),
        "ratio_of_medians": ratio(median_of(&ours, key), median_of(&theirs, key)),
    });
    save(&flags.out_dir(), "jobs", &result)
}

/// `count` jobs enqueued on a fresh database, then drained by the worker's queue.
async fn jobs_round(database_url: &str, count: u64) -> anyhow::Result<serde_json::Value> {
    let db = crate::ws::fresh_database(database_url).await?;
    let batch: Vec<serde_json::Value> = (0..5_000).map(|n| json!({ "n": n })).collect();
    let mut enqueued = 0;
    let started = Instant::now();
    while enqueued < count {
        let n = usize::try_from((count - enqueued).min(5_000))?;
        enqueued += jobs::enqueue_values(&db, BENCH_KIND, &batch[..n], 3).await?;
    }
    let enqueue_seconds = started.elapsed().as_secs_f64();
    eprintln!("{count} jobs enqueued in {enqueue_seconds:.1} s; draining");

    let pool = mobile_db::Db::connect_lazy(
        database_url,
        &mobile_db::PoolSettings::new("mobile-loadtest", 20),
    )?;
    let metrics = WorkerMetrics::register(&mut prometheus_client::registry::Registry::default());
    let queue = Queue::new(
        pool,
        QueueSettings {
            worker_id: "bench".into(),
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(60),
        },
        vec![Kind {
            kind: BENCH_KIND,
            concurrency: 512,
            timeout: Duration::from_secs(30),
            handler: Arc::new(Noop),
        }],
        metrics,
    );
    let stop = CancellationToken::new();
    let started = Instant::now();
    let runner = tokio::spawn(queue.run(stop.clone(), Duration::from_secs(10)));
    loop {
        let left: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs")
            .fetch_one(&db)
            .await?;
        if left == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{left} jobs still queued after 10 minutes");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drain_seconds = started.elapsed().as_secs_f64();
    stop.cancel();
    runner.await?;

    db.close().await;
    Ok(json!({
        "enqueue_seconds": enqueue_seconds,
        "enqueued_per_second": count as f64 / enqueue_seconds,
        "drain_seconds": drain_seconds,
        "jobs_per_second": count as f64 / drain_seconds,
    }))
}
