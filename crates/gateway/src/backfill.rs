//! Reading a conversation's events back from PostgreSQL (its messages and its other
//! events, merged in offset order): the one way the gateway gets
//! what Redis did not bring, for the hub's fills and for a subscriber's recovery with
//! `since`. The frames are encoded exactly as the API encodes them when it publishes,
//! so a client cannot tell a recovered event from a live one.

use std::{ops::RangeInclusive, sync::Arc};

use mobile_db::Db;
use mobile_db::conversations;
use mobile_events::Channel;

use crate::hub::Delivery;

/// Events read per query.
const CHUNK: i64 = 1_000;

/// The events of `channel` with offsets in `range` that PostgreSQL has, in order.
/// Channels without offsets have nothing to read.
pub async fn read(
    db: &Db,
    channel: Channel,
    range: RangeInclusive<i64>,
) -> Result<Vec<Arc<Delivery>>, sqlx::Error> {
    let Channel::Conversation(conversation) = channel else {
        return Ok(Vec::new());
    };
    let (from, to) = (*range.start(), *range.end());
    let mut deliveries = Vec::new();
    let mut after = from.saturating_sub(1).max(0);
    while after < to {
        let limit = (to - after).min(CHUNK);
        let page = conversations::list_events(db, conversation, after, to, limit).await?;
        let Some(last) = page.last().map(|event| event.seq) else {
            break;
        };
        after = last;
        deliveries.extend(
            page.into_iter()
                .map(|event| Arc::new(Delivery::from_event(conversation, event))),
        );
    }
    Ok(deliveries)
}
