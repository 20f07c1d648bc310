//! The races the ordering promise is about, made to happen on purpose: a publish that
//! never reaches Redis, a frame Redis delivers twice, and a recovery that overlaps
//! live events. Each test fails if the piece of the gateway it is about is taken out
//! (the note of the change that added them shows each such mutation failing).

use std::time::Duration;

use crate::helpers::{Client, Stack, sample};

/// Lost publishes: messages committed but never published. The next published one
/// reveals the gap, and the hub fills it from PostgreSQL before passing it on.
#[tokio::test]
async fn a_publish_that_never_reached_redis_is_filled_before_the_next() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    client.subscribe(&conversation, None).await;
    assert_eq!(stack.post(&ann, &conversation, "one").await, 1);
    assert_eq!(client.offsets(1).await, vec![1]);

    assert_eq!(stack.post_unpublished(&ann, &conversation, "lost").await, 2);
    assert_eq!(stack.post_unpublished(&ann, &conversation, "lost").await, 3);
    assert_eq!(stack.post(&ann, &conversation, "four").await, 4);

    assert_eq!(client.offsets(3).await, vec![2, 3, 4]);
    assert!(
        client
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_gap_fills_total{case="lost_publish",outcome="filled"}"#
        ),
        1.0,
        "{metrics}"
    );
}

/// Redis delivers a frame twice (a publisher's retry): the hub passes it on once.
#[tokio::test]
async fn a_frame_redis_delivers_twice_is_passed_on_once() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    client.subscribe(&conversation, None).await;
    stack.post(&ann, &conversation, "one").await;
    let frame = client.next().await;
    assert_eq!(frame["offset"], 1);

    let channel = format!("conversation:{conversation}");
    stack.publish_raw(&channel, &frame.to_string()).await;
    stack.post(&ann, &conversation, "two").await;
    assert_eq!(
        client.offsets(1).await,
        vec![2],
        "offset 1 is not delivered again"
    );
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(&metrics, "websocket_duplicates_dropped_total "),
        1.0,
        "the hub dropped it, not only the connection: {metrics}"
    );
}

/// Bob recovers offsets 2 and 3 from PostgreSQL with `since`; his reading shows the
/// hub that it is behind (their publishes were lost), so the hub fills them for Ann,
/// and its fill reaches Bob's queue too. Bob sees each offset once, Ann too.
#[tokio::test]
async fn a_recovery_that_overlaps_live_events_delivers_each_offset_once() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;
    let url = &stack.gateways[0].addr;
    let mut anns = Client::connect(url, &ann.token).await;
    anns.subscribe(&conversation, None).await;
    stack.post(&ann, &conversation, "one").await;
    assert_eq!(anns.offsets(1).await, vec![1]);

    stack.post_unpublished(&ann, &conversation, "lost").await;
    stack.post_unpublished(&ann, &conversation, "lost").await;
    let mut bobs = Client::connect(url, &bob.token).await;
    let subscribed = bobs.subscribe(&conversation, Some(1)).await;
    assert_eq!(
        (
            subscribed["offset"].as_i64(),
            subscribed["recovered"].as_bool()
        ),
        (Some(3), Some(true))
    );
    assert_eq!(bobs.offsets(2).await, vec![2, 3], "recovered");
    assert_eq!(anns.offsets(2).await, vec![2, 3], "filled by the hub");

    stack.post(&ann, &conversation, "four").await;
    assert_eq!(
        bobs.offsets(1).await,
        vec![4],
        "the hub's fill of 2 and 3 was dropped"
    );
    assert_eq!(anns.offsets(1).await, vec![4]);
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_gap_fills_total{case="subscriber_ahead",outcome="filled"}"#
        ),
        1.0,
        "{metrics}"
    );
}

/// Two clients subscribe to a channel new to the gateway at the same moment, with
/// messages arriving meanwhile: the channel starts where the lower reading says, so
/// neither misses anything.
#[tokio::test]
async fn concurrent_first_subscribers_both_get_everything_after_their_readings() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let url = &stack.gateways[0].addr;
    for round in 0..5 {
        let mut clients = Vec::new();
        for _ in 0..2 {
            clients.push(Client::connect(url, &ann.token).await);
        }
        let before = stack.post(&ann, &conversation, "before").await;
        let posting = {
            let http = stack.http.clone();
            let api = stack.api.clone();
            let token = ann.token.clone();
            let conversation = conversation.clone();
            tokio::spawn(async move {
                for i in 0..5 {
                    let response = http
                        .post(format!("{api}/v1/conversations/{conversation}/messages"))
                        .bearer_auth(&token)
                        .json(&serde_json::json!({"client_msg_id": format!("r{round}-{i}"), "body": "x"}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(response.status(), 201);
                }
            })
        };
        let (first, second) = clients.split_at_mut(1);
        let (a, b) = tokio::join!(
            first[0].subscribe(&conversation, Some(before)),
            second[0].subscribe(&conversation, Some(before))
        );
        posting.await.unwrap();
        let last = before + 5;
        for (client, subscribed) in clients.iter_mut().zip([a, b]) {
            let offset = subscribed["offset"].as_i64().unwrap();
            let expected: Vec<i64> = (before + 1..=last).collect();
            let seen = client.offsets(expected.len()).await;
            assert_eq!(seen, expected, "round {round}, reading {offset}");
        }
        drop(clients);
        // Let the channel go before the next round, so it starts afresh.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
