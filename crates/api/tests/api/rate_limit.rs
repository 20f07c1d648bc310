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

/// Four failed logins at 3 a minute: the fourth must be refused, whatever Redis does
/// (and Redis could check none of the three it was asked about).
async fn fourth_login_is_limited(app: &TestApp) {
    for _ in 0..3 {
        let response = app.login("nobody@example.com", "wrong password!").await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let response = app.login("nobody@example.com", "wrong password!").await;
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // At least one attempt found Redis unusable (a full Redis may still take a small
    // write now and then, as memory frees up: the limit must hold either way).
    let metrics = app.metrics_text().await;
    assert!(sample(&metrics, "redis_degraded_total{feature=\"rate_limit\"}").unwrap_or(0.0) >= 1.0);
}

#[tokio::test]
async fn without_redis_the_auth_limit_holds_in_process() {
    let mut redis = mobile_testkit::RedisServer::start().await;
    let app = TestApp::builder()
        .redis_url(redis.url())
        .env("RATE_LIMIT_AUTH_PER_MINUTE", "3")
        .spawn()
        .await;
    redis.stop().await;
    fourth_login_is_limited(&app).await;
}

#[tokio::test]
async fn a_full_redis_does_not_open_the_auth_limit() {
    let redis = mobile_testkit::RedisServer::start().await;
    let app = TestApp::builder()
        .redis_url(redis.url())
        .env("RATE_LIMIT_AUTH_PER_MINUTE", "3")
        .spawn()
        .await;
    // Filled to its maxmemory with `noeviction`: every write is refused with OOM.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory-policy")
        .arg("noeviction")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("4mb")
        .query_async(&mut conn)
        .await
        .unwrap();
    let filler = "x".repeat(64 * 1024);
    let mut full = false;
    for i in 0..1000 {
        let stored: redis::RedisResult<()> = redis::cmd("SET")
            .arg(format!("filler:{i}"))
            .arg(&filler)
            .query_async(&mut conn)
            .await;
        if stored.is_err() {
            full = true;
            break;
        }
    }
    assert!(full, "Redis refuses writes");
    fourth_login_is_limited(&app).await;
}

#[tokio::test]
async fn behind_a_proxy_every_forwarded_entry_is_a_hop() {
    let app = TestApp::builder()
        .env("RATE_LIMIT_AUTH_PER_MINUTE", "2")
        .env("TRUSTED_PROXY_HOPS", "1")
        .spawn()
        .await;
    let login = |xff: String| {
        app.request(Method::POST, "/v1/auth/login")
            .header("x-forwarded-for", xff)
            .json(&json!({"email": "nobody@example.com", "password": "wrong password!"}))
            .send()
    };
    // The proxy's entry (last) has a port, is `unknown`, or is IPv6 with a port; the
    // client varies what it claims to the left of it. Each is one bucket.
    for proxy_entry in ["203.0.113.9:4431", "unknown", "[2001:db8::7]:443"] {
        for attempt in 0..3 {
            let response = login(format!("198.51.100.{attempt}, {proxy_entry}"))
                .await
                .unwrap();
            if attempt < 2 {
                assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{proxy_entry}");
            } else {
                assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
            }
        }
    }
    // Two hops in: the client's own entry is trusted as written by the first proxy.
    let response = login("198.51.100.77, [2001:db8::7]:443".to_owned())
        .await
        .unwrap();
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
}

#[tokio::test]
async fn failed_logins_are_limited_per_account_by_slowing_down_not_locking_out() {
    let app = TestApp::builder()
        .env("TRUSTED_PROXY_HOPS", "1")
        .env("LOGIN_FAILURES_PER_ADDRESS", "3")
        .env("LOGIN_SLOWDOWN_AFTER_FAILURES", "3")
        .env("LOGIN_MAX_DELAY_SECONDS", "1")
        .spawn()
        .await;
    app.register("ann@example.com").await;
    app.register("bob@example.com").await;
    let login = |from: &str, email: &str, password: &str| {
        app.request(Method::POST, "/v1/auth/login")
            .header("x-forwarded-for", from)
            .json(&json!({"email": email, "password": password}))
            .send()
    };
    let right = mobile_testkit::api::PASSWORD;
    for _ in 0..3 {
        let response = login("203.0.113.1", "ann@example.com", "wrong password!")
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    // The guessing address is refused on that account, even with the right password.
    let response = login("203.0.113.1", "ann@example.com", right)
        .await
        .unwrap();
    assert!(response.headers().get("retry-after").is_some());
    assert_problem(response, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    // But not on another account.
    let response = login("203.0.113.1", "bob@example.com", right)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // And the owner, from elsewhere, gets in: slowed, not locked out.
    let started = std::time::Instant::now();
    let response = login("198.51.100.2", "ann@example.com", right)
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(started.elapsed() >= std::time::Duration::from_millis(900));
    // Every count expires with its window, and none names the email.
    let client = redis::Client::open(mobile_testkit::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}login:*", app.redis_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        keys.len(),
        2,
        "the account, and the account with the guessing address"
    );
    for key in keys {
        assert!(!key.contains("ann"), "{key}");
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!((1..=900).contains(&ttl), "{key}: {ttl}");
    }
    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(&metrics, "login_throttled_total{action=\"refused\"}"),
        Some(1.0)
    );
    assert_eq!(
        sample(&metrics, "login_throttled_total{action=\"delayed\"}"),
        Some(1.0)
    );
}
