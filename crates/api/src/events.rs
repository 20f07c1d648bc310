//! Publishing events to the gateways, after the commit that made them true.
//!
//! A publish that fails (Redis down) loses nothing: the data is in PostgreSQL, a
//! gateway that sees the next offset fills the gap from there, a gateway that
//! reconnects to Redis catches up every channel it serves, and a client that
//! reconnects resubscribes with `since`. The failure is logged and counted in
//! `events_published_total{outcome="failed"}`.

use mobile_events::Channel;

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
