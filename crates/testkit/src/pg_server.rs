//! A private PostgreSQL cluster, for tests that need what the shared server does not
//! have: TLS with a test CA's certificate, a PgBouncer in front, an outage.
//!
//! `initdb` and the server run as the `postgres` OS user when the tests run as root
//! (PostgreSQL refuses to run as root), as the current user otherwise.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use crate::{TestCa, free_port};

/// A PostgreSQL cluster in a temporary directory, on a port of its own, listening on
/// 127.0.0.1 with trust authentication; stopped and removed when dropped.
#[derive(Debug)]
pub struct PgServer {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
}

impl PgServer {
    /// A cluster that speaks TLS with `ca`'s server certificate (and plain TCP too,
    /// as a server with `ssl=on` does: the client's `sslmode` decides).
    pub async fn start_tls(ca: &TestCa) -> Self {
        let server = Self::init();
        let data = server.data();
        std::fs::copy(ca.cert_file(), data.join("server.crt")).expect("copy the certificate");
        std::fs::copy(ca.key_file(), data.join("server.key")).expect("copy the key");
        set_mode(&data.join("server.key"), 0o600);
        server.chown();
        server.start().await;
        server
    }

    /// Starts the cluster (again, after [`PgServer::stop`]) and waits until it accepts.
    pub async fn start(&self) {
        self.run_ctl(&[
            "-o",
            &format!(
                "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
                 -c ssl=on -c fsync=off -c max_connections=100",
                self.port,
                self.dir.display()
            ),
            "-l",
            &self.dir.join("log").display().to_string(),
            "-w",
            "start",
        ]);
        self.wait_until_accepting().await;
    }

    /// Stops the cluster as a crash would (`immediate`): every connection is cut.
    pub fn stop(&self) {
        self.run_ctl(&["-m", "immediate", "-w", "stop"]);
    }

    /// `postgres://postgres@<host>:<port>/postgres`, to which the caller adds
    /// `sslmode` and the rest.
    pub fn url(&self, host: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    fn init() -> Self {
        let dir = std::env::temp_dir().join(format!("mb-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the cluster's directory");
        let server = Self {
            dir,
            bin: bin_dir(),
            port: free_port(),
        };
        server.chown();
        let status = server
            .as_owner(&server.bin.join("initdb"))
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(server.data())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        server
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn run_ctl(&self, args: &[&str]) {
        let status = self
            .as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run pg_ctl");
        assert!(
            status.success(),
            "pg_ctl {args:?} failed: see {}/log",
            self.dir.display()
        );
    }

    async fn wait_until_accepting(&self) {
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("PostgreSQL did not start on port {}", self.port);
    }

    /// A command run as the cluster's owner.
    fn as_owner(&self, program: &Path) -> Command {
        as_postgres(program)
    }

    fn chown(&self) {
        give_to_postgres(&self.dir);
    }
}

/// `program`, run as the `postgres` OS user when the tests run as root (PostgreSQL
/// refuses to run as root), as the current user otherwise.
fn as_postgres(program: &Path) -> Command {
    if is_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(program);
        command
    } else {
        Command::new(program)
    }
}

/// Makes `dir` the `postgres` OS user's, when the tests run as root.
pub(crate) fn give_to_postgres(dir: &Path) {
    if is_root() {
        let status = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(dir)
            .status()
            .expect("run chown");
        assert!(status.success(), "chown failed");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self
            .as_owner(&self.bin.join("pg_ctl"))
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The newest installed PostgreSQL's programs (Debian keeps them out of `PATH`).
fn bin_dir() -> PathBuf {
    let mut versions: Vec<u32> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_unstable();
    match versions.last() {
        Some(version) => PathBuf::from(format!("/usr/lib/postgresql/{version}/bin")),
        // Elsewhere: whatever `initdb` and `pg_ctl` are on PATH.
        None => PathBuf::new(),
    }
}

pub(crate) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| out.stdout.trim_ascii() == b"0")
}

fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}
