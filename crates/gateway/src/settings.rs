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
        ] {
            if value == 0 {
                return Err(SettingsError::new(name, "must be at least 1"));
            }
        }
        if settings.max_frame_bytes < 1024 {
            return Err(SettingsError::new(
                "WS_MAX_FRAME_BYTES",
                "must be at least 1024",
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
