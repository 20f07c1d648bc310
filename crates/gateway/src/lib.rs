//! `mobile-gateway`: the WebSocket gateway.
//!
//! A client connects to `GET /v1/ws` with an access token, is subscribed to its own
//! `user:` channel, and subscribes to the conversations it follows (with `since` to
//! recover what it missed). Messages reach it through the [`hub`], which fans each frame
//! from this process's single Redis Pub/Sub connection ([`pubsub`]) out to the local
//! subscribers, in the order its [`sequencer`] keeps, filling what Redis lost from
//! PostgreSQL ([`backfill`]); each [`connection`] delivers its client's events in
//! order, once. The wire format is in [`protocol`] and `docs/websocket-protocol.md`.
//!
//! Who holds which socket is kept in [`sessions`]: the caps per user and per address,
//! and the closing of a revoked session's sockets. Start-up, health, metrics and drain
//! are the shared ones of `mobile-runtime`; on SIGTERM each connection is told to
//! reconnect (`reconnect`, then close 1012) at a random moment of the drain window, so
//! its clients do not all land on one pod at once.

pub mod backfill;
pub mod bucket;
pub mod connection;
pub mod hub;
pub mod inbox;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod pubsub;
pub mod sequencer;
pub mod sessions;
pub mod settings;
pub mod socket;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::{ConnectInfo, Query, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use mobile_auth::{AccessTokens, TokenError};
use mobile_db::Db;
use mobile_runtime::{
    CommonSettings, Defaults, Env, Health, SettingsError, Shutdown,
    health::Scope,
    metrics as runtime_metrics,
    redis::Redis,
    server,
    service::{Foundation, Listeners, Service},
};
use rand::Rng;
use serde::Deserialize;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

pub use crate::settings::GatewaySettings;
use crate::{
    connection::{Admission, Admitted},
    hub::{Evict, Hub},
    metrics::GatewayMetrics,
    presence::Presence,
    sessions::{Budgets, Refusal, Sessions},
    socket::{Upgrade, WebSocketConfig},
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

/// What every connection shares.
#[derive(Debug)]
pub struct Context {
    pub settings: GatewaySettings,
    pub tokens: AccessTokens,
    pub db: Db,
    pub redis: Redis,
    pub hub: Hub,
    pub presence: Presence,
    pub sessions: Sessions,
    pub metrics: GatewayMetrics,
    pub shutdown: Shutdown,
    /// Caps connections per process; a permit lives as long as its connection.
    pub connections: Arc<Semaphore>,
    /// Every connection task, so the drain waits for them.
    pub tasks: TaskTracker,
}

impl Context {
    /// When, after shutdown starts, one connection should be told to reconnect: after
    /// the delay (while load balancers still route here, a reconnect could land here
    /// again), at a uniformly random point of the first three quarters of what remains.
    pub fn drain_offset(&self) -> Duration {
        let delay = self.settings.common.shutdown_delay;
        let window = self
            .settings
            .common
            .shutdown_timeout
            .saturating_sub(delay)
            .mul_f64(0.75);
        let spread = rand::thread_rng().gen_range(0.0..=1.0);
        delay + window.mul_f64(spread)
    }
}

/// The `mobile-gateway` binary.
#[derive(Debug)]
pub struct Gateway;

impl Service for Gateway {
    const NAME: &'static str = "mobile-gateway";
    const VERSION: &'static str = VERSION;
    const DEFAULTS: Defaults = GatewaySettings::DEFAULTS;
    const ABOUT: &'static str = "serve WebSocket clients at /v1/ws";

    type Settings = GatewaySettings;

    fn settings(env: &Env) -> Result<GatewaySettings, SettingsError> {
        GatewaySettings::from_env(env)
    }

    fn common(settings: &GatewaySettings) -> &CommonSettings {
        &settings.common
    }

    async fn serve(
        settings: GatewaySettings,
        listeners: Listeners,
        shutdown: Shutdown,
    ) -> anyhow::Result<()> {
        serve(settings, listeners, shutdown).await
    }
}

/// Serves on listeners the caller bound until `shutdown` triggers, then drains.
pub async fn serve(
    settings: GatewaySettings,
    listeners: Listeners,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    let tokens = settings.tokens.verifier()?;
    let Foundation {
        db,
        redis,
        mut registry,
        health,
        drain,
        serve_options,
    } = Foundation::connect::<Gateway>(&settings.common, &shutdown)?;
    let metrics = GatewayMetrics::register(&mut registry);

    // The hub and presence outlive the connections: they stop after the drain.
    let background = tokio_util::sync::CancellationToken::new();
    let _stop_background = background.clone().drop_guard();
    let sessions = Sessions::new(
        settings.max_connections_per_user,
        settings.max_connections_per_ip,
        Budgets {
            // Room for a few devices subscribing everything at once.
            subscribe_burst: u32::try_from(settings.max_channels)
                .unwrap_or(u32::MAX)
                .saturating_mul(2)
                .max(settings.subscribes_per_second),
            subscribes_per_second: settings.subscribes_per_second,
            recoveries_per_minute: settings.recovery_budget_per_minute,
        },
    );
    let hub = Hub::start(
        redis.clone(),
        db.clone(),
        metrics.clone(),
        sessions.clone(),
        background.clone(),
    );
    tokio::spawn(sessions::sweep(
        sessions.clone(),
        db.clone(),
        settings.session_check_interval,
        background.clone(),
    ));
    let presence = Presence::start(redis.clone(), hub.connections(), background.clone());

    // This pod's own subscription: down while Redis answers, the pod is unready (other
    // gateways can serve); down because Redis is, every gateway is degraded alike and
    // stays ready, serving from PostgreSQL.
    let pubsub_hub = hub.clone();
    let health = health.with_check(
        "pubsub",
        Scope::Local { on: Some("redis") },
        Arc::new(move || {
            let live = pubsub_hub.is_live();
            Box::pin(async move {
                if live {
                    Ok(())
                } else {
                    Err("the Redis Pub/Sub subscription is down".to_owned())
                }
            })
        }),
    );
    let tasks = TaskTracker::new();
    let context = Arc::new(Context {
        connections: Arc::new(Semaphore::new(settings.max_connections)),
        settings,
        tokens,
        db,
        redis,
        hub,
        presence,
        sessions,
        metrics,
        shutdown: shutdown.clone(),
        tasks: tasks.clone(),
    });
    let app = app(context, &health);
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

/// `/v1/ws` and health.
pub fn app(context: Arc<Context>, health: &Health) -> Router {
    Router::new()
        .route("/v1/ws", get(upgrade))
        .merge(health.router())
        .with_state(context)
}

#[derive(Debug, Deserialize)]
struct WsQuery {
    access_token: Option<String>,
}

/// Checks capacity and the token, then upgrades. A bad token still upgrades, to be
/// closed with 4001: mobile WebSocket clients seldom see the HTTP status of a refused
/// handshake, but always see a close code. A connection over a cap is refused before
/// the upgrade, with a problem body: 503 `overloaded` (this process), 429
/// `too_many_connections` (this user, or this address).
async fn upgrade(
    State(context): State<Arc<Context>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    Query(query): Query<WsQuery>,
    upgrade: Upgrade,
) -> Response {
    if context.shutdown.is_triggered() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting_down",
            "this gateway is shutting down; reconnect",
        );
    }
    let address = mobile_runtime::client_ip::client_ip(
        &headers,
        Some(peer.ip()),
        context.settings.trusted_proxy_hops,
    )
    .subject();
    let Ok(address_ticket) = context.sessions.admit_address(address) else {
        context.metrics.refused("address");
        return refuse(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_connections",
            "this address holds as many connections as it may (WS_MAX_CONNECTIONS_PER_IP)",
        );
    };
    let Ok(permit) = context.connections.clone().try_acquire_owned() else {
        context.metrics.refused("process");
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "this gateway holds as many connections as it may; retry shortly",
        );
    };
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(mobile_auth::bearer_token)
        .map(str::to_owned)
        .or(query.access_token);
    let auth = match token {
        Some(token) => context.tokens.verify(token.trim()),
        None => Err(TokenError::Invalid),
    };
    let admitted = match auth {
        Ok(claims) => {
            let conn = connection::next_conn_id();
            let evict = Evict::default();
            match context
                .sessions
                .admit(claims.sub, claims.sid, conn, evict.clone())
            {
                Ok(ticket) => Ok(Admitted {
                    conn,
                    claims,
                    evict,
                    ticket,
                }),
                Err(Refusal::User | Refusal::Address) => {
                    context.metrics.refused("user");
                    return refuse(
                        StatusCode::TOO_MANY_REQUESTS,
                        "too_many_connections",
                        "this user holds as many connections as they may \
                         (WS_MAX_CONNECTIONS_PER_USER); close one first",
                    );
                }
            }
        }
        Err(error) => Err(error),
    };
    let admission = Box::new(Admission {
        auth: admitted,
        slots: (permit, address_ticket),
    });
    let frame_limit = context.settings.max_frame_bytes;
    let tasks = context.tasks.clone();
    // A small read buffer: most connections are idle most of the time, and memory per
    // idle connection is what decides how many a pod holds. What is sent gathers in
    // the socket's own buffer until the flush after each batch (`socket::Wire`).
    let config = WebSocketConfig::default()
        .max_frame_size(Some(frame_limit))
        .max_message_size(Some(frame_limit))
        .read_buffer_size(512);
    // Boxed: the socket's task keeps this closure's captures for as long as it lives,
    // so they are three pointers, not the admission itself.
    upgrade.accept(config, move |socket| {
        tasks.track_future(connection::serve(socket, *admission, context))
    })
}

/// A refused upgrade, as the API's problem documents are.
pub(crate) fn refuse(status: StatusCode, code: &'static str, detail: &'static str) -> Response {
    let body = serde_json::json!({
        "type": format!("urn:mobile-backend:problem:{code}"),
        "title": status.canonical_reason().unwrap_or("Error"),
        "status": status.as_u16(),
        "code": code,
        "detail": detail,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
    }
    response
}
