//! Readiness: a shared outage (Redis or PostgreSQL down for every pod) degrades the API
//! but keeps it in service; a pod that has never reached them is still starting.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::helpers::{TestApp, sample};

async fn ready(app: &TestApp) -> (StatusCode, Value) {
    let response = app
        .request(Method::GET, "/health/ready")
        .send()
        .await
        .unwrap();
    (response.status(), response.json().await.unwrap())
}

#[tokio::test]
async fn a_redis_outage_degrades_the_api_without_taking_it_out_of_service() {
    let mut redis = mobile_testkit::RedisServer::start().await;
    let app = TestApp::builder()
        .redis_url(redis.url())
        .env("RATE_LIMIT_AUTH_PER_MINUTE", "1000")
        .spawn()
        .await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["checks"]["redis"], "ok");
    assert_eq!(body["checks"]["postgres"], "ok");

    redis.stop().await;
    // Redis is down for every pod alike: this one stays in service, degraded, saying
    // which check failed, never the driver's error (hosts, ports, versions).
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body,
        serde_json::json!({"status": "degraded", "checks": {"postgres": "ok", "redis": "failed"}})
    );
    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(&metrics, "readiness_check_ok{check=\"redis\"}"),
        Some(0.0)
    );
    // Liveness does not care.
    let live = app
        .request(Method::GET, "/health/live")
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);

    // Rate limiting falls back to this process's own limiter, and idempotency runs
    // without its guarantee: the API keeps serving.
    let session = app.register("degraded@example.com").await;
    let response = app
        .authed(Method::POST, "/v1/conversations", &session)
        .header("idempotency-key", "while-redis-is-down")
        .json(&serde_json::json!({"member_ids": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let metrics = app.metrics_text().await;
    assert!(sample(&metrics, "redis_degraded_total{feature=\"rate_limit\"}").unwrap_or(0.0) >= 1.0);
    assert!(
        sample(&metrics, "redis_degraded_total{feature=\"idempotency\"}").unwrap_or(0.0) >= 1.0
    );
    // The failed commands show per feature, as do the readiness check's pings.
    for feature in ["rate_limit", "idempotency", "health"] {
        let errors = format!("redis_command_errors_total{{feature=\"{feature}\"}}");
        assert!(sample(&metrics, &errors).unwrap_or(0.0) >= 1.0, "{errors}");
    }

    // Redis comes back (empty): ready again, on its own.
    redis.restart().await;
    let mut recovered = false;
    for _ in 0..50 {
        if ready(&app).await.1["status"] == "ready" {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "readiness returns once Redis answers");
}

#[tokio::test]
async fn readiness_reports_a_missing_database() {
    let app = TestApp::builder()
        .env("DATABASE_URL", "postgres://postgres@127.0.0.1:1/nothing")
        .spawn()
        .await;
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    // Never reached: still starting (a new pod with a wrong URL fails its rollout).
    assert_eq!(body["status"], "starting", "{body}");
    assert_eq!(body["checks"]["postgres"], "failed", "{body}");
    // A request that needs the database is a retryable 503, not a 500.
    let response = app
        .post_json(
            "/v1/auth/login",
            &serde_json::json!({"email": "a@example.com", "password": "x"}),
        )
        .await;
    crate::helpers::assert_problem(
        response,
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
    )
    .await;
}

#[tokio::test]
async fn readiness_turns_503_when_shutdown_starts() {
    let app = TestApp::builder()
        .env("SHUTDOWN_DELAY_SECONDS", "2")
        .spawn()
        .await;
    assert_eq!(ready(&app).await.0, StatusCode::OK);
    app.shutdown.trigger();
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(body["status"], "shutting_down");
    // Nothing in flight: after the delay the server drains and returns cleanly.
    let served = tokio::time::timeout(Duration::from_secs(5), app.server).await;
    assert!(matches!(served, Ok(Ok(Ok(())))), "{served:?}");
}

#[tokio::test]
async fn a_connection_postgresql_cut_is_a_retryable_503_and_then_replaced() {
    // One connection, so the request after the cut gets the one that was cut. (A
    // PgBouncer in between would absorb the cut: this is about a direct connection.)
    let app = TestApp::builder()
        .direct_database()
        .env("DATABASE_MAX_CONNECTIONS", "1")
        .spawn()
        .await;
    let session = app.register("cut@example.com").await;
    let me = || app.authed(Method::GET, "/v1/me", &session).send();
    assert_eq!(me().await.unwrap().status(), StatusCode::OK);

    // As a PostgreSQL restart or failover ends every backend.
    let admin = app.db.pool().await;
    let cut: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND application_name = 'mobile-api'",
    )
    .fetch_all(&admin)
    .await
    .unwrap();
    assert_eq!(cut.len(), 1);

    // Used a moment ago, the connection is handed out unchecked and fails: the client
    // is told to retry, not that the server has a bug. The pool then replaces it.
    crate::helpers::assert_problem(
        me().await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
    )
    .await;
    assert_eq!(me().await.unwrap().status(), StatusCode::OK);
}

#[tokio::test]
async fn a_postgres_outage_after_start_degrades_every_pod_alike_and_recovers() {
    let ca = mobile_testkit::TestCa::new();
    let postgres = mobile_testkit::PgServer::start_tls(&ca).await;
    let url = format!("{}?sslmode=disable", postgres.url("127.0.0.1"));
    mobile_api::migrate(&url).await.unwrap();
    let app = TestApp::builder().env("DATABASE_URL", &url).spawn().await;
    let session = app.register("outage@example.com").await;
    let me = || app.authed(Method::GET, "/v1/me", &session).send();
    assert_eq!(me().await.unwrap().status(), StatusCode::OK);
    // The kubelet's probe has seen it ready (it is no longer starting).
    assert_eq!(ready(&app).await.1["status"], "ready");

    postgres.stop();
    let (status, body) = ready(&app).await;
    assert_eq!(status, StatusCode::OK, "still in service: {body}");
    assert_eq!(
        body,
        serde_json::json!({"status": "degraded", "checks": {"postgres": "failed", "redis": "ok"}})
    );
    crate::helpers::assert_problem(
        me().await.unwrap(),
        StatusCode::SERVICE_UNAVAILABLE,
        "database_unavailable",
    )
    .await;

    postgres.start().await;
    let mut recovered = false;
    for _ in 0..50 {
        if ready(&app).await.1["status"] == "ready" && me().await.unwrap().status() == 200 {
            recovered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(recovered, "ready and serving once PostgreSQL is back");
}
