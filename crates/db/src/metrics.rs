//! `database_query_duration_seconds{query}`: how long each named query of this crate
//! takes, from asking the pool for a connection to the last row, errors included; and
//! `database_query_errors_total{query}`, the ones that failed (an expected outcome such
//! as an email already taken is not a failure).
//!
//! The label is the function's name (`users.find_user`): a fixed set, one series per
//! function. The queries are plain functions over any executor (a pool, a
//! transaction), so there is no handle to hang the metrics on: they live here, once
//! per process, and a binary registers them on its registry with [`register`]. (A
//! process runs one binary; tests that start several apps in one process share them.)

use std::{future::Future, sync::LazyLock, time::Instant};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

/// Buckets in seconds: 0.5 ms to 10 s, dense where a healthy query falls.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct QueryLabel {
    query: &'static str,
}

type Durations = Family<QueryLabel, Histogram, fn() -> Histogram>;

static DURATIONS: LazyLock<Durations> =
    LazyLock::new(|| Family::new_with_constructor(|| Histogram::new(BUCKETS)));
static ERRORS: LazyLock<Family<QueryLabel, Counter>> = LazyLock::new(Family::default);

/// Registers the query metrics on a binary's registry.
pub fn register(registry: &mut Registry) {
    registry.register_with_unit(
        "database_query_duration",
        "PostgreSQL query time by named query, from acquiring a connection to the result",
        Unit::Seconds,
        DURATIONS.clone(),
    );
    registry.register(
        "database_query_errors",
        "PostgreSQL queries that failed, by named query",
        ERRORS.clone(),
    );
}

/// Runs `query`'s future, recording its time under `query`.
pub(crate) async fn timed<T>(
    query: &'static str,
    run: impl Future<Output = Result<T, sqlx::Error>>,
) -> Result<T, sqlx::Error> {
    let started = Instant::now();
    let result = run.await;
    let label = QueryLabel { query };
    DURATIONS
        .get_or_create(&label)
        .observe(started.elapsed().as_secs_f64());
    if result.is_err() {
        ERRORS.get_or_create(&label).inc();
    }
    result
}
