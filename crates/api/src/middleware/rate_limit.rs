//! Rate limits in Redis, shared by every API replica.
//!
//! The algorithm is GCRA (the generic cell rate algorithm): one key per subject holding
//! a "theoretical arrival time". It allows a burst of `limit` requests, then one every
//! `60 s / limit`, needs one round-trip, and stores one integer with a TTL of at most
//! a minute. The clock is Redis's own (`TIME`), so replicas with skewed clocks agree.
//! Limits are whole milliseconds apart, so a limit is at most 60 000 a minute (the
//! settings refuse more).
//!
//! The same algorithm also runs in this process ([`LocalLimits`]), on every request it
//! limits: a request needs room in both. The local count is never the stricter of the
//! two while Redis works (a replica sees a share of the traffic), but it is the one
//! that holds when Redis does not answer or refuses the write (full, with
//! `noeviction`), and it holds across Redis answering one request and failing the
//! next. The limit is then per replica instead of per deployment, looser by the
//! replica count but never open, so an attacker who can fill Redis cannot switch the
//! auth limit off. `redis_degraded_total{feature="rate_limit"}` counts the requests
//! Redis could not check.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex, PoisonError},
    time::{Duration, Instant},
};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use mobile_runtime::redis::Feature;

use crate::{
    error::ApiError,
    extract::{Authentication, client_ip},
    metrics::{FeatureLabel, RouteLabel},
    state::AppState,
};

/// Allows the request if the bucket has room (returns 0), else returns how many
/// milliseconds until it would. KEYS[1]: the bucket; ARGV: emission interval and burst
/// tolerance, in milliseconds. Loaded once per process; sent by SHA after the first call.
static GCRA: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GCRA_LUA));

const GCRA_LUA: &str = r"
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) * 1000 + math.floor(tonumber(now_parts[2]) / 1000)
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
local new_tat = tat + interval
local allow_at = new_tat - tolerance
if allow_at > now then
  return allow_at - now
end
redis.call('SET', KEYS[1], new_tat, 'PX', new_tat - now)
return 0
";

/// One step of GCRA on a theoretical arrival time `tat` (milliseconds): the new TAT if
/// a request at `now` is allowed, else how many milliseconds until one would be. The
/// Lua script above is this function, run inside Redis.
fn gcra(tat: u64, now: u64, interval: u64, tolerance: u64) -> Result<u64, u64> {
    let new_tat = tat.max(now) + interval;
    let allow_at = new_tat.saturating_sub(tolerance);
    if allow_at > now {
        Err(allow_at - now)
    } else {
        Ok(new_tat)
    }
}

/// A limit: a burst of `limit`, refilled evenly over `period`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub limit: u32,
    pub period: Duration,
}

impl Rate {
    pub const fn per_minute(limit: u32) -> Self {
        Self {
            limit,
            period: Duration::from_secs(60),
        }
    }

    pub const fn per_hour(limit: u32) -> Self {
        Self {
            limit,
            period: Duration::from_secs(3_600),
        }
    }
}

/// A limit as GCRA's emission interval and burst tolerance, in milliseconds (at least
/// one millisecond apart: a limit never opens).
fn cell(rate: Rate) -> (u64, u64) {
    let period_ms = u64::try_from(rate.period.as_millis()).unwrap_or(u64::MAX / 2);
    let limit = u64::from(rate.limit.max(1));
    let interval_ms = (period_ms / limit).max(1);
    (interval_ms, interval_ms * limit)
}

/// The rate limits of this process alone, for when Redis cannot keep them.
#[derive(Debug)]
pub struct LocalLimits {
    started: Instant,
    buckets: Mutex<Buckets>,
}

#[derive(Debug, Default)]
struct Buckets {
    tats: HashMap<String, u64>,
    /// When (ms) full buckets were last swept of the expired.
    swept: u64,
}

impl LocalLimits {
    /// Subjects tracked at most (about 100 bytes each). Beyond, after a sweep of the
    /// expired, a new subject is refused: an attacker with this many addresses in a
    /// minute is a flood for the load balancer, and refusing is the safe side.
    pub const CAPACITY: usize = 100_000;

    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            buckets: Mutex::new(Buckets::default()),
        }
    }

    /// `None` when allowed, or how long until the next request would be.
    pub fn check(&self, bucket: &str, rate: Rate) -> Option<Duration> {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX / 2);
        let (interval, tolerance) = cell(rate);
        let mut buckets = self.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if buckets.tats.len() >= Self::CAPACITY && !buckets.tats.contains_key(bucket) {
            // A sweep at most once a second, so a flood of new subjects does not make
            // every request walk the whole table.
            if now.saturating_sub(buckets.swept) >= 1_000 {
                buckets.tats.retain(|_, tat| *tat > now);
                buckets.swept = now;
            }
            if buckets.tats.len() >= Self::CAPACITY {
                return Some(Duration::from_secs(1));
            }
        }
        let tat = buckets.tats.get(bucket).copied().unwrap_or(now);
        match gcra(tat, now, interval, tolerance) {
            Ok(new_tat) => {
                buckets.tats.insert(bucket.to_owned(), new_tat);
                None
            }
            Err(wait) => Some(Duration::from_millis(wait)),
        }
    }
}

impl Default for LocalLimits {
    fn default() -> Self {
        Self::new()
    }
}

/// Which limit a route group is under.
#[derive(Debug, Clone, Copy)]
pub enum Class {
    /// Register, login, refresh, logout: per client IP, every method.
    Auth,
    /// Writes by a signed-in user (POST, PUT, PATCH, DELETE): per user.
    Write,
}

pub async fn limit(
    State((state, class)): State<(AppState, Class)>,
    req: Request,
    next: Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let (bucket, per_minute) = match class {
        Class::Auth => {
            let ip = client_ip(&parts, state.settings.trusted_proxy_hops).subject();
            (
                format!("rl:auth:{ip}"),
                state.settings.rate_limit_auth_per_minute,
            )
        }
        Class::Write => {
            let writes = !(parts.method.is_safe());
            match parts.extensions.get::<Authentication>() {
                Some(Authentication::Valid(claims)) if writes => (
                    format!("rl:write:{}", claims.sub),
                    state.settings.rate_limit_write_per_minute,
                ),
                // Reads are not limited here; the unauthenticated get their 401 below.
                _ => return next.run(Request::from_parts(parts, body)).await,
            }
        }
    };
    let verdict = allow(&state, &bucket, Rate::per_minute(per_minute)).await;
    match verdict {
        None => next.run(Request::from_parts(parts, body)).await,
        Some(wait) => {
            let route = parts
                .extensions
                .get::<MatchedPath>()
                .map_or("unmatched", MatchedPath::as_str)
                .to_owned();
            state
                .metrics
                .rate_limited
                .get_or_create(&RouteLabel { route })
                .inc();
            ApiError::rate_limited(wait.as_secs_f64().ceil().max(1.0) as u64).into_response()
        }
    }
}

/// Takes one request from `bucket` if it has room: `None` when allowed, or how long
/// until the next request would be. The bucket is counted in Redis, for every replica,
/// and in this process, which holds alone when Redis cannot count (see the module).
pub async fn allow(state: &AppState, bucket: &str, rate: Rate) -> Option<Duration> {
    if let Some(wait) = state.local_limits.check(bucket, rate) {
        return Some(wait);
    }
    match check(state, bucket, rate).await {
        Ok(verdict) => verdict,
        Err(e) => {
            tracing::warn!(error = %e, "Redis cannot keep the rate limit; this process keeps it");
            state
                .metrics
                .redis_degraded
                .get_or_create(&FeatureLabel {
                    feature: "rate_limit",
                })
                .inc();
            // Allowed by this process's count, which is all there is now.
            None
        }
    }
}

/// `None` when allowed, or how long until the next request would be.
async fn check(
    state: &AppState,
    bucket: &str,
    rate: Rate,
) -> Result<Option<Duration>, redis::RedisError> {
    let (interval_ms, tolerance_ms) = cell(rate);
    let wait_ms: u64 = GCRA
        .key(state.redis.key(bucket))
        .arg(interval_ms)
        .arg(tolerance_ms)
        .invoke_async(&mut state.redis.conn(Feature::RateLimit))
        .await?;
    Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gcra_allows_the_burst_then_one_per_interval() {
        let (interval, tolerance) = cell(Rate::per_minute(3));
        assert_eq!((interval, tolerance), (20_000, 60_000));
        let mut tat = 0;
        for _ in 0..3 {
            tat = gcra(tat, 0, interval, tolerance).unwrap();
        }
        assert_eq!(gcra(tat, 0, interval, tolerance), Err(20_000));
        assert_eq!(gcra(tat, 19_999, interval, tolerance), Err(1));
        assert!(gcra(tat, 20_000, interval, tolerance).is_ok());
    }

    #[test]
    fn the_highest_limit_still_limits() {
        // 60 000 a minute: one a millisecond, never a zero interval.
        let (interval, tolerance) = cell(Rate::per_minute(60_000));
        assert_eq!(interval, 1);
        let mut tat = 0;
        for _ in 0..60_000 {
            tat = gcra(tat, 0, interval, tolerance).unwrap();
        }
        assert!(gcra(tat, 0, interval, tolerance).is_err());
    }

    #[test]
    fn local_limits_keep_each_subject_apart() {
        let limits = LocalLimits::new();
        let rate = Rate::per_minute(2);
        assert_eq!(limits.check("a", rate), None);
        assert_eq!(limits.check("a", rate), None);
        assert!(limits.check("a", rate).is_some());
        assert_eq!(limits.check("b", rate), None);
    }
}
