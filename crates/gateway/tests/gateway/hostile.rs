//! The gateway against clients that mean harm or merely misbehave: connection caps,
//! subscribe floods, recovery loops, offsets out of range, half-sent upgrades, closes
//! that must be answered, and a reader that stalls under steady traffic.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite::{
    Message,
    client::IntoClientRequest,
    protocol::{CloseFrame, frame::coding::CloseCode},
};

use crate::helpers::{Client, Socket, Stack, User, close_frame, sample};

/// Tries an upgrade with `headers`; the HTTP status and body of a refusal, or `None`
/// if it upgraded.
async fn try_upgrade(
    url: &str,
    token: &str,
    headers: &[(&'static str, &str)],
) -> Option<(u16, Value)> {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    for (name, value) in headers {
        request.headers_mut().insert(*name, value.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((socket, _)) => {
            // Held open by leaking it into a task that keeps reading (answering pings).
            tokio::spawn(async move {
                let mut socket = socket;
                while let Some(Ok(_)) = socket.next().await {}
            });
            None
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            let status = response.status().as_u16();
            assert_eq!(
                response.headers()["content-type"],
                "application/problem+json"
            );
            let body = response.body().clone().unwrap_or_default();
            Some((status, serde_json::from_slice(&body).unwrap()))
        }
        Err(other) => panic!("{other}"),
    }
}

#[tokio::test]
async fn one_user_cannot_take_every_slot() {
    let stack = Stack::start(1, &[("WS_MAX_CONNECTIONS_PER_USER", "2")]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let url = &stack.gateways[0].addr;
    assert!(try_upgrade(url, &ann.token, &[]).await.is_none());
    assert!(try_upgrade(url, &ann.token, &[]).await.is_none());
    let (status, problem) = try_upgrade(url, &ann.token, &[]).await.unwrap();
    assert_eq!(status, 429);
    assert_eq!(problem["code"], "too_many_connections");
    assert!(try_upgrade(url, &bob.token, &[]).await.is_none());
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_connections_refused_total{cap="user"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn a_cap_per_address_when_one_is_set() {
    let stack = Stack::start(
        1,
        &[
            ("WS_MAX_CONNECTIONS_PER_IP", "2"),
            ("TRUSTED_PROXY_HOPS", "1"),
        ],
    )
    .await;
    let users = [
        stack.register("a").await,
        stack.register("b").await,
        stack.register("c").await,
        stack.register("d").await,
    ];
    let url = &stack.gateways[0].addr;
    let from = |address: &'static str| [("x-forwarded-for", address)];
    // Different users, one address (with a port, as some balancers write it).
    assert!(
        try_upgrade(url, &users[0].token, &from("203.0.113.5:1000"))
            .await
            .is_none()
    );
    assert!(
        try_upgrade(url, &users[1].token, &from("203.0.113.5:2000"))
            .await
            .is_none()
    );
    let (status, problem) = try_upgrade(url, &users[2].token, &from("203.0.113.5"))
        .await
        .unwrap();
    assert_eq!(
        (status, problem["code"].as_str()),
        (429, Some("too_many_connections"))
    );
    assert!(
        try_upgrade(url, &users[3].token, &from("198.51.100.1"))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn subscribes_are_rate_limited() {
    let stack = Stack::start(
        1,
        &[("WS_SUBSCRIBES_PER_SECOND", "2"), ("WS_MAX_CHANNELS", "5")],
    )
    .await;
    let ann = stack.register("ann").await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    // Random ids: each would cost PostgreSQL a membership check.
    for id in 0..50 {
        client
            .send(json!({"type": "subscribe", "id": id, "channel": format!("conversation:{}", uuid::Uuid::new_v4())}))
            .await;
    }
    let mut forbidden = 0;
    let mut limited = 0;
    for _ in 0..50 {
        match client.next().await["code"].as_str() {
            Some("forbidden") => forbidden += 1,
            Some("rate_limited") => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    // The burst (twice the channels: 10) and what refilled meanwhile reached
    // PostgreSQL; nothing more.
    assert!((10..=13).contains(&forbidden), "{forbidden} checked");
    assert_eq!(forbidden + limited, 50);
    // Reconnecting does not refill the budget: it is the user's.
    drop(client);
    let mut again = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    again
        .send(json!({"type": "subscribe", "id": 1, "channel": format!("conversation:{}", uuid::Uuid::new_v4())}))
        .await;
    assert_eq!(again.next().await["code"], "rate_limited");
}

#[tokio::test]
async fn replays_have_a_budget_and_since_is_a_checked_range() {
    let stack = Stack::start(
        1,
        &[
            ("WS_RECOVERY_BUDGET_PER_MINUTE", "5"),
            ("WS_RECOVERY_LIMIT", "5"),
        ],
    )
    .await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    for n in 0..4 {
        stack.post(&ann, &conversation, &format!("m{n}")).await;
    }
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let channel = format!("conversation:{conversation}");

    for since in [-1, i64::MIN] {
        client
            .send(json!({"type": "subscribe", "id": 1, "channel": channel, "since": since}))
            .await;
        assert_eq!(client.next().await["code"], "invalid_since", "{since}");
    }

    client.subscribe(&conversation, Some(0)).await;
    assert_eq!(client.offsets(4).await, [1, 2, 3, 4]);
    client
        .send(json!({"type": "unsubscribe", "id": 2, "channel": channel}))
        .await;
    assert_eq!(client.next().await["type"], "unsubscribed");
    // Four more would exceed the five a minute.
    client
        .send(json!({"type": "subscribe", "id": 3, "channel": channel, "since": 0}))
        .await;
    let refused = client.next().await;
    assert_eq!(refused["code"], "recovery_limited", "{refused}");
    // Nor does a new connection get a fresh budget.
    let mut other = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    other
        .send(json!({"type": "subscribe", "id": 3, "channel": channel, "since": 0}))
        .await;
    assert_eq!(other.next().await["code"], "recovery_limited");
    // Not subscribed: a live message does not arrive; a subscribe without `since` works.
    let seq = stack.post(&ann, &conversation, "live").await;
    assert!(
        client
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    client.subscribe(&conversation, None).await;
    let seq2 = stack.post(&ann, &conversation, "live again").await;
    assert_eq!(client.offsets(1).await, [seq2]);
    assert_eq!(seq2, seq + 1);
}

#[tokio::test]
async fn a_clients_close_is_answered() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    client
        .socket
        .send(Message::Close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })))
        .await
        .unwrap();
    let (code, _) = close_frame(&mut client.socket, Duration::from_secs(2)).await;
    assert_eq!(code, 1000);
    // And then the stream ends cleanly.
    assert!(matches!(client.socket.next().await, None | Some(Err(_))));
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_disconnects_total{reason="client_closed"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn a_half_sent_upgrade_is_closed_at_the_header_deadline() {
    let stack = Stack::start(1, &[("HTTP_HEADER_READ_TIMEOUT_SECONDS", "1")]).await;
    let addr = stack.gateways[0]
        .addr
        .trim_start_matches("ws://")
        .trim_end_matches("/v1/ws")
        .to_owned();
    let mut stream = TcpStream::connect(&addr).await.unwrap();
    stream
        .write_all(
            b"GET /v1/ws HTTP/1.1\r\nhost: gw\r\nupgrade: websocket\r\nconnection: upgrade\r\n",
        )
        .await
        .unwrap();
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("closed within the header deadline");
    assert!(matches!(read, Ok(0) | Err(_)));
}

/// Sends `request` as it is, and reads the answer's head.
async fn raw_request(url: &str, request: &str) -> String {
    let addr = url.trim_start_matches("ws://").trim_end_matches("/v1/ws");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.windows(4).any(|w| w == b"\r\n\r\n") {
        let read = stream.read(&mut buf).await.unwrap();
        assert!(read > 0, "closed before the answer's head: {answer:?}");
        answer.extend_from_slice(&buf[..read]);
    }
    let head = answer.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    String::from_utf8(answer[..head].to_vec())
        .unwrap()
        .to_ascii_lowercase()
}

#[tokio::test]
async fn what_is_not_a_websocket_upgrade_is_refused_with_a_problem() {
    let stack = Stack::start(1, &[]).await;
    let url = &stack.gateways[0].addr;
    let key = "sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n";

    // A plain GET, an upgrade to something else, a key missing.
    for request in [
        "GET /v1/ws HTTP/1.1\r\nhost: gw\r\n\r\n".to_owned(),
        format!("GET /v1/ws HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: h2c\r\n{key}sec-websocket-version: 13\r\n\r\n"),
        "GET /v1/ws HTTP/1.1\r\nhost: gw\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\n\r\n".to_owned(),
    ] {
        let answer = raw_request(url, &request).await;
        assert!(answer.starts_with("http/1.1 400"), "{request}: {answer}");
        assert!(answer.contains("content-type: application/problem+json"), "{answer}");
    }
    let (status, problem) = try_upgrade(url, "no token needed", &[("sec-websocket-version", "8")])
        .await
        .expect("refused");
    assert_eq!(
        (status, problem["code"].as_str()),
        (426, Some("unsupported_websocket_version"))
    );

    // A version the gateway does not speak: the one it does, in the refusal (RFC 6455 §4.4).
    let answer = raw_request(
        url,
        &format!("GET /v1/ws HTTP/1.1\r\nhost: gw\r\nconnection: keep-alive, Upgrade\r\nupgrade: websocket\r\n{key}sec-websocket-version: 8\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("http/1.1 426"), "{answer}");
    assert!(answer.contains("sec-websocket-version: 13\r\n"), "{answer}");

    // The RFC's own example key, with its listed tokens in any order and case: upgraded,
    // with the RFC's accept value (§1.3).
    let answer = raw_request(
        url,
        &format!("GET /v1/ws HTTP/1.1\r\nhost: gw\r\nconnection: keep-alive, Upgrade\r\nupgrade: WebSocket\r\n{key}sec-websocket-version: 13\r\n\r\n"),
    )
    .await;
    assert!(answer.starts_with("http/1.1 101"), "{answer}");
    assert!(
        answer.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{answer}"
    );
}

/// A client whose socket buffers little, so that a stalled reader fills it at once.
async fn small_buffered_client(url: &str, token: &str) -> Socket {
    let addr = url
        .trim_start_matches("ws://")
        .trim_end_matches("/v1/ws")
        .to_owned();
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let (socket, _) =
        tokio_tungstenite::client_async(request, tokio_tungstenite::MaybeTlsStream::Plain(stream))
            .await
            .unwrap();
    socket
}

/// Publishes a 3 KB event to `user`'s channel 200 times a second until stopped.
fn steady_traffic(stack: &Stack, user: &str) -> tokio_util::sync::CancellationToken {
    let stop = tokio_util::sync::CancellationToken::new();
    let channel = format!("{}user:{user}", stack.prefix);
    let frame = json!({"type": "event", "channel": format!("user:{user}"), "event": "notification",
                       "data": {"body": "x".repeat(3 * 1024)}})
    .to_string();
    let redis_url = stack.redis_url.clone();
    let stopped = stop.clone();
    tokio::spawn(async move {
        let client = redis::Client::open(redis_url.as_str()).unwrap();
        let mut redis = client.get_multiplexed_async_connection().await.unwrap();
        let mut every = tokio::time::interval(Duration::from_millis(5));
        while !stopped.is_cancelled() {
            every.tick().await;
            let _: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(&frame)
                .query_async(&mut redis)
                .await;
        }
    });
    stop
}

#[tokio::test]
async fn a_reader_stalled_under_steady_traffic_gets_4008_and_is_counted_so() {
    let stack = Stack::start(1, &[("WS_OUTBOUND_QUEUE", "16")]).await;
    let ann = stack.register("ann").await;
    let mut socket = small_buffered_client(&stack.gateways[0].addr, &ann.token).await;
    let traffic = steady_traffic(&stack, &ann.id);
    // The socket buffers, the write buffer and the queue fill in about 4.5 s at 600
    // KB/s (the kernel grows the send buffer to a few MB); the write is stuck from
    // then on. A 2 s grace on that write would have dropped the socket long before
    // the reader comes back; the default 10 s does not.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let (code, reason) = close_frame(&mut socket, Duration::from_secs(10)).await;
    traffic.cancel();
    assert_eq!((code, reason.as_str()), (4008, "slow consumer"));
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_disconnects_total{reason="slow_consumer"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(&metrics, r#"websocket_disconnects_total{reason="gone"}"#),
        0.0
    );
}

#[tokio::test]
async fn a_reader_that_never_comes_back_is_still_counted_as_slow() {
    let stack = Stack::start(
        1,
        &[
            ("WS_OUTBOUND_QUEUE", "16"),
            ("WS_SLOW_CONSUMER_GRACE_SECONDS", "1"),
        ],
    )
    .await;
    let ann = stack.register("ann").await;
    let _socket = small_buffered_client(&stack.gateways[0].addr, &ann.token).await;
    let traffic = steady_traffic(&stack, &ann.id);
    let mut counted = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let metrics = stack.metrics(0).await;
        if sample(
            &metrics,
            r#"websocket_disconnects_total{reason="slow_consumer"}"#,
        ) == 1.0
        {
            counted = true;
            break;
        }
        assert_eq!(
            sample(&metrics, r#"websocket_disconnects_total{reason="gone"}"#),
            0.0
        );
    }
    traffic.cancel();
    assert!(counted, "counted as a slow consumer");
}

/// One gateway with a replay budget of five events a minute (and `extra`), and Ann
/// with four events on her own channel: conversations Bob started with her.
async fn four_user_events_and_a_replay_budget_of_five(
    extra: &[(&str, &str)],
) -> (Stack, User, User) {
    let mut settings = vec![
        ("WS_RECOVERY_BUDGET_PER_MINUTE", "5"),
        ("WS_RECOVERY_LIMIT", "5"),
    ];
    settings.extend_from_slice(extra);
    let stack = Stack::start(1, &settings).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    for _ in 0..4 {
        stack.conversation(&bob, &[&ann]).await;
    }
    (stack, ann, bob)
}

/// Ann's socket replays her own channel's four events, unsubscribes it, and is then
/// refused its resubscribe with `since` (four more would exceed the five a minute).
async fn refuse_own_resubscribe(client: &mut Client, own: &str) {
    client
        .send(json!({"type": "subscribe", "id": 1, "channel": own, "since": 0}))
        .await;
    assert_eq!(client.next().await["offset"], 4);
    for _ in 0..4 {
        assert_eq!(client.next().await["event"], "conversation.created");
    }
    client
        .send(json!({"type": "unsubscribe", "id": 2, "channel": own}))
        .await;
    assert_eq!(client.next().await["type"], "unsubscribed");
    client
        .send(json!({"type": "subscribe", "id": 3, "channel": own, "since": 0}))
        .await;
    assert_eq!(client.next().await["code"], "recovery_limited");
}

/// An app that unsubscribed its own channel and is refused its resubscribe (over the
/// replay budget) is left unsubscribed, as it was: not half-subscribed, which the next
/// live event would find behind and close the connection for.
#[tokio::test]
async fn a_refused_resubscribe_of_the_own_channel_leaves_it_as_it_was() {
    let (stack, ann, bob) = four_user_events_and_a_replay_budget_of_five(&[]).await;
    let own = format!("user:{}", ann.id);
    // Her other device, on the same gateway, is not disturbed by any of this.
    let mut other = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    refuse_own_resubscribe(&mut client, &own).await;

    stack.conversation(&bob, &[&ann]).await;
    assert!(
        client
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "not subscribed, and not closed"
    );
    client
        .send(json!({"type": "subscribe", "id": 4, "channel": own}))
        .await;
    assert_eq!(client.next().await["offset"], 5);
    stack.conversation(&bob, &[&ann]).await;
    let live = client.next().await;
    assert_eq!(
        (live["event"].as_str(), live["offset"].as_i64()),
        (Some("conversation.created"), Some(6))
    );
    let seen: Vec<i64> = [other.next().await, other.next().await]
        .iter()
        .map(|event| event["offset"].as_i64().unwrap())
        .collect();
    assert_eq!(seen, [5, 6]);
}

/// The same refusal when the socket was the channel's only one on this gateway: the
/// resubscribe registered it with the hub again, and the refusal must take it back out,
/// or the channel's start would wait for a reading that never comes and hold back every
/// later socket of the user.
#[tokio::test]
async fn a_refused_resubscribe_of_the_own_channel_leaves_nothing_in_the_hub() {
    let (stack, ann, bob) =
        four_user_events_and_a_replay_budget_of_five(&[("WS_USER_CHANNEL_HOLD_MS", "0")]).await;
    let own = format!("user:{}", ann.id);
    // The only socket of hers: its unsubscribe takes the channel out of the hub, and
    // the refused resubscribe must not leave it back in.
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    refuse_own_resubscribe(&mut client, &own).await;

    let mut other = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    stack.conversation(&bob, &[&ann]).await;
    let live = other.next_within(Duration::from_secs(5)).await;
    assert_eq!(
        live.as_ref()
            .map(|event| (event["event"].as_str(), event["offset"].as_i64())),
        Some((Some("conversation.created"), Some(5))),
        "a later socket's own channel is live"
    );
}
