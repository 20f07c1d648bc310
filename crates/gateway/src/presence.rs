//! This process's share of presence: which users have a connection here, renewed in
//! Redis so they count as online (see `mobile_events::presence`).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use mobile_domain::UserId;
use mobile_events::presence;
use mobile_runtime::redis::Redis;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

#[derive(Debug, Clone)]
pub struct Presence {
    redis: Redis,
    /// connection id → user, for the periodic renewal (ids as numbers: one entry per
    /// open connection, so its size counts).
    local: Arc<Mutex<HashMap<Uuid, UserId>>>,
}

impl Presence {
    /// Creates the tracker and its renewal task, which stops with `stop`.
    pub fn start(redis: Redis, stop: CancellationToken) -> Self {
        let presence = Self {
            redis,
            local: Arc::default(),
        };
        let renewer = presence.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(presence::REFRESH_EVERY);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => renewer.renew_all().await,
                }
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

    async fn renew_all(&self) {
        let entries = self.entries();
        let refs: Vec<(UserId, &str)> = entries.iter().map(|(u, c)| (*u, c.as_str())).collect();
        if let Err(e) = presence::renew(&self.redis, &refs).await {
            tracing::warn!(error = %e, "presence renewal failed");
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
