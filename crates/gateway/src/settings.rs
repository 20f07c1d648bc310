//! `mobile-gateway`'s settings: the common ones plus token verification and limits.

use std::{path::PathBuf, time::Duration};

use mobile_auth::TokenConfig;
use mobile_runtime::{CommonSettings, Defaults, Env, SettingsError};

#[derive(Debug, Clone)]
pub struct GatewaySettings {
    pub common: CommonSettings,
    /// `JWT_VERIFY_KEYS_FILE` (the public keys access tokens may be signed with;
    /// required unless `APP_ENV=development`, then the development key's public half),
    /// `JWT_ISSUER`, `JWT_AUDIENCE` and `ACCESS_TOKEN_TTL_SECONDS` (default 900: a
    /// token living longer is refused), as the API issues.
    pub tokens: TokenConfig,
    /// `PING_INTERVAL_SECONDS` (default 25): server pings; two unanswered drop the client.
    pub ping_interval: Duration,
    /// `WS_MAX_FRAME_BYTES` (default 16384): the largest message a client may send.
    pub max_frame_bytes: usize,
    /// `WS_MAX_CHANNELS` (default 100): subscriptions per connection.
    pub max_channels: usize,
    /// `WS_OUTBOUND_QUEUE` (default 256): frames queued for one client before it counts
    /// as too slow and is closed with 4008.
    pub outbound_queue: usize,
    /// `WS_MAX_CONNECTIONS` (default 50000): connections per process; beyond, 503.
    pub max_connections: usize,
    /// `WS_RECOVERY_LIMIT` (default 1000): the most missed messages replayed on a
    /// subscribe with `since`; further behind, `recovered: false` and the app pages
    /// through REST instead.
    pub recovery_limit: i64,
    /// `WS_PUBLISH_PER_SECOND` (default 10): ephemeral publishes per connection.
    pub publish_per_second: u32,
    /// `WS_SUBSCRIBES_PER_SECOND` (default 10): subscribes per user (all their sockets
    /// on this process), after a burst of twice `WS_MAX_CHANNELS` (a few devices
    /// subscribing to their conversations at start). Each costs PostgreSQL a query.
    pub subscribes_per_second: u32,
    /// `WS_RECOVERY_BUDGET_PER_MINUTE` (default 10000): events a user may have replayed
    /// from PostgreSQL (subscribes with `since`) per minute on this process; beyond, a
    /// subscribe with `since` is refused with `recovery_limited` until the budget
    /// refills. At least `WS_RECOVERY_LIMIT`, or some recoveries could never happen.
    pub recovery_budget_per_minute: u32,
    /// `WS_MAX_CONNECTIONS_PER_USER` (default 10): sockets one user may hold on this
    /// process (a user has a few devices); beyond, the upgrade is 429.
    pub max_connections_per_user: usize,
    /// `WS_MAX_CONNECTIONS_PER_IP` (default 0: off): sockets one client address may
    /// hold on this process. Off by default: carriers put thousands of phones behind
    /// one address (CGNAT), and behind a proxy without `TRUSTED_PROXY_HOPS` every
    /// client has the proxy's.
    pub max_connections_per_ip: usize,
    /// `TRUSTED_PROXY_HOPS` (default 0): as the API's; says which address is the
    /// client's for `WS_MAX_CONNECTIONS_PER_IP`.
    pub trusted_proxy_hops: usize,
    /// `WS_SESSION_CHECK_SECONDS` (default 30): how often the sessions of open sockets
    /// are checked against PostgreSQL, in case a revocation's Redis message was lost.
    pub session_check_interval: Duration,
    /// `WS_SLOW_CONSUMER_GRACE_SECONDS` (default 10): how long a client marked slow
    /// has to take what is in flight and its 4008 close before the socket is dropped.
    pub slow_consumer_grace: Duration,
    /// `WS_USER_CHANNEL_HOLD_MS` (default 2000; 0: no hold): how long a new
    /// connection holds its own `user:` channel's live events back, waiting for the
    /// app to resubscribe that channel with `since` so that the replay comes first.
    /// The app's first frame of any other kind, or this time passing, ends the hold.
    /// At most 60000: an app that never resubscribes waits this long for its news.
    pub user_channel_hold: Duration,
    /// `WS_WRITE_COALESCE_MS` (default 10; 0: off): how long a connection that is
    /// behind (it found four or more frames to write) waits for more before writing them
    /// in one socket write; one that finds fewer writes at once. What arrives during
    /// the wait must fit in `WS_OUTBOUND_QUEUE` (at the defaults, a connection would
    /// need over 25 000 frames a second to overflow it). At most 1000.
    pub write_coalesce: Duration,
}

impl GatewaySettings {
    pub const DEFAULTS: Defaults = Defaults {
        listen_addr: "0.0.0.0:8081",
        metrics_addr: "0.0.0.0:9091",
        max_connections: 60_000,
    };

    pub fn from_env(env: &Env) -> Result<Self, SettingsError> {
        let common = CommonSettings::from_env(env, &Self::DEFAULTS)?;
        let settings = Self {
            tokens: TokenConfig {
                signing_key_file: None,
                verify_keys_file: env.optional("JWT_VERIFY_KEYS_FILE").map(PathBuf::from),
                issuer: env.string("JWT_ISSUER", TokenConfig::DEFAULT_ISSUER),
                audience: env.string("JWT_AUDIENCE", TokenConfig::DEFAULT_AUDIENCE),
                ttl: env.seconds("ACCESS_TOKEN_TTL_SECONDS", 900)?,
                development: common.app_env.is_development(),
            },
            common,
            ping_interval: env.seconds("PING_INTERVAL_SECONDS", 25)?,
            max_frame_bytes: env.parse("WS_MAX_FRAME_BYTES", 16 * 1024)?,
            max_channels: env.parse("WS_MAX_CHANNELS", 100)?,
            outbound_queue: env.parse("WS_OUTBOUND_QUEUE", 256)?,
            max_connections: env.parse("WS_MAX_CONNECTIONS", 50_000)?,
            recovery_limit: env.parse("WS_RECOVERY_LIMIT", 1_000)?,
            publish_per_second: env.parse("WS_PUBLISH_PER_SECOND", 10)?,
            subscribes_per_second: env.parse("WS_SUBSCRIBES_PER_SECOND", 10)?,
            recovery_budget_per_minute: env.parse("WS_RECOVERY_BUDGET_PER_MINUTE", 10_000)?,
            max_connections_per_user: env.parse("WS_MAX_CONNECTIONS_PER_USER", 10)?,
            max_connections_per_ip: env.parse("WS_MAX_CONNECTIONS_PER_IP", 0)?,
            trusted_proxy_hops: env.parse("TRUSTED_PROXY_HOPS", 0)?,
            session_check_interval: env.seconds("WS_SESSION_CHECK_SECONDS", 30)?,
            slow_consumer_grace: env.seconds("WS_SLOW_CONSUMER_GRACE_SECONDS", 10)?,
            user_channel_hold: Duration::from_millis(env.parse("WS_USER_CHANNEL_HOLD_MS", 2_000)?),
            write_coalesce: Duration::from_millis(env.parse("WS_WRITE_COALESCE_MS", 10)?),
        };
        for (name, value) in [
            ("ACCESS_TOKEN_TTL_SECONDS", settings.tokens.ttl.as_secs()),
            ("PING_INTERVAL_SECONDS", settings.ping_interval.as_secs()),
            ("WS_MAX_CHANNELS", settings.max_channels as u64),
            ("WS_OUTBOUND_QUEUE", settings.outbound_queue as u64),
            ("WS_MAX_CONNECTIONS", settings.max_connections as u64),
            (
                "WS_PUBLISH_PER_SECOND",
                u64::from(settings.publish_per_second),
            ),
            (
                "WS_SUBSCRIBES_PER_SECOND",
                u64::from(settings.subscribes_per_second),
            ),
            (
                "WS_RECOVERY_BUDGET_PER_MINUTE",
                u64::from(settings.recovery_budget_per_minute),
            ),
            (
                "WS_MAX_CONNECTIONS_PER_USER",
                settings.max_connections_per_user as u64,
            ),
            (
                "WS_SESSION_CHECK_SECONDS",
                settings.session_check_interval.as_secs(),
            ),
            (
                "WS_SLOW_CONSUMER_GRACE_SECONDS",
                settings.slow_consumer_grace.as_secs(),
            ),
        ] {
            if value == 0 {
                return Err(SettingsError::new(name, "must be at least 1"));
            }
        }
        for (name, value, most) in [
            (
                "WS_USER_CHANNEL_HOLD_MS",
                settings.user_channel_hold,
                60_000,
            ),
            ("WS_WRITE_COALESCE_MS", settings.write_coalesce, 1_000),
        ] {
            if value > Duration::from_millis(most) {
                return Err(SettingsError::new(name, format!("must be at most {most}")));
            }
        }
        if settings.max_frame_bytes < 1024 {
            return Err(SettingsError::new(
                "WS_MAX_FRAME_BYTES",
                "must be at least 1024",
            ));
        }
        if i64::from(settings.recovery_budget_per_minute) < settings.recovery_limit {
            return Err(SettingsError::new(
                "WS_RECOVERY_BUDGET_PER_MINUTE",
                "must be at least WS_RECOVERY_LIMIT",
            ));
        }
        if settings.recovery_limit < 1 {
            return Err(SettingsError::new(
                "WS_RECOVERY_LIMIT",
                "must be at least 1",
            ));
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_budget_below_one_recovery_is_refused() {
        let env = |budget: &str| {
            Env::from_pairs([
                ("APP_ENV", "development"),
                ("WS_RECOVERY_LIMIT", "1000"),
                ("WS_RECOVERY_BUDGET_PER_MINUTE", budget),
            ])
        };
        assert!(GatewaySettings::from_env(&env("1000")).is_ok());
        let error = GatewaySettings::from_env(&env("999")).unwrap_err();
        assert_eq!(error.name, "WS_RECOVERY_BUDGET_PER_MINUTE");
    }

    /// The two settings in milliseconds: 0 allowed, their defaults, their maximums,
    /// and nothing else.
    #[test]
    fn the_millisecond_settings_have_defaults_and_maximums() {
        type Field = fn(&GatewaySettings) -> Duration;
        let cases: [(&str, Field, u64, u64); 2] = [
            (
                "WS_USER_CHANNEL_HOLD_MS",
                |s| s.user_channel_hold,
                2_000,
                60_000,
            ),
            ("WS_WRITE_COALESCE_MS", |s| s.write_coalesce, 10, 1_000),
        ];
        for (name, field, default, most) in cases {
            let with = |ms: &str| {
                GatewaySettings::from_env(&Env::from_pairs([
                    ("APP_ENV", "development"),
                    (name, ms),
                ]))
                .map(|settings| field(&settings))
            };
            assert_eq!(with("0").unwrap(), Duration::ZERO, "{name}");
            assert_eq!(
                with(&most.to_string()).unwrap(),
                Duration::from_millis(most)
            );
            let unset = GatewaySettings::from_env(&Env::from_pairs([("APP_ENV", "development")]));
            assert_eq!(
                field(&unset.unwrap()),
                Duration::from_millis(default),
                "{name}"
            );
            assert_eq!(with(&(most + 1).to_string()).unwrap_err().name, name);
            assert_eq!(with("2s").unwrap_err().name, name);
        }
    }
}
