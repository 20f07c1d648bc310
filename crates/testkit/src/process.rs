//! A service binary run as a child process, for tests of what only a process shows:
//! signals, exit codes, start-up refusals, `kill -9`.

use std::{ffi::OsStr, process::Stdio, time::Duration};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::{Child, Command},
};

use crate::free_port;

/// A running service binary, killed when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    pub child: Child,
    /// `LISTEN_ADDR`'s port on 127.0.0.1.
    pub port: u16,
}

impl ServiceProcess {
    /// A command for `binary` with a cleared environment, a free `LISTEN_ADDR` and
    /// `METRICS_ADDR`, quiet logs and no output: the caller adds the rest.
    pub fn command(binary: &str) -> (Command, u16) {
        let port = free_port();
        let mut command = Command::new(binary);
        command
            .env_clear()
            .env("APP_ENV", "test")
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("REDIS_URL", crate::redis_url())
            .env("REDIS_KEY_PREFIX", crate::unique_redis_prefix())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        (command, port)
    }

    /// Starts `binary` with `env` on top of [`ServiceProcess::command`]'s, and waits
    /// until it is ready.
    pub async fn start<K, V>(binary: &str, env: impl IntoIterator<Item = (K, V)>) -> Self
    where
        K: AsRef<OsStr>,
        V: AsRef<OsStr>,
    {
        let (mut command, port) = Self::command(binary);
        command.envs(env);
        let child = command.spawn().expect("spawn the service binary");
        let process = Self { child, port };
        process.wait_until_ready().await;
        process
    }

    pub async fn wait_until_ready(&self) {
        for _ in 0..200 {
            if self.get_status("/health/ready").await == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the service on port {} did not become ready", self.port);
    }

    /// The status of a GET on a fresh connection, or `None` if nobody accepts.
    pub async fn get_status(&self, path: &str) -> Option<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await.ok()?;
        response.get(9..12)?.parse().ok()
    }

    /// Sends a signal by name (`TERM`, `INT`, `KILL`).
    pub fn signal(&self, name: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([format!("-{name}"), pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name}");
    }

    /// The exit code, which must come within `limit`.
    pub async fn exit_code_within(&mut self, limit: Duration) -> Option<i32> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .expect("the process exits in time")
            .expect("wait")
            .code()
    }
}
