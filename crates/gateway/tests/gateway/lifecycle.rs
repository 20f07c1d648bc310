//! Slow consumers, rolling restarts and Redis restarts: nothing lost, nothing doubled.

use std::time::Duration;

use crate::helpers::{Client, Closed, Stack, sample};

#[tokio::test]
async fn a_stalled_client_gets_4008_others_keep_their_latency_and_nothing_is_lost() {
    let stack = Stack::start(1, &[("WS_OUTBOUND_QUEUE", "16")]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;
    let url = &stack.gateways[0].addr;
    let mut stalled = Client::connect(url, &bob.token).await;
    stalled.subscribe(&conversation, None).await;
    let mut healthy = Client::connect(url, &ann.token).await;
    healthy.subscribe(&conversation, None).await;
    let first = stack.post(&ann, &conversation, "before the stall").await;
    assert_eq!(stalled.offsets(1).await, vec![first]);
    assert_eq!(healthy.offsets(1).await, vec![first]);

    // Bob stops reading while 16 MiB of user-channel events are published to him: far
    // more than the socket buffers and his queue of 16 hold.
    let redis = redis::Client::open(stack.redis_url.as_str()).unwrap();
    let mut redis = redis.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}user:{}", stack.prefix, bob.id);
    let frame = serde_json::json!({"type": "event", "channel": format!("user:{}", bob.id), "event": "notification",
                                   "data": {"body": "x".repeat(8 * 1024)}})
    .to_string();
    for _ in 0..8 {
        let mut pipe = redis::pipe();
        for _ in 0..256 {
            pipe.publish(&channel, &frame).ignore();
        }
        let _: () = pipe.query_async(&mut redis).await.unwrap();
    }

    // Meanwhile Ann's messages still arrive. Bob reads nothing until after this, so a
    // gateway that waited for a stuck client would never deliver them: no timer needed
    // (how fast they arrive is a benchmark's question, not a test's).
    for _ in 0..3 {
        let seq = stack.post(&ann, &conversation, "during the stall").await;
        assert_eq!(healthy.offsets(1).await, vec![seq]);
    }

    // Bob reads again: what was buffered, then 4008.
    assert_eq!(
        stalled.closed(Duration::from_secs(10)).await,
        Closed::Code(4008)
    );
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_disconnects_total{reason="slow_consumer"}"#
        ),
        1.0
    );

    // He reconnects with the last offset he saw and gets every message since.
    let mut back = Client::connect(url, &bob.token).await;
    let subscribed = back.subscribe(&conversation, Some(first)).await;
    assert_eq!(subscribed["recovered"], true);
    assert_eq!(back.offsets(3).await, vec![first + 1, first + 2, first + 3]);
}

#[tokio::test]
async fn sigterm_moves_clients_to_the_other_gateway_without_loss() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let (draining, staying) = (&stack.gateways[0], &stack.gateways[1]);

    let mut clients = Vec::new();
    for _ in 0..3 {
        let mut client = Client::connect(&draining.addr, &ann.token).await;
        client.subscribe(&conversation, None).await;
        clients.push(client);
    }
    for _ in 0..3 {
        stack.post(&ann, &conversation, "before").await;
    }

    // Messages keep coming while the gateway drains.
    draining.shutdown.trigger();
    let posting = {
        let http = stack.http.clone();
        let api = stack.api.clone();
        let token = ann.token.clone();
        let conversation = conversation.clone();
        tokio::spawn(async move {
            for i in 0..20 {
                let response = http
                    .post(format!("{api}/v1/conversations/{conversation}/messages"))
                    .bearer_auth(&token)
                    .json(&serde_json::json!({"client_msg_id": format!("during-{i}"), "body": "during"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(response.status(), 201);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    let total = 23;
    let mut handles = Vec::new();
    for mut client in clients {
        let staying = staying.addr.clone();
        let token = ann.token.clone();
        let conversation = conversation.clone();
        handles.push(tokio::spawn(async move {
            let mut seen: Vec<i64> = Vec::new();
            let after_ms = loop {
                let frame = client
                    .next_within(Duration::from_secs(10))
                    .await
                    .expect("reconnect before the drain ends");
                match frame["type"].as_str() {
                    Some("reconnect") => break frame["after_ms"].as_u64().unwrap(),
                    Some("event") => seen.push(frame["offset"].as_i64().unwrap()),
                    other => panic!("unexpected {other:?}"),
                }
            };
            assert!(after_ms <= 1_000);
            assert_eq!(
                client.closed(Duration::from_secs(5)).await,
                Closed::Code(1012)
            );
            tokio::time::sleep(Duration::from_millis(after_ms)).await;

            let mut moved = Client::connect(&staying, &token).await;
            let since = seen.last().copied().unwrap_or(0);
            let subscribed = moved.subscribe(&conversation, Some(since)).await;
            assert_eq!(subscribed["recovered"], true);
            let offset = subscribed["offset"].as_i64().unwrap();
            seen.extend(moved.offsets((offset - since) as usize).await);
            while seen.len() < total {
                seen.extend(moved.offsets(1).await);
            }
            seen
        }));
    }
    posting.await.unwrap();
    for handle in handles {
        let seen = handle.await.unwrap();
        assert_eq!(
            seen,
            (1..=total as i64).collect::<Vec<_>>(),
            "every message once, in order"
        );
    }
    let drained = tokio::time::timeout(
        Duration::from_secs(6),
        &mut stack.gateways.into_iter().next().unwrap().server,
    )
    .await;
    assert!(
        matches!(drained, Ok(Ok(Ok(())))),
        "the draining gateway exits cleanly: {drained:?}"
    );
}

#[tokio::test]
async fn a_redis_restart_loses_nothing() {
    let mut redis = mobile_testkit::RedisServer::start().await;
    let stack = Stack::start_with_redis(2, &[], redis.url()).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let mut clients = Vec::new();
    for gateway in &stack.gateways {
        let mut client = Client::connect(&gateway.addr, &ann.token).await;
        client.subscribe(&conversation, None).await;
        clients.push(client);
    }
    for _ in 0..3 {
        stack.post(&ann, &conversation, "before").await;
    }
    for client in &mut clients {
        assert_eq!(client.offsets(3).await, vec![1, 2, 3]);
    }

    // Redis dies (and comes back empty). Messages posted meanwhile are only in
    // PostgreSQL: their publishes failed.
    redis.stop().await;
    for _ in 0..3 {
        stack.post(&ann, &conversation, "while Redis is down").await;
    }
    let ready = stack.gateways[0]
        .addr
        .replace("ws://", "http://")
        .replace("/v1/ws", "/health/ready");
    // Redis is down for every gateway alike: each stays ready, degraded, and keeps
    // taking connections, which recover from PostgreSQL.
    let response = stack.http.get(&ready).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"status": "degraded",
                           "checks": {"postgres": "ok", "redis": "failed", "pubsub": "failed"}})
    );
    let mut late = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let recovered = late.subscribe(&conversation, Some(0)).await;
    assert_eq!(recovered["recovered"], true, "{recovered}");
    assert_eq!(late.offsets(6).await, vec![1, 2, 3, 4, 5, 6]);
    redis.restart().await;
    for gateway in &stack.gateways {
        stack.wait_ready(gateway).await;
    }

    // The gateways caught up from PostgreSQL, and live delivery works again.
    stack.post(&ann, &conversation, "after").await;
    for client in &mut clients {
        assert_eq!(client.offsets(4).await, vec![4, 5, 6, 7]);
        assert!(
            client
                .next_within(Duration::from_millis(300))
                .await
                .is_none(),
            "and no duplicates"
        );
    }
    let metrics = stack.metrics(0).await;
    assert!(sample(&metrics, "redis_pubsub_reconnects_total ") >= 1.0);
}

#[tokio::test]
async fn presence_comes_back_with_redis_so_a_connected_user_gets_no_push() {
    let mut redis = mobile_testkit::RedisServer::start().await;
    let stack = Stack::start_with_redis(1, &[], redis.url()).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&bob, &[&ann]).await;
    let _ann_online = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let pool = stack.db.pool().await;
    let notify_jobs = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM jobs WHERE kind LIKE 'push.%'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    stack.post(&bob, &conversation, "ann is here").await;
    assert_eq!(notify_jobs().await, 0, "no push for a connected user");

    // Redis restarts empty: every presence entry is gone.
    redis.restart().await;
    stack.wait_ready(&stack.gateways[0]).await;
    let handle =
        mobile_runtime::redis::Redis::connect_lazy(&stack.redis_url, &stack.prefix).unwrap();
    let id: mobile_domain::UserId = ann.id.parse().unwrap();
    // Registered again at once, not at the next renewal (20 s).
    let mut online = false;
    for _ in 0..30 {
        online = mobile_events::presence::online(&handle, &[id])
            .await
            .is_ok_and(|online| online.contains(&id));
        if online {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(online, "ann, still connected, is online again within 3 s");
    stack.post(&bob, &conversation, "ann is still here").await;
    assert_eq!(notify_jobs().await, 0, "and gets no push");
    pool.close().await;
}

#[tokio::test]
async fn the_pubsub_connection_stays_up_while_idle() {
    // The hub checks its Pub/Sub connection every 5 s; a check that fails on a healthy
    // connection would reconnect (and catch up from PostgreSQL) over and over.
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let conversation = stack.conversation(&ann, &[]).await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    client.subscribe(&conversation, None).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let seq = stack.post(&ann, &conversation, "still here").await;
    assert_eq!(client.offsets(1).await, vec![seq]);
    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(&metrics, "redis_pubsub_reconnects_total "),
        0.0,
        "{metrics}"
    );
}
