//! Who is online, kept in Redis by the gateways.
//!
//! Each user has a sorted set `presence:<user>` of their live connections: member the
//! connection id, score the moment (Unix milliseconds) the entry expires. A gateway
//! adds an entry when a client connects, renews all of its entries every
//! [`REFRESH_EVERY`], and removes one when the client leaves; a gateway that dies
//! stops renewing, so its entries lapse within [`TTL`]. A user is online while any entry
//! is unexpired. Losing Redis loses presence, which is fine: the worst outcome is a
//! push to someone who was online anyway.

use std::{
    collections::HashSet,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use mobile_domain::UserId;
use mobile_runtime::redis::{Feature, Redis};
use redis::RedisResult;

/// How long an entry lives without renewal.
pub const TTL: Duration = Duration::from_secs(60);
/// How often a gateway renews its entries: well inside the TTL.
pub const REFRESH_EVERY: Duration = Duration::from_secs(20);

fn key(redis: &Redis, user: UserId) -> String {
    redis.key(format_args!("presence:{user}"))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Marks (or keeps) these connections online for another [`TTL`], in one round trip.
pub async fn renew(redis: &Redis, entries: &[(UserId, &str)]) -> RedisResult<()> {
    if entries.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let expires = now + u64::try_from(TTL.as_millis()).unwrap_or(u64::MAX);
    let mut pipe = redis::pipe();
    for (user, connection) in entries {
        let key = key(redis, *user);
        pipe.zadd(&key, *connection, expires).ignore();
        // Drop entries of connections that died without saying so.
        pipe.zrembyscore(&key, "-inf", now).ignore();
        pipe.expire(&key, i64::try_from(TTL.as_secs()).unwrap_or(60))
            .ignore();
    }
    pipe.query_async(&mut redis.conn(Feature::Presence)).await
}

/// Marks one connection offline.
pub async fn remove(redis: &Redis, user: UserId, connection: &str) -> RedisResult<()> {
    redis::cmd("ZREM")
        .arg(key(redis, user))
        .arg(connection)
        .query_async(&mut redis.conn(Feature::Presence))
        .await
}

/// Which of `users` have at least one live connection, in one round trip.
pub async fn online(redis: &Redis, users: &[UserId]) -> RedisResult<HashSet<UserId>> {
    if users.is_empty() {
        return Ok(HashSet::new());
    }
    let now = now_ms();
    let mut pipe = redis::pipe();
    for user in users {
        pipe.zcount(key(redis, *user), format!("({now}"), "+inf");
    }
    let counts: Vec<u64> = pipe.query_async(&mut redis.conn(Feature::Presence)).await?;
    Ok(users
        .iter()
        .zip(counts)
        .filter(|(_, live)| *live > 0)
        .map(|(user, _)| *user)
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn renew_remove_and_query() {
        let redis = Redis::connect_lazy(
            &mobile_testkit::redis_url(),
            &mobile_testkit::unique_redis_prefix(),
        )
        .unwrap();
        let (ann, bob, eve) = (UserId::new(), UserId::new(), UserId::new());

        renew(&redis, &[(ann, "c1"), (ann, "c2"), (bob, "c3")])
            .await
            .unwrap();
        let online_now = online(&redis, &[ann, bob, eve]).await.unwrap();
        assert_eq!(online_now, HashSet::from([ann, bob]));

        remove(&redis, ann, "c1").await.unwrap();
        assert!(
            online(&redis, &[ann]).await.unwrap().contains(&ann),
            "c2 is still there"
        );
        remove(&redis, ann, "c2").await.unwrap();
        assert!(online(&redis, &[ann]).await.unwrap().is_empty());

        // An entry whose expiry passed counts as offline even before Redis drops the key.
        let _: () = redis::cmd("ZADD")
            .arg(key(&redis, eve))
            .arg(now_ms() - 1)
            .arg("stale")
            .query_async(&mut redis.conn(Feature::Presence))
            .await
            .unwrap();
        assert!(online(&redis, &[eve]).await.unwrap().is_empty());
    }
}
