//! `/metrics` on its own port, with the brief's names and route templates as labels.

use reqwest::{Method, StatusCode};
use uuid::Uuid;

use crate::helpers::{TestApp, sample};

#[tokio::test]
async fn metrics_use_route_templates_and_the_briefs_names() {
    let app = TestApp::spawn().await;
    let session = app.register("metrics@example.com").await;
    let device = Uuid::new_v4();
    let response = app
        .authed(Method::DELETE, &format!("/v1/devices/{device}"), &session)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    app.request(Method::GET, "/no/such/path/123")
        .send()
        .await
        .unwrap();

    let text = app.metrics_text().await;
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="DELETE",route="/v1/devices/{device_id}",status="404"}"#
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="POST",route="/v1/auth/register",status="201"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            r#"http_requests_total{method="GET",route="unmatched",status="404"}"#
        ),
        Some(1.0)
    );
    assert!(
        !text.contains(&device.to_string()),
        "raw paths never become labels"
    );
    assert!(!text.contains("/no/such/path"));
    assert_eq!(
        sample(
            &text,
            r#"http_request_duration_seconds_count{method="POST",route="/v1/auth/register",status="201"}"#
        ),
        Some(1.0)
    );
    assert!(text.contains(r#"http_request_duration_seconds_bucket{le="0.005",method="POST",route="/v1/auth/register",status="201"}"#)
        || text.contains(r#"http_request_duration_seconds_bucket{method="POST",route="/v1/auth/register",status="201",le="0.005"}"#),
        "a histogram with buckets: {text}");
    assert_eq!(
        sample(&text, r#"db_pool_connections{state="max"}"#),
        Some(10.0)
    );
    assert!(sample(&text, r#"db_pool_connections{state="idle"}"#).is_some());
    assert!(sample(&text, r#"db_pool_connections{state="active"}"#).is_some());
    assert_eq!(
        sample(
            &text,
            &format!(r#"build_info{{version="{}"}}"#, mobile_api::VERSION)
        ),
        Some(1.0)
    );
    assert!(sample(&text, "process_resident_memory_bytes").unwrap_or(0.0) > 0.0);
    assert!(text.contains("# TYPE rate_limited counter"));

    // Never on the public port.
    let response = app.request(Method::GET, "/metrics").send().await.unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
}

/// Every named query and every Redis-backed feature a request used is timed, and a
/// healthy run records no errors.
#[tokio::test]
async fn the_data_tier_is_timed_per_named_query_and_per_redis_feature() {
    let app = TestApp::spawn().await;
    let session = app.register("timed@example.com").await;
    let me = app
        .authed(Method::GET, "/v1/me", &session)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);

    let text = app.metrics_text().await;
    for query in [
        "users.insert_user",
        "sessions.create_session",
        "users.find_user",
    ] {
        let count = format!(r#"database_query_duration_seconds_count{{query="{query}"}}"#);
        assert!(
            sample(&text, &count).unwrap_or(0.0) >= 1.0,
            "{count}: {text}"
        );
    }
    assert!(
        text.contains(
            r#"database_query_duration_seconds_bucket{le="0.0005",query="users.find_user"}"#
        ),
        "a histogram with sub-millisecond buckets: {text}"
    );
    let count = r#"redis_command_duration_seconds_count{feature="rate_limit"}"#;
    assert!(
        sample(&text, count).unwrap_or(0.0) >= 1.0,
        "{count}: {text}"
    );
    assert!(
        !text
            .lines()
            .any(|line| (line.starts_with("redis_command_errors_total")
                || line.starts_with("database_query_errors_total"))
                && !line.ends_with(" 0")),
        "no errors in a healthy run: {text}"
    );
}
