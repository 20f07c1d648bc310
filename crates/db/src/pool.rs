//! The connection pool.

use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// How the pool is sized and how long a request may wait for a connection.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub max_connections: u32,
    /// A request that cannot get a connection in this time fails fast instead of
    /// queueing behind a database that is down or saturated.
    pub acquire_timeout: Duration,
}

impl PoolSettings {
    /// The defaults with `max_connections` (`DATABASE_MAX_CONNECTIONS`).
    pub fn with_max_connections(max_connections: u32) -> Self {
        Self {
            max_connections,
            ..Self::default()
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(3),
        }
    }
}

/// A pool that connects on first use, so a binary starts (and reports itself unready)
/// while PostgreSQL is still coming up, instead of crash-looping.
pub fn connect_lazy(
    database_url: &str,
    settings: &PoolSettings,
) -> Result<sqlx::PgPool, sqlx::Error> {
    let options: PgConnectOptions = database_url.parse()?;
    let options = options.application_name(env!("CARGO_PKG_NAME"));
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        .connect_lazy_with(options))
}
