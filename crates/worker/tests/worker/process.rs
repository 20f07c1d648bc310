//! The real binary as a process: killed with SIGKILL mid-job, and drained on SIGTERM.

use std::{process::Stdio, time::Duration};

use mobile_db::push::{self, Notification};
use mobile_domain::Platform;
use mobile_testkit::{ApnsReply, FakeApns, ServiceProcess, TestDb};
use sqlx::PgPool;
use uuid::Uuid;

use crate::helpers::{apns_token, device, eventually, jobs_left, user};

const BIN: &str = env!("CARGO_BIN_EXE_mobile-worker");

/// `mobile-worker` as a process against `db` and the fake APNs.
async fn start_worker(db: &TestDb, apns: &FakeApns, extra: &[(&str, &str)]) -> ServiceProcess {
    let storage = std::env::temp_dir().join(format!("worker-media-{}", Uuid::new_v4().simple()));
    let mut env: Vec<(String, String)> = db.service_env();
    env.extend([
        (
            "STORAGE_URL".into(),
            format!("file://{}", storage.display()),
        ),
        ("JOB_POLL_INTERVAL_SECONDS".into(), "1".into()),
    ]);
    env.extend(apns.env());
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    ServiceProcess::start(BIN, env).await
}

const TOPIC: &str = "com.example.mobile";

/// A user with one iOS device, and a notification for them enqueued.
async fn one_push(pool: &PgPool, token: &str) {
    let ada = user(pool, "Ada").await;
    device(pool, ada, Platform::Ios, token).await;
    let mut conn = pool.acquire().await.unwrap();
    let notification = Notification {
        user_id: ada,
        title: "Ada".into(),
        body: "hello".into(),
        data: None,
        collapse_id: None,
        thread_id: None,
        kind: mobile_db::push::PushKind::Alert,
        localized: None,
        badge: None,
        unread_badge: false,
        message_id: None,
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
    let mut first = start_worker(&db, &apns, &[("WORKER_ID", "first"), timeout]).await;
    one_push(&pool, &apns_token(1)).await;
    wait_for_requests(&apns, 1).await;
    let running: (String, Option<String>) =
        sqlx::query_as("SELECT state, locked_by FROM jobs WHERE kind = 'push.send'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(running, ("running".to_owned(), Some("first".to_owned())));

    first.child.kill().await.unwrap(); // SIGKILL: no drain, no release
    let mut second = start_worker(&db, &apns, &[("WORKER_ID", "second"), timeout]).await;
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
    second.signal("TERM");
    assert_eq!(
        second.exit_code_within(Duration::from_secs(15)).await,
        Some(0)
    );
}

#[tokio::test]
async fn sigterm_lets_an_in_flight_job_finish_then_exits_0() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let apns = FakeApns::start(TOPIC).await;
    apns.script(&apns_token(2), [ApnsReply::stall(Duration::from_secs(2))]);
    let mut worker = start_worker(&db, &apns, &[("SHUTDOWN_TIMEOUT_SECONDS", "15")]).await;
    one_push(&pool, &apns_token(2)).await;
    wait_for_requests(&apns, 1).await;

    worker.signal("TERM");
    assert_eq!(
        worker.exit_code_within(Duration::from_secs(20)).await,
        Some(0)
    );
    assert_eq!(apns.deliveries().len(), 1, "the in-flight send finished");
    assert!(jobs_left(&pool).await.is_empty());
}

#[tokio::test]
async fn sigterm_releases_a_job_that_outlasts_the_drain() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let apns = FakeApns::start(TOPIC).await;
    apns.script(&apns_token(3), [ApnsReply::stall(Duration::from_secs(120))]);
    let mut worker = start_worker(&db, &apns, &[("SHUTDOWN_TIMEOUT_SECONDS", "4")]).await;
    one_push(&pool, &apns_token(3)).await;
    wait_for_requests(&apns, 1).await;

    worker.signal("TERM");
    assert_eq!(
        worker.exit_code_within(Duration::from_secs(10)).await,
        Some(0)
    );
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
    let mut worker = start_worker(&db, &apns, &[]).await;
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
    worker.signal("TERM");
    assert_eq!(
        worker.exit_code_within(Duration::from_secs(15)).await,
        Some(0)
    );
    assert_eq!(probe(port).code(), Some(1));
}
