//! The Redis handle every binary uses: commands on one shared connection, dedicated
//! Pub/Sub connections, and the deployment's key prefix, which lives here and nowhere
//! else (every key and channel name is made by [`Redis::key`]).
//!
//! Redis holds only what may be lost (rate-limit buckets, idempotency records,
//! presence, live fan-out), so the handle is built to degrade, not to block: it
//! connects lazily (a process starts while Redis is down), reconnects by itself, and
//! gives up on a command within about a second, so callers can fail open.

use std::{fmt::Display, sync::Arc, time::Duration};

use redis::{
    AsyncCommands, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig, PubSub},
};

/// How long connecting (a command connection or a Pub/Sub one) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A cloneable, self-reconnecting Redis connection with this deployment's key prefix.
#[derive(Clone)]
pub struct Redis {
    client: redis::Client,
    conn: ConnectionManager,
    prefix: Arc<str>,
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
        })
    }

    /// A connection to run commands on. Cloning is cheap: all clones share one
    /// multiplexed connection.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
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

    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.conn();
        let _: String = conn.ping().await?;
        Ok(())
    }
}
