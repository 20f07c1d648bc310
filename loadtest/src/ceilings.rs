//! The ceilings `me` measures beside the two servers, so each figure can be read
//! against what this machine allows at all:
//!
//! - **HTTP**: a bare hyper server (`mobile-loadtest http-ceiling`, run as a child
//!   process) that answers every request with a fixed body the size of `/v1/me`'s: no
//!   routing, middleware, token or database: what hyper and the kernel cost per
//!   request on this machine before any work is done.
//! - **Database**: `pgbench` running the same indexed read as `GET /v1/me` with 20
//!   connections (the pools' size), prepared, as fast as PostgreSQL answers it.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::{Context as _, bail};
use http_body_util::Full;
use hyper::{Request, Response, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use uuid::Uuid;

/// About what `GET /v1/me` answers (a user's id, email, name and two timestamps).
const BODY: &str = r#"{"id":"0193a5b2-8c1e-7d4f-9a6b-3c2d1e0f9a8b","email":"bench-0193a5b2@example.com","display_name":"Bench","created_at":"2026-12-01T18:00:00Z","updated_at":"2026-12-01T18:00:00Z"}"#;

/// `mobile-loadtest http-ceiling --port N`: serves until killed.
pub async fn serve_http(port: u16) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], port)))
        .await
        .with_context(|| format!("bind 127.0.0.1:{port}"))?;
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(|_: Request<hyper::body::Incoming>| async {
                Ok::<_, Infallible>(
                    Response::builder()
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from_static(BODY.as_bytes())))
                        .unwrap_or_default(),
                )
            });
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Transactions per second of `pgbench` running `GET /v1/me`'s query for `user`.
pub async fn pgbench(database_url: &str, user: Uuid, seconds: u64) -> anyhow::Result<f64> {
    let script = std::env::temp_dir().join(format!("mobile-bench-me-{}.sql", std::process::id()));
    std::fs::write(
        &script,
        "SELECT id, email, display_name, created_at, updated_at FROM users WHERE id = :uid;\n",
    )?;
    let run = tokio::process::Command::new("pgbench")
        .args([
            "--no-vacuum",
            "--protocol=prepared",
            "--client=20",
            "--jobs=2",
        ])
        .arg(format!("--time={seconds}"))
        .arg(format!("--define=uid={user}"))
        .arg(format!("--file={}", script.display()))
        .arg(database_url)
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(seconds + 30), run)
        .await
        .context("pgbench did not finish")?
        .context("run pgbench (apt-get install postgresql-client)")?;
    let _ = std::fs::remove_file(&script);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        bail!(
            "pgbench failed: {}\n{stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    stdout
        .lines()
        .find_map(|line| line.strip_prefix("tps = "))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|tps| tps.parse().ok())
        .with_context(|| format!("no tps in pgbench's output:\n{stdout}"))
}
