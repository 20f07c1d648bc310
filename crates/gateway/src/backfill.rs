//! Reading a conversation's events back from PostgreSQL (its messages and its other
//! events, merged in offset order): the one way the gateway gets
//! what Redis did not bring, for the hub's fills and for a subscriber's recovery with
//! `since`. The frames are encoded exactly as the API encodes them when it publishes,
//! so a client cannot tell a recovered event from a live one.

use std::{ops::RangeInclusive, sync::Arc};

use mobile_db::Db;
use mobile_db::{conversations, user_events};
use mobile_domain::UserId;
use mobile_events::Channel;

use crate::hub::Delivery;

/// Events read per query.
const CHUNK: i64 = 1_000;

/// The events of `channel` with offsets in `range` that PostgreSQL has, in order: a
/// conversation's, or a user's log.
pub async fn read(
    db: &Db,
    channel: Channel,
    range: RangeInclusive<i64>,
) -> Result<Vec<Arc<Delivery>>, sqlx::Error> {
    let conversation = match channel {
        Channel::Conversation(conversation) => conversation,
        Channel::User(user) => return read_user(db, user, range).await,
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

/// The events of a user's log with offsets in `range` that PostgreSQL still has.
async fn read_user(
    db: &Db,
    user: UserId,
    range: RangeInclusive<i64>,
) -> Result<Vec<Arc<Delivery>>, sqlx::Error> {
    let (from, to) = (*range.start(), *range.end());
    let mut deliveries = Vec::new();
    let mut after = from.saturating_sub(1).max(0);
    while after < to {
        let page = user_events::list(db, user, after, to, CHUNK).await?;
        let Some(last) = page.last().map(|event| event.seq) else {
            break;
        };
        after = last;
        deliveries.extend(
            page.iter()
                .map(|event| Arc::new(Delivery::from_user_event(event))),
        );
    }
    Ok(deliveries)
}
