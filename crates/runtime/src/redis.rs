//! The Redis handle every binary uses: commands on one shared connection, dedicated
//! Pub/Sub connections, and the deployment's key prefix, which lives here and nowhere
//! else (every key and channel name is made by [`Redis::key`]).
//!
//! Redis holds only what may be lost (rate-limit buckets, idempotency records,
//! presence, live fan-out), so the handle is built to degrade, not to block: it
//! connects lazily (a process starts while Redis is down), reconnects by itself, and
//! gives up on a command within about a second, so callers can fail open.
//!
//! Every command names the feature it serves ([`Redis::conn`]), and is timed under it:
//! `redis_command_duration_seconds{feature}` and `redis_command_errors_total{feature}`,
//! so a slow or failing Redis shows, and shows whom it hurts, before users notice.

use std::{
    fmt::Display,
    sync::Arc,
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};
use redis::{
    AsyncCommands, Cmd, ErrorKind, Pipeline, RedisError, RedisFuture, ServerErrorKind, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig, PubSub},
};

/// What a Redis command is for: the `feature` label of the Redis metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Feature {
    /// The API's per-client and per-user rate limits.
    RateLimit,
    /// The API's `Idempotency-Key` records.
    Idempotency,
    /// The API's failed-sign-in counters.
    LoginGuard,
    /// The API's record of the Apple and Google sign-in nonces already used.
    Nonces,
    /// Who is online (gateways write it, the API and worker read it).
    Presence,
    /// Publishing event frames to the gateways.
    Events,
    /// The readiness check's `PING`.
    Health,
}

/// Where the API keeps a user's `Idempotency-Key` records (under the deployment's
/// prefix): one prefix per user, so that deleting an account finds them all.
pub fn idempotency_prefix(user: impl Display) -> String {
    format!("idem:user:{user}:")
}

impl Feature {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RateLimit => "rate_limit",
            Self::Idempotency => "idempotency",
            Self::LoginGuard => "login_guard",
            Self::Nonces => "nonces",
            Self::Presence => "presence",
            Self::Events => "events",
            Self::Health => "health",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct FeatureLabel {
    feature: &'static str,
}

/// Buckets in seconds: 0.25 ms to the 1 s a command may take before it is given up.
const BUCKETS: [f64; 12] = [
    0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

#[derive(Debug)]
struct CommandMetrics {
    duration: Family<FeatureLabel, Histogram, fn() -> Histogram>,
    errors: Family<FeatureLabel, Counter>,
}

impl CommandMetrics {
    fn new() -> Self {
        Self {
            duration: Family::new_with_constructor(|| Histogram::new(BUCKETS)),
            errors: Family::default(),
        }
    }

    fn observe(&self, feature: Feature, started: Instant, failed: bool) {
        let label = FeatureLabel {
            feature: feature.as_str(),
        };
        self.duration
            .get_or_create(&label)
            .observe(started.elapsed().as_secs_f64());
        if failed {
            self.errors.get_or_create(&label).inc();
        }
    }
}

/// How long connecting (a command connection or a Pub/Sub one) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A cloneable, self-reconnecting Redis connection with this deployment's key prefix.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: Arc<str>,
    metrics: Arc<CommandMetrics>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// A handle that connects on first use. Fails only on a malformed URL.
    pub fn connect_lazy(url: &str, prefix: &str) -> Result<Self, RedisError> {
        Self::connect_lazy_trusting(url, prefix, None)
    }

    /// As [`Redis::connect_lazy`]; a `rediss://` URL (TLS) verifies the server's
    /// certificate and host name against `root_ca` (PEM: `REDIS_CA_FILE`, a private
    /// CA such as Memorystore's), or against the system's roots when it is `None`.
    pub fn connect_lazy_trusting(
        url: &str,
        prefix: &str,
        root_ca: Option<Vec<u8>>,
    ) -> Result<Self, RedisError> {
        let client = match root_ca {
            None => redis::Client::open(url)?,
            Some(root_cert) => redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(root_cert),
                },
            )?,
        };
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config)?;
        Ok(Self {
            client,
            conn,
            prefix: Arc::from(prefix),
            metrics: Arc::new(CommandMetrics::new()),
        })
    }

    /// Registers `redis_command_duration_seconds{feature}` and
    /// `redis_command_errors_total{feature}` on a binary's registry.
    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register_with_unit(
            "redis_command_duration",
            "Redis command (or pipeline) round trips by the feature they serve",
            Unit::Seconds,
            self.metrics.duration.clone(),
        );
        registry.register(
            "redis_command_errors",
            "Redis commands that failed or timed out, by the feature they serve",
            self.metrics.errors.clone(),
        );
    }

    /// A connection to run `feature`'s commands on. Cloning is cheap: all share one
    /// multiplexed connection.
    pub fn conn(&self, feature: Feature) -> Conn {
        Conn {
            inner: self.conn.clone(),
            feature,
            metrics: Arc::clone(&self.metrics),
        }
    }

    /// A new connection of its own for Pub/Sub (a subscribed connection can run no
    /// other command), within the connect timeout.
    pub async fn pubsub(&self) -> Result<PubSub, RedisError> {
        match tokio::time::timeout(CONNECT_TIMEOUT * 4, self.client.get_async_pubsub()).await {
            Ok(connected) => connected,
            Err(_) => Err(RedisError::from((
                redis::ErrorKind::Io,
                "connecting for Pub/Sub timed out",
            ))),
        }
    }

    /// A key or channel name under this deployment's prefix (`REDIS_KEY_PREFIX`):
    /// `mb:` + `rl:auth:1.2.3.4`, `mb:` + `conversation:<id>`.
    pub fn key(&self, name: impl Display) -> String {
        format!("{}{name}", self.prefix)
    }

    /// A `SCAN MATCH` pattern for every key under `prefix` (itself under this
    /// deployment's prefix), with the glob's special characters in both escaped.
    pub fn pattern_under(&self, prefix: impl Display) -> String {
        let literal = self.key(prefix);
        let mut pattern = String::with_capacity(literal.len() + 2);
        for c in literal.chars() {
            if matches!(c, '*' | '?' | '[' | ']' | '\\') {
                pattern.push('\\');
            }
            pattern.push(c);
        }
        pattern.push('*');
        pattern
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.conn(Feature::Health);
        let _: String = conn.ping().await?;
        Ok(())
    }
}

/// The shared connection, timing each command under its feature.
#[derive(Clone)]
pub struct Conn {
    inner: ConnectionManager,
    feature: Feature,
    metrics: Arc<CommandMetrics>,
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("feature", &self.feature)
            .finish_non_exhaustive()
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self.inner.req_packed_command(cmd).await;
            let failed = match &result {
                // A server's error reply arrives as a value; the caller's
                // `query_async` turns it into an error later.
                Ok(value) => is_error_reply(value),
                Err(error) => !is_script_miss(error),
            };
            self.metrics.observe(self.feature, started, failed);
            result
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let started = Instant::now();
            let result = self
                .inner
                .req_packed_commands(pipeline, offset, count)
                .await;
            let failed = match &result {
                Ok(values) => values.iter().any(is_error_reply),
                Err(_) => true,
            };
            self.metrics.observe(self.feature, started, failed);
            result
        })
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}

/// `NOSCRIPT`: a script's first run on a Redis that has not cached it yet (after a
/// start or a failover), which the client answers by loading it; part of running a
/// script, not a failure.
fn is_script_miss(error: &RedisError) -> bool {
    error.kind() == ErrorKind::Server(ServerErrorKind::NoScript)
}

/// An error reply from the server, other than a script miss.
fn is_error_reply(value: &Value) -> bool {
    matches!(value, Value::ServerError(error) if error.kind() != Some(ServerErrorKind::NoScript))
}
