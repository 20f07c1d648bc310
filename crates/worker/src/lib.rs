//! `mobile-worker`: everything slow or remote, as durable jobs.
//!
//! The [`queue`] runs jobs from PostgreSQL (`mobile_db::jobs`) with per-kind
//! concurrency, timeouts, retries and leases. The kinds:
//!
//! | kind | handler | what it does |
//! |---|---|---|
//! | `media.process` | [`media::ProcessMedia`] | decodes an upload once (`mobile_media`), stores `thumb`/`medium`/`large`, publishes `media.ready` |
//! | `push.notify` | [`push::Fanout`] | one `push.send` per device of a user |
//! | `push.send` | [`push::Deliver`] | one notification to one device over APNs or FCM |
//! | `media.delete` | [`erase::DeleteMedia`] | removes a deleted account's upload (original and variants) from storage |
//! | `account.forget` | [`erase::ForgetAccount`] | deletes what Redis holds under a deleted account's id |
//! | `mail.send` | [`mail::SendMail`] | one mail (a verification or reset link, a notice) over SMTP |
//!
//! The process serves only health on `LISTEN_ADDR` and metrics on `METRICS_ADDR`. On
//! SIGTERM it goes unready, stops claiming, lets in-flight jobs finish within the
//! drain, releases what is still running, and exits 0.

pub mod erase;
pub mod mail;
pub mod media;
pub mod metrics;
pub mod push;
pub mod queue;
pub mod settings;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::Router;
use mobile_domain::JobKind;
use mobile_runtime::{
    CommonSettings, Defaults, Env, SettingsError, Shutdown, metrics as runtime_metrics, server,
    service::{Foundation, Listeners, Service},
};
use mobile_storage::Storage;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use crate::settings::WorkerSettings;
use crate::{
    metrics::WorkerMetrics,
    push::{apns::Apns, fcm::Fcm},
    queue::{Kind, Queue, QueueSettings},
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// `push.notify` jobs are one short transaction each: a few at once keep up with any
/// number of senders.
const FANOUT_CONCURRENCY: usize = 8;
/// `media.delete` jobs at once: storage deletes are small requests, and an account
/// with thousands of uploads should not wait on one at a time.
const ERASE_CONCURRENCY: usize = 8;
/// Stop waiting for in-flight jobs this long before the drain deadline, to release
/// the rest while the process may still write.
const RELEASE_MARGIN: Duration = Duration::from_secs(2);

/// The `mobile-worker` binary.
#[derive(Debug)]
pub struct Worker;

impl Service for Worker {
    const NAME: &'static str = "mobile-worker";
    const VERSION: &'static str = VERSION;
    const DEFAULTS: Defaults = WorkerSettings::DEFAULTS;
    const ABOUT: &'static str = "run the durable jobs (health on LISTEN_ADDR)";

    type Settings = WorkerSettings;

    fn settings(env: &Env) -> Result<WorkerSettings, SettingsError> {
        WorkerSettings::from_env(env)
    }

    fn common(settings: &WorkerSettings) -> &CommonSettings {
        &settings.common
    }

    async fn serve(
        settings: WorkerSettings,
        listeners: Listeners,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        serve(settings, listeners, shutdown).await
    }
}

/// Works on listeners the caller bound until `shutdown` triggers, then drains.
pub async fn serve(
    settings: WorkerSettings,
    listeners: Listeners,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let Foundation {
        db,
        redis,
        mut registry,
        health,
        drain,
        serve_options,
    } = Foundation::connect::<Worker>(&settings.common, &shutdown)?;
    let metrics = WorkerMetrics::register(&mut registry);
    let storage = Storage::open(&settings.storage_url, settings.storage_options.clone())?;
    tracing::info!(url = storage.url(), "object storage");

    let extra_root = match &settings.push_ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("PUSH_CA_FILE: cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let http = push::http_client(extra_root.as_deref()).context("PUSH_CA_FILE")?;
    let apns = match &settings.apns {
        Some(apns) => Some(Arc::new(Apns::new(apns, http.clone())?)),
        None => {
            tracing::warn!(
                "APNs is disabled (set APNS_KEY_FILE, APNS_KEY_ID, APNS_TEAM_ID and APNS_TOPIC): iOS devices get no pushes"
            );
            None
        }
    };
    let fcm = match &settings.fcm {
        Some(fcm) => Some(Arc::new(Fcm::new(fcm, http)?)),
        None => {
            tracing::warn!(
                "FCM is disabled (set FCM_SERVICE_ACCOUNT_FILE): Android devices get no pushes"
            );
            None
        }
    };

    let mailer = match settings.mail.clone() {
        Some(mail) => {
            let mailer = mail::Mailer::new(mail, settings.mail_timeout)?;
            tracing::info!(smtp = %mailer.describe(), "mail is on");
            Some(Arc::new(mailer))
        }
        None => {
            tracing::warn!(
                "mail is off (set SMTP_URL, MAIL_FROM, APP_NAME and APP_LINK_BASE_URL): no verification or password-reset mails are sent"
            );
            None
        }
    };

    let kinds = vec![
        Kind {
            kind: JobKind::MailSend,
            concurrency: settings.mail_concurrency,
            timeout: settings.mail_timeout,
            handler: Arc::new(mail::SendMail {
                db: db.clone(),
                mailer,
                metrics: metrics.clone(),
            }),
        },
        Kind {
            kind: JobKind::MediaProcess,
            concurrency: settings.image_concurrency,
            timeout: settings.image_timeout,
            handler: Arc::new(media::ProcessMedia {
                db: db.clone(),
                storage: storage.clone(),
                redis: redis.clone(),
                metrics: metrics.clone(),
                max_pixels: settings.media_max_pixels,
                quality: settings.image_quality,
            }),
        },
        Kind {
            kind: JobKind::MediaDelete,
            concurrency: ERASE_CONCURRENCY,
            timeout: settings.image_timeout,
            handler: Arc::new(erase::DeleteMedia { storage }),
        },
        Kind {
            kind: JobKind::AccountForget,
            concurrency: 1,
            timeout: settings.image_timeout,
            handler: Arc::new(erase::ForgetAccount {
                redis: redis.clone(),
            }),
        },
        Kind {
            kind: JobKind::PushNotify,
            concurrency: FANOUT_CONCURRENCY,
            timeout: settings.push_timeout,
            handler: Arc::new(push::Fanout { db: db.clone() }),
        },
        Kind {
            kind: JobKind::PushSend,
            concurrency: settings.push_concurrency,
            timeout: settings.push_timeout,
            handler: Arc::new(push::Deliver {
                db: db.clone(),
                apns,
                fcm,
                metrics: metrics.clone(),
            }),
        },
    ];
    let queue = Queue::new(
        db,
        QueueSettings {
            worker_id: settings.worker_id.clone(),
            poll_interval: settings.poll_interval,
            backoff_base: settings.backoff_base,
            backoff_cap: settings.backoff_cap,
        },
        kinds,
        metrics,
    );
    tracing::info!(worker_id = %settings.worker_id, "job runner starting");

    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();
    tasks.spawn({
        let (shutdown, stop) = (shutdown.clone(), stop.clone());
        async move {
            shutdown.triggered().await;
            stop.cancel();
        }
    });
    tasks.spawn(queue.run(stop, drain.timeout.saturating_sub(RELEASE_MARGIN)));

    let app = Router::new().merge(health.router());
    server::serve(
        listeners,
        app,
        runtime_metrics::router(Arc::new(registry)),
        shutdown,
        drain,
        tasks,
        serve_options,
    )
    .await
}
