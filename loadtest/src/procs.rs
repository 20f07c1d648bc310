//! Child processes under test, and what /proc says about them.

use std::{path::PathBuf, process::Stdio, time::Duration};

use anyhow::{Context as _, bail};
use tokio::process::{Child, Command};

/// A service binary built next to this one (`target/release/…`).
pub fn sibling(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe()?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p {name})",
            path.display()
        );
    }
    Ok(path)
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

pub struct Service {
    /// Held so the process is killed when the service is dropped.
    _child: Child,
    pub pid: u32,
    pub port: u16,
    pub metrics_port: u16,
}

/// How long the tokens the load generator mints live.
pub const MINTED_TOKEN_TTL: std::time::Duration = std::time::Duration::from_secs(3600);

/// What mints the load generator's access tokens: the development key, the services'
/// default issuer and audience, [`MINTED_TOKEN_TTL`].
pub fn token_minter() -> anyhow::Result<mobile_auth::AccessTokens> {
    Ok(mobile_auth::AccessTokens::new(
        Some(mobile_auth::SigningKey::development()?),
        mobile_auth::VerifyKeys::default(),
        "mobile-backend",
        "mobile-app",
        MINTED_TOKEN_TTL,
    ))
}

impl Service {
    /// Starts `binary` with `env` on a fresh port and waits for `/health/ready`.
    pub async fn start(binary: &PathBuf, env: &[(&str, String)]) -> anyhow::Result<Self> {
        Self::start_on(binary, env, free_port()?, free_port()?).await
    }

    /// Starts `binary` on the given ports (a restart of a replica keeps its address).
    pub async fn start_on(
        binary: &PathBuf,
        env: &[(&str, String)],
        port: u16,
        metrics_port: u16,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(binary);
        command
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("METRICS_ADDR", format!("127.0.0.1:{metrics_port}"))
            .env("LOG_FORMAT", "json")
            .env("RUST_LOG", "warn")
            // The services refuse tokens living longer than their TTL; ours are minted
            // for a whole run.
            .env(
                "ACCESS_TOKEN_TTL_SECONDS",
                MINTED_TOKEN_TTL.as_secs().to_string(),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command
            .spawn()
            .with_context(|| format!("start {}", binary.display()))?;
        let pid = child.id().context("pid")?;
        let service = Self {
            _child: child,
            pid,
            port,
            metrics_port,
        };
        for _ in 0..200 {
            if ready(port).await {
                return Ok(service);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("{} did not become ready", binary.display())
    }

    /// SIGTERM, as Kubernetes sends it; waits for the exit and returns its code.
    pub async fn terminate(mut self) -> anyhow::Result<Option<i32>> {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()?;
        if !status.success() {
            bail!("kill -TERM {} failed", self.pid);
        }
        Ok(self._child.wait().await?.code())
    }

    /// Resident memory in bytes.
    pub fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or(0, |kib| kib * 1024)
    }

    /// User plus system CPU time consumed so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .ok()
            .and_then(|s| {
                let fields: Vec<String> = s
                    .rsplit_once(')')?
                    .1
                    .split_whitespace()
                    .map(str::to_owned)
                    .collect();
                let utime: f64 = fields.get(11)?.parse().ok()?;
                let stime: f64 = fields.get(12)?.parse().ok()?;
                // USER_HZ is 100 on Linux.
                Some((utime + stime) / 100.0)
            })
            .unwrap_or(0.0)
    }
}

impl Service {
    /// The `/metrics` lines starting with `name`, joined, for diagnostics.
    pub async fn metric_lines(&self, name: &str) -> String {
        get(self.metrics_port, "/metrics")
            .await
            .unwrap_or_default()
            .lines()
            .filter(|line| line.starts_with(name))
            .collect::<Vec<_>>()
            .join("; ")
    }
}

async fn ready(port: u16) -> bool {
    get(port, "/health/ready")
        .await
        .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
}

/// A GET on a fresh connection; the whole response as text.
async fn get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}
