//! `mobile-worker` integration tests, against the machine's real PostgreSQL and Redis
//! and in-process fakes of APNs and FCM. (The image pipeline's own tests are in
//! `mobile-media`.)

#![allow(clippy::unwrap_used)]

#[allow(dead_code)]
mod helpers;
mod process;
mod push;
mod queue;
