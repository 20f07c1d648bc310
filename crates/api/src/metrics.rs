//! The API's metric families. Names are the brief's; every label value comes from a
//! small fixed set (route templates, methods, status codes).

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::{Registry, Unit},
};

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpLabels {
    /// The method if it is one of HTTP's own, else `other`: a client chooses the
    /// method, and every value of a label is a series kept forever.
    pub method: &'static str,
    /// The matched route template (`/v1/devices/{device_id}`), never the raw path.
    pub route: String,
    pub status: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct FeatureLabel {
    pub feature: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SignInLabels {
    /// `password`, `apple` or `google`.
    pub provider: &'static str,
    /// `existing` (signed in to an account), `created` (a new account), `linked` (a
    /// provider identity joined the account with its email), `invalid` (wrong
    /// credentials or token), `refused` (no account can be made: the email is taken or
    /// missing), `unavailable` (the provider's keys could not be fetched).
    pub outcome: &'static str,
}

/// Handles on the API's metrics, cloned into the middleware that records them.
#[derive(Debug, Clone)]
pub struct ApiMetrics {
    pub http_requests: Family<HttpLabels, Counter>,
    pub http_request_duration: Family<HttpLabels, Histogram>,
    pub rate_limited: Family<RouteLabel, Counter>,
    /// Requests served without a Redis-backed feature because Redis did not answer
    /// (the feature fails open): a rising count means Redis is in trouble.
    pub redis_degraded: Family<FeatureLabel, Counter>,
    /// Frames published to the gateways over Redis, by outcome (`ok`, `failed`).
    pub events_published: Family<OutcomeLabel, Counter>,
    /// Sign-in attempts on an account under attack, by action (`delayed`, `refused`).
    pub login_throttled: Family<ActionLabel, Counter>,
    /// Sign-ins and sign-ups by provider and outcome.
    pub sign_ins: Family<SignInLabels, Counter>,
}

impl ApiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(|| {
                Histogram::new(mobile_runtime::metrics::DURATION_BUCKETS)
            }),
            rate_limited: Family::default(),
            redis_degraded: Family::default(),
            events_published: Family::default(),
            login_throttled: Family::default(),
            sign_ins: Family::default(),
        };
        registry.register(
            "http_requests",
            "HTTP requests by method, route template and status",
            metrics.http_requests.clone(),
        );
        registry.register_with_unit(
            "http_request_duration",
            "HTTP request latency by method, route template and status",
            Unit::Seconds,
            metrics.http_request_duration.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused with 429 by route template",
            metrics.rate_limited.clone(),
        );
        registry.register(
            "redis_degraded",
            "Requests served without a Redis-backed feature because Redis failed",
            metrics.redis_degraded.clone(),
        );
        registry.register(
            "events_published",
            "Event frames published to the gateways over Redis, by outcome",
            metrics.events_published.clone(),
        );
        registry.register(
            "login_throttled",
            "Sign-in attempts slowed or refused for the failures on their account",
            metrics.login_throttled.clone(),
        );
        registry.register(
            "auth_sign_ins",
            "Sign-ins and sign-ups by provider (password, apple, google) and outcome",
            metrics.sign_ins.clone(),
        );
        metrics
    }

    /// Counts one sign-in attempt.
    pub fn sign_in(&self, provider: &'static str, outcome: &'static str) {
        self.sign_ins
            .get_or_create(&SignInLabels { provider, outcome })
            .inc();
    }
}
