//! `mobile-api`'s settings: the common ones plus auth, limits and rate limits.

use std::{path::PathBuf, time::Duration};

use mobile_auth::TokenConfig;
use mobile_runtime::{CommonSettings, Defaults, Env, SettingsError};

use crate::{
    login_guard::LoginGuardSettings,
    oidc::{Provider, ProviderSettings},
};
use secrecy::{ExposeSecret as _, SecretString};

/// Everything `mobile-api` reads from the environment. README's settings table lists
/// each variable with its default.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    pub common: CommonSettings,
    /// `JWT_SIGNING_KEY_FILE` (Ed25519 PKCS#8 PEM, required unless
    /// `APP_ENV=development`), `JWT_VERIFY_KEYS_FILE` (extra public keys accepted
    /// during a rotation; the signing key's own is always accepted), `JWT_ISSUER`,
    /// `JWT_AUDIENCE`, and `ACCESS_TOKEN_TTL_SECONDS` (default 900, 15 minutes) as
    /// the tokens' lifetime.
    pub tokens: TokenConfig,
    /// `REFRESH_TOKEN_TTL_DAYS` (default 30): a session unused this long ends.
    pub refresh_token_ttl: Duration,
    /// `SESSION_MAX_AGE_DAYS` (default 90): a session ends this long after sign-in,
    /// however often it refreshed.
    pub session_max_age: Duration,
    /// `REQUEST_TIMEOUT_SECONDS` (default 15): a request still running after this gets
    /// 503 `timeout`, and its work is cancelled.
    pub request_timeout: Duration,
    /// `REQUEST_BODY_TIMEOUT_SECONDS` (default 10): a request body (other than an
    /// upload's) still arriving after this gets 408 `body_timeout`. 64 KiB in 10 s is
    /// 52 kbit/s, slower than any phone link that works at all.
    pub request_body_timeout: Duration,
    /// `MAX_BODY_BYTES` (default 65536): the largest JSON body accepted.
    pub max_body_bytes: usize,
    /// `RATE_LIMIT_AUTH_PER_MINUTE` (default 20): auth requests per client IP.
    pub rate_limit_auth_per_minute: u32,
    /// `RATE_LIMIT_WRITE_PER_MINUTE` (default 120): writes per signed-in user.
    pub rate_limit_write_per_minute: u32,
    /// `LOGIN_*`: failed sign-ins per account (`crate::login_guard`).
    pub login_guard: LoginGuardSettings,
    /// `MAIL_PER_ADDRESS_PER_HOUR` (default 5): mails asked for one address (reset,
    /// verification, email change), whoever asks.
    pub mail_per_address_per_hour: u32,
    /// `MAIL_PER_IP_PER_HOUR` (default 30): mails asked for from one client IP.
    pub mail_per_ip_per_hour: u32,
    /// `TRUSTED_PROXY_HOPS` (default 0): how many proxies in front of the API append
    /// to `X-Forwarded-For`. 0 uses the TCP peer address; 1 (behind one ingress) takes
    /// the right-most entry, which the client cannot forge.
    pub trusted_proxy_hops: usize,
    /// `IDEMPOTENCY_TTL_SECONDS` (default 86400): how long a stored response replays.
    pub idempotency_ttl: Duration,
    /// `IDEMPOTENCY_MAX_RESPONSE_BYTES` (default 65536): the largest response body
    /// stored for replay; a larger one is answered but not stored.
    pub idempotency_max_response_bytes: usize,
    /// `STORAGE_URL` (default `file:///var/lib/mobile/media`): where uploads go; the
    /// worker reads them from the same place.
    pub storage_url: String,
    /// `AWS_*`, `GOOGLE_*`, `AZURE_*`: the storage provider's own settings.
    pub storage_options: Vec<(String, String)>,
    /// `MEDIA_MAX_BYTES` (default 20971520, 20 MiB): the largest upload.
    pub media_max_bytes: u64,
    /// Uploads, which phones send over slow links, follow their own clock instead of
    /// `REQUEST_TIMEOUT_SECONDS` (`routes::media`).
    pub upload: UploadPacing,
    /// `MEDIA_MAX_PIXELS` (default 50,000,000): uploads whose header claims more are
    /// refused at once (and the worker checks again before decoding).
    pub media_max_pixels: u64,
    /// `INTERNAL_API_TOKEN`: the bearer token of `/internal/v1/*` (for the app's other
    /// backends). Unset: those endpoints answer 404.
    pub internal_api_token: Option<SecretString>,
    /// Sign in with Apple and Google (`crate::oidc`).
    pub sign_in: SignInSettings,
}

/// Native sign-in with Apple and Google.
#[derive(Debug, Clone)]
pub struct SignInSettings {
    /// `APPLE_CLIENT_IDS` (comma-separated bundle and service ids; unset: Sign in with
    /// Apple is off) and `APPLE_ISSUER` (default `https://appleid.apple.com`).
    pub apple: ProviderSettings,
    /// `GOOGLE_CLIENT_IDS` (comma-separated OAuth client ids of the iOS, Android and web
    /// apps; unset: off) and `GOOGLE_ISSUER` (default `https://accounts.google.com`).
    pub google: ProviderSettings,
    /// `OIDC_CA_FILE`: an extra trusted root (PEM) for the issuers: a private issuer's,
    /// or the tests'.
    pub ca_file: Option<PathBuf>,
    /// `OIDC_JWKS_MIN_REFRESH_SECONDS` (default 60): an id_token signed by a key not in
    /// the cache refetches the issuer's keys at most this often.
    pub jwks_min_refresh: Duration,
    /// `REAUTH_MAX_AGE_SECONDS` (default 300): how recent an id_token must be to
    /// confirm an account's deletion.
    pub reauth_max_age: Duration,
}

fn provider_settings(env: &Env, provider: Provider) -> Result<ProviderSettings, SettingsError> {
    let name = provider.as_str().to_ascii_uppercase();
    let issuer_var = format!("{name}_ISSUER");
    let issuer = env.string(&issuer_var, provider.default_issuer());
    if !issuer.starts_with("https://") {
        return Err(SettingsError::new(&issuer_var, "must be an https:// URL"));
    }
    let client_ids = env
        .optional(&format!("{name}_CLIENT_IDS"))
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|id| !id.is_empty())
        .map(str::to_owned)
        .collect();
    Ok(ProviderSettings { issuer, client_ids })
}

/// How long an upload may take: as long as it keeps moving, up to a ceiling.
#[derive(Debug, Clone, Copy)]
pub struct UploadPacing {
    /// `UPLOAD_MIN_BYTES_PER_SECOND` (default 8192, 64 kbit/s): the slowest an upload
    /// may arrive, judged over each window.
    pub min_bytes_per_second: u64,
    /// `UPLOAD_RATE_WINDOW_SECONDS` (default 30): an upload that brings less than
    /// `min_bytes_per_second` × this in any such window (a stall, a link that died) is
    /// ended with 408 `upload_too_slow`. Long enough for a phone that changes cells.
    pub window: Duration,
    /// `UPLOAD_TIMEOUT_SECONDS` (default 600): the ceiling, however it moves (20 MiB
    /// in 600 s is 280 kbit/s). Below `HTTP_IDLE_TIMEOUT_SECONDS`, and the ingress and
    /// HTTPRoute allow it on `/v1/media`.
    pub timeout: Duration,
}

impl ApiSettings {
    pub const DEFAULTS: Defaults = Defaults {
        listen_addr: "0.0.0.0:8080",
        metrics_addr: "0.0.0.0:9090",
        max_connections: 10_000,
    };

    pub fn from_env(env: &Env) -> Result<Self, SettingsError> {
        let common = CommonSettings::from_env(env, &Self::DEFAULTS)?;
        let settings = Self {
            tokens: TokenConfig {
                signing_key_file: env.optional("JWT_SIGNING_KEY_FILE").map(PathBuf::from),
                verify_keys_file: env.optional("JWT_VERIFY_KEYS_FILE").map(PathBuf::from),
                issuer: env.string("JWT_ISSUER", TokenConfig::DEFAULT_ISSUER),
                audience: env.string("JWT_AUDIENCE", TokenConfig::DEFAULT_AUDIENCE),
                ttl: env.seconds("ACCESS_TOKEN_TTL_SECONDS", 900)?,
                development: common.app_env.is_development(),
            },
            common,
            refresh_token_ttl: env.days("REFRESH_TOKEN_TTL_DAYS", 30)?,
            session_max_age: env.days("SESSION_MAX_AGE_DAYS", 90)?,
            request_timeout: env.seconds("REQUEST_TIMEOUT_SECONDS", 15)?,
            request_body_timeout: env.seconds("REQUEST_BODY_TIMEOUT_SECONDS", 10)?,
            max_body_bytes: env.parse("MAX_BODY_BYTES", 64 * 1024)?,
            rate_limit_auth_per_minute: env.parse("RATE_LIMIT_AUTH_PER_MINUTE", 20)?,
            rate_limit_write_per_minute: env.parse("RATE_LIMIT_WRITE_PER_MINUTE", 120)?,
            login_guard: LoginGuardSettings {
                window: env.seconds("LOGIN_FAILURE_WINDOW_SECONDS", 900)?,
                slowdown_after: env.parse("LOGIN_SLOWDOWN_AFTER_FAILURES", 5)?,
                max_delay: env.seconds("LOGIN_MAX_DELAY_SECONDS", 10)?,
                per_address: env.parse("LOGIN_FAILURES_PER_ADDRESS", 10)?,
            },
            mail_per_address_per_hour: env.parse("MAIL_PER_ADDRESS_PER_HOUR", 5)?,
            mail_per_ip_per_hour: env.parse("MAIL_PER_IP_PER_HOUR", 30)?,
            trusted_proxy_hops: env.parse("TRUSTED_PROXY_HOPS", 0)?,
            idempotency_ttl: env.seconds("IDEMPOTENCY_TTL_SECONDS", 86_400)?,
            idempotency_max_response_bytes: env
                .parse("IDEMPOTENCY_MAX_RESPONSE_BYTES", 64 * 1024)?,
            storage_url: env.string("STORAGE_URL", "file:///var/lib/mobile/media"),
            storage_options: mobile_storage::provider_options(env.iter()),
            media_max_bytes: env.parse("MEDIA_MAX_BYTES", 20 * 1024 * 1024)?,
            upload: UploadPacing {
                min_bytes_per_second: env.parse("UPLOAD_MIN_BYTES_PER_SECOND", 8192)?,
                window: env.seconds("UPLOAD_RATE_WINDOW_SECONDS", 30)?,
                timeout: env.seconds("UPLOAD_TIMEOUT_SECONDS", 600)?,
            },
            media_max_pixels: env.parse("MEDIA_MAX_PIXELS", 50_000_000)?,
            internal_api_token: env
                .optional("INTERNAL_API_TOKEN")
                .filter(|t| !t.is_empty())
                .map(|t| SecretString::from(t.to_owned())),
            sign_in: SignInSettings {
                apple: provider_settings(env, Provider::Apple)?,
                google: provider_settings(env, Provider::Google)?,
                ca_file: env.optional("OIDC_CA_FILE").map(PathBuf::from),
                jwks_min_refresh: env.seconds("OIDC_JWKS_MIN_REFRESH_SECONDS", 60)?,
                reauth_max_age: env.seconds("REAUTH_MAX_AGE_SECONDS", 300)?,
            },
        };
        if let Some(token) = &settings.internal_api_token
            && token.expose_secret().len() < 32
        {
            return Err(SettingsError::new(
                "INTERNAL_API_TOKEN",
                "must be at least 32 characters (e.g. `openssl rand -hex 32`)",
            ));
        }
        for (name, value) in [
            ("ACCESS_TOKEN_TTL_SECONDS", settings.tokens.ttl.as_secs()),
            (
                "REFRESH_TOKEN_TTL_DAYS",
                settings.refresh_token_ttl.as_secs(),
            ),
            ("SESSION_MAX_AGE_DAYS", settings.session_max_age.as_secs()),
            (
                "REQUEST_TIMEOUT_SECONDS",
                settings.request_timeout.as_secs(),
            ),
            (
                "REQUEST_BODY_TIMEOUT_SECONDS",
                settings.request_body_timeout.as_secs(),
            ),
            (
                "RATE_LIMIT_AUTH_PER_MINUTE",
                u64::from(settings.rate_limit_auth_per_minute),
            ),
            (
                "RATE_LIMIT_WRITE_PER_MINUTE",
                u64::from(settings.rate_limit_write_per_minute),
            ),
            (
                "IDEMPOTENCY_TTL_SECONDS",
                settings.idempotency_ttl.as_secs(),
            ),
            ("MEDIA_MAX_BYTES", settings.media_max_bytes),
            (
                "MAIL_PER_ADDRESS_PER_HOUR",
                u64::from(settings.mail_per_address_per_hour),
            ),
            (
                "MAIL_PER_IP_PER_HOUR",
                u64::from(settings.mail_per_ip_per_hour),
            ),
            (
                "LOGIN_FAILURE_WINDOW_SECONDS",
                settings.login_guard.window.as_secs(),
            ),
            (
                "LOGIN_SLOWDOWN_AFTER_FAILURES",
                u64::from(settings.login_guard.slowdown_after),
            ),
            (
                "LOGIN_FAILURES_PER_ADDRESS",
                u64::from(settings.login_guard.per_address),
            ),
            ("MEDIA_MAX_PIXELS", settings.media_max_pixels),
            (
                "UPLOAD_MIN_BYTES_PER_SECOND",
                settings.upload.min_bytes_per_second,
            ),
            (
                "UPLOAD_RATE_WINDOW_SECONDS",
                settings.upload.window.as_secs(),
            ),
            ("UPLOAD_TIMEOUT_SECONDS", settings.upload.timeout.as_secs()),
        ] {
            if value == 0 {
                return Err(SettingsError::new(name, "must be at least 1"));
            }
        }
        for (name, value) in [
            (
                "RATE_LIMIT_AUTH_PER_MINUTE",
                settings.rate_limit_auth_per_minute,
            ),
            (
                "RATE_LIMIT_WRITE_PER_MINUTE",
                settings.rate_limit_write_per_minute,
            ),
        ] {
            // The limiter counts whole milliseconds between requests.
            if value > 60_000 {
                return Err(SettingsError::new(
                    name,
                    "must be at most 60000 (one request a millisecond)",
                ));
            }
        }
        if settings.login_guard.max_delay >= settings.request_timeout {
            return Err(SettingsError::new(
                "LOGIN_MAX_DELAY_SECONDS",
                "must be shorter than REQUEST_TIMEOUT_SECONDS, or a slowed sign-in times out",
            ));
        }
        if settings.upload.window >= settings.upload.timeout {
            return Err(SettingsError::new(
                "UPLOAD_RATE_WINDOW_SECONDS",
                "must be shorter than UPLOAD_TIMEOUT_SECONDS",
            ));
        }
        if settings.upload.timeout >= settings.common.connections.idle_timeout {
            return Err(SettingsError::new(
                "UPLOAD_TIMEOUT_SECONDS",
                "must be shorter than HTTP_IDLE_TIMEOUT_SECONDS, which would cut an HTTP/2 upload first",
            ));
        }
        if settings.max_body_bytes < 1024 {
            return Err(SettingsError::new(
                "MAX_BODY_BYTES",
                "must be at least 1024",
            ));
        }
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pairs: &[(&str, &str)]) -> Result<ApiSettings, SettingsError> {
        let mut env = vec![("APP_ENV", "development")];
        env.extend_from_slice(pairs);
        ApiSettings::from_env(&Env::from_pairs(env.iter().copied()))
    }

    #[test]
    fn days_are_bounded_not_wrapped() {
        assert!(settings(&[("SESSION_MAX_AGE_DAYS", "3650")]).is_ok());
        for value in ["3651", "213503982334601"] {
            let error = settings(&[("SESSION_MAX_AGE_DAYS", value)]).unwrap_err();
            assert_eq!(error.name, "SESSION_MAX_AGE_DAYS");
        }
    }

    #[test]
    fn rate_limits_the_limiter_cannot_keep_are_refused_at_start() {
        assert!(settings(&[("RATE_LIMIT_AUTH_PER_MINUTE", "60000")]).is_ok());
        for name in ["RATE_LIMIT_AUTH_PER_MINUTE", "RATE_LIMIT_WRITE_PER_MINUTE"] {
            for value in ["60001", "0"] {
                let error = settings(&[(name, value)]).unwrap_err();
                assert_eq!(error.name, name, "{value}");
            }
        }
    }
}
