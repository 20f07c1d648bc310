//! `/health/live` and `/health/ready`.
//!
//! Liveness says only that the process can answer: it never checks dependencies, or a
//! database outage would restart every pod and make things worse. Readiness checks
//! every dependency (concurrently, each bounded by a timeout) and answers 503 when one
//! fails, and from the moment shutdown starts. The body names each check and says
//! `ok` or `failed`; why it failed goes to the log, not to whoever can reach the port
//! (a driver's error can name hosts, users and versions).

use std::{future::Future, pin::Pin, sync::Arc, time::Duration};

use axum::{Json, Router, extract::State, http::StatusCode, routing::get};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::{Shutdown, redis::Redis};

/// One dependency check: `Ok` when the dependency answers, `Err(reason)` otherwise.
pub type Check =
    Arc<dyn Fn() -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// How long one check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// The health state of a process: its shutdown signal and its dependency checks.
#[derive(Clone)]
pub struct Health {
    shutdown: Shutdown,
    checks: Arc<Vec<(&'static str, Check)>>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.checks.iter().map(|(name, _)| *name).collect();
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
    pub fn is_ready(&self) -> bool {
        self.status == "ready"
    }
}

impl Health {
    pub fn new(shutdown: Shutdown) -> Self {
        Self {
            shutdown,
            checks: Arc::new(Vec::new()),
        }
    }

    /// Adds a named dependency check. Call while building, before [`Health::router`].
    pub fn with_check(mut self, name: &'static str, check: Check) -> Self {
        Arc::make_mut(&mut self.checks).push((name, check));
        self
    }

    pub async fn readiness(&self) -> Readiness {
        if self.shutdown.is_triggered() {
            return Readiness {
                status: "shutting_down",
                checks: Map::new(),
            };
        }
        let results =
            futures_util::future::join_all(self.checks.iter().map(|(name, check)| async move {
                let outcome = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(format!("no answer within {CHECK_TIMEOUT:?}")),
                };
                (*name, outcome)
            }))
            .await;
        let mut ready = true;
        let mut checks = Map::new();
        for (name, outcome) in results {
            let value = match outcome {
                Ok(()) => "ok",
                Err(reason) => {
                    tracing::warn!(check = name, %reason, "readiness check failed");
                    ready = false;
                    "failed"
                }
            };
            checks.insert(name.to_owned(), json!(value));
        }
        Readiness {
            status: if ready { "ready" } else { "unready" },
            checks,
        }
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
pub fn postgres(pool: sqlx::PgPool) -> Check {
    Arc::new(move || {
        let pool = pool.clone();
        Box::pin(async move {
            sqlx::query("SELECT 1")
                .execute(&pool)
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
