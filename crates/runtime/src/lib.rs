//! What every mobile-backend binary starts the same way.
//!
//! A binary implements [`service::Service`] and its `main` is [`cli::main`]: the
//! arguments, [`settings`], [`telemetry::init`], binding and signal handlers happen
//! once, here. The service's `serve` starts from a [`service::Foundation`] (the pool,
//! Redis, the metrics registry with the common metrics, health with the common checks)
//! and hands its router to [`server::serve`], which listens, serves `/metrics` on its
//! own port, and drains on SIGTERM as [`shutdown`] describes.
//!
//! - [`cli`]: the arguments every binary takes (`health`, `--version`, `--help`, its
//!   own commands).
//! - [`service`]: the `Service` trait, `run`, and the `Foundation`.
//! - [`settings`]: typed configuration from the environment; secrets never logged.
//! - [`telemetry`]: JSON (or pretty) logs through `tracing`, filtered by `RUST_LOG`.
//! - [`metrics`]: `build_info`, process metrics, the PostgreSQL pool gauge, `/metrics`.
//! - [`health`]: `/health/live` and `/health/ready` with dependency checks.
//! - [`shutdown`]: SIGTERM/SIGINT → unready → drain; a second signal exits at once.
//! - [`client_ip`]: the client's address behind `TRUSTED_PROXY_HOPS` proxies.
//! - [`redis`]: a lazily connected, self-healing Redis handle, the one owner of the
//!   deployment's key prefix.
//! - [`server`]: the listen / drain / exit sequence tying the above together.

pub mod cli;
pub mod client_ip;
pub mod health;
pub mod metrics;
pub mod probe;
pub mod redis;
pub mod server;
pub mod service;
pub mod settings;
pub mod shutdown;
pub mod telemetry;

pub use health::Health;
pub use settings::{AppEnv, CommonSettings, Defaults, Env, LogFormat, SettingsError};
pub use shutdown::Shutdown;
