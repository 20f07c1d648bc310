//! The start-up every service shares, so each binary's `serve` holds only what is its
//! own: routes, state, extra metrics and checks.

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;

use crate::{
    CommonSettings, Health, Shutdown, health,
    metrics::{self, PoolCollector},
    redis::Redis,
    server::{self, Drain},
};

/// What a service has once started: its connections, its metrics registry (with
/// `build_info`, `process_*` and `db_pool_connections` registered), its health (checking
/// PostgreSQL and Redis), and its drain timing.
#[derive(Debug)]
pub struct Foundation {
    pub db: sqlx::PgPool,
    pub redis: Redis,
    pub registry: Registry,
    pub health: Health,
    pub drain: Drain,
}

impl Foundation {
    /// Builds the foundation. Both connections are lazy, so a service starts (and says
    /// it is unready) while PostgreSQL or Redis is still coming up. Fails only on a
    /// malformed setting.
    pub fn connect(
        common: &CommonSettings,
        version: &str,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        let db = mobile_db::connect_lazy(
            common.database_url.expose_secret(),
            &mobile_db::PoolSettings::with_max_connections(common.database_max_connections),
        )
        .context("DATABASE_URL")?;
        let redis = Redis::connect_lazy(common.redis_url.expose_secret(), &common.redis_key_prefix)
            .context("REDIS_URL")?;
        let mut registry = Registry::default();
        metrics::register_common(&mut registry, version);
        registry.register_collector(Box::new(PoolCollector::new(db.clone())));
        let health = Health::new(shutdown.clone())
            .with_check("postgres", health::postgres(db.clone()))
            .with_check("redis", health::redis(redis.clone()));
        Ok(Self {
            db,
            redis,
            registry,
            health,
            drain: Drain {
                delay: common.shutdown_delay,
                timeout: common.shutdown_timeout,
            },
        })
    }
}

/// Binds `LISTEN_ADDR` and `METRICS_ADDR` and installs the signal handlers: what a
/// binary's `run` needs before it hands over to its `serve`.
pub async fn bind_with_signals(
    common: &CommonSettings,
) -> anyhow::Result<(TcpListener, TcpListener, Shutdown)> {
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("cannot install signal handlers")?;
    let listener = server::bind(common.listen_addr).await?;
    let metrics_listener = server::bind(common.metrics_addr).await?;
    Ok((listener, metrics_listener, shutdown))
}
