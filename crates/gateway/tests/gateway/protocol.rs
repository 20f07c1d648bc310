//! The protocol's refusals: tokens, membership, bad and oversized frames, limits.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::helpers::{Client, Closed, Stack, closed};

fn token(stack: &Stack, key: usize, user: &str, exp_offset: i64) -> String {
    let signing = mobile_auth::SigningKey::from_file(&stack.keys.signing(key)).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(signing.kid().to_owned());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({"sub": user, "sid": uuid::Uuid::new_v4(), "iss": "mobile-backend", "aud": "mobile-app",
                        "iat": now - 120, "exp": now + exp_offset});
    let pem = std::fs::read(stack.keys.signing(key)).unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap()
}

#[tokio::test]
async fn bad_tokens_are_closed_with_4001() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let url = &stack.gateways[0].addr;

    for (query, why) in [
        (String::new(), "no token"),
        ("?access_token=garbage".to_owned(), "garbage"),
        (
            format!("?access_token={}", token(&stack, 0, &ann.id, -60)),
            "expired",
        ),
        (
            format!("?access_token={}", token(&stack, 1, &ann.id, 600)),
            "unknown key",
        ),
    ] {
        let mut socket = Client::connect_raw(&format!("{url}{query}")).await;
        assert_eq!(
            closed(&mut socket, Duration::from_secs(5)).await,
            Closed::Code(4001),
            "{why}"
        );
    }

    // The same user with a good token, in the query string this time.
    let mut socket = Client::connect_raw(&format!("{url}?access_token={}", ann.token)).await;
    let welcome = futures_util::StreamExt::next(&mut socket)
        .await
        .unwrap()
        .unwrap();
    assert!(welcome.to_text().unwrap().contains("\"welcome\""));
}

#[tokio::test]
async fn members_only_and_errors_keep_the_connection() {
    let stack = Stack::start(1, &[("WS_MAX_CHANNELS", "3")]).await;
    let ann = stack.register("ann").await;
    let eve = stack.register("eve").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let mut eves = Client::connect(&stack.gateways[0].addr, &eve.token).await;
    assert_eq!(eves.welcome["ping_interval_s"], 25);

    eves.send(
        json!({"type": "subscribe", "id": 1, "channel": format!("conversation:{conversation}")}),
    )
    .await;
    assert_eq!(
        eves.next().await,
        json!({"type": "error", "id": 1, "code": "forbidden", "message": "not a member of this conversation"})
    );
    eves.send(json!({"type": "subscribe", "id": 2, "channel": format!("user:{}", ann.id)}))
        .await;
    assert_eq!(eves.next().await["code"], "forbidden");
    eves.send(json!({"type": "subscribe", "id": 3, "channel": "room:lobby"}))
        .await;
    assert_eq!(eves.next().await["code"], "invalid_channel");
    eves.send(json!({"type": "subscribe", "id": 4, "channel": format!("user:{}", eve.id)}))
        .await;
    assert_eq!(
        eves.next().await["type"],
        "subscribed",
        "one's own user channel is always allowed"
    );
    eves.send(json!({"type": "dance", "id": 5})).await;
    let answer = eves.next().await;
    assert_eq!(
        (answer["code"].as_str(), answer["id"].as_u64()),
        (Some("bad_frame"), Some(5))
    );
    eves.send(json!({"type": "publish", "id": 6, "channel": format!("conversation:{conversation}"), "data": {}})).await;
    assert_eq!(eves.next().await["code"], "not_subscribed");
    eves.send(
        json!({"type": "unsubscribe", "id": 7, "channel": format!("conversation:{conversation}")}),
    )
    .await;
    assert_eq!(eves.next().await["code"], "not_subscribed");

    // The channel limit (3, the user channel included).
    let mut anns = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    for _ in 0..2 {
        let other = stack.conversation(&ann, &[]).await;
        anns.next().await; // conversation.created
        anns.subscribe(&other, None).await;
    }
    anns.send(
        json!({"type": "subscribe", "id": 9, "channel": format!("conversation:{conversation}")}),
    )
    .await;
    assert_eq!(anns.next().await["code"], "too_many_channels");
    anns.send(
        json!({"type": "subscribe", "id": 10, "channel": format!("conversation:{conversation}")}),
    )
    .await;
    assert_eq!(
        anns.next().await["code"],
        "too_many_channels",
        "still open, still refusing"
    );
}

/// A frame over the limit is refused after its header: the rest of it is never read.
/// Dropping a socket with unread bytes makes the kernel send a reset, and a reset
/// destroys whatever the client has not read yet, the 1009 close included; so the
/// gateway ends its side first and reads what still comes until the client closes.
#[tokio::test]
async fn the_close_for_a_frame_too_large_ends_cleanly_not_with_a_reset() {
    let stack = Stack::start(1, &[("WS_MAX_FRAME_BYTES", "2048")]).await;
    let ann = stack.register("ann").await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let huge = json!({"type": "publish", "channel": "x", "data": "y".repeat(64 * 1024)});
    // Sent whole only if the gateway reads it all; the close says whether it was refused.
    let _ = client.socket.send(Message::text(huge.to_string())).await;
    assert_eq!(
        client.closed(Duration::from_secs(5)).await,
        Closed::Code(1009)
    );
    let end = tokio::time::timeout(Duration::from_secs(5), client.socket.next())
        .await
        .expect("the gateway closes its side");
    assert!(end.is_none(), "a clean end of the stream: {end:?}");
}

#[tokio::test]
async fn frames_that_are_not_the_protocol_close_the_connection() {
    let stack = Stack::start(1, &[("WS_MAX_FRAME_BYTES", "2048")]).await;
    let ann = stack.register("ann").await;
    let url = &stack.gateways[0].addr;

    let mut client = Client::connect(url, &ann.token).await;
    client
        .socket
        .send(Message::text("this is not json"))
        .await
        .unwrap();
    assert_eq!(
        client.closed(Duration::from_secs(5)).await,
        Closed::Code(1008)
    );

    let mut client = Client::connect(url, &ann.token).await;
    client
        .socket
        .send(Message::binary(vec![1, 2, 3]))
        .await
        .unwrap();
    assert_eq!(
        client.closed(Duration::from_secs(5)).await,
        Closed::Code(1008)
    );

    let mut client = Client::connect(url, &ann.token).await;
    let huge = json!({"type": "publish", "channel": "x", "data": "y".repeat(4096)}).to_string();
    client.socket.send(Message::text(huge)).await.unwrap();
    assert_eq!(
        client.closed(Duration::from_secs(5)).await,
        Closed::Code(1009)
    );

    let metrics = stack.metrics(0).await;
    assert_eq!(
        crate::helpers::sample(
            &metrics,
            r#"websocket_disconnects_total{reason="protocol_violation"}"#
        ),
        2.0
    );
    assert_eq!(
        crate::helpers::sample(&metrics, r#"websocket_disconnects_total{reason="too_big"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_dropped() {
    let stack = Stack::start(1, &[("PING_INTERVAL_SECONDS", "1")]).await;
    let ann = stack.register("ann").await;
    let mut quiet = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let mut lively = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    // Reading answers pings (tungstenite replies to them while reading); not reading
    // does not. Keep one client reading for 4 s and the other silent.
    let reading = tokio::spawn(async move {
        let ended = lively.next_within(Duration::from_secs(4)).await;
        (lively, ended)
    });
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (mut lively, ended) = reading.await.unwrap();
    assert!(
        ended.is_none(),
        "no frames, and no close, for the lively client"
    );
    // The silent one was closed meanwhile.
    let how = quiet.closed(Duration::from_secs(2)).await;
    assert!(
        matches!(how, Closed::Code(1001) | Closed::Abruptly),
        "{how:?}"
    );
    lively
        .send(json!({"type": "subscribe", "id": 1, "channel": format!("user:{}", ann.id)}))
        .await;
    assert_eq!(lively.next().await["type"], "subscribed");
    let metrics = stack.metrics(0).await;
    assert_eq!(
        crate::helpers::sample(
            &metrics,
            r#"websocket_disconnects_total{reason="ping_timeout"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn resubscribing_unsubscribing_and_publish_limits() {
    let stack = Stack::start(1, &[("WS_PUBLISH_PER_SECOND", "2")]).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let channel = format!("conversation:{conversation}");
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    client.subscribe(&conversation, None).await;

    client
        .send(json!({"type": "subscribe", "id": 2, "channel": channel}))
        .await;
    assert_eq!(client.next().await["code"], "already_subscribed");

    // Two publishes a second: the third in a row is refused, the connection stays.
    for id in 3..5 {
        client
            .send(json!({"type": "publish", "id": id, "channel": channel, "data": {}}))
            .await;
        assert_eq!(client.next().await["type"], "published");
    }
    client
        .send(json!({"type": "publish", "id": 5, "channel": channel, "data": {}}))
        .await;
    assert_eq!(client.next().await["code"], "rate_limited");

    client
        .send(json!({"type": "unsubscribe", "id": 6, "channel": channel}))
        .await;
    assert_eq!(
        client.next().await,
        json!({"type": "unsubscribed", "id": 6, "channel": channel})
    );
    stack
        .post(&ann, &conversation, "not for this connection any more")
        .await;
    assert!(
        client
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
}
