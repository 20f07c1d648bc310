//! Integration tests of `mobile-gateway`: the API and two gateways, in-process, on the
//! machine's real PostgreSQL and Redis, with real WebSocket clients.

#![allow(clippy::unwrap_used)] // a test crate: a panic is a failed test

mod helpers;

mod delivery;
mod events;
mod hostile;
mod lifecycle;
mod ordering;
mod protocol;
mod revocation;
