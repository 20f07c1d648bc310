//! Rate limits in Redis, shared by every API replica.
//!
//! The algorithm is GCRA (the generic cell rate algorithm): one key per subject holding
//! a "theoretical arrival time". It allows a burst of `limit` requests, then one every
//! `60 s / limit`, needs one round-trip, and stores one integer. The clock is Redis's
//! own (`TIME`), so replicas with skewed clocks agree.
//!
//! If Redis does not answer, the request goes through (fail open) and
//! `redis_degraded_total{feature="rate_limit"}` counts it: losing rate limiting for a
//! while is better than losing the API.

use std::{sync::LazyLock, time::Duration};

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};

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
            let ip = client_ip(&parts, state.settings.trusted_proxy_hops)
                .map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
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
    match check(&state, &bucket, per_minute).await {
        Ok(None) => next.run(Request::from_parts(parts, body)).await,
        Ok(Some(wait)) => {
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
        Err(e) => {
            tracing::warn!(error = %e, "rate limiter unavailable; allowing the request");
            state
                .metrics
                .redis_degraded
                .get_or_create(&FeatureLabel {
                    feature: "rate_limit",
                })
                .inc();
            next.run(Request::from_parts(parts, body)).await
        }
    }
}

/// `None` when allowed, or how long until the next request would be.
async fn check(
    state: &AppState,
    bucket: &str,
    per_minute: u32,
) -> Result<Option<Duration>, redis::RedisError> {
    let interval_ms = 60_000 / u64::from(per_minute.max(1));
    let tolerance_ms = interval_ms * u64::from(per_minute);
    let wait_ms: u64 = GCRA
        .key(state.redis.key(bucket))
        .arg(interval_ms)
        .arg(tolerance_ms)
        .invoke_async(&mut state.redis.conn())
        .await?;
    Ok((wait_ms > 0).then(|| Duration::from_millis(wait_ms)))
}
