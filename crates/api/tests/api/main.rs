//! Integration tests of `mobile-api` against the machine's real PostgreSQL and Redis.
//!
//! One test binary (modules, not files under `tests/`) so the suite links once. Each
//! test spawns its own app on port 0 with its own database and Redis key prefix, so the
//! tests run in parallel without seeing each other.

#![allow(clippy::unwrap_used)] // a test crate: a panic is a failed test

mod helpers;

mod account;
mod auth;
mod bad_input;
mod chat;
mod conversations;
mod devices;
mod email;
mod hostile;
mod idempotency;
mod me;
mod media;
mod metrics;
mod notifications;
mod openapi;
mod process;
mod rate_limit;
mod readiness;
mod sessions;
mod social;
