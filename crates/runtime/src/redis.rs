//! The Redis handle every binary uses for commands (not Pub/Sub).
//!
//! Redis holds only what may be lost (rate-limit buckets, idempotency records,
//! presence, live fan-out), so the handle is built to degrade, not to block: it
//! connects lazily (a process starts while Redis is down), reconnects by itself, and
//! gives up on a command within about a second, so callers can fail open.

use std::{sync::Arc, time::Duration};

use redis::{
    AsyncCommands, RedisError,
    aio::{ConnectionManager, ConnectionManagerConfig},
};

/// A cloneable, self-reconnecting Redis connection with this deployment's key prefix.
#[derive(Clone)]
pub struct Redis {
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
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(200));
        let conn = ConnectionManager::new_lazy_with_config(client, config)?;
        Ok(Self {
            conn,
            prefix: Arc::from(prefix),
        })
    }

    /// A connection to run commands on. Cloning is cheap: all clones share one
    /// multiplexed connection.
    pub fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// This deployment's key prefix (`REDIS_KEY_PREFIX`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `suffix` under this deployment's prefix: `mb:` + `rl:auth:1.2.3.4`.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.prefix)
    }

    pub async fn ping(&self) -> Result<(), RedisError> {
        let mut conn = self.conn();
        let _: String = conn.ping().await?;
        Ok(())
    }
}
