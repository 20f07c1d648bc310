//! `/health/live` and `/health/ready`.
//!
//! Liveness says only that the process can answer: it never checks dependencies, or a
//! database outage would restart every pod and make things worse.
//!
//! Readiness answers "should traffic go to this pod rather than another?". Its checks
//! run concurrently, each bounded by [`CHECK_TIMEOUT`], and each has a [`Scope`]:
//!
//! - a **shared** dependency (PostgreSQL, Redis) failing is an outage of every pod at
//!   once: taking them all out of service would turn a degraded service into none, so
//!   the pod stays ready (200, `"status": "degraded"`) and answers what needs the
//!   dependency with a retryable 503. Until PostgreSQL has answered once, though, the
//!   pod is still starting (503, `"starting"`): a new pod with a wrong database URL
//!   must not pass a rollout. Redis is not needed to start: a pod started during a
//!   Redis outage serves, degraded, as the others do.
//! - a **local** fault (the gateway's own Pub/Sub subscription) makes this pod unready
//!   (503, `"unready"`): others can serve instead. If the shared dependency it rides on
//!   is failing too, it is that outage, and counts as one.
//!
//! From the moment shutdown starts the answer is 503 `"shutting_down"`. The body names
//! each check and says `ok` or `failed`; why it failed goes to the log, not to whoever
//! can reach the port (a driver's error can name hosts, users and versions). Each
//! evaluation also sets `readiness_check_ok{check}` (1 or 0).

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::{Shutdown, redis::Redis};

/// One dependency check: `Ok` when the dependency answers, `Err(reason)` otherwise.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How long one check may take before it counts as failed. The probes' own
/// `timeoutSeconds` (3) is above it, so a slow check is reported, not cut.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// What a failing check means for this pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// A dependency every pod shares: failing, the pod is degraded, not unready. With
    /// `needed_to_start`, a pod that has never reached it is still starting (PostgreSQL:
    /// nothing works without it); without, a pod may start degraded (Redis: started
    /// during its outage, it serves without it).
    Shared { needed_to_start: bool },
    /// Something of this pod's own: failing, the pod is unready, unless the shared
    /// check named `on` is failing too (then it is that outage).
    Local { on: Option<&'static str> },
}

struct Entry {
    name: &'static str,
    scope: Scope,
    check: Check,
    /// Whether it has ever passed (shared checks: the pod has started).
    answered: AtomicBool,
}

impl Clone for Entry {
    fn clone(&self) -> Self {
        Self {
            name: self.name,
            scope: self.scope,
            check: self.check.clone(),
            answered: AtomicBool::new(self.answered.load(Ordering::Relaxed)),
        }
    }
}

/// The health state of a process: its shutdown signal and its dependency checks.
#[derive(Clone)]
pub struct Health {
    shutdown: Shutdown,
    checks: Arc<Vec<Entry>>,
    gauge: Family<CheckLabel, Gauge>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct CheckLabel {
    check: &'static str,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.checks.iter().map(|entry| entry.name).collect();
        f.debug_struct("Health")
            .field("checks", &names)
            .finish_non_exhaustive()
    }
}

/// The body of `/health/ready`.
#[derive(Debug, Serialize)]
pub struct Readiness {
    pub status: &'static str,
    pub checks: Map<String, Value>,
}

impl Readiness {
    /// Whether traffic should come here: `ready`, or `degraded` by a shared outage.
    pub fn is_ready(&self) -> bool {
        matches!(self.status, "ready" | "degraded")
    }
}

impl Health {
    pub fn new(shutdown: Shutdown) -> Self {
        Self {
            shutdown,
            checks: Arc::new(Vec::new()),
            gauge: Family::default(),
        }
    }

    /// Adds a named check. Call while building, before [`Health::router`].
    pub fn with_check(mut self, name: &'static str, scope: Scope, check: Check) -> Self {
        Arc::make_mut(&mut self.checks).push(Entry {
            name,
            scope,
            check,
            answered: AtomicBool::new(false),
        });
        self
    }

    /// Registers `readiness_check_ok{check}`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "readiness_check_ok",
            "Whether each readiness check passed when last evaluated (1) or not (0)",
            self.gauge.clone(),
        );
    }

    pub async fn readiness(&self) -> Readiness {
        if self.shutdown.is_triggered() {
            return Readiness {
                status: "shutting_down",
                checks: Map::new(),
            };
        }
        let results = futures_util::future::join_all(self.checks.iter().map(|entry| async move {
            match tokio::time::timeout(CHECK_TIMEOUT, (entry.check)()).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
            }
        }))
        .await;
        let failed = |name: &str| {
            self.checks
                .iter()
                .zip(&results)
                .any(|(entry, outcome)| entry.name == name && outcome.is_err())
        };
        let (mut starting, mut unready, mut degraded) = (false, false, false);
        let mut checks = Map::new();
        for (entry, outcome) in self.checks.iter().zip(&results) {
            let ok = outcome.is_ok();
            self.gauge
                .get_or_create(&CheckLabel { check: entry.name })
                .set(i64::from(ok));
            checks.insert(
                entry.name.to_owned(),
                json!(if ok { "ok" } else { "failed" }),
            );
            if let Err(reason) = outcome {
                tracing::warn!(check = entry.name, %reason, "readiness check failed");
            }
            match (entry.scope, ok) {
                (Scope::Shared { .. }, true) => entry.answered.store(true, Ordering::Relaxed),
                (
                    Scope::Shared {
                        needed_to_start: true,
                    },
                    false,
                ) if !entry.answered.load(Ordering::Relaxed) => {
                    starting = true;
                }
                (Scope::Shared { .. }, false) => degraded = true,
                (Scope::Local { .. }, true) => {}
                (Scope::Local { on: Some(on) }, false) if failed(on) => degraded = true,
                (Scope::Local { .. }, false) => unready = true,
            }
        }
        let status = if starting {
            "starting"
        } else if unready {
            "unready"
        } else if degraded {
            "degraded"
        } else {
            "ready"
        };
        Readiness { status, checks }
    }

    /// `GET /health/live` and `GET /health/ready`, to merge into any router.
    pub fn router<S: Clone + Send + Sync + 'static>(&self) -> Router<S> {
        Router::new()
            .route("/health/live", get(live))
            .route("/health/ready", get(ready))
            .with_state(self.clone())
    }
}

async fn live() -> Json<Value> {
    Json(json!({ "status": "live" }))
}

async fn ready(State(health): State<Health>) -> (StatusCode, Json<Readiness>) {
    let readiness = health.readiness().await;
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(readiness))
}

/// PostgreSQL answers `SELECT 1` through the pool.
pub fn postgres(db: mobile_db::Db) -> Check {
    Arc::new(move || {
        let db = db.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&db)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        })
    })
}

/// Redis answers `PING`.
pub fn redis(redis: Redis) -> Check {
    Arc::new(move || {
        let redis = redis.clone();
        Box::pin(async move { redis.ping().await.map_err(|e| e.to_string()) })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU8;

    use super::*;

    /// A check whose outcome the test sets: 0 passes, anything else fails.
    fn switch() -> (Arc<AtomicU8>, Check) {
        let state = Arc::new(AtomicU8::new(0));
        let read = state.clone();
        let check: Check = Arc::new(move || {
            let failing = read.load(Ordering::Relaxed) != 0;
            Box::pin(async move {
                if failing {
                    Err("down".to_owned())
                } else {
                    Ok(())
                }
            })
        });
        (state, check)
    }

    #[tokio::test]
    async fn a_shared_outage_degrades_a_local_fault_takes_the_pod_out() {
        let (postgres, postgres_check) = switch();
        let (redis, redis_check) = switch();
        let (pubsub, pubsub_check) = switch();
        let shutdown = Shutdown::new();
        let health = Health::new(shutdown.clone())
            .with_check(
                "postgres",
                Scope::Shared {
                    needed_to_start: true,
                },
                postgres_check,
            )
            .with_check(
                "redis",
                Scope::Shared {
                    needed_to_start: false,
                },
                redis_check,
            )
            .with_check("pubsub", Scope::Local { on: Some("redis") }, pubsub_check);
        let status = || async { health.readiness().await.status };

        // PostgreSQL never reached: starting, whatever else holds.
        postgres.store(1, Ordering::Relaxed);
        redis.store(1, Ordering::Relaxed);
        assert_eq!(status().await, "starting");
        // Redis never reached: this pod starts degraded (it serves without Redis).
        postgres.store(0, Ordering::Relaxed);
        assert_eq!(status().await, "degraded");
        redis.store(0, Ordering::Relaxed);
        assert_eq!(status().await, "ready");
        // PostgreSQL down for everyone: degraded, still ready.
        postgres.store(1, Ordering::Relaxed);
        let readiness = health.readiness().await;
        assert_eq!(readiness.status, "degraded");
        assert!(readiness.is_ready());
        assert_eq!(readiness.checks["postgres"], "failed");
        postgres.store(0, Ordering::Relaxed);
        // This pod's subscription is down while Redis answers: unready.
        pubsub.store(1, Ordering::Relaxed);
        assert_eq!(status().await, "unready");
        // Redis down for everyone (so the subscription too): degraded.
        redis.store(1, Ordering::Relaxed);
        assert_eq!(status().await, "degraded");
        redis.store(0, Ordering::Relaxed);
        pubsub.store(0, Ordering::Relaxed);
        assert_eq!(status().await, "ready");
        shutdown.trigger();
        assert_eq!(status().await, "shutting_down");
    }
}
