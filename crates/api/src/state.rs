//! The state every handler shares.
//!
//! Every middleware layer and handler takes its own clone of the state for each
//! request, so a clone is one reference-count increment: the fields live once, behind
//! one `Arc`, and handlers read them through `Deref` (`state.db`, `state.metrics`).

use std::{ops::Deref, sync::Arc};

use mobile_auth::AccessTokens;
use mobile_db::Db;
use mobile_runtime::redis::Redis;

use crate::{
    metrics::ApiMetrics,
    middleware::rate_limit::LocalLimits,
    oidc::{Provider, Verifier},
    settings::ApiSettings,
};

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
    /// Sign in with Apple and Google.
    pub sign_in: SignIn,
}

/// The id_token verifiers of the native sign-in providers.
#[derive(Debug)]
pub struct SignIn {
    pub apple: Verifier,
    pub google: Verifier,
}

impl SignIn {
    pub fn verifier(&self, provider: Provider) -> &Verifier {
        match provider {
            Provider::Apple => &self.apple,
            Provider::Google => &self.google,
        }
    }
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
