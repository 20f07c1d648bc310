//! Push notifications: the two job handlers and the platform clients.
//!
//! - [`Fanout`] runs `push.notify`: one `push.send` job per device of the user, in one
//!   transaction with completing the notify job.
//! - [`Deliver`] runs `push.send`: one notification to one device through [`apns`] or
//!   [`fcm`]. A token the platform calls dead deletes the device; throttling and
//!   outages retry with backoff (or the platform's `Retry-After`); a notification the
//!   platform can never accept fails without retry.

pub mod apns;
pub mod fcm;

use std::{sync::Arc, time::Duration};

use mobile_db::Db;
use mobile_db::{
    jobs::Job,
    push::{self, DeviceNotification, Notification},
};
use mobile_domain::{ApnsEnvironment, Platform};
use serde_json::{Map, Value};

use crate::{
    metrics::{PushLabel, WorkerMetrics},
    queue::{Done, Handler, JobError, JobFuture, Lease},
};

/// What a platform said about one send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The token no longer reaches an installation (uninstalled, or never valid).
    #[error("the device token is dead: {0}")]
    DeadToken(String),
    /// The platform refuses this notification for good (too large, malformed).
    #[error("rejected: {0}")]
    Rejected(String),
    /// Try again later, no sooner than `after` if the platform said so.
    #[error("{reason}")]
    Retry {
        reason: String,
        after: Option<Duration>,
    },
}

impl SendError {
    fn retry(reason: impl Into<String>, after: Option<Duration>) -> Self {
        Self::Retry {
            reason: reason.into(),
            after,
        }
    }
}

/// The most either platform accepts for one notification's payload.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// `push.notify`: fan out to the user's devices.
#[derive(Debug, Clone)]
pub struct Fanout {
    pub db: Db,
}

impl Handler for Fanout {
    fn run(&self, job: Job, lease: Lease) -> JobFuture {
        let db = self.db.clone();
        Box::pin(async move {
            let notification: Notification = job.payload().map_err(JobError::permanent)?;
            let sent = push::fan_out(&db, job.id, &lease.worker, &notification).await?;
            tracing::debug!(job_id = %job.id, devices = ?sent, "fanned out");
            Ok(Done::AlreadyCompleted)
        })
    }
}

/// `push.send`: one notification to one device.
#[derive(Debug, Clone)]
pub struct Deliver {
    pub db: Db,
    pub apns: Option<Arc<apns::Apns>>,
    pub fcm: Option<Arc<fcm::Fcm>>,
    pub metrics: WorkerMetrics,
}

impl Handler for Deliver {
    fn run(&self, job: Job, _lease: Lease) -> JobFuture {
        let this = self.clone();
        Box::pin(async move {
            let send: DeviceNotification = job.payload().map_err(JobError::permanent)?;
            this.deliver(send).await
        })
    }
}

impl Deliver {
    async fn deliver(&self, send: DeviceNotification) -> Result<Done, JobError> {
        let platform = send.platform;
        let result = match platform {
            Platform::Ios => {
                let Some(apns) = &self.apns else {
                    return Ok(self.disabled(platform));
                };
                let sandbox = send.apns_environment == Some(ApnsEnvironment::Sandbox);
                apns.send(&send.push_token, sandbox, &send.notification)
                    .await
            }
            Platform::Android => {
                let Some(fcm) = &self.fcm else {
                    return Ok(self.disabled(platform));
                };
                fcm.send(&send.push_token, &send.notification).await
            }
        };
        let count = |outcome| {
            self.metrics
                .pushes
                .get_or_create(&PushLabel {
                    platform: platform.as_str(),
                    outcome,
                })
                .inc();
        };
        match result {
            Ok(()) => {
                count("sent");
                Ok(Done::Complete)
            }
            Err(SendError::DeadToken(reason)) => {
                let removed =
                    push::remove_dead_token(&self.db, send.device_id, &send.push_token).await?;
                tracing::info!(device_id = %send.device_id, %platform, %reason, removed, "dead push token; device removed");
                count("device_removed");
                Ok(Done::Complete)
            }
            Err(SendError::Rejected(reason)) => {
                count("rejected");
                Err(JobError::permanent(reason))
            }
            Err(SendError::Retry { reason, after }) => {
                count("retried");
                Err(match after {
                    Some(after) => JobError::retry_after(reason, after),
                    None => JobError::transient(reason),
                })
            }
        }
    }

    fn disabled(&self, platform: Platform) -> Done {
        tracing::debug!(
            %platform,
            "push platform not configured; notification dropped"
        );
        self.metrics
            .pushes
            .get_or_create(&PushLabel {
                platform: platform.as_str(),
                outcome: "disabled",
            })
            .inc();
        Done::Complete
    }
}

/// The app's custom key/values as strings (FCM's `data` takes strings only; APNs
/// gets the same for symmetry): strings as they are, anything else as JSON.
pub fn string_data(data: Option<&Value>) -> Map<String, Value> {
    let Some(Value::Object(data)) = data else {
        return Map::new();
    };
    data.iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            (k.clone(), Value::String(v))
        })
        .collect()
}

/// `Retry-After` in seconds (the form APNs and Google send).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// An HTTP client for a push platform: HTTP/2, one connection reused for every send,
/// TLS with the system roots plus `extra_root` (a proxy's or a test server's).
pub fn http_client(extra_root: Option<&[u8]>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(20))
        .pool_idle_timeout(Duration::from_secs(600))
        .http2_keep_alive_interval(Duration::from_secs(60))
        .http2_keep_alive_while_idle(true);
    if let Some(pem) = extra_root {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
    }
    Ok(builder.build()?)
}
