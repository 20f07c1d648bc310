//! Failed sign-ins, counted per account as well as per address.
//!
//! The per-IP auth limit (`RATE_LIMIT_AUTH_PER_MINUTE`) bounds what one address can
//! try across all accounts. This bounds what is tried against one account:
//!
//! - from one address: after `LOGIN_FAILURES_PER_ADDRESS` failures on an account
//!   within `LOGIN_FAILURE_WINDOW_SECONDS`, that address's attempts on that account are
//!   refused (429 with `Retry-After`) until the window ends. The account's owner,
//!   signing in from anywhere else, is not affected. (An IPv6 address counts by its
//!   /64; a client whose address the proxies could not tell is never refused by this
//!   rule, since all such clients share one bucket.)
//! - from everywhere: once an account has `LOGIN_SLOWDOWN_AFTER_FAILURES` failures in
//!   the window, every attempt on it waits before its password is checked, 1 s, then
//!   doubling per further failure, up to `LOGIN_MAX_DELAY_SECONDS`. Slowed, never
//!   refused: an attacker spraying guesses from many addresses cannot lock the owner
//!   out, only make their sign-in slower.
//!
//! Unknown emails are counted like known ones (the answer must not say which exist).
//! Keys hold a hash of the email, never the email; each has the window as its TTL, and
//! how many there can be is bounded by the auth rate limit. If Redis cannot keep the
//! counts, sign-in goes on under the per-IP limit alone (which holds in-process then)
//! and `redis_degraded_total{feature="login_guard"}` counts it.

use std::{sync::LazyLock, time::Duration};

use mobile_domain::Email;
use mobile_runtime::{client_ip::ClientIp, redis::Feature};
use sha2::{Digest as _, Sha256};

use crate::{
    error::ApiError,
    metrics::{ActionLabel, FeatureLabel},
    state::AppState,
};

/// The guard's settings.
#[derive(Debug, Clone)]
pub struct LoginGuardSettings {
    /// `LOGIN_FAILURE_WINDOW_SECONDS` (900): how long a failure counts.
    pub window: Duration,
    /// `LOGIN_SLOWDOWN_AFTER_FAILURES` (5): an account's failures before attempts on
    /// it are slowed.
    pub slowdown_after: u32,
    /// `LOGIN_MAX_DELAY_SECONDS` (10): the longest wait.
    pub max_delay: Duration,
    /// `LOGIN_FAILURES_PER_ADDRESS` (10): one address's failures on one account before
    /// it is refused for the rest of the window.
    pub per_address: u32,
}

/// The Redis keys of an attempt: the account's, and the account-and-address pair's.
struct Keys {
    account: String,
    pair: String,
}

impl Keys {
    fn new(state: &AppState, email: &Email, ip: ClientIp) -> Self {
        let account = hex::encode(&Sha256::digest(email.as_str().as_bytes())[..16]);
        let ip = ip.subject();
        Self {
            pair: state.redis.key(format_args!("login:pair:{account}:{ip}")),
            account: state.redis.key(format_args!("login:account:{account}")),
        }
    }
}

/// Before checking a password: refuses an address that failed too often on this
/// account, or waits as long as the account's failures say.
pub async fn before_attempt(state: &AppState, email: &Email, ip: ClientIp) -> Result<(), ApiError> {
    let settings = &state.settings.login_guard;
    let keys = Keys::new(state, email, ip);
    let counts: Result<(Option<u32>, Option<u32>, i64), _> = redis::pipe()
        .get(&keys.account)
        .get(&keys.pair)
        .pttl(&keys.pair)
        .query_async(&mut state.redis.conn(Feature::LoginGuard))
        .await;
    let (account, pair, pair_ttl_ms) = match counts {
        Ok(counts) => counts,
        Err(e) => {
            degraded(state, &e);
            return Ok(());
        }
    };
    if pair.unwrap_or(0) >= settings.per_address && ip != ClientIp::Unknown {
        count(state, "refused");
        let seconds = u64::try_from(pair_ttl_ms)
            .unwrap_or(1)
            .div_ceil(1000)
            .max(1);
        return Err(ApiError::rate_limited(seconds)
            .detail("too many failed sign-ins on this account from this address; retry later"));
    }
    let delay = delay(settings, account.unwrap_or(0));
    if !delay.is_zero() {
        count(state, "delayed");
        tokio::time::sleep(delay).await;
    }
    Ok(())
}

/// How long an attempt on an account with `failures` recent failures waits.
fn delay(settings: &LoginGuardSettings, failures: u32) -> Duration {
    let Some(beyond) = failures.checked_sub(settings.slowdown_after) else {
        return Duration::ZERO;
    };
    Duration::from_secs(1u64 << beyond.min(20)).min(settings.max_delay)
}

/// Counts one failure on a key, giving a new count the window as its TTL in the same
/// step (a count must never outlive its window: `INCR` alone on a key that just
/// expired would make one that never does).
static COUNT_FAILURE: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"
for _, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 or redis.call('TTL', key) < 0 then
    redis.call('EXPIRE', key, ARGV[1])
  end
end
return 0
",
    )
});

/// After a wrong password (or an unknown email).
pub async fn failed(state: &AppState, email: &Email, ip: ClientIp) {
    let keys = Keys::new(state, email, ip);
    let window = state.settings.login_guard.window.as_secs();
    let counted: Result<i64, _> = COUNT_FAILURE
        .key(&keys.account)
        .key(&keys.pair)
        .arg(window)
        .invoke_async(&mut state.redis.conn(Feature::LoginGuard))
        .await;
    if let Err(e) = counted {
        degraded(state, &e);
    }
}

/// After a sign-in: this address's failures on the account are forgiven (the
/// account's own count stays, as an attack on it may go on).
pub async fn succeeded(state: &AppState, email: &Email, ip: ClientIp) {
    let keys = Keys::new(state, email, ip);
    let cleared: Result<(), _> = redis::cmd("DEL")
        .arg(&keys.pair)
        .query_async(&mut state.redis.conn(Feature::LoginGuard))
        .await;
    if let Err(e) = cleared {
        degraded(state, &e);
    }
}

fn count(state: &AppState, action: &'static str) {
    state
        .metrics
        .login_throttled
        .get_or_create(&ActionLabel { action })
        .inc();
}

fn degraded(state: &AppState, error: &redis::RedisError) {
    tracing::warn!(%error, "Redis cannot keep failed sign-ins");
    state
        .metrics
        .redis_degraded
        .get_or_create(&FeatureLabel {
            feature: "login_guard",
        })
        .inc();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_delay_doubles_from_the_threshold_up_to_the_cap() {
        let settings = LoginGuardSettings {
            window: Duration::from_secs(900),
            slowdown_after: 5,
            max_delay: Duration::from_secs(10),
            per_address: 10,
        };
        let delays: Vec<u64> = (0..12).map(|f| delay(&settings, f).as_secs()).collect();
        assert_eq!(delays, [0, 0, 0, 0, 0, 1, 2, 4, 8, 10, 10, 10]);
        assert_eq!(delay(&settings, u32::MAX), Duration::from_secs(10));
    }
}
