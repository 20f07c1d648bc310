//! `mobile-api`: the stateless REST API.
//!
//! A request passes through the [`middleware`] stack (request id, metrics, problem
//! safety net, authentication, idempotency, timeout, rate limits), reaches a handler in
//! [`routes`] that parses its input into domain types ([`mobile_domain`]), calls plain
//! query functions ([`mobile_db`]) and answers JSON, or an [`error::ApiError`] as
//! problem+json. The OpenAPI document is generated from the handlers' annotations, so
//! it cannot drift from them.
//!
//! `main.rs` is thin: [`run`] serves, [`migrate`] applies migrations.

pub mod error;
pub mod events;
pub mod extract;
pub mod metrics;
pub mod middleware;
mod openapi;
pub mod routes;
pub mod settings;
pub mod state;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use axum::{
    Router,
    extract::DefaultBodyLimit,
    http::{HeaderValue, header},
    middleware::{from_fn, from_fn_with_state},
    routing::get,
};
use mobile_auth::{AccessTokens, SigningKey, VerifyKeys};
use mobile_runtime::{
    Health, Shutdown, metrics as runtime_metrics, server,
    service::{self, Foundation},
};
use tokio::net::TcpListener;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub use crate::settings::ApiSettings;
use crate::{
    metrics::ApiMetrics,
    state::{AppState, Shared},
};

/// The version reported in `build_info` and the OpenAPI document.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The public router: every route, the OpenAPI document, health, and the middleware.
pub fn app(state: AppState, health: &Health) -> Router {
    let (api, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(routes::auth::router(&state))
        .merge(routes::me::router(&state))
        .merge(routes::devices::router(&state))
        .merge(routes::conversations::router(&state))
        .merge(routes::media::router(&state))
        .merge(routes::internal::router())
        .split_for_parts();
    // Serialised once at start; every request for it is a copy of these bytes.
    let document = bytes::Bytes::from(document.to_pretty_json().unwrap_or_default());

    api.route(
        "/openapi.json",
        get(move || {
            let document = document.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    )],
                    document,
                )
            }
        }),
    )
    .merge(health.router())
    .fallback(middleware::not_found)
    // Layers wrap what is above them: the last added runs first.
    .layer(from_fn_with_state(state.clone(), middleware::timeout))
    .layer(from_fn_with_state(
        state.clone(),
        middleware::idempotency::idempotency,
    ))
    .layer(from_fn_with_state(state.clone(), middleware::authenticate))
    .layer(from_fn(middleware::problem_safety_net))
    .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
    .layer(from_fn_with_state(state.clone(), middleware::observe))
    .with_state(state)
}

/// Listens on the configured addresses and serves until SIGTERM.
pub async fn run(settings: ApiSettings) -> anyhow::Result<()> {
    let (listener, metrics_listener, shutdown) =
        service::bind_with_signals(&settings.common).await?;
    serve(settings, listener, metrics_listener, shutdown).await
}

/// Serves on listeners the caller bound (tests bind port 0) until `shutdown` triggers,
/// then drains.
pub async fn serve(
    settings: ApiSettings,
    listener: TcpListener,
    metrics_listener: TcpListener,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let tokens = access_tokens(&settings)?;
    let Foundation {
        db,
        redis,
        mut registry,
        health,
        drain,
    } = Foundation::connect(&settings.common, VERSION, &shutdown)?;
    let metrics = ApiMetrics::register(&mut registry);
    let storage =
        mobile_storage::Storage::open(&settings.storage_url, settings.storage_options.clone())?;
    tracing::info!(url = storage.url(), "object storage");
    if settings.internal_api_token.is_none() {
        tracing::info!("INTERNAL_API_TOKEN is not set: /internal/v1/* answers 404");
    }
    let state = AppState::new(Shared {
        storage,
        db,
        redis,
        tokens,
        settings,
        metrics,
    });
    let app = app(state, &health);
    server::serve(
        listener,
        app,
        metrics_listener,
        runtime_metrics::router(Arc::new(registry)),
        shutdown,
        drain,
        // Every request of the API ends with its response: nothing outlives it.
        tokio_util::task::TaskTracker::new(),
    )
    .await
}

/// The signing key from `JWT_SIGNING_KEY_FILE` (or, in development only, the published
/// development key) and any extra verify keys from `JWT_VERIFY_KEYS_FILE`.
fn access_tokens(settings: &ApiSettings) -> anyhow::Result<AccessTokens> {
    let signing = match &settings.jwt_signing_key_file {
        Some(path) => SigningKey::from_file(path).context("JWT_SIGNING_KEY_FILE")?,
        None if settings.common.app_env.is_development() => {
            tracing::warn!(
                "JWT_SIGNING_KEY_FILE is not set: signing with the PUBLISHED DEVELOPMENT KEY. \
                 Anyone can forge tokens for this server. Never run this outside development."
            );
            SigningKey::development()?
        }
        None => anyhow::bail!(
            "JWT_SIGNING_KEY_FILE is required (APP_ENV is {:?}; only APP_ENV=development may fall back to the development key)",
            settings.common.app_env.to_string()
        ),
    };
    let verify = match &settings.jwt_verify_keys_file {
        Some(path) => VerifyKeys::from_file(path).context("JWT_VERIFY_KEYS_FILE")?,
        None => VerifyKeys::default(),
    };
    let tokens = AccessTokens::new(
        Some(signing),
        verify,
        settings.jwt_issuer.clone(),
        settings.jwt_audience.clone(),
        settings.access_token_ttl,
    );
    tracing::info!(
        verify_kids = ?tokens.verify_keys().kids(),
        "access-token keys loaded"
    );
    Ok(tokens)
}

/// `mobile-api migrate`: creates the database if needed and applies migrations,
/// retrying for up to a minute while PostgreSQL is still starting.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        attempt += 1;
        match mobile_db::migrate(database_url).await {
            Ok(applied) => {
                tracing::info!(applied, "migrations complete");
                return Ok(());
            }
            Err(mobile_db::migrate::Error::Connect(e)) if attempt < 30 => {
                tracing::warn!(attempt, error = %e, "PostgreSQL not reachable yet; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) => return Err(e).context("migrate"),
        }
    }
}
