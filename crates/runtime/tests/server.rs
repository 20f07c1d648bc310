//! The shared server against hostile clients, over real sockets: half-sent heads, idle
//! keep-alives, more connections than the cap. What a test asserts is what a client
//! sees (a closed socket, a 503) and what the operator sees (the counters).

#![allow(clippy::unwrap_used)] // a test crate: a panic is a failed test

use std::{sync::Arc, time::Duration};

use axum::{Router, routing::get};
use mobile_runtime::{
    Shutdown,
    server::{self, ConnectionLimits, ConnectionMetrics, Drain, ServeOptions},
    service::Listeners,
};
use prometheus_client::registry::Registry;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    time::{Instant, timeout},
};
use tokio_util::task::TaskTracker;

struct Server {
    addr: std::net::SocketAddr,
    metrics: ConnectionMetrics,
    shutdown: Shutdown,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.trigger();
    }
}

fn limits(max_connections: usize) -> ConnectionLimits {
    ConnectionLimits {
        max_connections,
        header_read_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(2),
        max_header_bytes: 16 * 1024,
        h2_max_concurrent_streams: 10,
        // Pings every half second: an HTTP/2 peer that answers them is still idle.
        h2_keepalive_interval: Duration::from_millis(500),
        h2_keepalive_timeout: Duration::from_secs(10),
    }
}

async fn start(limits: ConnectionLimits) -> Server {
    let app = Router::new()
        .route("/", get(|| async { "hello" }))
        .route(
            "/slow",
            get(|| async {
                // Longer than the header timeout: a request in flight is not cut by
                // it (and shorter than the idle one, which a request that makes no
                // progress at all would reach).
                tokio::time::sleep(Duration::from_millis(1500)).await;
                "done"
            }),
        )
        .route("/big", get(|| async { "x".repeat(64 * 1024) }))
        .route(
            "/trickle",
            get(|| async {
                // A body that takes 3 s to send, longer than the idle deadline.
                let chunks = futures_util::stream::unfold(0, |n| async move {
                    if n == 6 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    Some((Ok::<_, std::io::Error>(format!("chunk{n};")), n + 1))
                });
                axum::body::Body::from_stream(chunks)
            }),
        );
    let public = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = public.local_addr().unwrap();
    let metrics_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = ConnectionMetrics::register(&mut Registry::default());
    let shutdown = Shutdown::new();
    tokio::spawn(server::serve(
        Listeners {
            public,
            metrics: metrics_listener,
        },
        app,
        Router::new(),
        shutdown.clone(),
        Drain {
            delay: Duration::ZERO,
            timeout: Duration::from_secs(5),
        },
        TaskTracker::new(),
        ServeOptions {
            limits: Arc::new(limits),
            metrics: metrics.clone(),
        },
    ));
    Server {
        addr,
        metrics,
        shutdown,
    }
}

/// Reads until the server closes the connection; how long that took, and what came.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (Duration, Vec<u8>) {
    let started = Instant::now();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match timeout(
            within.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => panic!("the server kept the connection open for {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (started.elapsed(), received),
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
        }
    }
}

fn closed(metrics: &ConnectionMetrics, reason: &'static str) -> u64 {
    metrics
        .closed
        .get_or_create(&server::ReasonLabel { reason })
        .get()
}

async fn get_hello(addr: std::net::SocketAddr) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (_, received) = until_closed(&mut stream, Duration::from_secs(5)).await;
    String::from_utf8_lossy(&received).into_owned()
}

#[tokio::test]
async fn a_half_sent_head_is_closed_at_the_header_deadline() {
    let server = start(limits(100)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    // A byte now and then does not extend the deadline: it runs from the first byte.
    let trickle = async {
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if stream.write_all(b"x").await.is_err() {
                break;
            }
        }
    };
    let _ = timeout(Duration::from_millis(700), trickle).await;
    let (waited, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(waited < Duration::from_secs(2), "closed after {waited:?}");
    assert_eq!(closed(&server.metrics, "header_timeout"), 1);
    assert!(get_hello(server.addr).await.ends_with("hello"));
}

#[tokio::test]
async fn a_half_sent_websocket_upgrade_is_closed_at_the_header_deadline() {
    let server = start(limits(100)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"GET /v1/ws HTTP/1.1\r\nhost: x\r\nupgrade: websocket\r\nconnection: upgrade\r\n\
              sec-websocket-version: 13\r\n",
        )
        .await
        .unwrap();
    let (waited, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
    assert!(waited < Duration::from_secs(2), "closed after {waited:?}");
    assert_eq!(closed(&server.metrics, "header_timeout"), 1);
}

#[tokio::test]
async fn a_silent_connection_is_closed_at_the_header_deadline_and_a_kept_alive_one_when_idle() {
    let server = start(limits(100)).await;
    // Connected, never a byte: its first head does not arrive.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // One request answered, then kept alive and silent.
    let mut kept_alive = TcpStream::connect(server.addr).await.unwrap();
    kept_alive
        .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 1024];
    let n = kept_alive.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let (waited, _) = until_closed(&mut silent, Duration::from_secs(6)).await;
    assert!(
        waited < Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    assert_eq!(closed(&server.metrics, "header_timeout"), 1);
    let (waited, _) = until_closed(&mut kept_alive, Duration::from_secs(6)).await;
    assert!(
        waited >= Duration::from_millis(500),
        "closed after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "closed after {waited:?}");
    assert_eq!(closed(&server.metrics, "idle"), 1);
}

#[tokio::test]
async fn a_request_in_flight_is_not_cut_by_the_header_deadline() {
    let server = start(limits(100)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (_, received) = until_closed(&mut stream, Duration::from_secs(6)).await;
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 200"), "{received}");
    assert!(received.ends_with("done"), "{received}");
    assert!(
        received
            .to_ascii_lowercase()
            .contains("x-content-type-options: nosniff"),
        "{received}"
    );
}

#[tokio::test]
async fn connections_over_the_cap_are_refused_at_once_and_counted() {
    let server = start(limits(3)).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        // A first byte, so the server has certainly accepted it.
        stream.write_all(b"G").await.unwrap();
        held.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut refused = TcpStream::connect(server.addr).await.unwrap();
    let (waited, received) = until_closed(&mut refused, Duration::from_secs(1)).await;
    let received = String::from_utf8_lossy(&received);
    assert!(waited < Duration::from_millis(500), "took {waited:?}");
    assert!(received.starts_with("HTTP/1.1 503"), "{received}");
    assert!(received.contains("\"code\":\"overloaded\""), "{received}");
    let body = &received[received.find("\r\n\r\n").unwrap() + 4..];
    assert!(received.contains(&format!("content-length: {}", body.len())));
    assert_eq!(server.metrics.refused.get(), 1);
    assert_eq!(server.metrics.open.get(), 3);

    // The held ones time out (half-sent heads); then there is room again.
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(get_hello(server.addr).await.ends_with("hello"));
}

#[tokio::test]
async fn hundreds_of_slow_sockets_under_the_cap_do_not_starve_a_real_request() {
    let server = start(limits(1000)).await;
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = TcpStream::connect(server.addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1\r\nhost").await.unwrap();
        slow.push(stream);
    }
    assert!(get_hello(server.addr).await.ends_with("hello"));
    // And all of them are gone after the header deadline.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    assert_eq!(closed(&server.metrics, "header_timeout"), 300);
    assert_eq!(server.metrics.open.get(), 0);
}

#[tokio::test]
async fn a_head_over_the_size_limit_is_refused() {
    let server = start(limits(100)).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let filler = "a".repeat(20 * 1024);
    let head = format!("GET / HTTP/1.1\r\nhost: x\r\nx-filler: {filler}\r\n\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let (_, received) = until_closed(&mut stream, Duration::from_secs(5)).await;
    let received = String::from_utf8_lossy(&received);
    assert!(received.starts_with("HTTP/1.1 431"), "{received}");
}

#[tokio::test]
async fn an_http2_peer_that_answers_pings_but_asks_nothing_is_idle() {
    let server = start(limits(100)).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let response = client
        .get(format!("http://{}/", server.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(response.version(), reqwest::Version::HTTP_2);
    assert_eq!(response.headers()["x-content-type-options"], "nosniff");
    assert_eq!(response.text().await.unwrap(), "hello");
    // The server pings every 0.5 s and the client answers; still closed at 2 s.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(closed(&server.metrics, "idle"), 1);
    assert_eq!(server.metrics.open.get(), 0);
}

#[tokio::test]
async fn a_response_still_being_sent_is_never_idle() {
    let server = start(limits(100)).await;
    for client in [
        reqwest::Client::new(),
        reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .unwrap(),
    ] {
        let response = client
            .get(format!("http://{}/trickle", server.addr))
            .send()
            .await
            .unwrap();
        let body = response.text().await.unwrap();
        assert_eq!(body, "chunk0;chunk1;chunk2;chunk3;chunk4;chunk5;");
    }
    assert_eq!(closed(&server.metrics, "idle"), 0);
}

#[tokio::test]
async fn pipelined_requests_to_a_client_that_never_reads_stall_and_close() {
    let server = start(limits(100)).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(server.addr).await.unwrap();
    // Many requests at once, each answered with 64 KiB, none of it read.
    let pipelined = "GET /big HTTP/1.1\r\nhost: x\r\n\r\n".repeat(64);
    stream.write_all(pipelined.as_bytes()).await.unwrap();
    let mut closed_in = None;
    for _ in 0..60 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if server.metrics.open.get() == 0 {
            closed_in = Some(());
            break;
        }
    }
    assert!(closed_in.is_some(), "the stuck connection is still open");
    assert_eq!(
        closed(&server.metrics, "stalled") + closed(&server.metrics, "idle"),
        1
    );
}
