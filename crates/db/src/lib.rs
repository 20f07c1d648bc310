//! PostgreSQL, the system of record: the pool, the migrator and every query, written as
//! plain functions over an executor (`insert_user(&pool, ...)`, `rotate_refresh_token(
//! &pool, ...)`), so a caller composes them inside its own transaction.
//!
//! This crate knows nothing of HTTP. Expected outcomes (an email already taken, a
//! refresh token reused) are enums in the return type; only the unexpected is an
//! `Err(sqlx::Error)`.
//!
//! Queries use sqlx's runtime-checked API rather than its compile-time macros, so no
//! database (and no `.sqlx/` offline data) is needed to build the image. The tests in
//! each module run every query against a real PostgreSQL.

pub mod accounts;
pub mod conversations;
pub mod devices;
pub mod email;
pub mod identities;
pub mod jobs;
pub mod media;
pub mod members;
pub mod metrics;

mod pool;
pub mod push;
pub mod sessions;
pub mod user_events;
pub mod users;

pub mod migrate;
pub use migrate::{MIGRATOR, migrate};
pub use pool::{Db, PoolMode, PoolSettings};
pub use sqlx::{PgPool, Postgres, Transaction};

/// The SQLSTATE of a unique violation, and a helper to name the constraint it hit.
pub(crate) fn violated_constraint(error: &sqlx::Error) -> Option<&str> {
    match error {
        sqlx::Error::Database(db) if db.is_unique_violation() => db.constraint(),
        _ => None,
    }
}
