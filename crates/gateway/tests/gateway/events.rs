//! Every kind of conversation event through the gateways: live in order on two
//! gateways, replayed with `since` exactly as it went out, filled from PostgreSQL when
//! its publish was lost, and the end of a removed member's subscription.

use std::time::Duration;

use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::{Client, Stack, User};

/// Sends `method` with `body` as `user`; the JSON answer (the status must be a success).
async fn call(
    stack: &Stack,
    user: &User,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Value {
    let request = stack
        .http
        .request(method, format!("{}{path}", stack.api))
        .bearer_auth(&user.token);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    let response = request.send().await.unwrap();
    let status = response.status();
    let body = response.json::<Value>().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{path}: {status} {body}");
    body
}

/// The next `n` events of `channel`, other frames skipped.
async fn events(client: &mut Client, channel: &str, n: usize) -> Vec<Value> {
    let mut events = Vec::new();
    while events.len() < n {
        let frame = client.next().await;
        if frame["type"] == "event" && frame["channel"] == channel {
            events.push(frame);
        }
    }
    events
}

fn kinds(events: &[Value]) -> Vec<(i64, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["offset"].as_i64().unwrap(),
                e["event"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn every_kind_of_change_arrives_in_order_on_both_gateways_and_replays_with_since() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let cat = stack.register("cat").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;
    let channel = format!("conversation:{conversation}");
    let mut anns = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let mut bobs = Client::connect(&stack.gateways[1].addr, &bob.token).await;
    anns.subscribe(&conversation, None).await;
    bobs.subscribe(&conversation, None).await;

    let messages = format!("/v1/conversations/{conversation}/messages");
    let first = call(
        &stack,
        &ann,
        Method::POST,
        &messages,
        Some(json!({"client_msg_id": "a", "body": "helo"})),
    )
    .await;
    let first_path = format!("{messages}/{}", first["id"].as_str().unwrap());
    call(
        &stack,
        &ann,
        Method::PATCH,
        &first_path,
        Some(json!({"body": "hello"})),
    )
    .await;
    let second = call(
        &stack,
        &bob,
        Method::POST,
        &messages,
        Some(json!({"client_msg_id": "b", "body": "oops"})),
    )
    .await;
    call(
        &stack,
        &bob,
        Method::DELETE,
        &format!("{messages}/{}", second["id"].as_str().unwrap()),
        None,
    )
    .await;
    let members = format!("/v1/conversations/{conversation}/members");
    call(
        &stack,
        &ann,
        Method::POST,
        &members,
        Some(json!({"user_ids": [cat.id]})),
    )
    .await;
    call(
        &stack,
        &bob,
        Method::PATCH,
        &format!("/v1/conversations/{conversation}"),
        Some(json!({"title": "Trip"})),
    )
    .await;
    let left = stack
        .api_as(&cat, Method::DELETE, &format!("{members}/{}", cat.id), None)
        .await;
    assert_eq!(left, 204);

    let expected: Vec<(i64, String)> = [
        "message.created",
        "message.updated",
        "message.created",
        "message.deleted",
        "member.added",
        "conversation.updated",
        "member.removed",
    ]
    .iter()
    .enumerate()
    .map(|(i, kind)| (i as i64 + 1, (*kind).to_owned()))
    .collect();
    let live_ann = events(&mut anns, &channel, 7).await;
    let live_bob = events(&mut bobs, &channel, 7).await;
    assert_eq!(kinds(&live_ann), expected);
    assert_eq!(live_ann, live_bob, "both gateways pass on the same frames");
    assert!(
        anns.next_within(Duration::from_millis(300)).await.is_none(),
        "each once"
    );

    // Recovery on the other gateway replays every kind, in order, once. Events not about
    // a message are replayed byte for byte; message events show the message as it is
    // now (the first edited, the second a tombstone).
    let mut again = Client::connect(&stack.gateways[1].addr, &ann.token).await;
    let subscribed = again.subscribe(&conversation, Some(0)).await;
    assert_eq!(subscribed["offset"], 7);
    assert_eq!(subscribed["recovered"], true);
    let replayed = events(&mut again, &channel, 7).await;
    assert_eq!(kinds(&replayed), expected);
    for (live, replayed) in live_ann.iter().zip(&replayed).skip(4) {
        assert_eq!(live, replayed);
    }
    assert_eq!(replayed[0]["data"]["body"], "hello");
    assert_eq!(replayed[1], live_ann[1]);
    assert_eq!(replayed[2]["data"]["body"], "");
    assert_eq!(replayed[3], live_ann[3]);
    assert!(
        again
            .next_within(Duration::from_millis(300))
            .await
            .is_none()
    );

    // From the middle: what follows offset 4.
    let mut middle = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    middle.subscribe(&conversation, Some(4)).await;
    let tail = events(&mut middle, &channel, 3).await;
    assert_eq!(kinds(&tail), expected[4..].to_vec());
}

#[tokio::test]
async fn an_event_whose_publish_was_lost_is_filled_from_postgresql() {
    use mobile_db::conversations::{ChangeMessage, edit_message};
    use mobile_domain::MessageText;

    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;
    let channel = format!("conversation:{conversation}");
    let mut bobs = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    bobs.subscribe(&conversation, None).await;
    let message = stack.post(&ann, &conversation, "helo").await;
    assert_eq!(events(&mut bobs, &channel, 1).await[0]["offset"], message);

    // An edit commits, but its publish never reaches Redis.
    let pool = stack.db.pool().await;
    let id: uuid::Uuid =
        sqlx::query_scalar("SELECT id FROM messages WHERE conversation_id = $1::uuid")
            .bind(&conversation)
            .fetch_one(&pool)
            .await
            .unwrap();
    let mut tx = pool.begin().await.unwrap();
    let edited = edit_message(
        &mut tx,
        conversation.parse().unwrap(),
        ann.id.parse().unwrap(),
        mobile_domain::MessageId::from_uuid(id),
        &MessageText::parse("hello").unwrap(),
    )
    .await
    .unwrap();
    assert!(matches!(edited, ChangeMessage::Changed { seq: 2, .. }));
    tx.commit().await.unwrap();
    pool.close().await;

    // The next event shows the gap; the gateway reads the edit from the log first.
    stack.post(&ann, &conversation, "next").await;
    let got = events(&mut bobs, &channel, 2).await;
    assert_eq!(
        kinds(&got),
        vec![
            (2, "message.updated".to_owned()),
            (3, "message.created".to_owned())
        ]
    );
    assert_eq!(got[0]["data"]["body"], "hello");
}

#[tokio::test]
async fn a_removed_member_is_unsubscribed_at_the_removal_and_reads_nothing_after() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let conversation = stack.conversation(&ann, &[&bob]).await;
    let channel = format!("conversation:{conversation}");
    // Bob on both gateways, Ann on one.
    let mut bob_here = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    let mut bob_there = Client::connect(&stack.gateways[1].addr, &bob.token).await;
    let mut anns = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    for client in [&mut bob_here, &mut bob_there, &mut anns] {
        client.subscribe(&conversation, None).await;
    }
    stack.post(&ann, &conversation, "before").await;

    let removed = stack
        .api_as(
            &ann,
            Method::DELETE,
            &format!("/v1/conversations/{conversation}/members/{}", bob.id),
            None,
        )
        .await;
    assert_eq!(removed, 204);
    stack.post(&ann, &conversation, "after").await;

    for bobs in [&mut bob_here, &mut bob_there] {
        let mut seen = Vec::new();
        while let Some(frame) = bobs.next_within(Duration::from_millis(700)).await {
            seen.push(frame);
        }
        let on_channel: Vec<&Value> = seen.iter().filter(|f| f["channel"] == channel).collect();
        assert_eq!(on_channel.len(), 3, "{seen:?}");
        assert_eq!(on_channel[0]["data"]["body"], "before");
        assert_eq!(on_channel[1]["event"], "member.removed");
        assert_eq!(
            on_channel[2],
            &json!({"type": "unsubscribed", "channel": channel, "reason": "removed"})
        );
        assert!(
            seen.iter().any(|f| f["event"] == "conversation.left"),
            "the user channel says so too: {seen:?}"
        );
        // Subscribing again is refused: not a member.
        bobs.send(json!({"type": "subscribe", "id": 9, "channel": channel, "since": 0}))
            .await;
        let answer = bobs.next().await;
        assert_eq!(
            (&answer["type"], &answer["code"]),
            (&json!("error"), &json!("forbidden"))
        );
    }
    // Ann is still subscribed and gets everything.
    assert_eq!(
        kinds(&events(&mut anns, &channel, 3).await),
        vec![
            (1, "message.created".to_owned()),
            (2, "member.removed".to_owned()),
            (3, "message.created".to_owned())
        ]
    );
}

#[tokio::test]
async fn the_user_channel_replays_what_a_disconnected_app_missed_exactly_once() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let own = format!("user:{}", ann.id);

    let mut first = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let conversation = stack.conversation(&bob, &[&ann]).await;
    let created = events(&mut first, &own, 1).await;
    assert_eq!(
        kinds(&created),
        vec![(1, "conversation.created".to_owned())]
    );
    drop(first);

    // While Ann is away: a second conversation, and her read on another device.
    let second = stack.conversation(&bob, &[&ann]).await;
    let seq = stack.post(&bob, &second, "are you there?").await;
    call(
        &stack,
        &ann,
        Method::POST,
        &format!("/v1/conversations/{second}/read"),
        Some(json!({ "offset": seq })),
    )
    .await;

    // Back, on the other gateway: resubscribing with `since` replays 2 and 3, in order.
    let mut back = Client::connect(&stack.gateways[1].addr, &ann.token).await;
    back.send(json!({"type": "subscribe", "id": 5, "channel": own, "since": 1}))
        .await;
    let subscribed = back.next().await;
    assert_eq!(
        subscribed,
        json!({"type": "subscribed", "id": 5, "channel": own, "offset": 3, "recovered": true})
    );
    let missed = events(&mut back, &own, 2).await;
    assert_eq!(
        kinds(&missed),
        vec![
            (2, "conversation.created".to_owned()),
            (3, "conversation.read".to_owned())
        ]
    );
    assert_eq!(missed[0]["data"]["id"], second.as_str());

    // Live from here, once: a third conversation is 4.
    stack.conversation(&bob, &[&ann]).await;
    assert_eq!(
        kinds(&events(&mut back, &own, 1).await),
        vec![(4, "conversation.created".to_owned())]
    );
    assert!(
        back.next_within(Duration::from_millis(300)).await.is_none(),
        "each once"
    );

    // An event whose publish was lost (recorded, never published) is filled before
    // the next one.
    let pool = stack.db.pool().await;
    let mut tx = pool.begin().await.unwrap();
    mobile_db::user_events::record(
        &mut tx,
        "notification",
        &[(ann.id.parse().unwrap(), r#"{"title":"lost"}"#.to_owned())],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    pool.close().await;
    let left = stack
        .api_as(
            &ann,
            Method::DELETE,
            &format!("/v1/conversations/{conversation}/members/{}", ann.id),
            None,
        )
        .await;
    assert_eq!(left, 204);
    let got = events(&mut back, &own, 2).await;
    assert_eq!(
        kinds(&got),
        vec![
            (5, "notification".to_owned()),
            (6, "conversation.left".to_owned())
        ]
    );
    assert_eq!(got[0]["data"]["title"], "lost");

    // A fresh connection asking from the start gets all six.
    let mut fresh = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    fresh
        .send(json!({"type": "subscribe", "channel": own, "since": 0}))
        .await;
    assert_eq!(fresh.next().await["offset"], 6);
    let all = events(&mut fresh, &own, 6).await;
    assert_eq!(
        all.iter()
            .map(|e| e["offset"].as_i64().unwrap())
            .collect::<Vec<_>>(),
        vec![1, 2, 3, 4, 5, 6]
    );
}

/// `WS_USER_CHANNEL_HOLD_MS` sets the hold: at 0 the channel is live from the welcome
/// on, and a resubscribe with `since` replays from there (the app drops the offsets it
/// has); a long hold keeps an app that sends nothing waiting, and its first frame ends
/// the hold at once.
#[tokio::test]
async fn the_user_channel_hold_is_a_setting() {
    let own = |user: &User| format!("user:{}", user.id);

    let stack = Stack::start(1, &[("WS_USER_CHANNEL_HOLD_MS", "0")]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let mut ann_ws = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let connected = std::time::Instant::now();
    stack.conversation(&bob, &[&ann]).await;
    let live = ann_ws
        .next_within(Duration::from_secs(10))
        .await
        .expect("the event, with no frame sent");
    assert!(
        connected.elapsed() < Duration::from_millis(1_900),
        "live at once, not after the default hold: {:?}",
        connected.elapsed()
    );
    assert_eq!(
        (live["channel"].as_str(), live["offset"].as_i64()),
        (Some(own(&ann).as_str()), Some(1))
    );
    ann_ws
        .send(json!({"type": "subscribe", "id": 1, "channel": own(&ann), "since": 0}))
        .await;
    assert_eq!(
        ann_ws.next().await,
        json!({"type": "subscribed", "id": 1, "channel": own(&ann), "offset": 1, "recovered": true})
    );
    assert_eq!(kinds(&events(&mut ann_ws, &own(&ann), 1).await)[0].0, 1);

    drop(stack);
    let stack = Stack::start(1, &[("WS_USER_CHANNEL_HOLD_MS", "60000")]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let mut ann_ws = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let first = stack.conversation(&bob, &[&ann]).await;
    assert!(
        ann_ws.next_within(Duration::from_secs(3)).await.is_none(),
        "held past the default's 2 s"
    );
    ann_ws
        .send(json!({"type": "subscribe", "id": 2, "channel": format!("conversation:{first}")}))
        .await;
    // The hold ends before the frame is handled: what it held comes first.
    let held = ann_ws.next().await;
    assert_eq!(
        (held["channel"].as_str(), held["offset"].as_i64()),
        (Some(own(&ann).as_str()), Some(1))
    );
    assert_eq!(ann_ws.next().await["type"], "subscribed");
}

/// What the user channel carries between the welcome and the app's resubscribe with
/// `since` comes after the replay, not before it: one ordered stream. Any other first
/// frame, or the hold's time passing, lets it through at once, in order.
#[tokio::test]
async fn the_user_channel_holds_live_events_until_the_resubscribe_replays_the_missed() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let own = format!("user:{}", ann.id);
    let gateway = &stack.gateways[0].addr;

    // 1 while Ann is away; 2 after her welcome, before her resubscribe.
    let first = stack.conversation(&bob, &[&ann]).await;
    let mut ann_ws = Client::connect(gateway, &ann.token).await;
    let second = stack.conversation(&bob, &[&ann]).await;
    assert!(
        ann_ws
            .next_within(Duration::from_millis(500))
            .await
            .is_none(),
        "2 waits for the resubscribe"
    );
    ann_ws
        .send(json!({"type": "subscribe", "id": 1, "channel": own, "since": 0}))
        .await;
    assert_eq!(
        ann_ws.next().await,
        json!({"type": "subscribed", "id": 1, "channel": own, "offset": 2, "recovered": true})
    );
    let got = events(&mut ann_ws, &own, 2).await;
    assert_eq!(
        got.iter()
            .map(|e| e["data"]["id"].as_str().unwrap())
            .collect::<Vec<_>>(),
        vec![first.as_str(), second.as_str()]
    );
    assert_eq!(got[1]["offset"], 2);
    assert!(
        ann_ws
            .next_within(Duration::from_millis(300))
            .await
            .is_none(),
        "each once"
    );

    // A first frame of another kind ends the hold: the held event comes at once.
    let mut other = Client::connect(gateway, &ann.token).await;
    stack.conversation(&bob, &[&ann]).await;
    assert_eq!(
        kinds(&events(&mut ann_ws, &own, 1).await),
        vec![(3, "conversation.created".to_owned())]
    );
    other
        .send(json!({"type": "subscribe", "id": 2, "channel": format!("conversation:{first}")}))
        .await;
    let mut frames = [other.next().await, other.next().await];
    frames.sort_by_key(|frame| frame["type"].to_string());
    assert_eq!(frames[0]["type"], "event");
    assert_eq!(frames[0]["offset"], 3);
    assert_eq!(frames[1]["type"], "subscribed");

    // An app that never resubscribes gets what was held once the hold is over.
    let mut silent = Client::connect(gateway, &ann.token).await;
    stack.conversation(&bob, &[&ann]).await;
    let held = silent.next_within(Duration::from_secs(5)).await.unwrap();
    assert_eq!(
        (held["channel"].as_str(), held["offset"].as_i64()),
        (Some(own.as_str()), Some(4))
    );
}
