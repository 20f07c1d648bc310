//! The state every handler shares: cheap to clone (everything is behind an `Arc` or is
//! a pool handle already).

use std::sync::Arc;

use mobile_auth::AccessTokens;
use mobile_runtime::redis::Redis;
use sqlx::PgPool;

use crate::{metrics::ApiMetrics, settings::ApiSettings};

#[derive(Debug, Clone)]
pub struct AppState {
    pub db: PgPool,
    pub redis: Redis,
    pub tokens: Arc<AccessTokens>,
    pub settings: Arc<ApiSettings>,
    pub metrics: ApiMetrics,
    pub storage: mobile_storage::Storage,
}
