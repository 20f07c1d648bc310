//! A PgBouncer (Debian's `pgbouncer`) in front of a PostgreSQL server, in transaction
//! pooling mode, as managed offerings and sidecars run it.
//!
//! PgBouncer refuses to run as root: when the tests do, it switches to the `postgres`
//! OS user, as [`crate::PgServer`] runs.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{free_port, pg_server};

/// A `pgbouncer` process on a port of its own, with `pool_size` server connections per
/// database and user, and trust authentication; stopped when dropped.
#[derive(Debug)]
pub struct PgBouncer {
    dir: PathBuf,
    child: Child,
    port: u16,
}

impl PgBouncer {
    /// Starts PgBouncer in transaction mode in front of the PostgreSQL at
    /// `host:port`, serving every database there, and waits until it accepts.
    pub fn start(host: &str, port: u16, pool_size: u32) -> Self {
        Self::start_in("transaction", host, port, pool_size)
    }

    /// As [`PgBouncer::start`], in `pool_mode` (`session`, `transaction`).
    pub fn start_in(pool_mode: &str, host: &str, port: u16, pool_size: u32) -> Self {
        let dir = std::env::temp_dir().join(format!("mb-pgb-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create PgBouncer's directory");
        let listen = free_port();
        let config = format!(
            "[databases]\n\
             * = host={host} port={port}\n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {listen}\n\
             unix_socket_dir =\n\
             auth_type = trust\n\
             auth_file = {users}\n\
             pool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = 500\n\
             server_lifetime = 3600\n\
             logfile = {log}\n",
            users = dir.join("users.txt").display(),
            log = dir.join("log").display(),
        );
        std::fs::write(dir.join("users.txt"), "\"postgres\" \"\"\n").expect("write users");
        std::fs::write(dir.join("pgbouncer.ini"), config).expect("write the config");
        pg_server::give_to_postgres(&dir);
        let mut command = Command::new(binary());
        if pg_server::is_root() {
            // Its own switch, so the process killed on drop is PgBouncer itself.
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(dir.join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run pgbouncer (Debian package pgbouncer)");
        let bouncer = Self {
            dir,
            child,
            port: listen,
        };
        bouncer.wait_until_accepting();
        bouncer
    }

    /// `postgres://postgres@127.0.0.1:<port>/<database>`.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn wait_until_accepting(&self) {
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "PgBouncer did not start on port {}: see {}/log",
            self.port,
            self.dir.display()
        );
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Debian installs it outside root's `PATH`.
fn binary() -> &'static str {
    if std::path::Path::new("/usr/sbin/pgbouncer").exists() {
        "/usr/sbin/pgbouncer"
    } else {
        "pgbouncer"
    }
}
