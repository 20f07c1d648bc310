//! The real binary as a process: killed with SIGKILL mid-job, and drained on SIGTERM.

use std::{process::Stdio, time::Duration};

use mobile_db::push::{self, Notification};
use mobile_testkit::{ApnsReply, FakeApns, TestDb, free_port};
use sqlx::PgPool;
use tokio::process::{Child, Command};
use uuid::Uuid;

use crate::helpers::{apns_token, device, eventually, jobs_left, user};

const BIN: &str = env!("CARGO_BIN_EXE_mobile-worker");

struct WorkerProcess {
    child: Child,
    health: String,
    port: u16,
}

impl WorkerProcess {
    async fn start(db: &TestDb, apns: &FakeApns, extra: &[(&str, &str)]) -> Self {
        let port = free_port();
        let storage =
            std::env::temp_dir().join(format!("worker-media-{}", Uuid::new_v4().simple()));
        let mut command = Command::new(BIN);
        command
            .env_clear()
            .env("APP_ENV", "test")
            .env("DATABASE_URL", db.url())
            .env("REDIS_URL", mobile_testkit::redis_url())
            .env("REDIS_KEY_PREFIX", mobile_testkit::unique_redis_prefix())
            .env("LISTEN_ADDR", format!("127.0.0.1:{port}"))
            .env("METRICS_ADDR", format!("127.0.0.1:{}", free_port()))
            .env("STORAGE_URL", format!("file://{}", storage.display()))
            .env("JOB_POLL_INTERVAL_SECONDS", "1")
            .env("RUST_LOG", "warn")
            .envs(apns.env())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        for (name, value) in extra {
            command.env(name, value);
        }
        let child = command.spawn().expect("spawn mobile-worker");
        let process = Self {
            child,
            health: format!("http://127.0.0.1:{port}/health/ready"),
            port,
        };
        eventually(
            Duration::from_secs(10),
            "the worker to be ready",
            || async {
                let response = reqwest::get(&process.health).await.ok()?;
                (response.status() == 200).then_some(())
            },
        )
        .await;
        process
    }

    fn sigterm(&self) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    async fn exit_code(mut self, within: Duration) -> Option<i32> {
        tokio::time::timeout(within, self.child.wait())
            .await
            .expect("the worker exits in time")
            .expect("wait")
            .code()
    }
}

const TOPIC: &str = "com.example.mobile";

/// A user with one iOS device, and a notification for them enqueued.
async fn one_push(pool: &PgPool, token: &str) {
    let ada = user(pool, "Ada").await;
    device(pool, ada, "ios", token).await;
    let mut conn = pool.acquire().await.unwrap();
    let notification = Notification {
        user_id: ada,
        title: "Ada".into(),
        body: "hello".into(),
        data: None,
        collapse_id: None,
    };
    push::enqueue_notifications(&mut conn, &[notification])
        .await
        .unwrap();
}

async fn wait_for_requests(apns: &FakeApns, n: usize) {
    eventually(Duration::from_secs(20), "APNs requests", || async {
        (apns.requests() >= n).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_job_whose_worker_is_killed_runs_again_on_another_worker() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let apns = FakeApns::start(TOPIC).await;
    // The first attempt hangs at APNs, as if the worker were stuck in it.
    apns.script(&apns_token(1), [ApnsReply::stall(Duration::from_secs(120))]);
    // A 2 s timeout makes the lease 7 s: the time after which another worker may take over.
    let timeout = ("PUSH_JOB_TIMEOUT_SECONDS", "2");
    let mut first = WorkerProcess::start(&db, &apns, &[("WORKER_ID", "first"), timeout]).await;
    one_push(&pool, &apns_token(1)).await;
    wait_for_requests(&apns, 1).await;
    let running: (String, Option<String>) =
        sqlx::query_as("SELECT state, locked_by FROM jobs WHERE kind = 'push.send'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(running, ("running".to_owned(), Some("first".to_owned())));

    first.child.kill().await.unwrap(); // SIGKILL: no drain, no release
    let second = WorkerProcess::start(&db, &apns, &[("WORKER_ID", "second"), timeout]).await;
    eventually(
        Duration::from_secs(40),
        "the job to complete on the second worker",
        || async { jobs_left(&pool).await.is_empty().then_some(()) },
    )
    .await;
    assert_eq!(apns.deliveries().len(), 1, "delivered once");
    assert_eq!(
        apns.requests(),
        2,
        "exactly two attempts: the killed one and the retry"
    );
    second.sigterm();
    assert_eq!(second.exit_code(Duration::from_secs(15)).await, Some(0));
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_job_finish_then_exits_0() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let apns = FakeApns::start(TOPIC).await;
    apns.script(&apns_token(2), [ApnsReply::stall(Duration::from_secs(2))]);
    let worker = WorkerProcess::start(&db, &apns, &[("SHUTDOWN_TIMEOUT_SECONDS", "15")]).await;
    one_push(&pool, &apns_token(2)).await;
    wait_for_requests(&apns, 1).await;

    worker.sigterm();
    assert_eq!(worker.exit_code(Duration::from_secs(20)).await, Some(0));
    assert_eq!(apns.deliveries().len(), 1, "the in-flight send finished");
    assert!(jobs_left(&pool).await.is_empty());
}

#[tokio::test]
async fn sigterm_releases_a_job_that_outlasts_the_drain() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let apns = FakeApns::start(TOPIC).await;
    apns.script(&apns_token(3), [ApnsReply::stall(Duration::from_secs(120))]);
    let worker = WorkerProcess::start(&db, &apns, &[("SHUTDOWN_TIMEOUT_SECONDS", "4")]).await;
    one_push(&pool, &apns_token(3)).await;
    wait_for_requests(&apns, 1).await;

    worker.sigterm();
    assert_eq!(worker.exit_code(Duration::from_secs(10)).await, Some(0));
    assert_eq!(
        jobs_left(&pool).await,
        vec![("push.send".to_owned(), "queued".to_owned(), 0)],
        "released for another worker, the attempt not counted"
    );
}

/// `mobile-worker health` exits 0 while the worker on `LISTEN_ADDR` is ready, 1 when
/// nothing answers: the container health check of an image without a shell.
#[tokio::test]
async fn the_health_subcommand_reports_readiness() {
    let db = TestDb::new().await;
    let apns = FakeApns::start(TOPIC).await;
    let worker = WorkerProcess::start(&db, &apns, &[]).await;
    let probe = |port: u16| {
        std::process::Command::new(BIN)
            .arg("health")
            .env_clear()
            .env("LISTEN_ADDR", format!("0.0.0.0:{port}"))
            .stderr(Stdio::null())
            .status()
            .unwrap()
    };
    assert!(probe(worker.port).success());
    let port = worker.port;
    worker.sigterm();
    assert_eq!(worker.exit_code(Duration::from_secs(15)).await, Some(0));
    assert_eq!(probe(port).code(), Some(1));
}
