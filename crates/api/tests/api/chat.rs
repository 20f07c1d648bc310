//! What a chat app needs of a conversation beyond posting: edits and deletions,
//! members and the owner, the title, read positions and unread counts, badges, mute.
//! Every change is an event at the conversation's next offset.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::conversations::{create, next_frame, post, subscribe};
use crate::helpers::{Session, TestApp, assert_problem};

async fn send(
    app: &TestApp,
    method: Method,
    path: &str,
    session: &Session,
    body: Option<Value>,
) -> reqwest::Response {
    let request = app.authed(method, path, session);
    let request = match body {
        Some(body) => request.json(&body),
        None => request,
    };
    request.send().await.unwrap()
}

async fn ok(response: reqwest::Response) -> Value {
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    assert!(status.is_success(), "{status}: {body}");
    body
}

async fn posted(app: &TestApp, session: &Session, conversation: &str, body: &str) -> Value {
    let client_msg_id = uuid::Uuid::new_v4().to_string();
    ok(post(app, session, conversation, &client_msg_id, body).await).await
}

#[tokio::test]
async fn edits_and_deletions_are_events_by_the_sender_and_history_shows_them() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let conversation = create(&app, &ann, &[&bob.user_id]).await;
    let id = conversation["id"].as_str().unwrap();
    let mut events = subscribe(&app, &format!("conversation:{id}")).await;

    let first = posted(&app, &ann, id, "helo").await;
    let second = posted(&app, &bob, id, "mine").await;
    assert_eq!(
        (first["seq"].as_i64(), second["seq"].as_i64()),
        (Some(1), Some(2))
    );
    next_frame(&mut events).await;
    next_frame(&mut events).await;
    let first_path = format!(
        "/v1/conversations/{id}/messages/{}",
        first["id"].as_str().unwrap()
    );
    let second_path = format!(
        "/v1/conversations/{id}/messages/{}",
        second["id"].as_str().unwrap()
    );

    let edited = ok(send(
        &app,
        Method::PATCH,
        &first_path,
        &ann,
        Some(json!({"body": "hello"})),
    )
    .await)
    .await;
    assert_eq!(edited["body"], "hello");
    assert_eq!(edited["seq"], 1, "an edit keeps the message's place");
    assert!(edited["edited_at"].is_string());
    let event = next_frame(&mut events).await;
    assert_eq!(
        (&event["event"], &event["offset"]),
        (&json!("message.updated"), &json!(3))
    );
    assert_eq!(event["data"], edited);

    // The same body again: nothing changes, no event.
    let again = ok(send(
        &app,
        Method::PATCH,
        &first_path,
        &ann,
        Some(json!({"body": "hello"})),
    )
    .await)
    .await;
    assert_eq!(again, edited);

    // Only the sender edits or deletes.
    assert_problem(
        send(
            &app,
            Method::PATCH,
            &first_path,
            &bob,
            Some(json!({"body": "mine now"})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "not_sender",
    )
    .await;
    assert_problem(
        send(&app, Method::DELETE, &first_path, &bob, None).await,
        StatusCode::FORBIDDEN,
        "not_sender",
    )
    .await;
    assert_problem(
        send(
            &app,
            Method::PATCH,
            &first_path,
            &ann,
            Some(json!({"body": "  "})),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_body",
    )
    .await;

    let tombstone = ok(send(&app, Method::DELETE, &second_path, &bob, None).await).await;
    assert_eq!(tombstone["body"], "");
    assert!(tombstone["deleted_at"].is_string());
    let event = next_frame(&mut events).await;
    assert_eq!(
        (&event["event"], &event["offset"]),
        (&json!("message.deleted"), &json!(4))
    );
    assert_eq!(event["data"], tombstone);
    // Deleting again is a no-op; a tombstone cannot be edited.
    assert_eq!(
        ok(send(&app, Method::DELETE, &second_path, &bob, None).await).await,
        tombstone
    );
    assert_problem(
        send(
            &app,
            Method::PATCH,
            &second_path,
            &bob,
            Some(json!({"body": "back"})),
        )
        .await,
        StatusCode::CONFLICT,
        "message_deleted",
    )
    .await;

    // The log over REST: every event, in offset order, paged by `after`.
    let log = app
        .get_json(&format!("/v1/conversations/{id}/events?limit=3"), &ann)
        .await;
    let kinds: Vec<(i64, &str)> = log["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["offset"].as_i64().unwrap(), e["event"].as_str().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (1, "message.created"),
            (2, "message.created"),
            (3, "message.updated")
        ]
    );
    assert_eq!(log["next_after"], 3);
    let rest = app
        .get_json(&format!("/v1/conversations/{id}/events?after=3"), &ann)
        .await;
    assert_eq!(rest["items"][0]["event"], "message.deleted");
    assert_eq!(rest["items"][0]["data"], tombstone);
    assert_eq!(rest["next_after"], Value::Null);

    // The history shows the messages as they are now, each at its own seq.
    let page = app
        .get_json(&format!("/v1/conversations/{id}/messages"), &ann)
        .await;
    assert_eq!(page["items"], json!([edited, tombstone]));

    // Another conversation's message, or an outsider: 404.
    let eve = app.register("eve@example.com").await;
    assert_problem(
        send(&app, Method::DELETE, &first_path, &eve, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let other = create(&app, &ann, &[]).await;
    let elsewhere = format!(
        "/v1/conversations/{}/messages/{}",
        other["id"].as_str().unwrap(),
        first["id"].as_str().unwrap()
    );
    assert_problem(
        send(&app, Method::DELETE, &elsewhere, &ann, None).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn the_owner_adds_and_removes_members_and_anyone_leaves() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let cat = app.register("cat@example.com").await;
    let conversation = create(&app, &ann, &[&bob.user_id]).await;
    assert_eq!(conversation["owner_id"], ann.user_id.as_str());
    let id = conversation["id"].as_str().unwrap();
    let members = format!("/v1/conversations/{id}/members");
    let mut events = subscribe(&app, &format!("conversation:{id}")).await;
    let mut cats = subscribe(&app, &format!("user:{}", cat.user_id)).await;
    posted(&app, &ann, id, "before cat").await;
    next_frame(&mut events).await;

    // Only the owner adds.
    assert_problem(
        send(
            &app,
            Method::POST,
            &members,
            &bob,
            Some(json!({"user_ids": [cat.user_id]})),
        )
        .await,
        StatusCode::FORBIDDEN,
        "not_owner",
    )
    .await;
    let unknown = uuid::Uuid::new_v4();
    assert_problem(
        send(
            &app,
            Method::POST,
            &members,
            &ann,
            Some(json!({"user_ids": [unknown]})),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_members",
    )
    .await;

    let added = ok(send(
        &app,
        Method::POST,
        &members,
        &ann,
        Some(json!({"user_ids": [cat.user_id, bob.user_id]})),
    )
    .await)
    .await;
    assert_eq!(added["member_ids"].as_array().unwrap().len(), 3);
    let event = next_frame(&mut events).await;
    assert_eq!(event["event"], "member.added");
    assert_eq!(event["offset"], 2);
    assert_eq!(
        event["data"],
        json!({"user_ids": [cat.user_id], "by": ann.user_id}),
        "only who is new"
    );
    let joined = next_frame(&mut cats).await;
    assert_eq!(joined["event"], "conversation.joined");
    assert_eq!(joined["data"]["id"], id);
    assert_eq!(
        joined["data"]["last_message"],
        Value::Null,
        "a logged event must not carry text that may be deleted later"
    );
    assert_eq!(
        joined["data"]["unread_count"], 1,
        "the history is theirs to read"
    );
    // Adding members already in changes nothing.
    ok(send(
        &app,
        Method::POST,
        &members,
        &ann,
        Some(json!({"user_ids": [cat.user_id]})),
    )
    .await)
    .await;

    // A member cannot remove another; the owner can; anyone can leave.
    assert_problem(
        send(
            &app,
            Method::DELETE,
            &format!("{members}/{}", cat.user_id),
            &bob,
            None,
        )
        .await,
        StatusCode::FORBIDDEN,
        "not_owner",
    )
    .await;
    let removed = send(
        &app,
        Method::DELETE,
        &format!("{members}/{}", cat.user_id),
        &ann,
        None,
    )
    .await;
    assert_eq!(removed.status(), StatusCode::NO_CONTENT);
    let event = next_frame(&mut events).await;
    assert_eq!(
        (&event["event"], &event["offset"]),
        (&json!("member.removed"), &json!(3))
    );
    assert_eq!(
        event["data"],
        json!({"user_id": cat.user_id, "reason": "removed", "by": ann.user_id, "owner_id": ann.user_id})
    );
    let left = next_frame(&mut cats).await;
    assert_eq!(left["event"], "conversation.left");
    assert_eq!(
        left["data"],
        json!({"conversation_id": id, "reason": "removed"})
    );
    // The former member sees nothing of it any more.
    assert_problem(
        app.authed(
            Method::GET,
            &format!("/v1/conversations/{id}/messages"),
            &cat,
        )
        .send()
        .await
        .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_problem(
        send(
            &app,
            Method::DELETE,
            &format!("{members}/{}", cat.user_id),
            &ann,
            None,
        )
        .await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // The owner leaves: the longest-standing member owns it now.
    let leave = send(
        &app,
        Method::DELETE,
        &format!("{members}/{}", ann.user_id),
        &ann,
        None,
    )
    .await;
    assert_eq!(leave.status(), StatusCode::NO_CONTENT);
    let event = next_frame(&mut events).await;
    assert_eq!(
        event["data"],
        json!({"user_id": ann.user_id, "reason": "left", "by": ann.user_id, "owner_id": bob.user_id})
    );
    let seen = app.get_json(&format!("/v1/conversations/{id}"), &bob).await;
    assert_eq!(seen["owner_id"], bob.user_id.as_str());
    assert_eq!(seen["member_ids"], json!([bob.user_id]));
    assert_eq!(seen["last_offset"], 4);

    // The last member leaves: the conversation is gone.
    let leave = send(
        &app,
        Method::DELETE,
        &format!("{members}/{}", bob.user_id),
        &bob,
        None,
    )
    .await;
    assert_eq!(leave.status(), StatusCode::NO_CONTENT);
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM conversations WHERE id = $1::uuid")
        .bind(id)
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn a_title_change_is_an_event_and_the_same_title_is_not() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let conversation = create(&app, &ann, &[&bob.user_id]).await;
    let id = conversation["id"].as_str().unwrap();
    let path = format!("/v1/conversations/{id}");
    let mut events = subscribe(&app, &format!("conversation:{id}")).await;

    let renamed = ok(send(
        &app,
        Method::PATCH,
        &path,
        &bob,
        Some(json!({"title": "Trip"})),
    )
    .await)
    .await;
    assert_eq!(renamed["title"], "Trip");
    let event = next_frame(&mut events).await;
    assert_eq!(event["event"], "conversation.updated");
    assert_eq!(event["offset"], 1);
    assert_eq!(event["data"], json!({"title": "Trip", "by": bob.user_id}));
    ok(send(
        &app,
        Method::PATCH,
        &path,
        &ann,
        Some(json!({"title": "Trip"})),
    )
    .await)
    .await;
    let untitled = ok(send(
        &app,
        Method::PATCH,
        &path,
        &ann,
        Some(json!({"title": null})),
    )
    .await)
    .await;
    assert_eq!(untitled["title"], Value::Null);
    let event = next_frame(&mut events).await;
    assert_eq!(event["offset"], 2, "the unchanged title took no offset");
    assert_problem(
        send(
            &app,
            Method::PATCH,
            &path,
            &ann,
            Some(json!({"title": "x".repeat(500)})),
        )
        .await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_title",
    )
    .await;
}

#[tokio::test]
async fn reads_move_forward_only_and_the_list_shows_unread_by_activity() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let quiet = create(&app, &ann, &[&bob.user_id]).await;
    let busy = create(&app, &ann, &[&bob.user_id]).await;
    let (quiet, busy) = (quiet["id"].as_str().unwrap(), busy["id"].as_str().unwrap());
    let mut bobs = subscribe(&app, &format!("user:{}", bob.user_id)).await;

    posted(&app, &ann, busy, "one").await;
    posted(&app, &ann, busy, "two").await;
    posted(&app, &ann, quiet, "hi").await;
    let last = posted(&app, &ann, busy, "three").await;
    posted(&app, &bob, busy, "my own is never unread").await;
    let deleted = posted(&app, &ann, quiet, "gone").await;
    ok(send(
        &app,
        Method::DELETE,
        &format!(
            "/v1/conversations/{quiet}/messages/{}",
            deleted["id"].as_str().unwrap()
        ),
        &ann,
        None,
    )
    .await)
    .await;

    // The most recently active first: `quiet` had the newest message (a tombstone now).
    let list = app.get_json("/v1/conversations", &bob).await;
    let items = list["items"].as_array().unwrap();
    assert_eq!(items[0]["id"], quiet);
    assert_eq!(items[1]["id"], busy);
    assert_eq!(items[0]["unread_count"], 1, "a tombstone is not unread");
    assert!(items[0]["last_message"]["deleted_at"].is_string());
    assert_eq!(items[1]["unread_count"], 3);
    assert_eq!(items[1]["last_offset"], 4);
    assert_eq!(items[1]["last_message"]["body"], "my own is never unread");
    assert_eq!(items[1]["read_offset"], 0);

    // One page at a time, in the same order.
    let first = app.get_json("/v1/conversations?limit=1", &bob).await;
    assert_eq!(first["items"][0]["id"], quiet);
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .get_json(&format!("/v1/conversations?limit=1&cursor={cursor}"), &bob)
        .await;
    assert_eq!(second["items"][0]["id"], busy);
    assert_eq!(second["next_cursor"], Value::Null);

    let read = format!("/v1/conversations/{busy}/read");
    let state = ok(send(
        &app,
        Method::POST,
        &read,
        &bob,
        Some(json!({"offset": last["seq"]})),
    )
    .await)
    .await;
    assert_eq!(
        state,
        json!({"conversation_id": busy, "read_offset": 3, "unread_count": 0, "total_unread": 1})
    );
    let event = next_frame(&mut bobs).await;
    assert_eq!(event["event"], "conversation.read");
    assert_eq!(event["data"], state);
    // Older is a no-op; beyond the newest is the newest.
    let state = ok(send(&app, Method::POST, &read, &bob, Some(json!({"offset": 1}))).await).await;
    assert_eq!(state["read_offset"], 3);
    let state = ok(send(
        &app,
        Method::POST,
        &read,
        &bob,
        Some(json!({"offset": 1000})),
    )
    .await)
    .await;
    assert_eq!(state["read_offset"], 4);

    // The read moved: a silent push tells the other devices, with the badge.
    let pushes: Vec<Value> = sqlx::query_scalar(
        "SELECT payload FROM jobs WHERE kind = 'push.notify' AND payload->>'user_id' = $1 AND payload->>'kind' = 'silent' ORDER BY id",
    )
    .bind(&bob.user_id)
    .fetch_all(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(pushes.len(), 2, "one per move, none for the no-op");
    assert_eq!(pushes[0]["badge"], 1);
    assert_eq!(pushes[0]["collapse_id"], format!("read:{busy}"));

    assert_problem(
        send(&app, Method::POST, &read, &bob, Some(json!({"offset": -1}))).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "validation_failed",
    )
    .await;
    let eve = app.register("eve@example.com").await;
    assert_problem(
        send(&app, Method::POST, &read, &eve, Some(json!({"offset": 1}))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_muted_member_gets_no_push_but_counts_unread_and_pushes_carry_the_badge() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let cat = app.register("cat@example.com").await;
    let conversation = create(&app, &ann, &[&bob.user_id, &cat.user_id]).await;
    let id = conversation["id"].as_str().unwrap();
    let mute = format!("/v1/conversations/{id}/mute");

    let muted = ok(send(&app, Method::PUT, &mute, &bob, Some(json!({}))).await).await;
    assert_eq!(muted["mute"], json!({"until": null}), "for good");
    let until = "2999-01-01T00:00:00Z";
    let muted = ok(send(
        &app,
        Method::PUT,
        &mute,
        &cat,
        Some(json!({"until": until})),
    )
    .await)
    .await;
    assert_eq!(muted["mute"]["until"], until);

    posted(&app, &ann, id, "one").await;
    // Cat's mute ends (a time in the past is no mute); Bob's stays.
    ok(send(
        &app,
        Method::PUT,
        &mute,
        &cat,
        Some(json!({"until": "2000-01-01T00:00:00Z"})),
    )
    .await)
    .await;
    let two = posted(&app, &ann, id, "two").await;

    let pushes: Vec<Value> =
        sqlx::query_scalar("SELECT payload FROM jobs WHERE kind = 'push.notify' ORDER BY id")
            .fetch_all(&app.db.pool().await)
            .await
            .unwrap();
    let to: Vec<(&str, &Value)> = pushes
        .iter()
        .map(|p| (p["user_id"].as_str().unwrap(), &p["unread_badge"]))
        .collect();
    assert_eq!(
        to,
        vec![(cat.user_id.as_str(), &json!(true))],
        "Bob muted throughout; Cat for the first; the worker counts the badge as it sends"
    );
    assert_eq!(pushes[0]["message_id"], json!(two["id"]));

    let seen = app.get_json(&format!("/v1/conversations/{id}"), &bob).await;
    assert_eq!(seen["unread_count"], 2, "muted, still unread");
    let seen = app.get_json(&format!("/v1/conversations/{id}"), &cat).await;
    assert_eq!(seen["mute"], Value::Null);

    let unmuted = ok(send(&app, Method::DELETE, &mute, &bob, None).await).await;
    assert_eq!(unmuted["mute"], Value::Null);
    posted(&app, &ann, id, "three").await;
    let bob_pushes: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM jobs WHERE kind = 'push.notify' AND payload->>'user_id' = $1",
    )
    .bind(&bob.user_id)
    .fetch_one(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(bob_pushes, 1);

    let eve = app.register("eve@example.com").await;
    assert_problem(
        send(&app, Method::PUT, &mute, &eve, Some(json!({}))).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn deleting_an_account_is_leaving_each_conversation() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let conversation = create(&app, &ann, &[&bob.user_id]).await;
    let id = conversation["id"].as_str().unwrap();
    let mut events = subscribe(&app, &format!("conversation:{id}")).await;

    let deleted = send(
        &app,
        Method::DELETE,
        "/v1/me",
        &ann,
        Some(json!({"password": mobile_testkit::api::PASSWORD})),
    )
    .await;
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let event = next_frame(&mut events).await;
    assert_eq!(event["event"], "member.removed");
    assert_eq!(
        event["data"],
        json!({"user_id": ann.user_id, "reason": "account_deleted", "by": ann.user_id, "owner_id": bob.user_id})
    );
    let seen = app.get_json(&format!("/v1/conversations/{id}"), &bob).await;
    assert_eq!(seen["owner_id"], bob.user_id.as_str());
}
