//! `mobile-worker` integration tests, against the machine's real PostgreSQL and Redis
//! and in-process fakes of APNs and FCM.

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod helpers;
mod images;
mod process;
mod push;
mod queue;
