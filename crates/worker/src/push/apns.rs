//! The APNs client: HTTP/2 with token (`.p8`, ES256) authentication.
//!
//! One provider token (a JWT signed with the team's key) is shared by every send and
//! renewed every 50 minutes: Apple refuses tokens older than an hour and throttles
//! providers that renew more often than every 20 minutes. A `403
//! ExpiredProviderToken` renews it at once. Requests follow Apple's "Sending
//! notification requests to APNs": `POST /3/device/<token>` with `apns-topic`,
//! `apns-push-type` and `apns-priority` by the kind of push (an alert at 10, a silent
//! `background` push at 5), `apns-expiration` and, when the notification has one,
//! `apns-collapse-id`.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mobile_db::push::{Notification, PushKind};
use reqwest::StatusCode;
use reqwest::header::HeaderValue;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::sync::{Mutex, PoisonError};

use super::{MAX_PAYLOAD_BYTES, SendError, retry_after, string_data};
use crate::settings::ApnsSettings;

/// Renew the provider token this long after signing it.
const TOKEN_RENEW_AFTER: Duration = Duration::from_secs(50 * 60);
/// How long APNs keeps trying to deliver to a device that is off.
const EXPIRATION: Duration = Duration::from_secs(24 * 60 * 60);

pub struct Apns {
    http: reqwest::Client,
    key: EncodingKey,
    key_id: String,
    team_id: String,
    topic: String,
    base_url: String,
    sandbox_base_url: String,
    /// The `authorization` header value and when its token was signed. A plain mutex:
    /// held for a clone (or, once in 50 minutes, one signature), never across an await.
    token: Mutex<Option<(HeaderValue, Instant)>>,
}

impl std::fmt::Debug for Apns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Apns")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .field("topic", &self.topic)
            .field("base_url", &self.base_url)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    iat: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    reason: String,
}

impl Apns {
    pub fn new(settings: &ApnsSettings, http: reqwest::Client) -> anyhow::Result<Self> {
        let pem = read(&settings.key_file).context("APNS_KEY_FILE")?;
        let key = EncodingKey::from_ec_pem(&pem)
            .context("APNS_KEY_FILE: not a .p8 (PKCS#8 P-256) key")?;
        Ok(Self {
            http,
            key,
            key_id: settings.key_id.clone(),
            team_id: settings.team_id.clone(),
            topic: settings.topic.clone(),
            base_url: settings.base_url.trim_end_matches('/').to_owned(),
            sandbox_base_url: settings.sandbox_base_url.trim_end_matches('/').to_owned(),
            token: Mutex::new(None),
        })
    }

    /// `bearer <provider token>`, signing a new token when it is due.
    fn authorization(&self) -> Result<HeaderValue, SendError> {
        let mut cached = self.token.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((header, signed)) = cached.as_ref()
            && signed.elapsed() < TOKEN_RENEW_AFTER
        {
            return Ok(header.clone());
        }
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.key_id.clone());
        let claims = Claims {
            iss: &self.team_id,
            iat: unix_now(),
        };
        let token = jsonwebtoken::encode(&header, &claims, &self.key)
            .map_err(|e| SendError::Rejected(format!("signing the APNs provider token: {e}")))?;
        let mut value = HeaderValue::from_str(&format!("bearer {token}"))
            .map_err(|e| SendError::Rejected(format!("the APNs provider token: {e}")))?;
        value.set_sensitive(true);
        *cached = Some((value.clone(), Instant::now()));
        Ok(value)
    }

    fn forget_token(&self) {
        *self.token.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }

    /// Sends one alert to one device.
    pub async fn send(
        &self,
        device_token: &str,
        sandbox: bool,
        notification: &Notification,
    ) -> Result<(), SendError> {
        let body = payload(notification);
        if body.len() > MAX_PAYLOAD_BYTES {
            return Err(SendError::Rejected(format!(
                "the payload is {} bytes; APNs takes at most {MAX_PAYLOAD_BYTES}",
                body.len()
            )));
        }
        let base = if sandbox {
            &self.sandbox_base_url
        } else {
            &self.base_url
        };
        let expiration = unix_now() + EXPIRATION.as_secs();
        let mut request = self
            .http
            .post(format!("{base}/3/device/{device_token}"))
            .header(reqwest::header::AUTHORIZATION, self.authorization()?)
            .header("apns-topic", &self.topic)
            .header("apns-push-type", push_type(notification.kind))
            .header("apns-priority", priority(notification.kind))
            .header("apns-expiration", expiration.to_string())
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        if let Some(collapse_id) = &notification.collapse_id {
            request = request.header("apns-collapse-id", collapse_id);
        }
        let response = request
            .send()
            .await
            .map_err(|e| SendError::retry(format!("APNs unreachable: {e}"), None))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let after = retry_after(response.headers());
        let reason = response
            .json::<ErrorBody>()
            .await
            .map_or_else(|_| status.to_string(), |b| b.reason);
        Err(match (status, reason.as_str()) {
            (StatusCode::GONE, _)
            | (StatusCode::BAD_REQUEST, "BadDeviceToken" | "DeviceTokenNotForTopic") => {
                SendError::DeadToken(reason)
            }
            (StatusCode::FORBIDDEN, "ExpiredProviderToken" | "InvalidProviderToken") => {
                self.forget_token();
                SendError::retry(format!("APNs: {reason}"), None)
            }
            (StatusCode::TOO_MANY_REQUESTS, _) => {
                SendError::retry(format!("APNs: {reason}"), after)
            }
            (status, _) if status.is_server_error() => {
                SendError::retry(format!("APNs: {status} {reason}"), after)
            }
            (status, _) => SendError::Rejected(format!("APNs: {status} {reason}")),
        })
    }
}

/// `apns-push-type`: what the payload is, which APNs requires to match it.
fn push_type(kind: PushKind) -> &'static str {
    match kind {
        PushKind::Alert => "alert",
        PushKind::Silent => "background",
    }
}

/// `apns-priority`: 10 delivers at once; 5 (required for background pushes) lets the
/// phone pick a moment that saves power.
fn priority(kind: PushKind) -> &'static str {
    match kind {
        PushKind::Alert => "10",
        PushKind::Silent => "5",
    }
}

/// `{"aps":{"alert":{"title","body"},"sound":"default","thread-id":…}, <data>...}`, or
/// for a silent push `{"aps":{"content-available":1}, <data>...}`: the app's own keys
/// sit beside `aps`, as Apple's payload format puts them. Localised text replaces the
/// title or body by `title-loc-key`/`title-loc-args`, `loc-key`/`loc-args`. A badge
/// goes in `aps.badge`, on either kind.
pub fn payload(notification: &Notification) -> String {
    let mut root = string_data(notification.data.as_ref());
    let aps = match notification.kind {
        PushKind::Silent => json!({ "content-available": 1 }),
        PushKind::Alert => {
            let mut aps = json!({ "alert": alert(notification), "sound": "default" });
            if let Some(thread) = &notification.thread_id {
                aps["thread-id"] = Value::String(thread.clone());
            }
            aps
        }
    };
    let mut aps = aps;
    if let Some(badge) = notification.badge {
        aps["badge"] = json!(badge);
    }
    root.insert("aps".to_owned(), aps);
    Value::Object(root).to_string()
}

fn alert(notification: &Notification) -> Value {
    let mut alert = json!({ "title": notification.title, "body": notification.body });
    if let Some(localized) = &notification.localized {
        for (key, args, plain, key_field, args_field) in [
            (
                &localized.title_key,
                &localized.title_args,
                "title",
                "title-loc-key",
                "title-loc-args",
            ),
            (
                &localized.body_key,
                &localized.body_args,
                "body",
                "loc-key",
                "loc-args",
            ),
        ] {
            if let Some(key) = key {
                // Apple: a loc-key is given *instead of* the text.
                alert.as_object_mut().map(|a| a.remove(plain));
                alert[key_field] = json!(key);
                if !args.is_empty() {
                    alert[args_field] = json!(args);
                }
            }
        }
    }
    alert
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}
