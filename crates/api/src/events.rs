//! Publishing events to the gateways, after the commit that made them true.
//!
//! A publish that fails (Redis down) loses nothing: the data is in PostgreSQL, a
//! gateway that sees the next offset fills the gap from there, a gateway that
//! reconnects to Redis catches up every channel it serves, and a client that
//! reconnects resubscribes with `since`. The failure is logged and counted in
//! `events_published_total{outcome="failed"}`.
//!
//! A revocation ([`revoke`]) is published the same way: every gateway holding a socket
//! of the session closes it within moments. Should the publish be lost, each gateway
//! also checks its sockets' sessions against PostgreSQL every
//! `WS_SESSION_CHECK_SECONDS`.

use mobile_domain::UserId;
use mobile_events::{Channel, Revoke};

use crate::{metrics::OutcomeLabel, state::AppState};

/// Publishes `frames` (channel, frame) in one pipelined round trip.
pub async fn publish(state: &AppState, frames: &[(Channel, String)]) {
    if frames.is_empty() {
        return;
    }
    let result = mobile_events::publish(&state.redis, frames).await;
    let outcome = match result {
        Ok(()) => "ok",
        Err(e) => {
            tracing::warn!(error = %e, count = frames.len(), "publishing events failed; gateways will catch up from PostgreSQL");
            "failed"
        }
    };
    let count = u64::try_from(frames.len()).unwrap_or(u64::MAX);
    state
        .metrics
        .events_published
        .get_or_create(&OutcomeLabel { outcome })
        .inc_by(count);
}

/// Tells the gateways that sessions of `user` ended, after the commit that ended them.
/// Every cause of a revocation (logout, refresh-token reuse, and whatever ends
/// sessions later) goes through here.
pub async fn revoke(state: &AppState, user: UserId, revoke: Revoke) {
    publish(state, &[mobile_events::revocation(user, revoke)]).await;
}
