//! What every mobile-backend binary starts the same way.
//!
//! A binary's `main` reads its [`settings`], calls [`telemetry::init`], builds its
//! metrics [`Registry`](prometheus_client::registry::Registry) with
//! [`metrics::register_common`], creates its [`health::Health`] with readiness checks,
//! and hands its router to [`server::serve`], which listens, serves `/metrics` on its own
//! port, and drains on SIGTERM as [`shutdown`] describes.
//!
//! - [`settings`]: typed configuration from the environment; secrets never logged.
//! - [`telemetry`]: JSON (or pretty) logs through `tracing`, filtered by `RUST_LOG`.
//! - [`metrics`]: `build_info`, process metrics, the PostgreSQL pool gauge, `/metrics`.
//! - [`health`]: `/health/live` and `/health/ready` with dependency checks.
//! - [`shutdown`]: SIGTERM/SIGINT → unready → drain; a second signal exits at once.
//! - [`redis`]: a lazily connected, self-healing Redis handle with a key prefix.
//! - [`server`]: the listen / drain / exit sequence tying the above together.

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
pub use settings::{AppEnv, CommonSettings, Env, LogFormat, SettingsError};
pub use shutdown::Shutdown;
