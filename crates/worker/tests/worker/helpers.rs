//! Shared set-up: a worker served in-process, users and devices, waiting for jobs.

use std::{future::Future, time::Duration};

use mobile_domain::{DeviceId, Platform, UserId};
use mobile_runtime::{Env, Shutdown, service::Listeners};
use mobile_testkit::TestDb;
use mobile_worker::WorkerSettings;
use sqlx::PgPool;
use tokio::{net::TcpListener, task::JoinHandle};
use uuid::Uuid;

pub struct TestWorker {
    pub metrics: String,
    pub health: String,
    pub shutdown: Shutdown,
    pub server: JoinHandle<anyhow::Result<()>>,
    pub redis_prefix: String,
    pub storage_dir: std::path::PathBuf,
}

/// The settings every in-process worker starts from; `extra` overrides or adds.
pub fn settings(
    db: &TestDb,
    extra: &[(String, String)],
) -> (WorkerSettings, String, std::path::PathBuf) {
    let prefix = mobile_testkit::unique_redis_prefix();
    let storage_dir =
        std::env::temp_dir().join(format!("worker-media-{}", Uuid::new_v4().simple()));
    let mut vars: Vec<(String, String)> = vec![
        ("APP_ENV".into(), "test".into()),
        ("REDIS_URL".into(), mobile_testkit::redis_url()),
        ("REDIS_KEY_PREFIX".into(), prefix.clone()),
        (
            "STORAGE_URL".into(),
            format!("file://{}", storage_dir.display()),
        ),
        ("JOB_POLL_INTERVAL_SECONDS".into(), "1".into()),
        ("JOB_BACKOFF_BASE_MS".into(), "100".into()),
        ("SHUTDOWN_TIMEOUT_SECONDS".into(), "10".into()),
    ];
    vars.extend(db.service_env());
    vars.extend(extra.iter().cloned());
    let settings = WorkerSettings::from_env(&Env::from_pairs(vars)).expect("valid test settings");
    (settings, prefix, storage_dir)
}

impl TestWorker {
    pub async fn spawn(db: &TestDb, extra: &[(String, String)]) -> Self {
        mobile_runtime::telemetry::init_for_tests();
        let (settings, redis_prefix, storage_dir) = settings(db, extra);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let health = format!("http://{}/health/ready", listener.local_addr().unwrap());
        let metrics = format!("http://{}/metrics", metrics_listener.local_addr().unwrap());
        let shutdown = Shutdown::new();
        let listeners = Listeners {
            public: listener,
            metrics: metrics_listener,
        };
        let server = tokio::spawn(mobile_worker::serve(settings, listeners, shutdown.clone()));
        Self {
            metrics,
            health,
            shutdown,
            server,
            redis_prefix,
            storage_dir,
        }
    }

    /// SIGTERM, as the process would get it; returns what `serve` returned.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.trigger();
        let result = self.server.await.unwrap();
        let _ = std::fs::remove_dir_all(&self.storage_dir);
        result
    }

    pub async fn metrics_text(&self) -> String {
        reqwest::get(&self.metrics)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

pub async fn user(pool: &PgPool, name: &str) -> UserId {
    let id = UserId::new();
    sqlx::query(
        "INSERT INTO users (id, email, password_hash, display_name) VALUES ($1, $2, 'x', $3)",
    )
    .bind(id)
    .bind(format!("{id}@example.com"))
    .bind(name)
    .execute(pool)
    .await
    .unwrap();
    id
}

/// Registers a device; returns its id.
pub async fn device(pool: &PgPool, user: UserId, platform: Platform, token: &str) -> DeviceId {
    let id = DeviceId::new();
    sqlx::query("INSERT INTO devices (id, user_id, platform, push_token) VALUES ($1, $2, $3, $4)")
        .bind(id)
        .bind(user)
        .bind(platform)
        .bind(token)
        .execute(pool)
        .await
        .unwrap();
    id
}

/// A 64-hex-digit APNs device token.
pub fn apns_token(n: u8) -> String {
    format!("{n:02x}").repeat(32)
}

/// Polls `check` until it yields `Some`, for up to `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Jobs left in the table, by kind and state.
pub async fn jobs_left(pool: &PgPool) -> Vec<(String, String, i32)> {
    sqlx::query_as("SELECT kind, state, attempts FROM jobs ORDER BY kind, id")
        .fetch_all(pool)
        .await
        .unwrap()
}
