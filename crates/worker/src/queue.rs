//! The job runner: claims jobs from `mobile_db::jobs`, runs each under its kind's
//! handler, and records the outcome.
//!
//! - One claim loop per kind, holding at most that kind's concurrency in flight. It
//!   sleeps until a `NOTIFY jobs, '<kind>'` (sent at the enqueuer's commit) or, should a
//!   notification be lost, the poll interval.
//! - Each job runs under a timeout, inside a lease a little longer than the timeout; a
//!   worker killed mid-job leaves the lease to expire, and [`reclaim`](mobile_db::jobs::reclaim_expired)
//!   gives the job to another worker.
//! - Success deletes the job, in batches. Failure retries after an exponential backoff
//!   with jitter (or the remote's `Retry-After`), until the job's last attempt makes it
//!   `dead`, keeping the error. A panicking handler is a failed attempt, not a dead worker.
//! - On shutdown the loops stop claiming, in-flight jobs get until the drain deadline,
//!   and whatever is still running then is released for another worker.

use std::{
    collections::HashMap,
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::FutureExt as _;
use mobile_db::Db;
use mobile_db::jobs::{self, Job, JobKind};
use mobile_domain::JobId;
use rand::Rng as _;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use prometheus_client::metrics::{gauge::Gauge, histogram::Histogram};

use crate::metrics::{KindLabel, WorkerMetrics};

/// What a handler's future resolves to.
pub type JobResult = Result<Done, JobError>;
/// A handler's future.
pub type JobFuture = Pin<Box<dyn Future<Output = JobResult> + Send>>;

/// Runs one kind of job.
pub trait Handler: Send + Sync + 'static {
    /// Runs one attempt. `lease` is the claim's holder, for handlers that complete the
    /// job in a transaction of their own ([`Done::AlreadyCompleted`]).
    fn run(&self, job: Job, lease: Lease) -> JobFuture;
}

/// Who holds a claimed job.
#[derive(Debug, Clone)]
pub struct Lease {
    pub worker: Arc<str>,
}

/// A successful attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// The runner deletes the job.
    Complete,
    /// The handler deleted it already, with its own writes.
    AlreadyCompleted,
}

/// A failed attempt, and whether trying again could help.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct JobError {
    pub message: String,
    pub retry: Retry,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Retry after the runner's exponential backoff.
    Backoff,
    /// Retry no sooner than this (the remote said `Retry-After`).
    After(Duration),
    /// No retry can fix it: the job is dead now.
    Never,
}

impl JobError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: Retry::Backoff,
        }
    }

    pub fn retry_after(message: impl Into<String>, after: Duration) -> Self {
        Self {
            message: message.into(),
            retry: Retry::After(after),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retry: Retry::Never,
        }
    }
}

impl From<sqlx::Error> for JobError {
    fn from(error: sqlx::Error) -> Self {
        Self::transient(format!("database: {error}"))
    }
}

/// How one kind of job runs.
#[derive(Clone)]
pub struct Kind {
    pub kind: JobKind,
    /// Attempts of this kind running at once in this process.
    pub concurrency: usize,
    /// An attempt still running after this is cancelled and retried.
    pub timeout: Duration,
    pub handler: Arc<dyn Handler>,
}

impl std::fmt::Debug for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Kind")
            .field("kind", &self.kind)
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Tuning shared by every kind.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// This process's name in `locked_by`: unique per process.
    pub worker_id: String,
    /// How often to look for due jobs without a notification (retries come due
    /// without one), and to reclaim expired leases.
    pub poll_interval: Duration,
    /// First retry delay; doubles per attempt.
    pub backoff_base: Duration,
    /// Longest retry delay.
    pub backoff_cap: Duration,
}

/// The runner.
#[derive(Debug)]
pub struct Queue {
    db: Db,
    settings: QueueSettings,
    kinds: Vec<Kind>,
    metrics: WorkerMetrics,
}

impl Queue {
    pub fn new(db: Db, settings: QueueSettings, kinds: Vec<Kind>, metrics: WorkerMetrics) -> Self {
        Self {
            db,
            settings,
            kinds,
            metrics,
        }
    }

    /// Runs until `stop` is cancelled, then drains: in-flight jobs have `drain` to
    /// finish; those still running then are released.
    pub async fn run(self, stop: CancellationToken, drain: Duration) {
        let worker: Arc<str> = Arc::from(self.settings.worker_id.as_str());
        let wakeups: HashMap<JobKind, Arc<Notify>> = self
            .kinds
            .iter()
            .map(|k| (k.kind, Arc::new(Notify::new())))
            .collect();
        let background = CancellationToken::new();
        let _stop_background = background.clone().drop_guard();
        tokio::spawn(listen(self.db.clone(), wakeups.clone(), background.clone()));
        tokio::spawn(housekeeping(
            self.db.clone(),
            self.kinds.iter().map(|k| k.kind).collect(),
            self.settings.poll_interval,
            self.metrics.clone(),
            background.clone(),
        ));

        let (completions, completed) = mpsc::unbounded_channel();
        let completer = tokio::spawn(complete_in_batches(
            self.db.clone(),
            worker.clone(),
            completed,
        ));
        let jobs = TaskTracker::new();
        let abandon = CancellationToken::new();
        let loops: Vec<_> = self
            .kinds
            .iter()
            .map(|kind| {
                let claimer = Claimer {
                    db: self.db.clone(),
                    kind: kind.clone(),
                    lease: Lease {
                        worker: worker.clone(),
                    },
                    settings: self.settings.clone(),
                    metrics: self.metrics.clone(),
                    completions: completions.clone(),
                    jobs: jobs.clone(),
                    abandon: abandon.clone(),
                    in_flight: self.metrics.in_flight.get_or_create(&label(kind)).clone(),
                    duration: self.metrics.duration.get_or_create(&label(kind)).clone(),
                };
                let wakeup = wakeups[&kind.kind].clone();
                tokio::spawn(claimer.run(wakeup, stop.clone()))
            })
            .collect();
        drop(completions);

        stop.cancelled().await;
        let deadline = tokio::time::Instant::now() + drain;
        for claim_loop in loops {
            let _ = claim_loop.await;
        }
        jobs.close();
        let in_flight = jobs.len();
        if in_flight > 0 {
            tracing::info!(
                in_flight,
                "no longer claiming; letting in-flight jobs finish"
            );
        }
        if tokio::time::timeout_at(deadline, jobs.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                left = jobs.len(),
                "in-flight jobs did not finish before the drain deadline; releasing them"
            );
            abandon.cancel();
            jobs.wait().await;
        }
        // Every Claimer (and job) has dropped its sender: the completer flushes and ends.
        let _ = completer.await;
        tracing::info!("job runner stopped");
    }
}

/// One kind's claim loop and the jobs it starts.
struct Claimer {
    db: Db,
    kind: Kind,
    lease: Lease,
    settings: QueueSettings,
    metrics: WorkerMetrics,
    completions: mpsc::UnboundedSender<JobId>,
    jobs: TaskTracker,
    /// Cancelled when the drain deadline passes: running jobs are released.
    abandon: CancellationToken,
    /// This kind's series, looked up once rather than per job.
    in_flight: Gauge,
    duration: Histogram,
}

fn label(kind: &Kind) -> KindLabel {
    KindLabel {
        kind: kind.kind.as_str(),
    }
}

/// At most this many jobs per claim query.
const CLAIM_BATCH: usize = 256;
/// How long a lease outlives the timeout: time to record the outcome. A killed
/// worker's jobs run again this long after their timeout would have ended them.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

impl Claimer {
    async fn run(self, wakeup: Arc<Notify>, stop: CancellationToken) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.kind.concurrency.max(1)));
        let lease = this.kind.timeout + LEASE_MARGIN;
        // After a failed claim (PostgreSQL restarting, failing over): short pauses,
        // doubling up to the poll interval, so a blip costs a blip, not a poll interval.
        let mut retry_pause = CLAIM_RETRY_FIRST;
        loop {
            // Wait for a free slot, then claim as many jobs as there are free slots.
            let first = tokio::select! {
                permit = slots.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => return,
                },
                () = stop.cancelled() => return,
            };
            let free = (slots.available_permits() + 1).min(CLAIM_BATCH);
            let claimed = jobs::claim(
                &this.db,
                this.kind.kind,
                &this.lease.worker,
                lease,
                i64::try_from(free).unwrap_or(1),
            )
            .await;
            let batch = match claimed {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(kind = %this.kind.kind, %error, ?retry_pause, "claiming jobs failed; retrying");
                    drop(first);
                    let pause = retry_pause.min(this.settings.poll_interval);
                    retry_pause = retry_pause.saturating_mul(2);
                    tokio::select! {
                        () = tokio::time::sleep(pause) => continue,
                        // A job enqueued meanwhile: PostgreSQL is back.
                        () = wakeup.notified() => continue,
                        () = stop.cancelled() => return,
                    }
                }
            };
            retry_pause = CLAIM_RETRY_FIRST;
            if batch.is_empty() {
                drop(first);
                tokio::select! {
                    () = wakeup.notified() => {}
                    () = tokio::time::sleep(this.settings.poll_interval) => {}
                    () = stop.cancelled() => return,
                }
                continue;
            }
            let full = batch.len() == free;
            let mut first = Some(first);
            for job in batch {
                let permit = match first.take() {
                    Some(permit) => permit,
                    // Claimed no more than were free, and only this loop takes slots.
                    None => match slots.clone().try_acquire_owned() {
                        Ok(permit) => permit,
                        Err(_) => {
                            this.release(job.id).await;
                            continue;
                        }
                    },
                };
                let this = this.clone();
                let tracker = this.jobs.clone();
                tracker.spawn(async move {
                    this.run_one(job).await;
                    drop(permit);
                });
            }
            if full {
                // More may be waiting: claim again as soon as a slot frees, without
                // waiting for a notification.
                wakeup.notify_one();
            }
        }
    }

    async fn run_one(&self, job: Job) {
        let kind = self.kind.kind;
        let in_flight = &self.in_flight;
        in_flight.inc();
        let started = Instant::now();
        let id = job.id;
        let attempts = job.attempts;
        let attempt =
            AssertUnwindSafe(self.kind.handler.run(job, self.lease.clone())).catch_unwind();
        let result = tokio::select! {
            result = tokio::time::timeout(self.kind.timeout, attempt) => result,
            () = self.abandon.cancelled() => {
                self.release(id).await;
                in_flight.dec();
                return;
            }
        };
        self.duration.observe(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(Ok(Ok(Done::Complete))) => {
                // The completer deletes it; if this process dies first, it runs again.
                let _ = self.completions.send(id);
                "completed"
            }
            Ok(Ok(Ok(Done::AlreadyCompleted))) => "completed",
            Ok(Ok(Err(error))) => self.fail(id, attempts, &error).await,
            Ok(Err(panic)) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                self.fail(
                    id,
                    attempts,
                    &JobError::transient(format!("the handler panicked: {message}")),
                )
                .await
            }
            Err(_) => {
                let error = JobError::transient(format!("timed out after {:?}", self.kind.timeout));
                match self.fail(id, attempts, &error).await {
                    "retried" => "timed_out",
                    other => other,
                }
            }
        };
        self.metrics.processed(kind, outcome);
        in_flight.dec();
    }

    /// Records a failed attempt; returns the outcome label.
    async fn fail(&self, id: JobId, attempts: i32, error: &JobError) -> &'static str {
        let (retry_in, permanent) = match error.retry {
            Retry::Backoff => (backoff(&self.settings, attempts), false),
            Retry::After(after) => (after + jitter(after / 10), false),
            Retry::Never => (Duration::ZERO, true),
        };
        let kind = self.kind.kind.as_str();
        match jobs::fail(
            &self.db,
            id,
            &self.lease.worker,
            &error.message,
            retry_in,
            permanent,
        )
        .await
        {
            Ok(jobs::Failed::Retrying) => {
                tracing::info!(kind, job_id = %id, attempts, retry_in = ?retry_in, error = %error, "job failed; will retry");
                "retried"
            }
            Ok(jobs::Failed::Dead) => {
                tracing::warn!(kind, job_id = %id, attempts, error = %error, "job failed for good; it is dead");
                "dead"
            }
            Ok(jobs::Failed::NotHeld) => {
                tracing::warn!(kind, job_id = %id, "job failed after it stopped being ours: its lease expired (another worker may have it), or it was withdrawn (its message deleted)");
                "lost_lease"
            }
            Err(db_error) => {
                // The lease will expire and the job run again.
                tracing::error!(kind, job_id = %id, %db_error, error = %error, "recording a failed job failed");
                "lost_lease"
            }
        }
    }

    async fn release(&self, id: JobId) {
        match jobs::release(&self.db, &[id], &self.lease.worker).await {
            Ok(_) => self.metrics.processed(self.kind.kind, "released"),
            Err(error) => {
                tracing::warn!(job_id = %id, %error, "releasing a job failed; its lease will expire")
            }
        }
    }
}

/// The delay before retry `attempts + 1`: `base × 2^(attempts-1)`, capped, then "equal
/// jitter" (half fixed, half random), so retries spread out but still grow.
pub fn backoff(settings: &QueueSettings, attempts: i32) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1).clamp(0, 30)).unwrap_or(0);
    let delay = settings
        .backoff_base
        .saturating_mul(2u32.saturating_pow(exponent))
        .min(settings.backoff_cap);
    delay / 2 + jitter(delay / 2)
}

fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    max.mul_f64(rand::thread_rng().gen_range(0.0..=1.0))
}

/// Deletes completed jobs in batches: one statement per burst instead of one per job.
async fn complete_in_batches(
    db: Db,
    worker: Arc<str>,
    mut completed: mpsc::UnboundedReceiver<JobId>,
) {
    let mut batch = Vec::with_capacity(1024);
    while completed.recv_many(&mut batch, 1024).await > 0 {
        loop {
            match jobs::complete(&db, &batch, &worker).await {
                Ok(_) => break,
                Err(error) => {
                    // Until this succeeds the jobs are still leased to us; if we die,
                    // they run again (at least once, never lost).
                    tracing::warn!(%error, count = batch.len(), "deleting completed jobs failed; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
        batch.clear();
    }
}

/// Wakes a kind's claim loop when `NOTIFY jobs, '<kind>'` arrives.
async fn listen(db: Db, wakeups: HashMap<JobKind, Arc<Notify>>, stop: CancellationToken) {
    loop {
        let listening = async {
            // LISTEN needs a session of its own: the direct connection.
            let mut listener = sqlx::postgres::PgListener::connect_with(db.direct()).await?;
            listener.listen("jobs").await?;
            // Anything enqueued while we were not listening is found by this poll.
            wakeups.values().for_each(|w| w.notify_one());
            loop {
                let notification = listener.recv().await?;
                let kind = notification.payload().parse::<JobKind>().ok();
                if let Some(wakeup) = kind.and_then(|kind| wakeups.get(&kind)) {
                    wakeup.notify_one();
                }
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        };
        tokio::select! {
            result = listening => {
                if let Err(error) = result {
                    tracing::warn!(%error, "LISTEN connection lost; polling until it is back");
                }
            }
            () = stop.cancelled() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// The first pause after a failed claim; it doubles up to the poll interval.
const CLAIM_RETRY_FIRST: Duration = Duration::from_millis(100);

/// How long reading the backlog may take before the reporter gives up its lock.
const BACKLOG_QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The advisory lock whose holder reports the backlog (`jobs_due`, `jobs_scheduled`).
const BACKLOG_REPORTER_LOCK: i64 = 0x6d62_6a6f_6273; // "mbjobs"

/// Every poll interval: reclaims expired leases, and, in the one worker that holds the
/// reporter's advisory lock, refreshes the backlog gauges. Every worker could read the
/// same numbers, but then a sum over workers (what KEDA and the alerts take) would
/// count each job once per worker. The lock is a session lock on a connection kept out
/// of the pool: if the holder dies or loses its connection, PostgreSQL releases it and
/// another worker takes over at its next tick.
async fn housekeeping(
    db: Db,
    kinds: Vec<JobKind>,
    every: Duration,
    metrics: WorkerMetrics,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reporter: Option<sqlx::PgConnection> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => return,
        }
        for kind in &kinds {
            match jobs::reclaim_expired(&db, *kind).await {
                Ok(0) => {}
                Ok(n) => tracing::warn!(%kind, count = n, "reclaimed jobs whose worker stopped"),
                Err(error) => tracing::warn!(%kind, %error, "reclaiming expired leases failed"),
            }
        }
        if reporter.is_none() {
            reporter = take_reporter_lock(&db).await;
        }
        let Some(connection) = reporter.as_mut() else {
            // Another worker reports: this one shows nothing rather than a copy.
            metrics.due.clear();
            metrics.scheduled.clear();
            continue;
        };
        // Bounded: the connection is outside the pool (no ping before use), and after a
        // failover it may be half-open; a hang here would also stop the lease reclaim.
        let read = match tokio::time::timeout(
            BACKLOG_QUERY_TIMEOUT,
            jobs::backlog(&mut *connection),
        )
        .await
        {
            Ok(read) => read.map_err(|error| error.to_string()),
            Err(_) => Err(format!("no answer within {BACKLOG_QUERY_TIMEOUT:?}")),
        };
        match read {
            Ok(rows) => {
                let rows: HashMap<JobKind, jobs::Backlog> =
                    rows.into_iter().map(|row| (row.kind, row)).collect();
                for kind in &kinds {
                    let label = KindLabel {
                        kind: kind.as_str(),
                    };
                    let row = rows.get(kind);
                    metrics
                        .due
                        .get_or_create(&label)
                        .set(row.map_or(0, |row| row.due));
                    metrics
                        .scheduled
                        .get_or_create(&label)
                        .set(row.map_or(0, |row| row.scheduled));
                }
            }
            Err(error) => {
                tracing::warn!(%error, "reading the backlog failed; letting another worker report");
                // Dropping the connection releases the lock.
                reporter = None;
                metrics.due.clear();
                metrics.scheduled.clear();
            }
        }
    }
}

/// A connection holding the reporter's lock, if this worker could take it.
async fn take_reporter_lock(db: &Db) -> Option<sqlx::PgConnection> {
    // A session advisory lock needs a session of its own: the direct connection.
    let mut connection = db.direct().acquire().await.ok()?;
    let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(BACKLOG_REPORTER_LOCK)
        .fetch_one(&mut *connection)
        .await
        .ok()?;
    // Not taken: the connection goes back to the pool. Taken: it leaves the pool, so
    // the lock lives as long as this worker's hold on it.
    taken.then(|| connection.detach())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's `/metrics` text, as far as the backlog goes.
    fn backlog_text(registry: &prometheus_client::registry::Registry) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
        text.lines()
            .filter(|line| line.starts_with("jobs_due{") || line.starts_with("jobs_scheduled{"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    #[tokio::test]
    async fn one_worker_reports_the_backlog_and_another_takes_over_when_it_stops() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = db.pool().await;
        // One due, one waiting out a backoff.
        for n in [1, 2] {
            let mut tx = pool.begin().await.unwrap();
            jobs::enqueue(
                &mut *tx,
                &jobs::NewJob::new(JobKind::PushSend, serde_json::json!({ "n": n })),
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
        }
        sqlx::query("UPDATE jobs SET run_at = now() + interval '1 hour' WHERE payload->>'n' = '2'")
            .execute(&pool)
            .await
            .unwrap();

        let start = |registry: &mut prometheus_client::registry::Registry| {
            let metrics = WorkerMetrics::register(registry);
            let stop = CancellationToken::new();
            tokio::spawn(housekeeping(
                pool.clone().into(),
                vec![JobKind::PushSend],
                Duration::from_millis(50),
                metrics,
                stop.clone(),
            ));
            stop
        };
        let (mut first, mut second) = (Default::default(), Default::default());
        let stop_first = start(&mut first);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let stop_second = start(&mut second);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let expected = "jobs_due{kind=\"push.send\"} 1\njobs_scheduled{kind=\"push.send\"} 1";
        assert_eq!(
            backlog_text(&first),
            expected,
            "the first to take the lock reports"
        );
        assert_eq!(backlog_text(&second), "", "the other shows nothing");

        // The reporter stops (its connection, and so the lock, goes): the other reports.
        stop_first.cancel();
        let mut took_over = false;
        for _ in 0..40 {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if backlog_text(&second) == expected {
                took_over = true;
                break;
            }
        }
        assert!(took_over, "{}", backlog_text(&second));
        stop_second.cancel();
    }

    #[test]
    fn backoff_grows_exponentially_with_bounded_jitter_and_a_cap() {
        let settings = QueueSettings {
            worker_id: "w".into(),
            poll_interval: Duration::from_secs(1),
            backoff_base: Duration::from_secs(1),
            backoff_cap: Duration::from_secs(300),
        };
        for (attempts, full) in [
            (1, 1),
            (2, 2),
            (3, 4),
            (6, 32),
            (9, 256),
            (10, 300),
            (40, 300),
        ] {
            let full = Duration::from_secs(full);
            for _ in 0..50 {
                let delay = backoff(&settings, attempts);
                assert!(
                    delay >= full / 2 && delay <= full,
                    "attempt {attempts}: {delay:?}"
                );
            }
        }
    }
}
