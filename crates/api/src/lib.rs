//! `mobile-api`: the stateless REST API.
//!
//! A request passes through the [`middleware`] stack (request id, metrics, problem
//! safety net, authentication, idempotency, timeout, rate limits), reaches a handler in
//! [`routes`] that parses its input into domain types ([`mobile_domain`]), calls plain
//! query functions ([`mobile_db`]) or, for a message post, [`messaging`], and answers
//! JSON, or an [`error::ApiError`] as problem+json. The OpenAPI document is generated
//! from the handlers' annotations and the [`error::ErrorCode`] table ([`openapi`]),
//! so it cannot drift from them; debug builds check every problem against it.
//!
//! `main.rs` is one line: [`Api`] is a [`Service`] and `mobile_runtime::cli::main`
//! does the rest (`mobile-api`, `mobile-api migrate`, `mobile-api health`).

pub mod error;
pub mod events;
pub mod extract;
pub mod login_guard;
pub mod messaging;
pub mod metrics;
pub mod middleware;
pub mod oidc;
pub mod openapi;
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
use mobile_runtime::{
    CommonSettings, Defaults, Env, Health, SettingsError, Shutdown, metrics as runtime_metrics,
    server,
    service::{Foundation, Listeners, Service},
};
use secrecy::ExposeSecret as _;
use utoipa::OpenApi as _;
use utoipa_axum::router::OpenApiRouter;

pub use crate::settings::ApiSettings;
use crate::{
    metrics::ApiMetrics,
    state::{AppState, Shared},
};

/// The version reported in `build_info` and the OpenAPI document.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// The `mobile-api` binary.
#[derive(Debug)]
pub struct Api;

impl Service for Api {
    const NAME: &'static str = "mobile-api";
    const VERSION: &'static str = VERSION;
    const DEFAULTS: Defaults = ApiSettings::DEFAULTS;
    const ABOUT: &'static str = "serve the REST API";
    const COMMANDS: &'static [(&'static str, &'static str)] = &[(
        "migrate",
        "create the database if missing and apply migrations, then exit",
    )];

    type Settings = ApiSettings;

    fn settings(env: &Env) -> Result<ApiSettings, SettingsError> {
        ApiSettings::from_env(env)
    }

    fn common(settings: &ApiSettings) -> &CommonSettings {
        &settings.common
    }

    async fn serve(
        settings: ApiSettings,
        listeners: Listeners,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        serve(settings, listeners, shutdown).await
    }

    async fn command(name: &str, env: &Env) -> anyhow::Result<()> {
        match name {
            "migrate" => {
                // Migrations hold a session advisory lock: never through a
                // transaction pooler.
                let common = Self::common_settings(env)?;
                let url = common
                    .database_listen_url
                    .as_ref()
                    .unwrap_or(&common.database_url);
                migrate(url.expose_secret()).await
            }
            other => anyhow::bail!("mobile-api has no command {other:?}"),
        }
    }
}

/// The public router: every route, the OpenAPI document, health, and the middleware.
pub fn app(state: AppState, health: &Health) -> Router {
    let (api, document) = OpenApiRouter::with_openapi(openapi::ApiDoc::openapi())
        .merge(routes::auth::router(&state))
        .merge(routes::me::router(&state))
        .merge(routes::email::router(&state))
        .merge(routes::sessions::router(&state))
        .merge(routes::devices::router(&state))
        .merge(routes::conversations::router(&state))
        .merge(routes::members::router(&state))
        .merge(routes::media::router(&state))
        .merge(routes::internal::router())
        .split_for_parts();
    let document = openapi::finish(&document);
    let contract = Arc::new(openapi::contract(&document));
    // Serialised once at start; every request for it is a copy of these bytes.
    let document = bytes::Bytes::from(serde_json::to_vec_pretty(&document).unwrap_or_default());

    let mut app = api
        .route(
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
        .layer(from_fn_with_state(
            state.clone(),
            middleware::body_deadline::body_deadline,
        ))
        .layer(from_fn(middleware::problem_safety_net));
    if cfg!(debug_assertions) {
        app = app.layer(from_fn_with_state(contract, middleware::contract::check));
    }
    app.layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), middleware::observe))
        .with_state(state)
}

/// The Apple and Google verifiers, each off unless its client ids are set.
fn sign_in(settings: &ApiSettings) -> anyhow::Result<state::SignIn> {
    let config = &settings.sign_in;
    let extra_root = match &config.ca_file {
        Some(path) => Some(
            std::fs::read(path)
                .with_context(|| format!("OIDC_CA_FILE: cannot read {}", path.display()))?,
        ),
        None => None,
    };
    let http = oidc::http_client(extra_root.as_deref()).context("OIDC_CA_FILE")?;
    let verifier = |provider, settings: &oidc::ProviderSettings| {
        let verifier = oidc::Verifier::new(
            provider,
            settings.clone(),
            http.clone(),
            config.jwks_min_refresh,
        );
        if verifier.enabled() {
            tracing::info!(provider = provider.as_str(), issuer = %settings.issuer, "native sign-in is on");
        } else {
            tracing::info!(
                provider = provider.as_str(),
                "native sign-in is off (no client ids)"
            );
        }
        verifier
    };
    Ok(state::SignIn {
        apple: verifier(oidc::Provider::Apple, &config.apple),
        google: verifier(oidc::Provider::Google, &config.google),
    })
}

/// Serves on listeners the caller bound (tests bind port 0) until `shutdown` triggers,
/// then drains.
pub async fn serve(
    settings: ApiSettings,
    listeners: Listeners,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let tokens = settings.tokens.issuer()?;
    let Foundation {
        db,
        redis,
        mut registry,
        health,
        drain,
        serve_options,
    } = Foundation::connect::<Api>(&settings.common, &shutdown)?;
    let metrics = ApiMetrics::register(&mut registry);
    let storage =
        mobile_storage::Storage::open(&settings.storage_url, settings.storage_options.clone())?;
    tracing::info!(url = storage.url(), "object storage");
    if settings.internal_api_token.is_none() {
        tracing::info!("INTERNAL_API_TOKEN is not set: /internal/v1/* answers 404");
    }
    let sign_in = sign_in(&settings)?;
    let state = AppState::new(Shared {
        sign_in,
        storage,
        db,
        redis,
        tokens,
        settings,
        metrics,
        local_limits: middleware::rate_limit::LocalLimits::new(),
    });
    let app = app(state, &health);
    server::serve(
        listeners,
        app,
        runtime_metrics::router(Arc::new(registry)),
        shutdown,
        drain,
        // Every request of the API ends with its response: nothing outlives it.
        tokio_util::task::TaskTracker::new(),
        serve_options,
    )
    .await
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
