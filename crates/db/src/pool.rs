//! The connection pool.

use std::time::Duration;

use sqlx::{
    Connection as _,
    postgres::{PgConnectOptions, PgPoolOptions},
};

/// How the pool is sized and how long a request may wait for a connection.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// What `pg_stat_activity` shows for these connections (`mobile-api`, ...), unless
    /// `DATABASE_URL` names one (`application_name=`).
    pub application_name: &'static str,
    pub max_connections: u32,
    /// A request that cannot get a connection in this time fails fast instead of
    /// queueing behind a database that is down or saturated.
    pub acquire_timeout: Duration,
}

impl PoolSettings {
    /// The defaults, for `application_name`'s connections, with `max_connections`
    /// (`DATABASE_MAX_CONNECTIONS`).
    pub fn new(application_name: &'static str, max_connections: u32) -> Self {
        Self {
            application_name,
            max_connections,
            ..Self::default()
        }
    }
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            application_name: env!("CARGO_PKG_NAME"),
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
    let options = match options.get_application_name() {
        Some(_) => options,
        None => options.application_name(settings.application_name),
    };
    Ok(PgPoolOptions::new()
        .max_connections(settings.max_connections)
        .min_connections(0)
        .acquire_timeout(settings.acquire_timeout)
        .idle_timeout(Some(Duration::from_secs(300)))
        // By default sqlx pings every connection it hands out: a round trip before
        // every query, on top of the query's own and the ping sqlx always makes when a
        // connection comes back. A connection idle for less than TRUSTED_IDLE answered
        // that release ping less than TRUSTED_IDLE ago, so it is handed out unchecked,
        // as HikariCP does (`aliveBypassWindowMs`); one that sat idle longer is still
        // pinged. What a PostgreSQL restart can cost is the requests that pick up,
        // within that second, a connection it has just cut: they fail with 503.
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for < TRUSTED_IDLE {
                    return Ok(true);
                }
                Ok(connection.ping().await.is_ok())
            })
        })
        .connect_lazy_with(options))
}

/// A connection idle for less than this is handed out without a ping.
const TRUSTED_IDLE: Duration = Duration::from_secs(1);

#[cfg(test)]
mod tests {
    use mobile_testkit::TestDb;

    use super::*;

    /// The `application_name` of the pools these tests make.
    const TEST_APP: &str = "mobile-db-test";

    /// The backends serving `pool`'s connections, ended from another session, as a
    /// PostgreSQL restart or a proxy's idle cut would end them.
    async fn cut_connections(db: &TestDb) -> u64 {
        let admin = db.pool().await;
        let cut: Vec<bool> = sqlx::query_scalar(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND application_name = $1",
        )
        .bind(TEST_APP)
        .fetch_all(&admin)
        .await
        .unwrap();
        admin.close().await;
        cut.len() as u64
    }

    #[tokio::test]
    async fn a_connection_cut_while_idle_is_replaced_not_handed_out() {
        let db = TestDb::new().await;
        let pool = connect_lazy(db.url(), &PoolSettings::new(TEST_APP, 1)).unwrap();
        let one: i32 = sqlx::query_scalar("SELECT 1")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(one, 1);
        assert_eq!(cut_connections(&db).await, 1);

        // Idle past the trusted window: the pool pings it, finds it dead, reconnects.
        tokio::time::sleep(TRUSTED_IDLE + Duration::from_millis(200)).await;
        let two: i32 = sqlx::query_scalar("SELECT 2")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(two, 2);
    }
}
