//! The real binary as a process: migrations, start-up refusals, SIGTERM and drain.

use std::{process::Stdio, time::Duration};

use mobile_testkit::{PgServer, RedisServer, ServiceProcess, TestCa, TestDb, TestKeys, free_port};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    process::Command,
};

const BIN: &str = env!("CARGO_BIN_EXE_mobile-api");

/// `mobile-api` as a process, with its own database and keys.
struct ApiProcess {
    process: ServiceProcess,
    _db: TestDb,
    _keys: TestKeys,
}

impl std::ops::Deref for ApiProcess {
    type Target = ServiceProcess;

    fn deref(&self) -> &ServiceProcess {
        &self.process
    }
}

impl std::ops::DerefMut for ApiProcess {
    fn deref_mut(&mut self) -> &mut ServiceProcess {
        &mut self.process
    }
}

impl ApiProcess {
    async fn start(extra: &[(&str, &str)]) -> Self {
        let db = TestDb::new().await;
        let keys = TestKeys::generate(1);
        let signing = keys.signing(0).display().to_string();
        let env = [
            ("DATABASE_URL", db.url()),
            ("JWT_SIGNING_KEY_FILE", &signing),
        ];
        let process =
            ServiceProcess::start(BIN, env.into_iter().chain(extra.iter().copied())).await;
        Self {
            process,
            _db: db,
            _keys: keys,
        }
    }
}

/// A registration whose body arrives in two halves, the second one later.
struct SlowRequest {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl SlowRequest {
    async fn begin(port: u16) -> Self {
        let body = br#"{"email":"slow@example.com","password":"correct horse battery","display_name":"Slow"}"#;
        let head = format!(
            "POST /v1/auth/register HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        );
        let mut stream = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        let (first, rest) = body.split_at(body.len() / 2);
        stream.write_all(head.as_bytes()).await.expect("write head");
        stream.write_all(first).await.expect("write first half");
        Self {
            stream,
            rest: rest.to_vec(),
        }
    }

    /// Sends the rest and returns the response's status line.
    async fn finish(mut self) -> String {
        self.stream.write_all(&self.rest).await.expect("write rest");
        let mut response = Vec::new();
        let mut buf = [0u8; 4096];
        while !response.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = self.stream.read(&mut buf).await.expect("read");
            assert!(n > 0, "connection closed before a response");
            response.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&response)
            .lines()
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

#[tokio::test]
async fn sigterm_goes_unready_finishes_the_request_in_flight_and_exits_zero() {
    let mut api = ApiProcess::start(&[
        ("SHUTDOWN_DELAY_SECONDS", "1"),
        ("SHUTDOWN_TIMEOUT_SECONDS", "10"),
    ])
    .await;
    let slow = SlowRequest::begin(api.port).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    api.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // During the delay: still accepting, but unready.
    assert_eq!(api.get_status("/health/ready").await, Some(503));
    assert_eq!(api.get_status("/health/live").await, Some(200));

    // After the delay: no new connections...
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert_eq!(
        api.get_status("/health/live").await,
        None,
        "the listener is closed"
    );

    // ...but the request in flight completes.
    assert_eq!(slow.finish().await, "HTTP/1.1 201 Created");
    assert_eq!(api.exit_code_within(Duration::from_secs(5)).await, Some(0));
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let mut api = ApiProcess::start(&[("SHUTDOWN_TIMEOUT_SECONDS", "30")]).await;
    let _slow = SlowRequest::begin(api.port).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    api.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    api.signal("INT");
    // Without the second signal it would wait up to 30 s for the stalled request.
    assert_eq!(
        api.exit_code_within(Duration::from_secs(3)).await,
        Some(130)
    );
}

#[tokio::test]
async fn refuses_to_start_without_a_signing_key_outside_development() {
    let db = TestDb::new().await;
    let output = Command::new(BIN)
        .env_clear()
        .env("APP_ENV", "production")
        .env("DATABASE_URL", db.url())
        .env("LISTEN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .output()
        .await
        .expect("run mobile-api");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("JWT_SIGNING_KEY_FILE is required"),
        "{stderr}"
    );

    // A bad setting names the variable.
    let output = Command::new(BIN)
        .env_clear()
        .env("LISTEN_ADDR", "nonsense")
        .output()
        .await
        .expect("run mobile-api");
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("LISTEN_ADDR"));
}

#[tokio::test]
async fn development_falls_back_to_the_published_key_loudly() {
    let db = TestDb::new().await;
    let port = free_port();
    let log = std::env::temp_dir().join(format!("mobile-api-dev-{}.log", uuid::Uuid::new_v4()));
    let mut child = Command::new(BIN)
        .env_clear()
        .env("APP_ENV", "development")
        .env("DATABASE_URL", db.url())
        .env("REDIS_KEY_PREFIX", mobile_testkit::unique_redis_prefix())
        .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
        .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
        .stdout(std::fs::File::create(&log).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("spawn");
    let mut started = false;
    for _ in 0..100 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            started = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(started, "development starts without keys");
    child.kill().await.expect("kill");
    let output = std::fs::read_to_string(&log).expect("read log");
    let _ = std::fs::remove_file(&log);
    assert!(output.contains("PUBLISHED DEVELOPMENT KEY"), "{output}");
    assert!(
        output.contains("\"level\":\"WARN\""),
        "JSON logs by default: {output}"
    );
}

#[tokio::test]
async fn migrate_creates_the_database_and_is_safe_twice_and_concurrently() {
    let db = TestDb::unborn();
    let migrate = || {
        Command::new(BIN)
            .arg("migrate")
            .env_clear()
            .env("DATABASE_URL", db.url())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
    };
    // Two pods racing on a database that does not exist yet.
    let (first, second) = tokio::join!(migrate(), migrate());
    for output in [first.expect("run"), second.expect("run")] {
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let third = migrate().await.expect("run");
    assert!(third.status.success());

    let pool = db.pool().await;
    let applied: i64 = sqlx::query_scalar("SELECT count(*) FROM _sqlx_migrations WHERE success")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(applied as usize, mobile_db::MIGRATOR.iter().count());
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_name IN ('users', 'sessions', 'refresh_tokens', 'devices')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(tables, 4);
    pool.close().await;
}

#[tokio::test]
async fn help_prints_the_usage_and_an_unknown_argument_is_refused() {
    for flag in ["--help", "-h"] {
        let output = Command::new(BIN).arg(flag).output().await.expect("run");
        assert_eq!(output.status.code(), Some(0), "{flag}");
        let usage = String::from_utf8_lossy(&output.stdout);
        assert!(usage.starts_with("usage: mobile-api"), "{usage}");
        assert!(usage.contains("mobile-api migrate"), "{usage}");
        assert!(usage.contains("mobile-api health"), "{usage}");
    }
    let output = Command::new(BIN)
        .arg("--frobnicate")
        .output()
        .await
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).starts_with("usage: mobile-api"));
    let output = Command::new(BIN)
        .arg("--version")
        .output()
        .await
        .expect("run");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("mobile-api {}", mobile_api::VERSION)
    );
}

/// A managed data tier: PostgreSQL and Redis over verified TLS (a private CA), every
/// secret from a mounted file, the connections named after the binary.
#[tokio::test]
async fn runs_on_tls_postgres_and_redis_with_every_secret_from_a_file() {
    let ca = TestCa::new();
    let postgres = PgServer::start_tls(&ca).await;
    let redis = RedisServer::start_tls(&ca).await;
    let root = ca.ca_file().display().to_string();
    let database_url = format!(
        "postgres://postgres@localhost:{}/mobile?sslmode=verify-full&sslrootcert={root}",
        postgres.port()
    );
    // `mobile-api migrate` over TLS, the URL from a file too.
    let secret = |name: &str, value: &str| {
        let path = ca.dir().join(name);
        std::fs::write(&path, format!("{value}\n")).unwrap();
        path.display().to_string()
    };
    let database_url_file = secret("database-url", &database_url);
    let migrated = Command::new(BIN)
        .arg("migrate")
        .env_clear()
        .env("DATABASE_URL_FILE", &database_url_file)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .await
        .expect("run mobile-api migrate");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );

    let keys = TestKeys::generate(1);
    let (mut command, port) = ServiceProcess::command(BIN);
    command
        .env_remove("REDIS_URL")
        .env("DATABASE_URL_FILE", &database_url_file)
        .env("REDIS_URL_FILE", secret("redis-url", &redis.url()))
        .env("REDIS_CA_FILE", &root)
        .env(
            "INTERNAL_API_TOKEN_FILE",
            secret(
                "internal-token",
                "file-mounted-internal-token-for-this-test-only",
            ),
        )
        .env("JWT_SIGNING_KEY_FILE", keys.signing(0));
    let api = ServiceProcess {
        child: command.spawn().expect("spawn mobile-api"),
        port,
    };
    api.wait_until_ready().await;

    // PostgreSQL (an account), Redis (the idempotency record of a signed-in POST) and
    // the internal token all work.
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let ann = mobile_testkit::api::register(&http, &base, "ann@example.com", "Ann").await;
    let created = |key: &'static str| {
        http.post(format!("{base}/v1/conversations"))
            .bearer_auth(&ann.access_token)
            .header("Idempotency-Key", key)
            .json(&serde_json::json!({ "member_ids": [], "title": "tls" }))
            .send()
    };
    let first = created("tls-1").await.unwrap();
    assert_eq!(first.status(), 201);
    let replay = created("tls-1").await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let notified = http
        .post(format!("{base}/internal/v1/notifications"))
        .bearer_auth("file-mounted-internal-token-for-this-test-only")
        .json(&serde_json::json!({ "user_id": ann.user_id, "title": "hi", "body": "there" }))
        .send()
        .await
        .unwrap();
    assert_eq!(notified.status(), 202);

    let admin = sqlx::PgPool::connect(&database_url).await.unwrap();
    let connections: Vec<(String, bool)> = sqlx::query_as(
        "SELECT a.application_name, s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.datname = 'mobile' AND a.pid <> pg_backend_pid()",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    admin.close().await;
    assert!(!connections.is_empty());
    assert!(
        connections
            .iter()
            .all(|(name, ssl)| name == "mobile-api" && *ssl),
        "{connections:?}"
    );
}

#[tokio::test]
async fn a_secret_given_twice_or_from_an_unreadable_file_stops_the_start() {
    for (env, says) in [
        (
            [
                ("DATABASE_URL", "postgres://a@b/c"),
                ("DATABASE_URL_FILE", "/etc/hostname"),
            ],
            "DATABASE_URL_FILE: DATABASE_URL is set too",
        ),
        (
            [
                ("REDIS_URL_FILE", "/nonexistent/redis-url"),
                ("APP_ENV", "development"),
            ],
            "REDIS_URL_FILE: cannot read /nonexistent/redis-url",
        ),
        (
            [
                ("REDIS_CA_FILE", "/etc/hostname"),
                ("APP_ENV", "development"),
            ],
            "REDIS_CA_FILE: is set, but REDIS_URL is not a rediss:// (TLS) URL",
        ),
    ] {
        let output = Command::new(BIN)
            .env_clear()
            .envs(env)
            .output()
            .await
            .expect("run mobile-api");
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(says), "{stderr}");
    }
}
