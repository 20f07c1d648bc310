//! The API against a client that means harm, over real sockets: slow heads and bodies,
//! more connections than allowed, junk methods, bodies sent to endpoints that should
//! not read them.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout},
};

use crate::helpers::{INTERNAL_TOKEN, TestApp, assert_problem, sample};

fn addr(app: &TestApp) -> String {
    app.base.trim_start_matches("http://").to_owned()
}

/// Reads until the server closes; what arrived and how long it took. Panics if the
/// server keeps the connection open past `within`.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (Duration, String) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let left = within.saturating_sub(started.elapsed());
        match timeout(left, stream.read(&mut buf)).await {
            Err(_) => panic!(
                "the server kept the connection open for {within:?}; got {:?}",
                String::from_utf8_lossy(&received)
            ),
            Ok(Ok(0) | Err(_)) => {
                return (
                    started.elapsed(),
                    String::from_utf8_lossy(&received).into_owned(),
                );
            }
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_half_sent_head_is_closed_at_the_header_deadline() {
    let app = TestApp::builder()
        .env("HTTP_HEADER_READ_TIMEOUT_SECONDS", "1")
        .spawn()
        .await;
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(b"GET /v1/me HTTP/1.1\r\nhost: api\r\nauthorization: Bearer ")
        .await
        .unwrap();
    let (waited, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            "http_connections_closed_total{reason=\"header_timeout\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_slow_body_is_408_at_the_body_deadline_even_with_an_idempotency_key() {
    let app = TestApp::builder()
        .env("REQUEST_BODY_TIMEOUT_SECONDS", "1")
        .spawn()
        .await;
    let ann = app.register("ann@example.com").await;
    let cases = [
        // Read by the idempotency layer, for a signed-in user.
        format!(
            "POST /v1/conversations HTTP/1.1\r\nhost: api\r\nauthorization: Bearer {}\r\n\
             idempotency-key: slow\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n",
            ann.access_token
        ),
        // Read by a handler's JSON extractor, anonymously.
        "POST /v1/auth/login HTTP/1.1\r\nhost: api\r\nidempotency-key: slow\r\n\
         content-type: application/json\r\ncontent-length: 100\r\n\r\n"
            .to_owned(),
    ];
    for head in cases {
        let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
        stream.write_all(head.as_bytes()).await.unwrap();
        stream.write_all(b"{\"member_ids\"").await.unwrap();
        let (waited, received) = until_closed(&mut stream, Duration::from_secs(5)).await;
        assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
        assert!(
            received.starts_with("HTTP/1.1 408"),
            "{head}\n---\n{received}"
        );
        assert!(received.contains("\"code\":\"body_timeout\""), "{received}");
    }
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_with_a_problem() {
    let app = TestApp::builder().env("MAX_CONNECTIONS", "5").spawn().await;
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
        stream
            .write_all(b"GET /health/live HTTP/1.1\r\nhost: api\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        let n = stream.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
        held.push(stream);
    }
    let mut refused = TcpStream::connect(addr(&app)).await.unwrap();
    let (waited, received) = until_closed(&mut refused, Duration::from_secs(2)).await;
    assert!(waited < Duration::from_secs(1), "took {waited:?}");
    assert!(received.starts_with("HTTP/1.1 503"), "{received}");
    assert!(received.contains("\"code\":\"overloaded\""), "{received}");
    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(&metrics, "http_connections_refused_total"),
        Some(1.0)
    );

    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let live = app
        .request(Method::GET, "/health/live")
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), StatusCode::OK);
}

#[tokio::test]
async fn junk_methods_do_not_grow_the_metrics() {
    let app = TestApp::spawn().await;
    let before = app.metrics_text().await.len();
    let junk = |i: usize| {
        let mut method = format!("X{i}");
        while method.len() < 1000 {
            method.push_str("JUNK");
        }
        Method::from_bytes(method.as_bytes()).unwrap()
    };
    for chunk in (0..500).collect::<Vec<_>>().chunks(50) {
        let sent = chunk.iter().map(|i| app.request(junk(*i), "/v1/me").send());
        for response in futures_util::future::join_all(sent).await {
            assert!(response.unwrap().status().is_client_error());
        }
    }
    let metrics = app.metrics_text().await;
    assert!(
        metrics.len() < before + 20_000,
        "/metrics grew from {before} to {} bytes",
        metrics.len()
    );
    assert!(metrics.contains("method=\"other\""), "{metrics}");
}

#[tokio::test]
async fn the_internal_endpoint_refuses_before_it_reads_the_body() {
    let app = TestApp::spawn().await;
    // A head announcing 64 KiB that never comes: the refusal does not wait for it.
    let mut stream = TcpStream::connect(addr(&app)).await.unwrap();
    stream
        .write_all(
            b"POST /internal/v1/notifications HTTP/1.1\r\nhost: api\r\n\
              content-type: application/json\r\ncontent-length: 65536\r\n\r\n{\"",
        )
        .await
        .unwrap();
    let (waited, received) = until_closed(&mut stream, Duration::from_secs(3)).await;
    assert!(waited < Duration::from_secs(1), "took {waited:?}");
    assert!(received.starts_with("HTTP/1.1 401"), "{received}");

    // A whole body of made-up field names, without the token: 401, not an echo.
    let field = "f".repeat(60 * 1024);
    let body = format!("{{\"{field}\": 1}}");
    let response = app
        .request(Method::POST, "/internal/v1/notifications")
        .header("content-type", "application/json")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    let problem = assert_problem(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;
    assert!(problem.to_string().len() < 1024);

    // With the token, the 422 names the field but is bounded.
    let response = app
        .request(Method::POST, "/internal/v1/notifications")
        .bearer_auth(INTERNAL_TOKEN)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let problem = assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.chars().count() <= 301, "{} chars", detail.len());
    assert!(detail.starts_with("Failed to deserialize"), "{detail}");
}

#[tokio::test]
async fn every_response_says_nosniff() {
    let app = TestApp::spawn().await;
    for (method, path) in [
        (Method::GET, "/health/ready"),
        (Method::GET, "/v1/me"),
        (Method::GET, "/nowhere"),
        (Method::GET, "/openapi.json"),
    ] {
        let response = app.request(method, path).send().await.unwrap();
        assert_eq!(
            response.headers()["x-content-type-options"],
            "nosniff",
            "{path}"
        );
    }
}
