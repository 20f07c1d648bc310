//! `mobile-worker`'s settings: the common ones plus storage, images, pushes and the
//! job runner's tuning. README's settings table lists each with its default.

use std::{path::PathBuf, str::FromStr as _, time::Duration};

use mobile_runtime::{CommonSettings, Defaults, Env, SettingsError};

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    pub common: CommonSettings,
    /// `STORAGE_URL` (default `file:///var/lib/mobile/media`).
    pub storage_url: String,
    /// `AWS_*`, `GOOGLE_*`, `AZURE_*`: the storage provider's own settings.
    pub storage_options: Vec<(String, String)>,
    /// `MEDIA_MAX_PIXELS` (default 50,000,000): larger images fail before decoding.
    pub media_max_pixels: u64,
    /// `IMAGE_QUALITY` (default 80): JPEG quality of the variants.
    pub image_quality: u8,
    /// `WORKER_ID` (default `$HOSTNAME-<random>`): this process in `jobs.locked_by`.
    pub worker_id: String,
    /// `WORKER_IMAGE_CONCURRENCY` (default: the number of CPUs): images at once.
    pub image_concurrency: usize,
    /// `WORKER_PUSH_CONCURRENCY` (default 256): push sends at once.
    pub push_concurrency: usize,
    /// `JOB_POLL_INTERVAL_SECONDS` (default 5): look for due jobs without a
    /// notification (retries coming due) and reclaim expired leases this often.
    pub poll_interval: Duration,
    /// `JOB_BACKOFF_BASE_MS` (default 1000): the first retry's delay; doubles per attempt.
    pub backoff_base: Duration,
    /// `JOB_BACKOFF_MAX_SECONDS` (default 300): the longest retry delay.
    pub backoff_cap: Duration,
    /// `IMAGE_JOB_TIMEOUT_SECONDS` (default 120).
    pub image_timeout: Duration,
    /// `PUSH_JOB_TIMEOUT_SECONDS` (default 30).
    pub push_timeout: Duration,
    pub apns: Option<ApnsSettings>,
    pub fcm: Option<FcmSettings>,
    /// `PUSH_CA_FILE`: an extra trusted root certificate (PEM) for the push endpoints,
    /// for a TLS-inspecting proxy or a test server. Unset: the system roots only.
    pub push_ca_file: Option<PathBuf>,
    /// Mail over SMTP; `None` (no `SMTP_URL`) disables it.
    pub mail: Option<MailSettings>,
    /// `WORKER_MAIL_CONCURRENCY` (default 4): mails sent at once.
    pub mail_concurrency: usize,
    /// `MAIL_JOB_TIMEOUT_SECONDS` (default 30): one mail's connect, TLS, and send.
    pub mail_timeout: Duration,
}

/// Mail: `SMTP_URL` with `MAIL_FROM`, `APP_NAME` and `APP_LINK_BASE_URL`.
#[derive(Debug, Clone)]
pub struct MailSettings {
    /// `SMTP_URL`: where and how to send (see [`SmtpUrl`]).
    pub smtp: SmtpUrl,
    /// `MAIL_FROM`: the sender, `Name <address>` or an address.
    pub from: String,
    /// `APP_NAME`: the app's name as the mails say it.
    pub app_name: String,
    /// `APP_LINK_BASE_URL`: where the links in the mails point, the app's universal
    /// link (iOS) / app link (Android) domain, e.g. `https://example.com/app`; the
    /// paths `/verify-email`, `/reset-password` and `/restore-email` are added, with
    /// `#token=`.
    pub link_base: url::Url,
    /// `SMTP_CA_FILE`: an extra trusted root certificate (PEM) for the SMTP server,
    /// for a private relay or a test server. Unset: the system roots only.
    pub ca_file: Option<PathBuf>,
    /// `EMAIL_VERIFICATION_TTL_SECONDS` (default 86400): how long a verification link works.
    pub verification_ttl: Duration,
    /// `PASSWORD_RESET_TTL_SECONDS` (default 3600): how long a reset link works.
    pub reset_ttl: Duration,
    /// `EMAIL_RESTORE_TTL_SECONDS` (default 604800): how long the link in an email
    /// change's notice undoes the change.
    pub restore_ttl: Duration,
}

/// `SMTP_URL`: `smtp://[user[:password]@]host[:port]` (STARTTLS, required; port 587
/// by default) or `smtps://…` (TLS from the first byte; port 465). The password may
/// instead be `SMTP_PASSWORD` (or the file `SMTP_PASSWORD_FILE` names). Mail never goes
/// out in plain text: a server that does not offer STARTTLS fails the send.
#[derive(Clone)]
pub struct SmtpUrl {
    pub implicit_tls: bool,
    pub host: String,
    pub port: u16,
    pub username: Option<String>,
    pub password: Option<String>,
}

impl std::fmt::Debug for SmtpUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password stays out of logs.
        f.debug_struct("SmtpUrl")
            .field("implicit_tls", &self.implicit_tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

impl SmtpUrl {
    pub fn parse(value: &str, password: Option<&str>) -> Result<Self, SettingsError> {
        let invalid = |reason: &str| SettingsError::new("SMTP_URL", reason.to_owned());
        let url = url::Url::parse(value).map_err(|e| invalid(&format!("not a URL: {e}")))?;
        let (implicit_tls, default_port) = match url.scheme() {
            "smtp" => (false, 587),
            "smtps" => (true, 465),
            other => {
                return Err(invalid(&format!(
                    "the scheme is {other:?}; use smtp:// (STARTTLS) or smtps:// (TLS)"
                )));
            }
        };
        let host = url
            .host_str()
            .filter(|host| !host.is_empty())
            .ok_or_else(|| invalid("the URL names no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(invalid(
                "only scheme, credentials, host and port are read; remove the rest",
            ));
        }
        let username = Some(url.username())
            .filter(|u| !u.is_empty())
            .map(percent_decode);
        let in_url = url.password().map(percent_decode);
        if in_url.is_some() && password.is_some() {
            return Err(SettingsError::new(
                "SMTP_PASSWORD",
                "SMTP_URL carries a password too; give it in one place",
            ));
        }
        let password = in_url.or_else(|| password.map(str::to_owned));
        match (&username, &password) {
            (None, Some(_)) => {
                return Err(invalid("a password needs a user name (smtp://user@host)"));
            }
            (Some(_), None) => {
                return Err(invalid(
                    "a user name needs a password (in the URL, or SMTP_PASSWORD / SMTP_PASSWORD_FILE)",
                ));
            }
            _ => {}
        }
        Ok(Self {
            implicit_tls,
            host,
            port: url.port().unwrap_or(default_port),
            username,
            password,
        })
    }
}

/// `%40` → `@` and the like, as a URL's user and password are written (every other
/// character, `&` and `+` included, as it is).
fn percent_decode(part: &str) -> String {
    percent_encoding::percent_decode_str(part)
        .decode_utf8_lossy()
        .into_owned()
}

/// APNs token auth: all of `APNS_KEY_FILE`, `APNS_KEY_ID`, `APNS_TEAM_ID`, `APNS_TOPIC`.
#[derive(Debug, Clone)]
pub struct ApnsSettings {
    /// `APNS_KEY_FILE`: the `.p8` key from the Apple developer account.
    pub key_file: PathBuf,
    /// `APNS_KEY_ID`: the key's 10-character id.
    pub key_id: String,
    /// `APNS_TEAM_ID`.
    pub team_id: String,
    /// `APNS_TOPIC`: the app's bundle id.
    pub topic: String,
    /// `APNS_BASE_URL` (default `https://api.push.apple.com`).
    pub base_url: String,
    /// `APNS_SANDBOX_BASE_URL` (default `https://api.sandbox.push.apple.com`): for
    /// devices registered with `apns_environment: "sandbox"` (development builds).
    pub sandbox_base_url: String,
}

/// FCM HTTP v1: `FCM_SERVICE_ACCOUNT_FILE`, and `FCM_BASE_URL`.
#[derive(Debug, Clone)]
pub struct FcmSettings {
    /// `FCM_SERVICE_ACCOUNT_FILE`: the service account's JSON key. Its `token_uri` is
    /// where OAuth tokens come from; its `project_id` is the FCM project.
    pub service_account_file: PathBuf,
    /// `FCM_BASE_URL` (default `https://fcm.googleapis.com`).
    pub base_url: String,
}

impl WorkerSettings {
    pub const DEFAULTS: Defaults = Defaults {
        listen_addr: "0.0.0.0:8082",
        metrics_addr: "0.0.0.0:9092",
        max_connections: 1_000,
    };

    pub fn from_env(env: &Env) -> Result<Self, SettingsError> {
        let cpus = std::thread::available_parallelism().map_or(1, usize::from);
        let settings = Self {
            common: CommonSettings::from_env(env, &Self::DEFAULTS)?,
            storage_url: env.string("STORAGE_URL", "file:///var/lib/mobile/media"),
            storage_options: mobile_storage::provider_options(env.iter()),
            media_max_pixels: env.parse("MEDIA_MAX_PIXELS", 50_000_000)?,
            image_quality: env.parse("IMAGE_QUALITY", 80)?,
            worker_id: env
                .optional("WORKER_ID")
                .map_or_else(default_worker_id, str::to_owned),
            image_concurrency: env.parse("WORKER_IMAGE_CONCURRENCY", cpus)?,
            push_concurrency: env.parse("WORKER_PUSH_CONCURRENCY", 256)?,
            poll_interval: env.seconds("JOB_POLL_INTERVAL_SECONDS", 5)?,
            backoff_base: Duration::from_millis(env.parse("JOB_BACKOFF_BASE_MS", 1_000)?),
            backoff_cap: env.seconds("JOB_BACKOFF_MAX_SECONDS", 300)?,
            image_timeout: env.seconds("IMAGE_JOB_TIMEOUT_SECONDS", 120)?,
            push_timeout: env.seconds("PUSH_JOB_TIMEOUT_SECONDS", 30)?,
            apns: apns(env)?,
            fcm: env
                .optional("FCM_SERVICE_ACCOUNT_FILE")
                .map(|file| FcmSettings {
                    service_account_file: PathBuf::from(file),
                    base_url: env.string("FCM_BASE_URL", "https://fcm.googleapis.com"),
                }),
            push_ca_file: env.optional("PUSH_CA_FILE").map(PathBuf::from),
            mail: mail(env)?,
            mail_concurrency: env.parse("WORKER_MAIL_CONCURRENCY", 4)?,
            mail_timeout: env.seconds("MAIL_JOB_TIMEOUT_SECONDS", 30)?,
        };
        for (name, value) in [
            (
                "WORKER_IMAGE_CONCURRENCY",
                settings.image_concurrency as u64,
            ),
            ("WORKER_PUSH_CONCURRENCY", settings.push_concurrency as u64),
            (
                "JOB_POLL_INTERVAL_SECONDS",
                settings.poll_interval.as_secs(),
            ),
            (
                "IMAGE_JOB_TIMEOUT_SECONDS",
                settings.image_timeout.as_secs(),
            ),
            ("PUSH_JOB_TIMEOUT_SECONDS", settings.push_timeout.as_secs()),
            ("WORKER_MAIL_CONCURRENCY", settings.mail_concurrency as u64),
            ("MAIL_JOB_TIMEOUT_SECONDS", settings.mail_timeout.as_secs()),
            ("MEDIA_MAX_PIXELS", settings.media_max_pixels),
        ] {
            if value == 0 {
                return Err(SettingsError::new(name, "must be at least 1"));
            }
        }
        if !(1..=100).contains(&settings.image_quality) {
            return Err(SettingsError::new("IMAGE_QUALITY", "must be 1 to 100"));
        }
        Ok(settings)
    }
}

/// APNs is configured by four variables together; some but not all is a mistake.
fn apns(env: &Env) -> Result<Option<ApnsSettings>, SettingsError> {
    const NAMES: [&str; 4] = ["APNS_KEY_FILE", "APNS_KEY_ID", "APNS_TEAM_ID", "APNS_TOPIC"];
    let values = NAMES.map(|name| env.optional(name));
    match values {
        [None, None, None, None] => Ok(None),
        [Some(key_file), Some(key_id), Some(team_id), Some(topic)] => Ok(Some(ApnsSettings {
            key_file: PathBuf::from(key_file),
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            topic: topic.to_owned(),
            base_url: env.string("APNS_BASE_URL", "https://api.push.apple.com"),
            sandbox_base_url: env.string(
                "APNS_SANDBOX_BASE_URL",
                "https://api.sandbox.push.apple.com",
            ),
        })),
        _ => {
            let missing: Vec<&str> = NAMES
                .iter()
                .zip(values)
                .filter(|(_, value)| value.is_none())
                .map(|(name, _)| *name)
                .collect();
            Err(SettingsError::new(
                missing[0],
                format!("APNs needs all four of {NAMES:?}; missing {missing:?}"),
            ))
        }
    }
}

/// Mail is on with `SMTP_URL`, which then needs `MAIL_FROM`, `APP_NAME` and
/// `APP_LINK_BASE_URL`; the others without it are a mistake, said at start.
fn mail(env: &Env) -> Result<Option<MailSettings>, SettingsError> {
    const NEEDED: [&str; 3] = ["MAIL_FROM", "APP_NAME", "APP_LINK_BASE_URL"];
    let Some(url) = env.optional("SMTP_URL") else {
        if let Some(name) = NEEDED
            .iter()
            .chain(&["SMTP_PASSWORD"])
            .find(|name| env.optional(name).is_some())
        {
            return Err(SettingsError::new(
                name,
                "is set but SMTP_URL is not: mail is off without it",
            ));
        }
        return Ok(None);
    };
    if let Some(missing) = NEEDED.iter().find(|name| env.optional(name).is_none()) {
        return Err(SettingsError::new(
            missing,
            format!("mail (SMTP_URL) needs all of {NEEDED:?}"),
        ));
    }
    let smtp = SmtpUrl::parse(url, env.optional("SMTP_PASSWORD"))?;
    let from = env.string("MAIL_FROM", "");
    lettre::message::Mailbox::from_str(&from).map_err(|e| {
        SettingsError::new(
            "MAIL_FROM",
            format!("not an address (`Name <a@example.com>`): {e}"),
        )
    })?;
    let link_base = url::Url::parse(&env.string("APP_LINK_BASE_URL", ""))
        .ok()
        .filter(|url| matches!(url.scheme(), "https" | "http") && url.host().is_some())
        .filter(|url| url.query().is_none() && url.fragment().is_none())
        .ok_or_else(|| {
            SettingsError::new(
                "APP_LINK_BASE_URL",
                "must be an https:// URL (http:// for development) without query or fragment, e.g. https://example.com/app",
            )
        })?;
    Ok(Some(MailSettings {
        smtp,
        from,
        app_name: env.string("APP_NAME", ""),
        link_base,
        ca_file: env.optional("SMTP_CA_FILE").map(PathBuf::from),
        verification_ttl: env.seconds("EMAIL_VERIFICATION_TTL_SECONDS", 86_400)?,
        reset_ttl: env.seconds("PASSWORD_RESET_TTL_SECONDS", 3_600)?,
        restore_ttl: env.seconds("EMAIL_RESTORE_TTL_SECONDS", 604_800)?,
    }))
}

fn default_worker_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    format!("{host}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn defaults_leave_push_platforms_disabled() {
        let settings =
            WorkerSettings::from_env(&Env::from_pairs([("APP_ENV", "development")])).unwrap();
        assert_eq!(settings.common.listen_addr.port(), 8082);
        assert_eq!(settings.common.metrics_addr.port(), 9092);
        assert!(settings.apns.is_none() && settings.fcm.is_none());
        assert_eq!(settings.storage_url, "file:///var/lib/mobile/media");
    }

    #[test]
    fn partial_apns_settings_are_refused_naming_what_is_missing() {
        let error = WorkerSettings::from_env(&Env::from_pairs([
            ("APNS_KEY_FILE", "/k.p8"),
            ("APNS_TOPIC", "com.example.app"),
        ]))
        .unwrap_err();
        assert_eq!(error.name, "APNS_KEY_ID");
        assert!(error.reason.contains("APNS_TEAM_ID"), "{error}");
    }

    #[test]
    fn smtp_urls() {
        let url = SmtpUrl::parse(
            "smtp://mailer%40example.com:p%40ss&w+rd@smtp.example.com",
            None,
        )
        .unwrap();
        assert!(!url.implicit_tls);
        assert_eq!((url.host.as_str(), url.port), ("smtp.example.com", 587));
        assert_eq!(url.username.as_deref(), Some("mailer@example.com"));
        assert_eq!(url.password.as_deref(), Some("p@ss&w+rd"));
        assert!(!format!("{url:?}").contains("p@ss"));

        let url = SmtpUrl::parse("smtps://apikey@smtp.example.com", Some("secret")).unwrap();
        assert!(url.implicit_tls);
        assert_eq!(url.port, 465);
        assert_eq!(url.password.as_deref(), Some("secret"));

        for refused in [
            "http://smtp.example.com",
            "smtp://user@smtp.example.com",
            "smtp://smtp.example.com/path",
            "smtp://smtp.example.com?tls=none",
        ] {
            assert_eq!(
                SmtpUrl::parse(refused, None).unwrap_err().name,
                "SMTP_URL",
                "{refused}"
            );
        }
        let both = SmtpUrl::parse("smtp://u:p@smtp.example.com", Some("q")).unwrap_err();
        assert_eq!(both.name, "SMTP_PASSWORD");
    }

    #[test]
    fn mail_needs_its_settings_together() {
        let error = WorkerSettings::from_env(&Env::from_pairs([
            ("SMTP_URL", "smtp://smtp.example.com"),
            ("MAIL_FROM", "App <no-reply@example.com>"),
            ("APP_NAME", "App"),
        ]))
        .unwrap_err();
        assert_eq!(error.name, "APP_LINK_BASE_URL");
        let error = WorkerSettings::from_env(&Env::from_pairs([("MAIL_FROM", "a@example.com")]))
            .unwrap_err();
        assert_eq!(error.name, "MAIL_FROM");
    }

    #[test]
    fn zero_concurrency_is_refused() {
        let error = WorkerSettings::from_env(&Env::from_pairs([("WORKER_PUSH_CONCURRENCY", "0")]))
            .unwrap_err();
        assert_eq!(error.name, "WORKER_PUSH_CONCURRENCY");
    }
}
