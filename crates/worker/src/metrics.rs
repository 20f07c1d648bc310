//! The worker's metric families: the brief's names, plus jobs in flight.

use mobile_domain::JobKind;
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::{Registry, Unit},
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct KindOutcomeLabel {
    pub kind: &'static str,
    /// `completed`, `retried`, `dead`, `timed_out`, `lost_lease`, `released`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PushLabel {
    pub platform: &'static str,
    /// `sent`, `retried`, `device_removed`, `rejected`.
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MailLabel {
    /// `verify_email`, `reset_password`, `email_change_requested`.
    pub template: &'static str,
    /// `sent`, `failed` (an attempt; retried unless permanent), `skipped` (nothing to
    /// send: the account is gone or already verified), `disabled` (no `SMTP_URL`).
    pub outcome: &'static str,
}

#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    /// Queued jobs due now, per kind; refreshed every poll interval by one worker of
    /// the deployment only (`crate::queue`), so a sum over workers counts each once.
    pub due: Family<KindLabel, Gauge>,
    /// Queued jobs scheduled later (retries in backoff), per kind; the same reporter.
    pub scheduled: Family<KindLabel, Gauge>,
    pub in_flight: Family<KindLabel, Gauge>,
    pub processed: Family<KindOutcomeLabel, Counter>,
    pub duration: Family<KindLabel, Histogram>,
    pub pushes: Family<PushLabel, Counter>,
    pub mails: Family<MailLabel, Counter>,
    /// Decode, orient, three resizes and encodes of one image.
    pub image_resize_duration: Histogram,
}

impl WorkerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            due: Family::default(),
            scheduled: Family::default(),
            in_flight: Family::default(),
            processed: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(mobile_runtime::metrics::DURATION_BUCKETS)
            }),
            pushes: Family::default(),
            mails: Family::default(),
            image_resize_duration: Histogram::new(mobile_runtime::metrics::DURATION_BUCKETS),
        };
        registry.register(
            "jobs_due",
            "Queued jobs due now, by kind (reported by one worker of the deployment)",
            metrics.due.clone(),
        );
        registry.register(
            "jobs_scheduled",
            "Queued jobs scheduled later, retries in backoff, by kind (reported by one worker)",
            metrics.scheduled.clone(),
        );
        registry.register(
            "jobs_in_flight",
            "Jobs this process is running, by kind",
            metrics.in_flight.clone(),
        );
        registry.register(
            "jobs_processed",
            "Job attempts by kind and outcome",
            metrics.processed.clone(),
        );
        registry.register_with_unit(
            "job_duration",
            "Time one job attempt ran, by kind",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "push_notifications",
            "Push sends by platform and outcome",
            metrics.pushes.clone(),
        );
        registry.register(
            "mails",
            "Mails by template and outcome",
            metrics.mails.clone(),
        );
        registry.register_with_unit(
            "image_resize_duration",
            "Time to turn one original into its variants",
            Unit::Seconds,
            metrics.image_resize_duration.clone(),
        );
        metrics
    }

    pub fn mail(&self, template: &'static str, outcome: &'static str) {
        self.mails
            .get_or_create(&MailLabel { template, outcome })
            .inc();
    }

    pub fn processed(&self, kind: JobKind, outcome: &'static str) {
        self.processed
            .get_or_create(&KindOutcomeLabel {
                kind: kind.as_str(),
                outcome,
            })
            .inc();
    }
}
