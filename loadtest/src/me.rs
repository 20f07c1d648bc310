//! The `me` scenario: `GET /v1/me` (verify an EdDSA access token, read one user by
//! primary key) on `mobile-api` and on the peer a Node.js team would write instead
//! (`loadtest/peers/fastify`: Fastify, jose, pg), side by side on the same database,
//! one server at a time, at the same ladder of open-loop rates.
//!
//! Two figures: the highest rate each sustains within the latency objective (no
//! errors, p99 ≤ `--p99-ms`, default 25) and their ratio; and, at each rate both
//! serve without errors, requests per second of the server's own CPU time (read from
//! `/proc`), the ratio that holds however much CPU the load generator and PostgreSQL
//! take on a small machine. Each server gets a 4 s warm-up first (for Node.js, its
//! JIT). Both use a pool of 20 database connections. Beside them, the same ladder runs
//! against a bare hyper server and `pgbench` runs the same query: the HTTP and
//! database ceilings of this machine (see [`crate::ceilings`]).
//!
//! With `--baseline <path of another mobile-api binary>` (a build of an earlier
//! commit), it compares that build with this one instead: both run at once on the same
//! database, and each rate is measured on one, then the other, `--rounds` times, the
//! order alternating, so drift on the machine falls on both alike. The figure is each
//! build's median requests per server CPU-second per rate, and their ratio.
//! `--baseline-database-url URL` gives the baseline its own `DATABASE_URL`: with this
//! build as the baseline, PostgreSQL over TLS (`sslmode=require` in `DATABASE_URL`)
//! against plain (`sslmode=disable` here).

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, bail};
use ed25519_dalek::pkcs8::{
    DecodePrivateKey as _, EncodePublicKey as _, spki::der::pem::LineEnding,
};
use mobile_auth::keys::DEVELOPMENT_SIGNING_KEY_PEM;
use mobile_domain::{SessionId, UserId};
use reqwest::Client;
use serde_json::json;
use uuid::Uuid;

use crate::{
    Flags, open_loop,
    procs::{Service, free_port, sibling},
};

pub async fn run(flags: &Flags) -> anyhow::Result<()> {
    if !flags.text("baseline", "").is_empty() {
        return run_against_baseline(flags).await;
    }
    let seconds = flags.number("seconds", 8)?;
    let p99_objective = flags.number("p99-ms", 25)? as f64;
    let ladder: Vec<u64> = flags
        .text("rates", "1000,2000,4000,6000,8000,10000,12000,14000")
        .split(',')
        .map(|r| r.trim().parse().context("--rates takes numbers"))
        .collect::<anyhow::Result<_>>()?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/mobile_bench_me".to_owned());
    let db = crate::ws::fresh_database(&database_url).await?;
    let users: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO users (id, email, password_hash, display_name)
         SELECT gen_random_uuid(), 'bench-' || gen_random_uuid() || '@example.com', 'x', 'Bench'
         FROM generate_series(1, 1000) RETURNING id",
    )
    .fetch_all(&db)
    .await?;
    let tokens = crate::procs::token_minter()?;
    let tokens: Arc<Vec<String>> = Arc::new(
        users
            .iter()
            .map(|&u| tokens.issue(UserId::from_uuid(u), SessionId::new()))
            .collect::<Result<_, _>>()?,
    );

    // The HTTP ceiling: bare hyper, the same requests, no work behind them.
    let ceiling_port = free_port()?;
    let ceiling_process = tokio::process::Command::new(std::env::current_exe()?)
        .args(["http-ceiling", "--port", &ceiling_port.to_string()])
        .kill_on_drop(true)
        .spawn()
        .context("start the HTTP ceiling server")?;
    let ceiling_pid = ceiling_process.id().context("ceiling pid")?;
    // It answers 200 on every path, /health/ready included.
    wait_ready(ceiling_port).await?;
    let ceiling = ladder_run(
        "hyper-ceiling",
        ceiling_pid,
        ceiling_port,
        &tokens,
        &ladder,
        seconds,
    )
    .await;
    drop(ceiling_process);

    // Ours.
    let api = Service::start(&sibling("mobile-api")?, &api_env(&database_url)).await?;
    let ours = ladder_run("mobile-api", api.pid, api.port, &tokens, &ladder, seconds).await;
    drop(api);

    // The peer.
    let peer_dir = PathBuf::from("loadtest/peers/fastify");
    if !peer_dir.join("node_modules").exists() {
        bail!("the Fastify peer is not installed: run loadtest/peers/install.sh");
    }
    let public_pem = ed25519_dalek::SigningKey::from_pkcs8_pem(DEVELOPMENT_SIGNING_KEY_PEM)
        .context("the development key")?
        .verifying_key()
        .to_public_key_pem(LineEnding::LF)
        .context("encode the public key")?;
    let port = free_port()?;
    let peer_process = tokio::process::Command::new("node")
        .arg("server.js")
        .current_dir(&peer_dir)
        .env("PORT", port.to_string())
        .env("DATABASE_URL", &database_url)
        .env("POOL_SIZE", "20")
        .env("JWT_PUBLIC_KEY_PEM", public_pem)
        .kill_on_drop(true)
        .spawn()
        .context("start node (is Node.js installed?)")?;
    let peer_pid = peer_process.id().context("node pid")?;
    wait_ready(port).await?;
    let peer = ladder_run("fastify-pg", peer_pid, port, &tokens, &ladder, seconds).await;
    drop(peer_process);

    let best = |steps: &[serde_json::Value]| {
        steps
            .iter()
            .filter(|s| {
                s["errors"] == 0 && s["p99_ms"].as_f64().unwrap_or(f64::MAX) <= p99_objective
            })
            .filter_map(|s| s["throughput_per_second"].as_f64())
            .fold(0.0f64, f64::max)
    };
    // The database ceiling: the same query straight from pgbench.
    eprintln!("pgbench: GET /v1/me's query, 20 connections, {seconds} s");
    // A missing pgbench costs this one figure, not the ladders above.
    let pgbench_tps = match crate::ceilings::pgbench(&database_url, users[0], seconds).await {
        Ok(tps) => {
            eprintln!("  → {tps:.0} transactions/s");
            Some(tps)
        }
        Err(e) => {
            eprintln!("  → pgbench failed, no database ceiling: {e:#}");
            None
        }
    };

    let (ours_best, peer_best) = (best(&ours), best(&peer));
    // Efficiency at equal load: requests per second of the server's own CPU, at each
    // rate both served without errors.
    let efficiency: Vec<serde_json::Value> = ours
        .iter()
        .zip(&peer)
        .filter(|(a, b)| a["errors"] == 0 && b["errors"] == 0)
        .map(|(a, b)| {
            let (x, y) = (
                a["requests_per_server_cpu_second"].as_f64().unwrap_or(0.0),
                b["requests_per_server_cpu_second"].as_f64().unwrap_or(0.0),
            );
            json!({ "rate": a["rate"], "mobile_api": x, "fastify_pg": y, "ratio": x / y.max(1e-9) })
        })
        .collect();
    let result = json!({
        "scenario": "me",
        "objective": format!("no errors and p99 ≤ {p99_objective} ms"),
        "seconds_per_step": seconds,
        "mobile_api": { "best_sustained_per_second": ours_best, "steps": ours },
        "fastify_pg": { "best_sustained_per_second": peer_best, "steps": peer },
        "hyper_ceiling": { "best_sustained_per_second": best(&ceiling), "steps": ceiling },
        "pgbench_ceiling": { "query": "SELECT id, email, display_name, created_at, updated_at FROM users WHERE id = $1",
                             "clients": 20, "transactions_per_second": pgbench_tps },
        "ratio": if peer_best > 0.0 { ours_best / peer_best } else { f64::NAN },
        "per_server_cpu_second": efficiency,
    });
    let out = flags.out_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("me.json"), serde_json::to_string_pretty(&result)?)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "mobile_api_best": ours_best,
            "fastify_pg_best": peer_best,
            "hyper_ceiling_best": result["hyper_ceiling"]["best_sustained_per_second"],
            "pgbench_tps": pgbench_tps,
            "ratio": result["ratio"],
            "per_server_cpu_second": result["per_server_cpu_second"],
        }))?
    );
    eprintln!("written to {}/me.json", out.display());
    Ok(())
}

async fn wait_ready(port: u16) -> anyhow::Result<()> {
    for _ in 0..100 {
        if let Ok(response) = reqwest::get(format!("http://127.0.0.1:{port}/health/ready")).await
            && response.status().is_success()
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the peer did not start on port {port}")
}

/// User plus system CPU seconds of a process so far.
fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            let fields: Vec<f64> = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .filter_map(|f| f.parse().ok())
                .collect();
            Some((fields.get(10)? + fields.get(11)?) / 100.0)
        })
        .unwrap_or(0.0)
}

/// The environment a `mobile-api` under measurement runs with.
fn api_env(database_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("APP_ENV", "development".to_owned()),
        ("DATABASE_URL", database_url.to_owned()),
        ("DATABASE_MAX_CONNECTIONS", "20".to_owned()),
        (
            "REDIS_KEY_PREFIX",
            format!("bench:{}:", Uuid::new_v4().simple()),
        ),
        (
            "STORAGE_URL",
            format!(
                "file://{}",
                std::env::temp_dir().join("mobile-bench-media").display()
            ),
        ),
    ]
}

/// `--baseline`: this build's `mobile-api` against another's, interleaved.
async fn run_against_baseline(flags: &Flags) -> anyhow::Result<()> {
    let baseline = PathBuf::from(flags.text("baseline", ""));
    let seconds = flags.number("seconds", 8)?;
    let rounds = flags.number("rounds", 4)?;
    let ladder: Vec<u64> = flags
        .text("rates", "2000,4000")
        .split(',')
        .map(|r| r.trim().parse().context("--rates takes numbers"))
        .collect::<anyhow::Result<_>>()?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/mobile_bench_me".to_owned());
    let db = crate::ws::fresh_database(&database_url).await?;
    let users = crate::ws::insert_users(&db, 1000).await?;
    let minter = crate::procs::token_minter()?;
    let tokens: Arc<Vec<String>> = Arc::new(
        users
            .iter()
            .map(|&u| minter.issue(UserId::from_uuid(u), crate::ws::session_of(u)))
            .collect::<Result<_, _>>()?,
    );
    // The baseline may also be this build on another connection (`--baseline-database-url`:
    // PostgreSQL over TLS beside plain, say).
    let base_url = flags.text("baseline-database-url", &database_url);
    // `--this-env 'NAME=value;NAME=value'`: settings for this build only (through
    // PgBouncer in transaction mode beside a direct connection, say).
    let this_overrides = flags.text("this-env", "");
    let mut this_env: Vec<(&str, String)> = api_env(&database_url);
    for pair in this_overrides.split(';').filter(|p| !p.is_empty()) {
        let (name, value) = pair
            .split_once('=')
            .context("--this-env takes NAME=value pairs separated by ';'")?;
        this_env.retain(|(existing, _)| *existing != name);
        this_env.push((name, value.to_owned()));
    }
    let this = Service::start(&sibling("mobile-api")?, &this_env).await?;
    let base = Service::start(&baseline, &api_env(&base_url)).await?;
    let servers = [("this", &this), ("baseline", &base)];
    let mut samples: Vec<[Vec<f64>; 2]> = vec![[Vec::new(), Vec::new()]; ladder.len()];
    for round in 0..rounds {
        for (step, &rate) in ladder.iter().enumerate() {
            for turn in 0..2 {
                // Alternate which goes first, round by round.
                let which = (turn + round as usize) % 2;
                let (name, server) = servers[which];
                let result =
                    ladder_run(name, server.pid, server.port, &tokens, &[rate], seconds).await;
                let Some(result) = result.first() else {
                    continue;
                };
                if result["errors"] != 0 {
                    bail!("{name} had errors at {rate}/s: {result}");
                }
                samples[step][which].push(
                    result["requests_per_server_cpu_second"]
                        .as_f64()
                        .unwrap_or(0.0),
                );
            }
        }
    }
    let median = |values: &[f64]| {
        let mut sorted = values.to_vec();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
    };
    let per_rate: Vec<serde_json::Value> = ladder
        .iter()
        .zip(&samples)
        .map(|(rate, [ours, theirs])| {
            let (a, b) = (median(ours), median(theirs));
            json!({ "rate": rate, "this": a, "baseline": b, "ratio": a / b.max(1e-9),
                    "this_samples": ours, "baseline_samples": theirs })
        })
        .collect();
    let result = json!({
        "scenario": "me --baseline",
        "baseline": baseline.display().to_string(),
        "seconds_per_step": seconds,
        "rounds": rounds,
        "requests_per_server_cpu_second": per_rate,
    });
    let out = flags.out_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("me-baseline.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    eprintln!("written to {}/me-baseline.json", out.display());
    Ok(())
}

async fn ladder_run(
    name: &str,
    pid: u32,
    port: u16,
    tokens: &Arc<Vec<String>>,
    ladder: &[u64],
    seconds: u64,
) -> Vec<serde_json::Value> {
    let client = Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap_or_default();
    let url = Arc::new(format!("http://127.0.0.1:{port}/v1/me"));
    let mut steps = Vec::new();
    // Warm-up (connections, caches, and for Node.js the JIT), not recorded.
    let warm = ladder.first().copied().unwrap_or(500) as f64;
    {
        let (client, url, tokens) = (client.clone(), url.clone(), tokens.clone());
        let _ = open_loop::run(
            Box::new(move |_| warm),
            Duration::from_secs(4),
            8_192,
            move |n| {
                let (client, url, tokens) = (client.clone(), url.clone(), tokens.clone());
                async move {
                    let token = &tokens[(n % tokens.len() as u64) as usize];
                    client
                        .get(url.as_str())
                        .bearer_auth(token)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    Ok(())
                }
            },
        )
        .await;
    }
    for &rate in ladder {
        eprintln!("{name}: {rate}/s for {seconds} s");
        let (client, url, tokens) = (client.clone(), url.clone(), tokens.clone());
        let cpu_before = cpu_seconds(pid);
        let report = open_loop::run(
            Box::new(move |_| rate as f64),
            Duration::from_secs(seconds),
            8_192,
            move |n| {
                let (client, url, tokens) = (client.clone(), url.clone(), tokens.clone());
                async move {
                    let token = &tokens[(n % tokens.len() as u64) as usize];
                    let response = client
                        .get(url.as_str())
                        .bearer_auth(token)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = response.status();
                    let _ = response.bytes().await.map_err(|e| e.to_string())?;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(status.to_string())
                    }
                }
            },
        )
        .await;
        let server_cpu = cpu_seconds(pid) - cpu_before;
        let summary = report.to_json();
        let p99 = summary["latency_ms"]["p99"].clone();
        eprintln!(
            "  → {:.0}/s, p50 {} ms, p99 {p99} ms, errors {}",
            summary["throughput_per_second"].as_f64().unwrap_or(0.0),
            summary["latency_ms"]["p50"],
            summary["errors"]
        );
        let overloaded = summary["latency_ms"]["p50"].as_f64().unwrap_or(0.0) > 1000.0;
        steps.push(json!({
            "rate": rate,
            "throughput_per_second": summary["throughput_per_second"],
            "errors": summary["errors"],
            "p50_ms": summary["latency_ms"]["p50"],
            "p99_ms": p99,
            "server_cpu_seconds": server_cpu,
            "requests_per_server_cpu_second": report.ok as f64 / server_cpu.max(0.01),
        }));
        if overloaded {
            // Far past saturation: higher rates only queue more.
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    steps
}
