//! The durable job queue's SQL.
//!
//! - [`enqueue`] takes any executor, so a caller enqueues inside its own transaction:
//!   the job commits or rolls back with the write that caused it, and a `NOTIFY` (sent
//!   by a trigger, at commit) wakes the workers.
//! - [`claim`] hands out due jobs with `FOR UPDATE SKIP LOCKED`: concurrent workers
//!   never wait for each other and never get the same job. A claim is a lease: the job
//!   is the claimer's until `locked_until`.
//! - [`reclaim_expired`] puts jobs whose lease ran out (their worker died) back in the
//!   queue, or makes them `dead` if that was their last attempt.
//! - [`complete`] deletes finished jobs; [`fail`] schedules a retry or buries the job
//!   with its last error; [`release`] hands back claimed jobs that never started
//!   (shutdown) without using up an attempt.
//!
//! Every state change after a claim checks `locked_by`, so a worker whose lease was
//! reclaimed cannot complete or fail a job another worker now holds.
//!
//! A job's payload is typed: each [`Payload`] names its [`JobKind`], so a job of one
//! kind cannot be enqueued with another kind's payload, and the handler reads it back
//! with [`Job::payload`].

use crate::metrics::timed;
use std::time::Duration;

use mobile_domain::JobId;
pub use mobile_domain::JobKind;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::Value;
use sqlx::{PgExecutor, postgres::types::PgInterval};
use time::OffsetDateTime;

/// Attempts before a job is dead, unless the payload's kind says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 10;

/// What one kind of job carries.
pub trait Payload: Serialize + DeserializeOwned {
    const KIND: JobKind;
    const MAX_ATTEMPTS: i32 = DEFAULT_MAX_ATTEMPTS;

    /// The payload as a job to enqueue.
    fn to_job(&self) -> Result<NewJob<'static>, sqlx::Error> {
        let payload = serde_json::to_value(self).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
        Ok(NewJob {
            max_attempts: Self::MAX_ATTEMPTS,
            ..NewJob::new(Self::KIND, payload)
        })
    }
}

/// A job to enqueue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub kind: JobKind,
    pub payload: Value,
    /// At most one queued or running job per (kind, key): enqueueing another is a no-op.
    pub unique_key: Option<&'a str>,
    pub max_attempts: i32,
    /// Not before this moment; now when `None`.
    pub run_at: Option<OffsetDateTime>,
}

impl<'a> NewJob<'a> {
    pub fn new(kind: JobKind, payload: Value) -> Self {
        Self {
            kind,
            payload,
            unique_key: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            run_at: None,
        }
    }
}

/// The outcome of [`enqueue`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    Enqueued(JobId),
    /// A job with the same unique key is already queued or running.
    Duplicate,
}

pub async fn enqueue(db: impl PgExecutor<'_>, job: &NewJob<'_>) -> Result<Enqueued, sqlx::Error> {
    timed("jobs.enqueue", async move {
        let id: Option<JobId> = sqlx::query_scalar(
            "INSERT INTO jobs (id, kind, payload, unique_key, max_attempts, run_at)
             VALUES ($1, $2, $3, $4, $5, coalesce($6, now()))
             ON CONFLICT (kind, unique_key) WHERE unique_key IS NOT NULL AND state IN ('queued', 'running')
             DO NOTHING
             RETURNING id",
        )
        .bind(JobId::new())
        .bind(job.kind)
        .bind(&job.payload)
        .bind(job.unique_key)
        .bind(job.max_attempts)
        .bind(job.run_at)
        .fetch_optional(db)
        .await?;
        Ok(id.map_or(Enqueued::Duplicate, Enqueued::Enqueued))
    })
    .await
}

/// Enqueues many jobs of one kind in one statement (one notification).
pub async fn enqueue_many<P: Payload>(
    db: impl PgExecutor<'_>,
    payloads: &[P],
) -> Result<u64, sqlx::Error> {
    let values: Vec<Value> = payloads
        .iter()
        .map(serde_json::to_value)
        .collect::<Result<_, _>>()
        .map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    enqueue_values(db, P::KIND, &values, P::MAX_ATTEMPTS).await
}

/// [`enqueue_many`] for payloads already in JSON (benchmarks, tests).
pub async fn enqueue_values(
    db: impl PgExecutor<'_>,
    kind: JobKind,
    payloads: &[Value],
    max_attempts: i32,
) -> Result<u64, sqlx::Error> {
    timed("jobs.enqueue_values", async move {
        if payloads.is_empty() {
            return Ok(0);
        }
        let ids: Vec<JobId> = payloads.iter().map(|_| JobId::new()).collect();
        let result = sqlx::query(
            "INSERT INTO jobs (id, kind, payload, max_attempts)
             SELECT id, $2, payload, $4 FROM unnest($1::uuid[], $3::jsonb[]) AS j(id, payload)",
        )
        .bind(&ids)
        .bind(kind)
        .bind(payloads)
        .bind(max_attempts)
        .execute(db)
        .await?;
        Ok(result.rows_affected())
    })
    .await
}

/// A claimed job.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Job {
    pub id: JobId,
    pub kind: JobKind,
    pub payload: Value,
    /// Including this one.
    pub attempts: i32,
    pub max_attempts: i32,
}

impl Job {
    /// The payload, as the kind's type; an error if it is of another kind or shape.
    pub fn payload<P: Payload>(&self) -> Result<P, String> {
        if self.kind != P::KIND {
            return Err(format!("a {} job read as a {} payload", self.kind, P::KIND));
        }
        P::deserialize(&self.payload).map_err(|e| format!("bad {} payload: {e}", self.kind))
    }
}

/// Claims up to `limit` due jobs of `kind` for `worker`, leased for `lease`.
pub async fn claim(
    db: impl PgExecutor<'_>,
    kind: JobKind,
    worker: &str,
    lease: Duration,
    limit: i64,
) -> Result<Vec<Job>, sqlx::Error> {
    timed("jobs.claim", async move {
        sqlx::query_as(
            "UPDATE jobs SET state = 'running', attempts = attempts + 1, locked_by = $2, locked_until = now() + $3
             WHERE id IN (
                 SELECT id FROM jobs
                 WHERE kind = $1 AND state = 'queued' AND run_at <= now()
                 ORDER BY run_at
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED
             )
             RETURNING id, kind, payload, attempts, max_attempts",
        )
        .bind(kind)
        .bind(worker)
        .bind(interval(lease))
        .bind(limit)
        .fetch_all(db)
        .await
    })
    .await
}

/// Returns jobs of `kind` whose lease expired to the queue (or buries those that had
/// used their last attempt). Returns how many were returned or buried.
pub async fn reclaim_expired(db: impl PgExecutor<'_>, kind: JobKind) -> Result<u64, sqlx::Error> {
    timed("jobs.reclaim_expired", async move {
        let result = sqlx::query(
            "UPDATE jobs SET
                 state = CASE WHEN attempts >= max_attempts THEN 'dead' ELSE 'queued' END,
                 last_error = 'the lease expired: the worker running it stopped (killed, or over its timeout)',
                 run_at = now(), locked_by = NULL, locked_until = NULL
             WHERE kind = $1 AND state = 'running' AND locked_until < now()",
        )
        .bind(kind)
        .execute(db)
        .await?;
        Ok(result.rows_affected())
    })
    .await
}

/// Deletes finished jobs this worker holds. Returns how many it still held.
pub async fn complete(
    db: impl PgExecutor<'_>,
    ids: &[JobId],
    worker: &str,
) -> Result<u64, sqlx::Error> {
    timed("jobs.complete", async move {
        let result = sqlx::query("DELETE FROM jobs WHERE id = ANY($1) AND locked_by = $2")
            .bind(ids)
            .bind(worker)
            .execute(db)
            .await?;
        Ok(result.rows_affected())
    })
    .await
}

/// What happened to a failed job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// Queued again, to run after the delay.
    Retrying,
    /// That was its last attempt: it is dead, with the error kept.
    Dead,
    /// This worker no longer held it (its lease had expired).
    NotHeld,
}

/// Records a failed attempt: a retry after `retry_in`, or `dead` after the last
/// attempt (or when `permanent`, for errors no retry can fix).
pub async fn fail(
    db: impl PgExecutor<'_>,
    id: JobId,
    worker: &str,
    error: &str,
    retry_in: Duration,
    permanent: bool,
) -> Result<Failed, sqlx::Error> {
    timed("jobs.fail", async move {
        let state: Option<String> = sqlx::query_scalar(
            "UPDATE jobs SET
                 state = CASE WHEN $5 OR attempts >= max_attempts THEN 'dead' ELSE 'queued' END,
                 run_at = now() + $4, last_error = $3, locked_by = NULL, locked_until = NULL
             WHERE id = $1 AND locked_by = $2
             RETURNING state",
        )
        .bind(id)
        .bind(worker)
        .bind(error)
        .bind(interval(retry_in))
        .bind(permanent)
        .fetch_optional(db)
        .await?;
        Ok(match state.as_deref() {
            Some("dead") => Failed::Dead,
            Some(_) => Failed::Retrying,
            None => Failed::NotHeld,
        })
    })
    .await
}

/// Hands back claimed jobs that never started (shutdown): queued again at once, the
/// attempt not counted.
pub async fn release(
    db: impl PgExecutor<'_>,
    ids: &[JobId],
    worker: &str,
) -> Result<u64, sqlx::Error> {
    timed("jobs.release", async move {
        let result = sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = attempts - 1, locked_by = NULL, locked_until = NULL
             WHERE id = ANY($1) AND locked_by = $2 AND state = 'running'",
        )
        .bind(ids)
        .bind(worker)
        .execute(db)
        .await?;
        Ok(result.rows_affected())
    })
    .await
}

/// The queued jobs of one kind: those due now (what more workers would run sooner:
/// `jobs_due{kind}`, what autoscaling follows) and those scheduled later (retries
/// waiting out their backoff: `jobs_scheduled{kind}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct Backlog {
    pub kind: JobKind,
    pub due: i64,
    pub scheduled: i64,
}

/// The backlog of every kind that has queued jobs.
pub async fn backlog(db: impl PgExecutor<'_>) -> Result<Vec<Backlog>, sqlx::Error> {
    timed("jobs.backlog", async move {
        sqlx::query_as(
            "SELECT kind,
                    count(*) FILTER (WHERE run_at <= now()) AS due,
                    count(*) FILTER (WHERE run_at > now()) AS scheduled
             FROM jobs WHERE state = 'queued' GROUP BY kind ORDER BY kind",
        )
        .fetch_all(db)
        .await
    })
    .await
}

/// A job as stored, for inspection (tests, operators).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobRecord {
    pub id: JobId,
    pub state: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub run_at: OffsetDateTime,
}

pub async fn find(db: impl PgExecutor<'_>, id: JobId) -> Result<Option<JobRecord>, sqlx::Error> {
    timed("jobs.find", async move {
        sqlx::query_as("SELECT id, state, attempts, last_error, run_at FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(db)
            .await
    })
    .await
}

fn interval(duration: Duration) -> PgInterval {
    PgInterval {
        months: 0,
        days: 0,
        microseconds: i64::try_from(duration.as_micros()).unwrap_or(i64::MAX),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const LEASE: Duration = Duration::from_secs(30);

    async fn enqueued(pool: &crate::Db, job: &NewJob<'_>) -> JobId {
        match enqueue(pool, job).await.unwrap() {
            Enqueued::Enqueued(id) => id,
            Enqueued::Duplicate => panic!("unexpected duplicate"),
        }
    }

    #[tokio::test]
    async fn enqueue_is_transactional_and_wakes_listeners() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let mut listener = sqlx::postgres::PgListener::connect_with(pool.direct())
            .await
            .unwrap();
        listener.listen("jobs").await.unwrap();

        let mut tx = pool.begin().await.unwrap();
        enqueue(
            &mut *tx,
            &NewJob::new(JobKind::MediaProcess, json!({"n": 1})),
        )
        .await
        .unwrap();
        tx.rollback().await.unwrap();
        assert!(
            backlog(&pool).await.unwrap().is_empty(),
            "rolled back with its transaction"
        );

        let mut tx = pool.begin().await.unwrap();
        enqueue(
            &mut *tx,
            &NewJob::new(JobKind::MediaProcess, json!({"n": 2})),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            backlog(&pool).await.unwrap(),
            vec![Backlog {
                kind: JobKind::MediaProcess,
                due: 1,
                scheduled: 0
            }]
        );
        let notification = tokio::time::timeout(Duration::from_secs(5), listener.recv())
            .await
            .expect("a notification at commit")
            .unwrap();
        assert_eq!(notification.payload(), "media.process");
    }

    #[tokio::test]
    async fn concurrent_claims_never_share_a_job() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let payloads: Vec<Value> = (0..100).map(|n| json!({ "n": n })).collect();
        assert_eq!(
            enqueue_values(&pool, JobKind::PushSend, &payloads, 3)
                .await
                .unwrap(),
            100
        );

        let claimers = (0..4).map(|w| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let batch = claim(&pool, JobKind::PushSend, &format!("w{w}"), LEASE, 7)
                        .await
                        .unwrap();
                    if batch.is_empty() {
                        return mine;
                    }
                    mine.extend(batch.into_iter().map(|j| j.id));
                }
            })
        });
        let mut all = Vec::new();
        for claimer in claimers {
            all.extend(claimer.await.unwrap());
        }
        let count = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(
            (count, all.len()),
            (100, 100),
            "each job claimed exactly once"
        );
    }

    #[tokio::test]
    async fn failures_retry_later_then_die_with_the_last_error() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let mut job = NewJob::new(JobKind::PushSend, json!({}));
        job.max_attempts = 2;
        let id = enqueued(&pool, &job).await;

        let claimed = claim(&pool, JobKind::PushSend, "w1", LEASE, 10)
            .await
            .unwrap();
        assert_eq!(claimed[0].attempts, 1);
        let outcome = fail(
            &pool,
            id,
            "w1",
            "503 from FCM",
            Duration::from_secs(60),
            false,
        )
        .await
        .unwrap();
        assert_eq!(outcome, Failed::Retrying);
        assert!(
            claim(&pool, JobKind::PushSend, "w1", LEASE, 10)
                .await
                .unwrap()
                .is_empty(),
            "not before run_at"
        );
        // Waiting out its backoff, it is scheduled, not due: no reason for more workers.
        assert_eq!(
            backlog(&pool).await.unwrap(),
            vec![Backlog {
                kind: JobKind::PushSend,
                due: 0,
                scheduled: 1
            }]
        );

        // Make it due now, fail the last attempt.
        sqlx::query("UPDATE jobs SET run_at = now()")
            .execute(&pool)
            .await
            .unwrap();
        let claimed = claim(&pool, JobKind::PushSend, "w1", LEASE, 10)
            .await
            .unwrap();
        assert_eq!(claimed[0].attempts, 2);
        let outcome = fail(&pool, id, "w1", "503 again", Duration::from_secs(60), false)
            .await
            .unwrap();
        assert_eq!(outcome, Failed::Dead);
        let record = find(&pool, id).await.unwrap().unwrap();
        assert_eq!(
            (record.state.as_str(), record.last_error.as_deref()),
            ("dead", Some("503 again"))
        );
        assert!(backlog(&pool).await.unwrap().is_empty());

        // A permanent error buries a job at once.
        let id = enqueued(&pool, &NewJob::new(JobKind::PushSend, json!({}))).await;
        claim(&pool, JobKind::PushSend, "w1", LEASE, 10)
            .await
            .unwrap();
        let outcome = fail(&pool, id, "w1", "payload too large", Duration::ZERO, true)
            .await
            .unwrap();
        assert_eq!(outcome, Failed::Dead);
    }

    #[tokio::test]
    async fn an_expired_lease_returns_the_job_and_its_holder_loses_it() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let id = enqueued(&pool, &NewJob::new(JobKind::MediaProcess, json!({}))).await;
        claim(
            &pool,
            JobKind::MediaProcess,
            "dead-worker",
            Duration::from_millis(1),
            10,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;

        assert_eq!(
            reclaim_expired(&pool, JobKind::MediaProcess).await.unwrap(),
            1
        );
        let claimed = claim(&pool, JobKind::MediaProcess, "w2", LEASE, 10)
            .await
            .unwrap();
        assert_eq!(
            (claimed[0].id, claimed[0].attempts),
            (id, 2),
            "the lost attempt counts"
        );

        // The old holder cannot touch it any more; the new one can.
        assert_eq!(complete(&pool, &[id], "dead-worker").await.unwrap(), 0);
        assert_eq!(
            fail(&pool, id, "dead-worker", "late", Duration::ZERO, false)
                .await
                .unwrap(),
            Failed::NotHeld
        );
        assert_eq!(complete(&pool, &[id], "w2").await.unwrap(), 1);
        assert!(find(&pool, id).await.unwrap().is_none());

        // A job whose last attempt's worker died is buried, not retried forever.
        let mut job = NewJob::new(JobKind::MediaProcess, json!({}));
        job.max_attempts = 1;
        let id = enqueued(&pool, &job).await;
        claim(
            &pool,
            JobKind::MediaProcess,
            "dead-worker",
            Duration::from_millis(1),
            10,
        )
        .await
        .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        reclaim_expired(&pool, JobKind::MediaProcess).await.unwrap();
        assert_eq!(find(&pool, id).await.unwrap().unwrap().state, "dead");
    }

    #[tokio::test]
    async fn unique_keys_and_release() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let mut job = NewJob::new(JobKind::MediaProcess, json!({"media": 1}));
        job.unique_key = Some("media-1");
        let id = enqueued(&pool, &job).await;
        assert_eq!(enqueue(&pool, &job).await.unwrap(), Enqueued::Duplicate);

        // Released on shutdown: queued again, the attempt not used up.
        claim(&pool, JobKind::MediaProcess, "w1", LEASE, 10)
            .await
            .unwrap();
        assert_eq!(
            enqueue(&pool, &job).await.unwrap(),
            Enqueued::Duplicate,
            "still unique while running"
        );
        assert_eq!(release(&pool, &[id], "w1").await.unwrap(), 1);
        let record = find(&pool, id).await.unwrap().unwrap();
        assert_eq!((record.state.as_str(), record.attempts), ("queued", 0));

        // Once done, the key is free again.
        claim(&pool, JobKind::MediaProcess, "w1", LEASE, 10)
            .await
            .unwrap();
        complete(&pool, &[id], "w1").await.unwrap();
        assert!(matches!(
            enqueue(&pool, &job).await.unwrap(),
            Enqueued::Enqueued(_)
        ));
    }
}
