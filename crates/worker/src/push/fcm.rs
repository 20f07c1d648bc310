//! The FCM HTTP v1 client, with the service account's OAuth 2.0 token.
//!
//! The access token comes from the account's `token_uri` for an RS256-signed
//! assertion (Google's "Using OAuth 2.0 for Server to Server Applications"), and is
//! shared by every send until five minutes before it expires; one exchange serves
//! thousands of sends. A 401 drops it, so the retry gets a fresh one.

use std::{
    path::Path,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mobile_db::push::{Notification, PushKind};
use reqwest::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::Mutex;

use super::{MAX_PAYLOAD_BYTES, SendError, retry_after, string_data};
use crate::settings::FcmSettings;

const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";
/// Renew this long before the token's expiry.
const EXPIRY_MARGIN: Duration = Duration::from_secs(5 * 60);
/// What an FCM notification may live for on Google's side while the phone is off.
const TTL: &str = "86400s";

/// The fields of a service-account JSON key the client uses.
#[derive(Deserialize)]
struct ServiceAccount {
    project_id: String,
    private_key_id: String,
    private_key: String,
    client_email: String,
    token_uri: String,
}

pub struct Fcm {
    http: reqwest::Client,
    send_url: String,
    key: EncodingKey,
    key_id: String,
    client_email: String,
    token_uri: String,
    token: Mutex<Option<(String, Instant)>>,
}

impl std::fmt::Debug for Fcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fcm")
            .field("send_url", &self.send_url)
            .field("client_email", &self.client_email)
            .field("token_uri", &self.token_uri)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Assertion<'a> {
    iss: &'a str,
    scope: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: GoogleError,
}

#[derive(Deserialize)]
struct GoogleError {
    #[serde(default)]
    status: String,
    #[serde(default)]
    message: String,
    #[serde(default)]
    details: Vec<Value>,
}

impl GoogleError {
    /// FCM's own code (`UNREGISTERED`, `QUOTA_EXCEEDED`, ...) from the `FcmError` detail.
    fn fcm_code(&self) -> Option<&str> {
        self.details
            .iter()
            .find(|d| {
                d.get("@type").and_then(Value::as_str)
                    == Some("type.googleapis.com/google.firebase.fcm.v1.FcmError")
            })
            .and_then(|d| d.get("errorCode"))
            .and_then(Value::as_str)
    }
}

impl Fcm {
    pub fn new(settings: &FcmSettings, http: reqwest::Client) -> anyhow::Result<Self> {
        let file = &settings.service_account_file;
        let account: ServiceAccount = serde_json::from_slice(&read(file)?)
            .context("FCM_SERVICE_ACCOUNT_FILE: not a service-account JSON key")?;
        let key = EncodingKey::from_rsa_pem(account.private_key.as_bytes())
            .context("FCM_SERVICE_ACCOUNT_FILE: private_key is not an RSA PEM key")?;
        Ok(Self {
            http,
            send_url: format!(
                "{}/v1/projects/{}/messages:send",
                settings.base_url.trim_end_matches('/'),
                account.project_id
            ),
            key,
            key_id: account.private_key_id,
            client_email: account.client_email,
            token_uri: account.token_uri,
            token: Mutex::new(None),
        })
    }

    /// The current access token, exchanging a new assertion when it is near expiry.
    /// The lock makes concurrent sends share one exchange.
    async fn access_token(&self) -> Result<String, SendError> {
        let mut cached = self.token.lock().await;
        if let Some((token, expires)) = cached.as_ref()
            && Instant::now() + EXPIRY_MARGIN < *expires
        {
            return Ok(token.clone());
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.key_id.clone());
        let assertion = Assertion {
            iss: &self.client_email,
            scope: SCOPE,
            aud: &self.token_uri,
            iat: now,
            exp: now + 3600,
        };
        let assertion = jsonwebtoken::encode(&header, &assertion, &self.key)
            .map_err(|e| SendError::Rejected(format!("signing the OAuth assertion: {e}")))?;
        let response = self
            .http
            .post(&self.token_uri)
            .form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer"),
                ("assertion", &assertion),
            ])
            .send()
            .await
            .map_err(|e| {
                SendError::retry(format!("OAuth token endpoint unreachable: {e}"), None)
            })?;
        let status = response.status();
        if !status.is_success() {
            let after = retry_after(response.headers());
            let body = response.text().await.unwrap_or_default();
            return Err(SendError::retry(
                format!("OAuth token exchange: {status} {body}"),
                after,
            ));
        }
        let token: TokenResponse = response
            .json()
            .await
            .map_err(|e| SendError::retry(format!("OAuth token response: {e}"), None))?;
        let expires = Instant::now() + Duration::from_secs(token.expires_in);
        *cached = Some((token.access_token.clone(), expires));
        Ok(token.access_token)
    }

    async fn forget_token(&self) {
        *self.token.lock().await = None;
    }

    /// Sends one notification to one registration token.
    pub async fn send(
        &self,
        device_token: &str,
        notification: &Notification,
    ) -> Result<(), SendError> {
        let body = message(device_token, notification);
        if body.len() > MAX_PAYLOAD_BYTES {
            return Err(SendError::Rejected(format!(
                "the message is {} bytes; FCM takes at most {MAX_PAYLOAD_BYTES}",
                body.len()
            )));
        }
        let response = self
            .http
            .post(&self.send_url)
            .bearer_auth(self.access_token().await?)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(|e| SendError::retry(format!("FCM unreachable: {e}"), None))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let after = retry_after(response.headers());
        let error = response.json::<ErrorResponse>().await.ok().map(|r| r.error);
        let code = error
            .as_ref()
            .and_then(GoogleError::fcm_code)
            .unwrap_or_default();
        let reason = error.as_ref().map_or_else(
            || status.to_string(),
            |e| format!("FCM: {status} {} {code} {}", e.status, e.message),
        );
        Err(match (status, code) {
            (_, "UNREGISTERED" | "SENDER_ID_MISMATCH") => SendError::DeadToken(code.to_owned()),
            (StatusCode::UNAUTHORIZED, _) | (_, "THIRD_PARTY_AUTH_ERROR") => {
                self.forget_token().await;
                SendError::retry(reason, None)
            }
            (StatusCode::TOO_MANY_REQUESTS, _) | (_, "QUOTA_EXCEEDED") => {
                SendError::retry(reason, after)
            }
            (status, _) if status.is_server_error() => SendError::retry(reason, after),
            _ => SendError::Rejected(reason),
        })
    }
}

/// The v1 `messages:send` body. An alert carries a `notification` (localised by
/// `android.notification.title_loc_key` and the like, with `title`/`body` as the
/// fallback) at high priority; a silent push is data only, at normal priority. The
/// thread goes in `data.thread_id`, for the app's own grouping; a badge in
/// `android.notification.notification_count` (alerts) and `data.badge` (both kinds).
pub fn message(device_token: &str, notification: &Notification) -> String {
    let mut data = string_data(notification.data.as_ref());
    if let Some(thread) = &notification.thread_id {
        data.insert("thread_id".to_owned(), Value::String(thread.clone()));
    }
    if let Some(badge) = notification.badge {
        data.insert("badge".to_owned(), Value::String(badge.to_string()));
    }
    let priority = match notification.kind {
        PushKind::Alert => "high",
        PushKind::Silent => "normal",
    };
    let mut android = json!({ "priority": priority, "ttl": TTL });
    if let Some(collapse_id) = &notification.collapse_id {
        android["collapse_key"] = Value::String(collapse_id.clone());
    }
    let mut message = json!({ "token": device_token, "data": data });
    if notification.kind == PushKind::Alert {
        message["notification"] = json!({ "title": notification.title, "body": notification.body });
        if let Some(localized) = &notification.localized {
            let mut texts = serde_json::Map::new();
            for (key, args, key_field, args_field) in [
                (
                    &localized.title_key,
                    &localized.title_args,
                    "title_loc_key",
                    "title_loc_args",
                ),
                (
                    &localized.body_key,
                    &localized.body_args,
                    "body_loc_key",
                    "body_loc_args",
                ),
            ] {
                if let Some(key) = key {
                    texts.insert(key_field.to_owned(), json!(key));
                    if !args.is_empty() {
                        texts.insert(args_field.to_owned(), json!(args));
                    }
                }
            }
            android["notification"] = Value::Object(texts);
        }
        if let Some(badge) = notification.badge {
            android["notification"]["notification_count"] = json!(badge);
        }
    }
    message["android"] = android;
    json!({ "message": message }).to_string()
}

fn read(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path)
        .with_context(|| format!("FCM_SERVICE_ACCOUNT_FILE: cannot read {}", path.display()))
}
