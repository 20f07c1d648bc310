//! A private `redis-server` process, for tests that stop and restart Redis, or need it
//! to speak TLS.

use std::{path::PathBuf, process::Stdio, time::Duration};

use tokio::{
    net::TcpStream,
    process::{Child, Command},
};

use crate::TestCa;

/// A `redis-server` on a port of its own, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    port: u16,
    /// Speaking TLS only, with these (certificate, key).
    tls: Option<(PathBuf, PathBuf)>,
    child: Option<Child>,
}

impl RedisServer {
    pub async fn start() -> Self {
        let mut server = Self {
            port: crate::free_port(),
            tls: None,
            child: None,
        };
        server.restart().await;
        server
    }

    /// A server that speaks TLS only, with `ca`'s server certificate (for `localhost`),
    /// as Azure Cache for Redis and Memorystore with in-transit encryption do.
    pub async fn start_tls(ca: &TestCa) -> Self {
        let mut server = Self {
            port: crate::free_port(),
            tls: Some((ca.cert_file(), ca.key_file())),
            child: None,
        };
        server.restart().await;
        server
    }

    /// `redis://127.0.0.1:<port>`, or `rediss://localhost:<port>` for a TLS server.
    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}", self.port),
            Some(_) => format!("rediss://localhost:{}", self.port),
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Kills the server (as a crash would: no shutdown, nothing saved).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Starts the server again on the same port, empty, and waits until it answers.
    pub async fn restart(&mut self) {
        self.stop().await;
        let mut command = Command::new("redis-server");
        match &self.tls {
            None => command.args(["--port", &self.port.to_string()]),
            Some((cert, key)) => command
                .args(["--port", "0", "--tls-port", &self.port.to_string()])
                .arg("--tls-cert-file")
                .arg(cert)
                .arg("--tls-key-file")
                .arg(key)
                .args(["--tls-auth-clients", "no"]),
        };
        let child = command
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start redis-server (is it installed?)");
        self.child = Some(child);
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", self.port)).await.is_ok() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("redis-server did not start on port {}", self.port);
    }
}
