//! Rate limits: per IP on auth routes, per user on writes; 429 with Retry-After.

use reqwest::{Method, StatusCode};
use serde_json::json;
use uuid::Uuid;

use crate::helpers::{TestApp, assert_problem, sample};

#[tokio::test]
async fn auth_routes_are_limited_per_ip() {
    let app = TestApp::builder()
        .env("RATE_LIMIT_AUTH_PER_MINUTE", "3")
        .spawn()
        .await;
    for _ in 0..3 {
        let response = app.login("nobody@example.com", "wrong password!").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = app.login("nobody@example.com", "wrong password!").await;
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // One request per 20 s refills at 3 per minute.
    assert!((1..=20).contains(&retry_after), "Retry-After {retry_after}");
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // The bucket is per IP, shared by every auth route.
    let response = app.refresh("rt_whatever").await;
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(&metrics, "rate_limited_total{route=\"/v1/auth/login\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "rate_limited_total{route=\"/v1/auth/refresh\"}"),
        Some(1.0)
    );
}

#[tokio::test]
async fn writes_are_limited_per_user_and_reads_are_not() {
    let app = TestApp::builder()
        .env("RATE_LIMIT_WRITE_PER_MINUTE", "2")
        .spawn()
        .await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let put = |session| {
        let body =
            json!({"platform": "android", "push_token": format!("fcm-token-{}", Uuid::new_v4())});
        app.authed(
            Method::PUT,
            &format!("/v1/devices/{}", Uuid::new_v4()),
            session,
        )
        .json(&body)
        .send()
    };
    assert_eq!(put(&ann).await.unwrap().status(), StatusCode::CREATED);
    assert_eq!(put(&ann).await.unwrap().status(), StatusCode::CREATED);
    let response = put(&ann).await.unwrap();
    assert!(response.headers().get("retry-after").is_some());
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;

    // Bob has his own budget; Ann can still read.
    assert_eq!(put(&bob).await.unwrap().status(), StatusCode::CREATED);
    for _ in 0..5 {
        let response = app
            .authed(Method::GET, "/v1/devices", &ann)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
    }
}
