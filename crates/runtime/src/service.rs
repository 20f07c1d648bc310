//! What a service binary is, and the start-up every one of them shares, so each binary
//! holds only what is its own: its settings, routes, state, extra metrics and checks.
//!
//! A binary implements [`Service`]; its `main` is [`crate::cli::main`], which reads the
//! arguments, and [`run`] binds, installs the signal handlers and hands over to the
//! service's `serve`, which starts from a [`Foundation`].

use std::{future::Future, sync::Arc};

use anyhow::Context as _;
use prometheus_client::registry::Registry;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;

use crate::{
    CommonSettings, Defaults, Env, Health, SettingsError, Shutdown,
    health::{self, Scope},
    metrics::{self, PoolCollector},
    redis::Redis,
    server::{self, ConnectionMetrics, Drain, ServeOptions},
};

/// One of the service binaries.
pub trait Service: 'static {
    /// The binary's name (`mobile-api`), for usage and errors.
    const NAME: &'static str;
    const VERSION: &'static str;
    /// Defaults of `LISTEN_ADDR`, `METRICS_ADDR` and `MAX_CONNECTIONS`.
    const DEFAULTS: Defaults;
    /// What the binary does, for the usage text's first line.
    const ABOUT: &'static str;
    /// Subcommands besides serving and `health`: (name, what it does).
    const COMMANDS: &'static [(&'static str, &'static str)] = &[];

    type Settings: Send + 'static;

    fn settings(env: &Env) -> Result<Self::Settings, SettingsError>;

    fn common(settings: &Self::Settings) -> &CommonSettings;

    /// Serves on listeners the caller bound (tests bind port 0) until `shutdown`
    /// triggers, then drains.
    fn serve(
        settings: Self::Settings,
        listeners: Listeners,
        shutdown: Shutdown,
    ) -> impl Future<Output = anyhow::Result<()>> + Send;

    /// Runs one of [`Service::COMMANDS`] (on the thread that runs `main`).
    fn command(name: &str, env: &Env) -> impl Future<Output = anyhow::Result<()>> {
        let _ = env;
        async move { anyhow::bail!("{} has no command {name:?}", Self::NAME) }
    }

    /// The settings every binary shares, with this binary's default addresses.
    fn common_settings(env: &Env) -> Result<CommonSettings, SettingsError> {
        CommonSettings::from_env(env, &Self::DEFAULTS)
    }
}

/// The two ports a service listens on.
#[derive(Debug)]
pub struct Listeners {
    /// `LISTEN_ADDR`: the service itself, and health.
    pub public: TcpListener,
    /// `METRICS_ADDR`: `/metrics` only.
    pub metrics: TcpListener,
}

impl Listeners {
    /// Binds both addresses of `common`.
    pub async fn bind(common: &CommonSettings) -> anyhow::Result<Self> {
        Ok(Self {
            public: server::bind(common.listen_addr).await?,
            metrics: server::bind(common.metrics_addr).await?,
        })
    }
}

/// Binds `LISTEN_ADDR` and `METRICS_ADDR`, installs the signal handlers, and serves
/// until SIGTERM.
pub async fn run<S: Service>(settings: S::Settings) -> anyhow::Result<()> {
    let shutdown = Shutdown::new();
    shutdown
        .listen_for_signals()
        .context("cannot install signal handlers")?;
    let listeners = Listeners::bind(S::common(&settings)).await?;
    S::serve(settings, listeners, shutdown).await
}

/// What a service has once started: its connections, its metrics registry (with
/// `build_info`, `process_*`, `db_pool_connections` and the connection metrics
/// registered), its health (checking PostgreSQL and Redis), its drain timing and its
/// servers' limits.
#[derive(Debug)]
pub struct Foundation {
    pub db: mobile_db::Db,
    pub redis: Redis,
    pub registry: Registry,
    pub health: Health,
    pub drain: Drain,
    pub serve_options: ServeOptions,
}

impl Foundation {
    /// Builds the foundation. Both connections are lazy, so a service starts (and says
    /// it is unready) while PostgreSQL or Redis is still coming up. Fails only on a
    /// malformed setting.
    /// The database connections are named after the binary (`application_name`), so
    /// `pg_stat_activity` tells them apart.
    pub fn connect<S: Service>(
        common: &CommonSettings,
        shutdown: &Shutdown,
    ) -> anyhow::Result<Self> {
        let db = mobile_db::Db::connect_lazy(
            common.database_url.expose_secret(),
            &mobile_db::PoolSettings {
                mode: common.database_pool_mode,
                direct_url: common
                    .database_listen_url
                    .as_ref()
                    .map(|url| url.expose_secret().to_owned()),
                ..mobile_db::PoolSettings::new(S::NAME, common.database_max_connections)
            },
        )
        .context("DATABASE_URL or DATABASE_LISTEN_URL")?;
        let redis_ca = match &common.redis_ca_file {
            Some(path) => Some(
                std::fs::read(path)
                    .with_context(|| format!("REDIS_CA_FILE: cannot read {}", path.display()))?,
            ),
            None => None,
        };
        let redis = Redis::connect_lazy_trusting(
            common.redis_url.expose_secret(),
            &common.redis_key_prefix,
            redis_ca,
        )
        .context("REDIS_URL")?;
        let mut registry = Registry::default();
        metrics::register_common(&mut registry, S::VERSION);
        registry.register_collector(Box::new(PoolCollector::new(&db)));
        mobile_db::metrics::register(&mut registry);
        redis.register_metrics(&mut registry);
        let serve_options = ServeOptions {
            limits: Arc::new(common.connections.clone()),
            metrics: ConnectionMetrics::register(&mut registry),
        };
        let health = Health::new(shutdown.clone())
            .with_check(
                "postgres",
                Scope::Shared {
                    needed_to_start: true,
                },
                health::postgres(db.clone()),
            )
            .with_check(
                "redis",
                Scope::Shared {
                    needed_to_start: false,
                },
                health::redis(redis.clone()),
            );
        health.register(&mut registry);
        Ok(Self {
            db,
            redis,
            registry,
            health,
            drain: Drain {
                delay: common.shutdown_delay,
                timeout: common.shutdown_timeout,
            },
            serve_options,
        })
    }
}
