//! Conversations and messages over REST, and the events published for the gateways.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use futures_util::StreamExt;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{Session, TestApp, assert_problem};

pub async fn create(app: &TestApp, session: &Session, members: &[&str]) -> Value {
    let response = app
        .authed(Method::POST, "/v1/conversations", session)
        .json(&json!({"member_ids": members, "title": "Team"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    response.json().await.unwrap()
}

pub async fn post(
    app: &TestApp,
    session: &Session,
    conversation: &str,
    client_msg_id: &str,
    body: &str,
) -> reqwest::Response {
    app.authed(
        Method::POST,
        &format!("/v1/conversations/{conversation}/messages"),
        session,
    )
    .json(&json!({"client_msg_id": client_msg_id, "body": body}))
    .send()
    .await
    .unwrap()
}

/// A Pub/Sub subscription on the app's Redis, to see what the gateways would see.
pub async fn subscribe(app: &TestApp, channel: &str) -> redis::aio::PubSub {
    let client = redis::Client::open(mobile_testkit::redis_url()).unwrap();
    let mut pubsub = client.get_async_pubsub().await.unwrap();
    pubsub
        .subscribe(format!("{}{channel}", app.redis_prefix))
        .await
        .unwrap();
    pubsub
}

pub async fn next_frame(pubsub: &mut redis::aio::PubSub) -> Value {
    let message = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        pubsub.on_message().next(),
    )
    .await
    .expect("a frame within 5 s")
    .expect("the subscription is open");
    serde_json::from_slice(message.get_payload_bytes()).unwrap()
}

#[tokio::test]
async fn members_see_conversations_and_outsiders_get_404() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let eve = app.register("eve@example.com").await;
    let mut bobs_events = subscribe(&app, &format!("user:{}", bob.user_id)).await;

    let conversation = create(&app, &ann, &[&bob.user_id]).await;
    let id = conversation["id"].as_str().unwrap();
    let mut members: Vec<&str> = conversation["member_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    members.sort_unstable();
    let mut expected = vec![ann.user_id.as_str(), bob.user_id.as_str()];
    expected.sort_unstable();
    assert_eq!(members, expected, "the creator is a member");
    assert_eq!(conversation["title"], "Team");

    let event = next_frame(&mut bobs_events).await;
    assert_eq!(event["type"], "event");
    assert_eq!(event["event"], "conversation.created");
    assert_eq!(event["channel"], format!("user:{}", bob.user_id));
    assert_eq!(event["data"], conversation);

    for session in [&ann, &bob] {
        let response = app
            .authed(Method::GET, &format!("/v1/conversations/{id}"), session)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let list: Value = app.get_json("/v1/conversations", session).await;
        assert_eq!(list["items"][0]["id"], id);
    }
    let response = app
        .authed(Method::GET, &format!("/v1/conversations/{id}"), &eve)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = post(&app, &eve, id, "x1", "let me in").await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let response = app
        .authed(
            Method::GET,
            &format!("/v1/conversations/{id}/messages"),
            &eve,
        )
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let list: Value = app.get_json("/v1/conversations", &eve).await;
    assert!(list["items"].as_array().unwrap().is_empty());

    let response = app
        .authed(Method::POST, "/v1/conversations", &ann)
        .json(&json!({"member_ids": [Uuid::new_v4()]}))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_members",
    )
    .await;
}

#[tokio::test]
async fn posting_assigns_seq_publishes_and_deduplicates() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let conversation = create(&app, &ann, &[]).await;
    let id = conversation["id"].as_str().unwrap();
    let mut events = subscribe(&app, &format!("conversation:{id}")).await;

    let response = post(&app, &ann, id, "c-1", "hello").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let message: Value = response.json().await.unwrap();
    assert_eq!(message["seq"], 1);
    assert_eq!(message["sender_id"], ann.user_id.as_str());
    assert_eq!(message["conversation_id"], id);

    let event = next_frame(&mut events).await;
    assert_eq!(event["channel"], format!("conversation:{id}"));
    assert_eq!(event["event"], "message.created");
    assert_eq!(event["offset"], 1);
    assert_eq!(
        event["data"], message,
        "the event carries the message exactly as REST shows it"
    );

    // A retry (lost response): the first message, 200, no new seq, no new event.
    let response = post(&app, &ann, id, "c-1", "hello").await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.json::<Value>().await.unwrap(), message);
    let response = post(&app, &ann, id, "c-2", "second").await;
    assert_eq!(response.json::<Value>().await.unwrap()["seq"], 2);
    assert_eq!(next_frame(&mut events).await["offset"], 2);

    for (body, code) in [
        (
            json!({"client_msg_id": "c-3", "body": "   "}),
            "invalid_body",
        ),
        (
            json!({"client_msg_id": "", "body": "x"}),
            "invalid_client_msg_id",
        ),
        (
            json!({"client_msg_id": "c-3", "body": "x", "media_id": Uuid::new_v4()}),
            "unknown_media",
        ),
    ] {
        let response = app
            .authed(
                Method::POST,
                &format!("/v1/conversations/{id}/messages"),
                &ann,
            )
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::UNPROCESSABLE_ENTITY, code).await;
    }
}

#[tokio::test]
async fn concurrent_posts_get_seq_one_to_n() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let conversation = create(&app, &ann, &[&bob.user_id]).await;
    let id = conversation["id"].as_str().unwrap();

    let n = 50;
    let responses = futures_util::future::join_all((0..n).map(|i| {
        let sender = if i % 2 == 0 { &ann } else { &bob };
        let app = &app;
        async move { post(app, sender, id, &format!("m-{i}"), "hi").await }
    }))
    .await;
    let mut seqs: Vec<i64> = Vec::new();
    for response in responses {
        assert_eq!(response.status(), StatusCode::CREATED);
        seqs.push(
            response.json::<Value>().await.unwrap()["seq"]
                .as_i64()
                .unwrap(),
        );
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (1..=n).collect::<Vec<i64>>());
}

#[tokio::test]
async fn message_pages_in_both_directions() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let conversation = create(&app, &ann, &[]).await;
    let id = conversation["id"].as_str().unwrap();
    for i in 1..=7 {
        assert_eq!(
            post(&app, &ann, id, &format!("m{i}"), &format!("message {i}"))
                .await
                .status(),
            StatusCode::CREATED
        );
    }
    let page = |query: String| {
        let app = &app;
        let ann = &ann;
        async move {
            let response = app
                .authed(
                    Method::GET,
                    &format!("/v1/conversations/{id}/messages{query}"),
                    ann,
                )
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            let page: Value = response.json().await.unwrap();
            let seqs: Vec<i64> = page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["seq"].as_i64().unwrap())
                .collect();
            (seqs, page["next_cursor"].as_str().map(str::to_owned))
        }
    };

    // Forward from seq 2, three at a time.
    let (seqs, cursor) = page("?after_seq=2&limit=3".into()).await;
    assert_eq!(seqs, vec![3, 4, 5]);
    let (seqs, cursor) = page(format!("?cursor={}&limit=3", cursor.unwrap())).await;
    assert_eq!(seqs, vec![6, 7]);
    assert!(cursor.is_none());

    // The newest, then back through history.
    let (seqs, cursor) = page("?limit=3".into()).await;
    assert_eq!(seqs, vec![5, 6, 7]);
    let (seqs, cursor) = page(format!("?cursor={}&limit=3", cursor.unwrap())).await;
    assert_eq!(seqs, vec![2, 3, 4]);
    let (seqs, cursor) = page(format!("?cursor={}&limit=3", cursor.unwrap())).await;
    assert_eq!(seqs, vec![1]);
    assert!(cursor.is_none());
    let (seqs, _) = page("?before_seq=3".into()).await;
    assert_eq!(seqs, vec![1, 2]);

    for query in [
        "?after_seq=1&before_seq=5",
        "?after_seq=-1",
        "?before_seq=0",
        "?limit=500",
    ] {
        let response = app
            .authed(
                Method::GET,
                &format!("/v1/conversations/{id}/messages{query}"),
                &ann,
            )
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_query").await;
    }
    // Not a cursor; crafted ones out of range, or past what a seq can hold.
    for position in [
        "nope",
        "after:-1",
        "before:0",
        "after:-9223372036854775808",
        "after:9223372036854775808",
    ] {
        let cursor = URL_SAFE_NO_PAD.encode(position);
        let response = app
            .authed(
                Method::GET,
                &format!("/v1/conversations/{id}/messages?cursor={cursor}"),
                &ann,
            )
            .send()
            .await
            .unwrap();
        assert_problem(response, StatusCode::BAD_REQUEST, "invalid_cursor").await;
    }
    // The extremes that are in range are answered, not wrapped.
    for query in [
        "?after_seq=9223372036854775807",
        "?before_seq=9223372036854775807",
    ] {
        let response = app
            .authed(
                Method::GET,
                &format!("/v1/conversations/{id}/messages{query}"),
                &ann,
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{query}");
    }
}

#[tokio::test]
async fn a_group_of_500_members_works() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    // 499 more users, inserted directly: registering each would hash 499 passwords.
    let members: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO users (id, email, password_hash, display_name)
         SELECT gen_random_uuid(), 'member' || i || '@example.com', 'x', 'Member ' || i
         FROM generate_series(1, 499) AS i
         RETURNING id",
    )
    .fetch_all(&app.db.pool().await)
    .await
    .unwrap();
    let member_ids: Vec<String> = members.iter().map(Uuid::to_string).collect();
    let member_refs: Vec<&str> = member_ids.iter().map(String::as_str).collect();

    let conversation = create(&app, &ann, &member_refs).await;
    assert_eq!(conversation["member_ids"].as_array().unwrap().len(), 500);
    let id = conversation["id"].as_str().unwrap();
    assert_eq!(
        post(&app, &ann, id, "big-1", "hello everyone")
            .await
            .status(),
        StatusCode::CREATED
    );
    let fetched: Value = app.get_json(&format!("/v1/conversations/{id}"), &ann).await;
    assert_eq!(fetched["member_ids"].as_array().unwrap().len(), 500);
}
