//! Fan-out across gateways: exactly once, in order, nothing lost.

use std::time::Duration;

use serde_json::json;

use crate::helpers::{Client, Stack, User, close_frame, sample};

#[tokio::test]
async fn a_message_reaches_subscribers_on_both_gateways_once_and_in_order() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;

    let mut on_first = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    let mut on_second = Client::connect(&stack.gateways[1].addr, &bob.token).await;
    let mut anns = Client::connect(&stack.gateways[1].addr, &ann.token).await;
    for client in [&mut on_first, &mut on_second, &mut anns] {
        let subscribed = client.subscribe(&conversation, None).await;
        assert_eq!(subscribed["offset"], 0);
        assert_eq!(subscribed["recovered"], false);
    }

    // Concurrent posts from both members: every subscriber sees 1..=n once, in order.
    let n = 30;
    futures_util::future::join_all((0..n).map(|i| {
        let sender = if i % 2 == 0 { &ann } else { &bob };
        stack.post(sender, &conversation, "hi")
    }))
    .await;
    let expected: Vec<i64> = (1..=n).collect();
    for client in [&mut on_first, &mut on_second, &mut anns] {
        assert_eq!(client.offsets(n as usize).await, expected);
        assert!(
            client
                .next_within(Duration::from_millis(300))
                .await
                .is_none(),
            "no duplicates after the last"
        );
    }

    // The frame is the message exactly as REST returned it.
    let seq = stack.post(&ann, &conversation, "check the shape").await;
    let frame = on_first.next().await;
    assert_eq!(frame["type"], "event");
    assert_eq!(frame["channel"], format!("conversation:{conversation}"));
    assert_eq!(frame["offset"], seq);
    assert_eq!(frame["data"]["body"], "check the shape");
    assert_eq!(frame["data"]["sender_id"], ann.id.as_str());

    // One Redis subscription per gateway for the channel, however many local clients.
    let client = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut redis = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}conversation:{conversation}", stack.prefix);
    let (_, subscribers): (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(&channel)
        .query_async::<Vec<(String, i64)>>(&mut redis)
        .await
        .unwrap()
        .remove(0);
    assert_eq!(subscribers, 2, "one per gateway");
    let metrics = stack.metrics(0).await;
    assert_eq!(sample(&metrics, "websocket_connections_active "), 1.0);
    assert!(sample(&metrics, "websocket_messages_sent_total ") >= 31.0);
    assert!(sample(&metrics, "redis_pubsub_messages_total ") >= 31.0);
    assert!(metrics.contains("websocket_fanout_duration_seconds_bucket"));

    // When the last local subscriber leaves, the gateway unsubscribes.
    drop(on_first);
    for _ in 0..50 {
        let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(&channel)
            .query_async(&mut redis)
            .await
            .unwrap();
        if counts[0].1 == 1 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the first gateway kept its Redis subscription");
}

#[tokio::test]
async fn since_recovers_what_was_missed_while_away() {
    let stack = Stack::start(1, &[("WS_RECOVERY_LIMIT", "5")]).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    for _ in 0..3 {
        stack.post(&ann, &conversation, "before").await;
    }
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let subscribed = client.subscribe(&conversation, Some(1)).await;
    assert_eq!(subscribed["offset"], 3);
    assert_eq!(subscribed["recovered"], true);
    assert_eq!(client.offsets(2).await, vec![2, 3]);
    stack.post(&ann, &conversation, "live").await;
    assert_eq!(client.offsets(1).await, vec![4]);
    drop(client);

    // Away while four more arrive; back with since=4.
    for _ in 0..4 {
        stack.post(&ann, &conversation, "while away").await;
    }
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let subscribed = client.subscribe(&conversation, Some(4)).await;
    assert_eq!(
        (
            subscribed["offset"].as_i64(),
            subscribed["recovered"].as_bool()
        ),
        (Some(8), Some(true))
    );
    assert_eq!(client.offsets(4).await, vec![5, 6, 7, 8]);

    // Too far behind for the limit (5): told so, and nothing replayed.
    let mut far = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let subscribed = far.subscribe(&conversation, Some(0)).await;
    assert_eq!(subscribed["recovered"], false);
    stack.post(&ann, &conversation, "next").await;
    assert_eq!(
        far.offsets(1).await,
        vec![9],
        "live events continue from the newest"
    );
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_recoveries_total{outcome="recovered"}"#
        ),
        2.0
    );
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_recoveries_total{outcome="too_far_behind"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn user_channel_events_and_ephemeral_publish() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let mut anns = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let mut bobs = Client::connect(&stack.gateways[1].addr, &bob.token).await;

    // conversation.created reaches every member's user channel.
    let conversation = stack.conversation(&ann, &[&bob]).await;
    for client in [&mut anns, &mut bobs] {
        let frame = client.next().await;
        assert_eq!(frame["event"], "conversation.created");
        assert_eq!(frame["data"]["id"], conversation.as_str());
    }

    // Typing goes to the other members, not back to the sender.
    anns.subscribe(&conversation, None).await;
    bobs.subscribe(&conversation, None).await;
    let channel = format!("conversation:{conversation}");
    anns.send(json!({"type": "publish", "id": 5, "channel": channel, "data": {"typing": true}}))
        .await;
    assert_eq!(
        anns.next().await,
        json!({"type": "published", "id": 5, "channel": channel})
    );
    let typing = bobs.next().await;
    assert_eq!(typing["event"], "ephemeral");
    assert_eq!(typing["from"], ann.id.as_str());
    assert_eq!(typing["data"], json!({"typing": true}));
    assert!(
        typing.get("offset").is_none(),
        "ephemeral events have no offset"
    );
    assert!(anns.next_within(Duration::from_millis(300)).await.is_none());
}

#[tokio::test]
async fn presence_follows_connections() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let redis =
        mobile_runtime::redis::Redis::connect_lazy(&stack.redis_url, &stack.prefix).unwrap();
    let id: mobile_domain::UserId = ann.id.parse().unwrap();
    let online = || async {
        mobile_events::presence::online(&redis, &[id])
            .await
            .unwrap()
            .contains(&id)
    };
    assert!(!online().await);
    let ws = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    assert!(online().await);
    drop(ws);
    for _ in 0..50 {
        if !online().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("still online after disconnecting");
}

/// `message.created` events at `offsets` of `conversation`, published in one Redis
/// pipeline: the hub takes them as one burst.
async fn publish_burst(stack: &Stack, conversation: &str, offsets: std::ops::RangeInclusive<i64>) {
    let channel = format!("{}conversation:{conversation}", stack.prefix);
    let mut burst = redis::pipe();
    for offset in offsets {
        let frame = json!({"type": "event", "channel": format!("conversation:{conversation}"),
                           "event": "message.created", "offset": offset, "data": {"body": "burst"}});
        burst
            .cmd("PUBLISH")
            .arg(&channel)
            .arg(frame.to_string())
            .ignore();
    }
    let redis = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    let () = burst.query_async(&mut redis).await.unwrap();
}

#[tokio::test]
async fn a_burst_larger_than_one_write_batch_arrives_whole_and_in_order() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;
    let mut client = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    client.subscribe(&conversation, None).await;

    // One pipeline: the hub takes the whole burst at once, so the connection finds a
    // queue several write batches long (a batch is at most 64 frames).
    let n = 150;
    publish_burst(&stack, &conversation, 1..=n).await;

    assert_eq!(
        client.offsets(n as usize).await,
        (1..=n).collect::<Vec<i64>>()
    );
    assert!(
        client
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "nothing after the last"
    );
}

/// A gateway that waits behind a burst for as long as it may (`WS_WRITE_COALESCE_MS`
/// at its most, a second), and bob, subscribed to a conversation with ann.
async fn bob_behind_the_longest_wait() -> (Stack, User, User, String, Client) {
    let stack = Stack::start(1, &[("WS_WRITE_COALESCE_MS", "1000")]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;
    let mut bobs = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    bobs.subscribe(&conversation, None).await;
    (stack, ann, bob, conversation, bobs)
}

/// `WS_WRITE_COALESCE_MS` at its most (a second): a subscriber getting one message at
/// a time gets each at once, never after the wait; a burst waits, then arrives whole
/// and in order with what came during the wait.
#[tokio::test]
async fn coalescing_writes_delays_no_one_keeping_up_and_loses_nothing() {
    let (stack, ann, _, conversation, mut bobs) = bob_behind_the_longest_wait().await;

    for expected in 1..=3 {
        let posted = std::time::Instant::now();
        stack.post(&ann, &conversation, "one at a time").await;
        assert_eq!(bobs.offsets(1).await, [expected]);
        assert!(
            posted.elapsed() < Duration::from_millis(900),
            "a single frame is written at once: {:?}",
            posted.elapsed()
        );
    }

    // A burst in one Redis pipeline: the connection finds it queued, waits, and takes
    // what the second pipeline put meanwhile. Nothing of either is lost or reordered,
    // and the burst is not written before the wait is over.
    let published = std::time::Instant::now();
    publish_burst(&stack, &conversation, 4..=13).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    publish_burst(&stack, &conversation, 14..=23).await;
    assert_eq!(bobs.offsets(20).await, (4..=23).collect::<Vec<i64>>());
    assert!(
        published.elapsed() >= Duration::from_millis(900),
        "a queued burst waits for more: {:?}",
        published.elapsed()
    );
    assert!(
        bobs.next_within(Duration::from_millis(300)).await.is_none(),
        "nothing after the last"
    );
}

#[tokio::test]
async fn a_revocation_ends_the_wait_for_more_and_what_was_taken_goes_first() {
    let (stack, _, bob, conversation, mut bobs) = bob_behind_the_longest_wait().await;

    // Behind a burst, the connection waits up to a second for more; bob logs out
    // meanwhile.
    let published = std::time::Instant::now();
    publish_burst(&stack, &conversation, 1..=10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let logout = json!({"refresh_token": bob.refresh_token});
    assert_eq!(stack.api_post("/v1/auth/logout", &logout).await, 204);

    assert_eq!(bobs.offsets(10).await, (1..=10).collect::<Vec<i64>>());
    let (code, reason) = close_frame(&mut bobs.socket, Duration::from_secs(2)).await;
    assert_eq!((code, reason.as_str()), (4001, "session_revoked"));
    assert!(
        published.elapsed() < Duration::from_millis(900),
        "a revocation ends the wait at once: {:?}",
        published.elapsed()
    );
}
