//! The state every handler shares.
//!
//! Every middleware layer and handler takes its own clone of the state for each
//! request, so a clone is one reference-count increment: the fields live once, behind
//! one `Arc`, and handlers read them through `Deref` (`state.db`, `state.metrics`).

use std::{ops::Deref, sync::Arc};

use mobile_auth::AccessTokens;
use mobile_db::Db;
use mobile_runtime::redis::Redis;

use crate::{metrics::ApiMetrics, middleware::rate_limit::LocalLimits, settings::ApiSettings};

#[derive(Debug, Clone)]
pub struct AppState(Arc<Shared>);

/// What [`AppState`] holds.
#[derive(Debug)]
pub struct Shared {
    pub db: Db,
    pub redis: Redis,
    pub tokens: AccessTokens,
    pub settings: ApiSettings,
    pub metrics: ApiMetrics,
    pub storage: mobile_storage::Storage,
    /// The rate limits this process keeps while Redis cannot.
    pub local_limits: LocalLimits,
}

impl AppState {
    pub fn new(shared: Shared) -> Self {
        Self(Arc::new(shared))
    }
}

impl Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}
