//! Typed settings from the environment (twelve-factor).
//!
//! Every binary reads [`CommonSettings`]; each adds its own on top with the same
//! [`Env`] helpers. A bad value stops the process at start with the variable's name
//! and what was wrong, never later and never silently. Secrets are `SecretString`, whose
//! `Debug` prints `[REDACTED]`, so logging the settings is safe.

use std::{
    collections::HashMap, fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration,
};

use secrecy::{ExposeSecret as _, SecretString};

use crate::server::ConnectionLimits;

/// A variable that is set but cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{name}: {reason}")]
pub struct SettingsError {
    pub name: String,
    pub reason: String,
}

impl SettingsError {
    pub fn new(name: &str, reason: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            reason: reason.into(),
        }
    }
}

/// The settings that hold secrets: each may be given as `<NAME>_FILE`, the path of a
/// file holding the value ([`Env::with_secret_files`]).
pub const SECRET_SETTINGS: &[&str] = &[
    "DATABASE_URL",
    "DATABASE_LISTEN_URL",
    "REDIS_URL",
    "INTERNAL_API_TOKEN",
    // Object storage keys, where no workload identity is used.
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_ACCOUNT_KEY",
    "AZURE_STORAGE_SAS_KEY",
    "AZURE_CLIENT_SECRET",
    "GOOGLE_SERVICE_ACCOUNT_KEY",
    // The worker's mail relay: a URL that may carry a password, or the password alone.
    "SMTP_URL",
    "SMTP_PASSWORD",
];

/// Where settings come from: the process environment, or a map in tests.
#[derive(Clone)]
pub struct Env {
    vars: HashMap<String, String>,
}

impl fmt::Debug for Env {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Values may be secrets: show names only.
        let mut names: Vec<&String> = self.vars.keys().collect();
        names.sort();
        f.debug_struct("Env").field("names", &names).finish()
    }
}

impl Env {
    /// A snapshot of the process environment.
    pub fn process() -> Self {
        Self {
            vars: std::env::vars().collect(),
        }
    }

    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        Self {
            vars: pairs
                .into_iter()
                .map(|(k, v)| (k.into(), v.into()))
                .collect(),
        }
    }

    /// The value, if set and not empty (an empty variable counts as unset, as a
    /// Kubernetes manifest with `value: ""` means).
    pub fn optional(&self, name: &str) -> Option<&str> {
        self.vars
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.trim().is_empty())
    }

    /// Every variable, for settings read by prefix (a storage provider's `AWS_*`).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.vars.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn string(&self, name: &str, default: &str) -> String {
        self.optional(name).unwrap_or(default).to_owned()
    }

    pub fn secret(&self, name: &str, default: &str) -> SecretString {
        SecretString::from(self.string(name, default))
    }

    /// Reads every secret setting ([`SECRET_SETTINGS`]) whose `<NAME>_FILE` is set from
    /// that file, as if it were `<NAME>`: how a Kubernetes Secret mounted as a volume
    /// (or a Docker secret) is handed over, kept out of `kubectl describe`, the
    /// process's environment and crash dumps. Surrounding whitespace is trimmed (a
    /// file ends with a newline). Setting both `<NAME>` and `<NAME>_FILE`, naming a
    /// file that cannot be read, or an empty file, is an error.
    pub fn with_secret_files(mut self) -> Result<Self, SettingsError> {
        for name in SECRET_SETTINGS {
            let file_var = format!("{name}_FILE");
            let Some(path) = self.optional(&file_var).map(str::to_owned) else {
                continue;
            };
            if self.optional(name).is_some() {
                return Err(SettingsError::new(
                    &file_var,
                    format!("{name} is set too; set one or the other"),
                ));
            }
            let contents = std::fs::read_to_string(path.trim()).map_err(|e| {
                SettingsError::new(&file_var, format!("cannot read {}: {e}", path.trim()))
            })?;
            let value = contents.trim();
            if value.is_empty() {
                return Err(SettingsError::new(
                    &file_var,
                    format!("{} is empty", path.trim()),
                ));
            }
            self.vars.insert((*name).to_owned(), value.to_owned());
        }
        Ok(self)
    }

    /// Parses the value with `FromStr`, or returns `default` when unset.
    pub fn parse<T>(&self, name: &str, default: T) -> Result<T, SettingsError>
    where
        T: FromStr,
        T::Err: fmt::Display,
    {
        match self.optional(name) {
            None => Ok(default),
            Some(raw) => raw.trim().parse().map_err(|e: T::Err| {
                SettingsError::new(name, format!("cannot parse {raw:?}: {e}"))
            }),
        }
    }

    /// A whole number of seconds, as every `*_SECONDS` variable is.
    pub fn seconds(&self, name: &str, default: u64) -> Result<Duration, SettingsError> {
        self.parse(name, default).map(Duration::from_secs)
    }

    /// A whole number of days, as every `*_DAYS` variable is: at most ten years.
    pub fn days(&self, name: &str, default: u64) -> Result<Duration, SettingsError> {
        let days: u64 = self.parse(name, default)?;
        if days > 3650 {
            return Err(SettingsError::new(name, "must be at most 3650 (ten years)"));
        }
        Ok(Duration::from_secs(days * 86_400))
    }
}

/// `APP_ENV`: only `development` unlocks development conveniences (such as the
/// published development signing key); every other value is treated as production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppEnv {
    Development,
    Other(String),
}

impl AppEnv {
    pub fn is_development(&self) -> bool {
        matches!(self, Self::Development)
    }
}

impl fmt::Display for AppEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Development => f.write_str("development"),
            Self::Other(name) => f.write_str(name),
        }
    }
}

/// `LOG_FORMAT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line, for log shippers.
    Json,
    /// Human-readable, coloured when the output is a terminal.
    Pretty,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "json" => Ok(Self::Json),
            "pretty" => Ok(Self::Pretty),
            other => Err(format!("expected \"json\" or \"pretty\", got {other:?}")),
        }
    }
}

/// The settings every binary shares. Defaults are the brief's; the listen and metrics
/// ports differ per binary, so the caller passes those.
#[derive(Debug, Clone)]
pub struct CommonSettings {
    /// `APP_ENV` (default `production`).
    pub app_env: AppEnv,
    /// `DATABASE_URL`: may carry a password, hence secret.
    pub database_url: SecretString,
    /// `DATABASE_MAX_CONNECTIONS` (default 10): the pool size per process.
    pub database_max_connections: u32,
    /// `DATABASE_POOL_MODE` (default `session`): `transaction` when `DATABASE_URL` is
    /// a pooler in transaction mode (PgBouncer's `pool_mode = transaction`).
    pub database_pool_mode: mobile_db::PoolMode,
    /// `DATABASE_LISTEN_URL`: a direct connection to PostgreSQL, for what needs a
    /// session of its own (the worker's `LISTEN` and its backlog reporter's lock,
    /// migrations) when `DATABASE_URL` goes through a transaction pooler. Unset:
    /// `DATABASE_URL`.
    pub database_listen_url: Option<SecretString>,
    /// `REDIS_URL`: may carry a password, hence secret.
    pub redis_url: SecretString,
    /// `REDIS_CA_FILE`: a PEM bundle to verify a `rediss://` server against, instead
    /// of the system's roots (a private CA: Memorystore's, a self-run Redis's).
    pub redis_ca_file: Option<PathBuf>,
    /// `REDIS_KEY_PREFIX` (default `mb:`): prefixes every key and channel, so several
    /// deployments (or parallel tests) can share one Redis.
    pub redis_key_prefix: String,
    /// `LISTEN_ADDR`: the public port (API, WebSocket, or the worker's health port).
    pub listen_addr: SocketAddr,
    /// `METRICS_ADDR`: `/metrics`, never on the public port.
    pub metrics_addr: SocketAddr,
    /// `LOG_FORMAT` (default `json`).
    pub log_format: LogFormat,
    /// `SHUTDOWN_TIMEOUT_SECONDS` (default 30): from SIGTERM to exit, at most.
    pub shutdown_timeout: Duration,
    /// `SHUTDOWN_DELAY_SECONDS` (default 0): after SIGTERM, how long to keep accepting
    /// new connections while reporting unready, so load balancers that poll readiness
    /// stop routing here before the listener closes. On Kubernetes the preStop sleep
    /// does this job and the default of 0 is right.
    pub shutdown_delay: Duration,
    /// `MAX_CONNECTIONS`, `HTTP_*`, `HTTP2_*`: what a client may hold of the server.
    pub connections: ConnectionLimits,
}

/// A binary's own defaults for the common settings.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub listen_addr: &'static str,
    pub metrics_addr: &'static str,
    pub max_connections: usize,
}

impl CommonSettings {
    pub const DEFAULT_DATABASE_URL: &'static str = "postgres://postgres@127.0.0.1:5432/mobile";
    pub const DEFAULT_REDIS_URL: &'static str = "redis://127.0.0.1:6379";

    pub fn from_env(env: &Env, defaults: &Defaults) -> Result<Self, SettingsError> {
        let app_env = match env.string("APP_ENV", "production").as_str() {
            "development" => AppEnv::Development,
            other => AppEnv::Other(other.to_owned()),
        };
        let settings = Self {
            app_env,
            database_url: env.secret("DATABASE_URL", Self::DEFAULT_DATABASE_URL),
            database_max_connections: env.parse("DATABASE_MAX_CONNECTIONS", 10)?,
            database_pool_mode: env.parse("DATABASE_POOL_MODE", mobile_db::PoolMode::Session)?,
            database_listen_url: env.optional("DATABASE_LISTEN_URL").map(SecretString::from),
            redis_url: env.secret("REDIS_URL", Self::DEFAULT_REDIS_URL),
            redis_ca_file: env.optional("REDIS_CA_FILE").map(PathBuf::from),
            redis_key_prefix: env.string("REDIS_KEY_PREFIX", "mb:"),
            listen_addr: env.parse("LISTEN_ADDR", socket(defaults.listen_addr))?,
            metrics_addr: env.parse("METRICS_ADDR", socket(defaults.metrics_addr))?,
            log_format: env.parse("LOG_FORMAT", LogFormat::Json)?,
            shutdown_timeout: env.seconds("SHUTDOWN_TIMEOUT_SECONDS", 30)?,
            shutdown_delay: env.seconds("SHUTDOWN_DELAY_SECONDS", 0)?,
            connections: ConnectionLimits::from_env(env, defaults.max_connections)?,
        };
        if settings.database_max_connections == 0 {
            return Err(SettingsError::new(
                "DATABASE_MAX_CONNECTIONS",
                "must be at least 1",
            ));
        }
        if settings.database_pool_mode == mobile_db::PoolMode::Transaction
            && settings.database_listen_url.is_none()
        {
            return Err(SettingsError::new(
                "DATABASE_LISTEN_URL",
                "must be set when DATABASE_POOL_MODE is transaction: LISTEN, advisory locks \
                 and migrations need a direct connection, which a transaction pooler is not",
            ));
        }
        if settings.redis_ca_file.is_some()
            && !settings.redis_url.expose_secret().starts_with("rediss://")
        {
            return Err(SettingsError::new(
                "REDIS_CA_FILE",
                "is set, but REDIS_URL is not a rediss:// (TLS) URL",
            ));
        }
        if settings.shutdown_delay >= settings.shutdown_timeout {
            return Err(SettingsError::new(
                "SHUTDOWN_DELAY_SECONDS",
                "must be shorter than SHUTDOWN_TIMEOUT_SECONDS, or nothing is left to drain in",
            ));
        }
        Ok(settings)
    }
}

fn socket(addr: &str) -> SocketAddr {
    addr.parse().unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    const DEFAULTS: Defaults = Defaults {
        listen_addr: "0.0.0.0:8080",
        metrics_addr: "0.0.0.0:9090",
        max_connections: 10_000,
    };

    #[test]
    fn defaults() {
        let settings =
            CommonSettings::from_env(&Env::from_pairs::<&str, &str>([]), &DEFAULTS).unwrap();
        assert_eq!(settings.app_env, AppEnv::Other("production".into()));
        assert_eq!(
            settings.database_url.expose_secret(),
            CommonSettings::DEFAULT_DATABASE_URL
        );
        assert_eq!(settings.listen_addr.port(), 8080);
        assert_eq!(settings.metrics_addr.port(), 9090);
        assert_eq!(settings.log_format, LogFormat::Json);
        assert_eq!(settings.shutdown_timeout, Duration::from_secs(30));
    }

    #[test]
    fn bad_values_name_the_variable() {
        let env = Env::from_pairs([("LISTEN_ADDR", "not an address")]);
        let err = CommonSettings::from_env(&env, &DEFAULTS).unwrap_err();
        assert_eq!(err.name, "LISTEN_ADDR");
        let env = Env::from_pairs([("LOG_FORMAT", "xml")]);
        assert_eq!(
            CommonSettings::from_env(&env, &DEFAULTS).unwrap_err().name,
            "LOG_FORMAT"
        );
        let env = Env::from_pairs([
            ("SHUTDOWN_TIMEOUT_SECONDS", "5"),
            ("SHUTDOWN_DELAY_SECONDS", "5"),
        ]);
        assert_eq!(
            CommonSettings::from_env(&env, &DEFAULTS).unwrap_err().name,
            "SHUTDOWN_DELAY_SECONDS"
        );
    }

    #[test]
    fn secrets_come_from_files_and_never_from_both_places() {
        let dir = std::env::temp_dir().join(format!("mb-secret-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, contents: &str| {
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            path.display().to_string()
        };
        let url = file("url", "postgres://u:hunter2@db/x\n");
        let token = file("token", "  s3cret-token \n");
        let env = Env::from_pairs([
            ("DATABASE_URL_FILE", url.as_str()),
            ("INTERNAL_API_TOKEN_FILE", token.as_str()),
            // Not a secret setting: a path the binary reads itself, left alone.
            ("JWT_SIGNING_KEY_FILE", "/keys/signing.pem"),
        ])
        .with_secret_files()
        .unwrap();
        let settings = CommonSettings::from_env(&env, &DEFAULTS).unwrap();
        assert_eq!(
            settings.database_url.expose_secret(),
            "postgres://u:hunter2@db/x"
        );
        assert_eq!(env.optional("INTERNAL_API_TOKEN"), Some("s3cret-token"));
        assert_eq!(env.optional("JWT_SIGNING_KEY"), None);
        assert!(!format!("{env:?}").contains("hunter2"));

        let both = Env::from_pairs([("REDIS_URL", "redis://a"), ("REDIS_URL_FILE", url.as_str())]);
        let error = both.with_secret_files().unwrap_err();
        assert_eq!(error.name, "REDIS_URL_FILE");
        assert!(error.reason.contains("REDIS_URL is set too"), "{error}");

        let missing = Env::from_pairs([("REDIS_URL_FILE", "/nonexistent/redis-url")]);
        let error = missing.with_secret_files().unwrap_err();
        assert_eq!(error.name, "REDIS_URL_FILE");
        assert!(error.reason.contains("/nonexistent/redis-url"), "{error}");

        let empty = file("empty", "\n");
        let error = Env::from_pairs([("DATABASE_URL_FILE", empty.as_str())])
            .with_secret_files()
            .unwrap_err();
        assert!(error.reason.ends_with("is empty"), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn empty_means_unset_and_secrets_stay_hidden() {
        let env = Env::from_pairs([
            ("APP_ENV", ""),
            ("DATABASE_URL", "postgres://u:hunter2@db/x"),
        ]);
        let settings = CommonSettings::from_env(&env, &DEFAULTS).unwrap();
        assert!(!settings.app_env.is_development());
        assert!(!format!("{settings:?}").contains("hunter2"));
        assert!(!format!("{env:?}").contains("hunter2"));
    }

    #[test]
    fn transaction_pool_mode_needs_a_direct_url() {
        let pooled = [
            ("DATABASE_URL", "postgres://u@pgbouncer:6432/x"),
            ("DATABASE_POOL_MODE", "transaction"),
        ];
        let error = CommonSettings::from_env(&Env::from_pairs(pooled), &DEFAULTS).unwrap_err();
        assert_eq!(error.name, "DATABASE_LISTEN_URL");

        let with_direct = pooled
            .into_iter()
            .chain([("DATABASE_LISTEN_URL", "postgres://u:hunter2@db:5432/x")]);
        let settings = CommonSettings::from_env(&Env::from_pairs(with_direct), &DEFAULTS).unwrap();
        assert_eq!(
            settings.database_pool_mode,
            mobile_db::PoolMode::Transaction
        );
        assert!(!format!("{settings:?}").contains("hunter2"), "a secret");

        let error = CommonSettings::from_env(
            &Env::from_pairs([("DATABASE_POOL_MODE", "statement")]),
            &DEFAULTS,
        )
        .unwrap_err();
        assert_eq!(error.name, "DATABASE_POOL_MODE");
    }
}
