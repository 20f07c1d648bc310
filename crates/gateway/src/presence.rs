//! This process's share of presence: which users have a connection here, renewed in
//! Redis so they count as online (see `mobile_events::presence`), and registered again
//! as soon as Redis is back after an outage or a restart.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use mobile_domain::UserId;
use mobile_events::presence;
use mobile_runtime::redis::Redis;
use rand::Rng as _;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How soon a failed renewal is tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct Presence {
    redis: Redis,
    /// connection id → user, for the periodic renewal (ids as numbers: one entry per
    /// open connection, so its size counts).
    local: Arc<Mutex<HashMap<Uuid, UserId>>>,
}

impl Presence {
    /// Creates the tracker and its renewal task, which stops with `stop`. Every entry
    /// is renewed each [`presence::REFRESH_EVERY`]; at once whenever `redis_up` says
    /// this process's Redis connection came back (a restarted Redis has lost every
    /// entry, and users who stayed connected would count as offline, and be sent
    /// pushes, until the next renewal); and, while renewing fails, every
    /// [`RETRY_EVERY`].
    pub fn start(
        redis: Redis,
        mut redis_up: watch::Receiver<u64>,
        stop: CancellationToken,
    ) -> Self {
        let presence = Self {
            redis,
            local: Arc::default(),
        };
        let renewer = presence.clone();
        tokio::spawn(async move {
            let mut next = Instant::now() + presence::REFRESH_EVERY;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(next) => {}
                    changed = redis_up.changed() => {
                        if changed.is_err() {
                            // The hub is gone: the process is stopping.
                            return;
                        }
                        // Every gateway sees Redis return at once: spread their
                        // re-registrations over a second rather than land together.
                        let jitter = rand::thread_rng().gen_range(0.0..1.0);
                        tokio::time::sleep(RETRY_EVERY.mul_f64(jitter)).await;
                    }
                }
                next = Instant::now()
                    + if renewer.renew_all().await {
                        presence::REFRESH_EVERY
                    } else {
                        RETRY_EVERY
                    };
            }
        });
        presence
    }

    fn entries(&self) -> Vec<(UserId, String)> {
        let local = self
            .local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        local
            .iter()
            .map(|(conn, user)| (*user, conn.to_string()))
            .collect()
    }

    /// Renews every entry; whether that worked.
    async fn renew_all(&self) -> bool {
        let entries = self.entries();
        if entries.is_empty() {
            return true;
        }
        let refs: Vec<(UserId, &str)> = entries.iter().map(|(u, c)| (*u, c.as_str())).collect();
        match presence::renew(&self.redis, &refs).await {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(error = %e, "presence renewal failed; retrying shortly");
                false
            }
        }
    }

    pub async fn connected(&self, user: UserId, connection: Uuid) {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(connection, user);
        let connection = connection.to_string();
        if let Err(e) = presence::renew(&self.redis, &[(user, connection.as_str())]).await {
            tracing::warn!(error = %e, "marking a user online failed");
        }
    }

    pub async fn disconnected(&self, user: UserId, connection: Uuid) {
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&connection);
        if let Err(e) = presence::remove(&self.redis, user, &connection.to_string()).await {
            tracing::warn!(error = %e, "marking a user offline failed");
        }
    }
}
