//! Test helpers shared by every crate's tests. Nothing here fakes PostgreSQL or Redis:
//! a test gets its own real database on the machine's PostgreSQL, and a test that needs
//! to kill Redis gets its own real `redis-server` process. The fakes stand in only for
//! what lives outside (APNs, FCM, S3, Apple and Google sign-in, SMTP), and speak the
//! real protocols.
//!
//! - [`TestDb`], [`RedisServer`], [`S3Server`], [`TestKeys`]: what a test runs on;
//!   [`PgServer`] a PostgreSQL cluster of the test's own, [`TestCa`] the certificates
//!   for servers that speak TLS.
//! - [`ServiceProcess`]: a service binary as a process (signals, exit codes).
//! - [`api`]: an account through the API, and reading `/metrics`.
//! - [`FakeApns`], [`FakeFcm`]: the push services; [`FakeIssuer`] an OpenID issuer;
//!   [`FakeSmtp`] a mail server.
//!
//! Settings: `TEST_DATABASE_URL` names the server to create test databases on
//! (default `postgres://postgres@127.0.0.1:5432/postgres`); `TEST_REDIS_URL` the shared
//! Redis (default `redis://127.0.0.1:6379`).

pub mod api;
mod ca;
mod database;
mod fake_apns;
mod fake_fcm;
mod fake_oidc;
mod fake_smtp;
mod keys;
mod pg_server;
mod pgbouncer;
mod process;
mod redis_server;
mod s3_server;
mod tls;

pub use ca::TestCa;
pub use database::TestDb;
pub use fake_apns::{ApnsDelivery, ApnsReply, FakeApns, TEST_APNS_KEY_ID, TEST_APNS_TEAM_ID};
pub use fake_fcm::{FakeFcm, FcmReply};
pub use fake_oidc::{FakeIssuer, nonce_hash};
pub use fake_smtp::{FakeSmtp, ReceivedMail, Security as SmtpSecurity};
pub use keys::TestKeys;
pub use pg_server::PgServer;
pub use pgbouncer::PgBouncer;
pub use process::ServiceProcess;
pub use redis_server::RedisServer;
pub use s3_server::S3Server;

/// The shared Redis the tests use unless they start their own.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix no other test shares, so tests can run in parallel on one Redis.
pub fn unique_redis_prefix() -> String {
    format!("test:{}:", uuid::Uuid::new_v4().simple())
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("local address").port()
}
