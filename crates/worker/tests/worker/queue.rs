//! The job runner with handlers written for the test: retries, backoff, dead jobs,
//! timeouts, panics, concurrency, wake-ups and drain.

use std::{
    collections::VecDeque,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use mobile_db::jobs::{self, Job, JobKind, NewJob};
use mobile_domain::JobId;
use mobile_testkit::TestDb;
use mobile_worker::{
    metrics::WorkerMetrics,
    queue::{Done, Handler, JobError, JobFuture, Kind, Lease, Queue, QueueSettings},
};
use serde_json::json;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use crate::helpers::{eventually, jobs_left};

/// What the handler does on each run, in order; `Ok` once the script is used up.
#[derive(Debug)]
enum Step {
    Fail(JobError),
    Sleep(Duration),
    Panic,
}

#[derive(Default)]
struct Scripted {
    steps: Mutex<VecDeque<Step>>,
    runs: Mutex<Vec<Instant>>,
    running: AtomicUsize,
    max_running: AtomicUsize,
    pause: Mutex<Option<Duration>>,
}

impl Scripted {
    fn new(steps: impl IntoIterator<Item = Step>) -> Arc<Self> {
        Arc::new(Self {
            steps: Mutex::new(steps.into_iter().collect()),
            ..Self::default()
        })
    }

    fn runs(&self) -> usize {
        self.runs.lock().unwrap().len()
    }
}

struct Handle(Arc<Scripted>);

impl Handler for Handle {
    fn run(&self, _job: Job, _lease: Lease) -> JobFuture {
        let this = self.0.clone();
        Box::pin(async move {
            this.runs.lock().unwrap().push(Instant::now());
            let running = this.running.fetch_add(1, Ordering::SeqCst) + 1;
            this.max_running.fetch_max(running, Ordering::SeqCst);
            let pause = *this.pause.lock().unwrap();
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
            let step = this.steps.lock().unwrap().pop_front();
            let result = match step {
                None => Ok(Done::Complete),
                Some(Step::Fail(error)) => Err(error),
                Some(Step::Sleep(d)) => {
                    tokio::time::sleep(d).await;
                    Ok(Done::Complete)
                }
                Some(Step::Panic) => {
                    this.running.fetch_sub(1, Ordering::SeqCst);
                    panic!("scripted panic");
                }
            };
            this.running.fetch_sub(1, Ordering::SeqCst);
            result
        })
    }
}

struct Runner {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    metrics: WorkerMetrics,
}

fn start(
    pool: &PgPool,
    handler: &Arc<Scripted>,
    concurrency: usize,
    timeout: Duration,
    poll: Duration,
) -> Runner {
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = WorkerMetrics::register(&mut registry);
    let queue = Queue::new(
        pool.clone().into(),
        QueueSettings {
            worker_id: format!("test-{}", uuid::Uuid::new_v4().simple()),
            poll_interval: poll,
            backoff_base: Duration::from_millis(50),
            backoff_cap: Duration::from_secs(1),
        },
        vec![Kind {
            kind: KIND,
            concurrency,
            timeout,
            handler: Arc::new(Handle(handler.clone())),
        }],
        metrics.clone(),
    );
    let stop = CancellationToken::new();
    let task = tokio::spawn(queue.run(stop.clone(), Duration::from_secs(2)));
    Runner {
        stop,
        task,
        metrics,
    }
}

/// The runner does not care which kind a handler serves: the tests script one under a
/// real kind, on a database of their own.
const KIND: JobKind = JobKind::PushSend;

async fn enqueue(pool: &PgPool, max_attempts: i32) -> JobId {
    let mut job = NewJob::new(KIND, json!({}));
    job.max_attempts = max_attempts;
    match jobs::enqueue(pool, &job).await.unwrap() {
        jobs::Enqueued::Enqueued(id) => id,
        jobs::Enqueued::Duplicate => unreachable!(),
    }
}

async fn wait_until_empty(pool: &PgPool) {
    eventually(Duration::from_secs(20), "the queue to empty", || async {
        jobs_left(pool).await.is_empty().then_some(())
    })
    .await;
}

const SECOND: Duration = Duration::from_secs(1);

#[tokio::test]
async fn a_failing_job_retries_with_backoff_then_dies_keeping_the_last_error() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler =
        Scripted::new((1..=5).map(|n| Step::Fail(JobError::transient(format!("boom {n}")))));
    let runner = start(&pool, &handler, 4, 10 * SECOND, SECOND);
    let id = enqueue(&pool, 3).await;

    let record = eventually(Duration::from_secs(20), "the job to die", || async {
        jobs::find(&pool, id)
            .await
            .unwrap()
            .filter(|j| j.state == "dead")
    })
    .await;
    assert_eq!(record.attempts, 3);
    assert_eq!(record.last_error.as_deref(), Some("boom 3"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(handler.runs(), 3, "no attempt after the last");

    // Each retry waited at least half its backoff: 25 ms, then 50 ms.
    let runs = handler.runs.lock().unwrap().clone();
    assert!(runs[1] - runs[0] >= Duration::from_millis(25));
    assert!(runs[2] - runs[1] >= Duration::from_millis(50));
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn retry_after_from_the_remote_is_honoured() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler = Scripted::new([Step::Fail(JobError::retry_after("throttled", 2 * SECOND))]);
    let runner = start(&pool, &handler, 4, 10 * SECOND, Duration::from_millis(200));
    enqueue(&pool, 5).await;
    wait_until_empty(&pool).await;
    let runs = handler.runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 2);
    assert!(
        runs[1] - runs[0] >= 2 * SECOND,
        "retried after {:?}",
        runs[1] - runs[0]
    );
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn a_permanent_error_kills_the_job_at_once() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler = Scripted::new([Step::Fail(JobError::permanent("payload too large"))]);
    let runner = start(&pool, &handler, 4, 10 * SECOND, SECOND);
    let id = enqueue(&pool, 10).await;
    let record = eventually(Duration::from_secs(10), "the job to die", || async {
        jobs::find(&pool, id)
            .await
            .unwrap()
            .filter(|j| j.state == "dead")
    })
    .await;
    assert_eq!(record.attempts, 1);
    assert_eq!(record.last_error.as_deref(), Some("payload too large"));
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn an_attempt_over_its_timeout_is_cancelled_and_retried() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler = Scripted::new([Step::Sleep(Duration::from_secs(60))]);
    let runner = start(&pool, &handler, 4, Duration::from_millis(300), SECOND);
    enqueue(&pool, 5).await;
    wait_until_empty(&pool).await;
    assert_eq!(handler.runs(), 2);
    let mut text = String::new();
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register("jobs_processed", "", runner.metrics.processed.clone());
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    assert!(
        text.contains(r#"jobs_processed_total{kind="push.send",outcome="timed_out"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"jobs_processed_total{kind="push.send",outcome="completed"} 1"#),
        "{text}"
    );
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn a_panicking_handler_fails_the_attempt_not_the_worker() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler = Scripted::new([Step::Panic]);
    let runner = start(&pool, &handler, 4, 10 * SECOND, SECOND);
    let first = enqueue(&pool, 5).await;
    let record = eventually(Duration::from_secs(10), "the failed attempt", || async {
        jobs::find(&pool, first)
            .await
            .unwrap()
            .filter(|j| j.last_error.is_some())
    })
    .await;
    assert!(record.last_error.unwrap().contains("scripted panic"));
    enqueue(&pool, 5).await;
    wait_until_empty(&pool).await;
    assert_eq!(handler.runs(), 3);
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn concurrency_per_kind_is_bounded() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler = Scripted::new([]);
    *handler.pause.lock().unwrap() = Some(Duration::from_millis(100));
    let payloads: Vec<_> = (0..20).map(|n| json!({ "n": n })).collect();
    jobs::enqueue_values(&pool, KIND, &payloads, 3)
        .await
        .unwrap();
    let runner = start(&pool, &handler, 3, 10 * SECOND, SECOND);
    wait_until_empty(&pool).await;
    assert_eq!(handler.runs(), 20);
    assert_eq!(handler.max_running.load(Ordering::SeqCst), 3);
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn a_commit_wakes_the_runner_without_waiting_for_the_poll() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler = Scripted::new([]);
    // A poll interval no test would wait out: only the NOTIFY can start the job.
    let runner = start(&pool, &handler, 4, 10 * SECOND, Duration::from_secs(3600));
    // The runner's first claim finds nothing and sleeps.
    tokio::time::sleep(Duration::from_millis(500)).await;
    enqueue(&pool, 5).await;
    wait_until_empty(&pool).await;
    assert_eq!(handler.runs(), 1);
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn after_a_failed_claim_the_runner_is_back_in_moments_not_a_poll_interval() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let handler = Scripted::new([]);
    let runner = start(&pool, &handler, 4, 10 * SECOND, Duration::from_secs(3600));
    tokio::time::sleep(Duration::from_millis(300)).await;
    // As during a failover: the claim fails (here, its table is gone for a moment)...
    sqlx::query("ALTER TABLE jobs RENAME TO jobs_away")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("SELECT pg_notify('jobs', 'push.send')")
        .execute(&pool)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // ...and is back a moment later, with a job waiting.
    sqlx::query("ALTER TABLE jobs_away RENAME TO jobs")
        .execute(&pool)
        .await
        .unwrap();
    enqueue(&pool, 5).await;
    let started = Instant::now();
    wait_until_empty(&pool).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?} (the poll interval is an hour)",
        started.elapsed()
    );
    assert_eq!(handler.runs(), 1);
    runner.stop.cancel();
    runner.task.await.unwrap();
}

#[tokio::test]
async fn drain_finishes_in_flight_jobs_and_releases_the_rest() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    // Two slots: one job finishes within the 2 s drain, one would take a minute, and a
    // third is never claimed.
    let handler = Scripted::new([
        Step::Sleep(Duration::from_millis(500)),
        Step::Sleep(Duration::from_secs(60)),
    ]);
    let runner = start(&pool, &handler, 2, Duration::from_secs(120), SECOND);
    for _ in 0..3 {
        enqueue(&pool, 5).await;
    }
    eventually(Duration::from_secs(10), "two jobs running", || async {
        (handler.runs() == 2).then_some(())
    })
    .await;
    runner.stop.cancel();
    runner.task.await.unwrap();

    // The quick one completed; the slow one went back without using up an attempt;
    // the third was never touched.
    let left = jobs_left(&pool).await;
    assert_eq!(
        left,
        vec![
            ("push.send".to_owned(), "queued".to_owned(), 0),
            ("push.send".to_owned(), "queued".to_owned(), 0)
        ]
    );
    assert_eq!(handler.runs(), 2);
}
