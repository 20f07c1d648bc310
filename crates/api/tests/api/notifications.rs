//! Pushes enqueued by the API: `POST /internal/v1/notifications`, and the push for
//! offline members that a message post enqueues in its own transaction.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::{
    conversations::{create, next_frame, post, subscribe},
    helpers::{INTERNAL_TOKEN, TestApp, assert_problem},
};

async fn notify(app: &TestApp, token: Option<&str>, body: &Value) -> reqwest::Response {
    let mut request = app
        .request(Method::POST, "/internal/v1/notifications")
        .json(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap()
}

/// The payloads of the queued `push.notify` jobs.
async fn notify_jobs(app: &TestApp) -> Vec<Value> {
    let pool = app.db.pool().await;
    sqlx::query_scalar("SELECT payload FROM jobs WHERE kind = 'push.notify' ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn internal_notifications_need_the_internal_token_and_enqueue_a_push() {
    let app = TestApp::spawn().await;
    let ada = app.register("ada@example.com").await;
    let body = json!({ "user_id": ada.user_id, "title": "Order shipped", "body": "Thursday", "data": { "order": 42 } });

    assert_problem(
        notify(&app, None, &body).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    assert_problem(
        notify(&app, Some("guess"), &body).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
    // A user's access token is not the internal token.
    assert_problem(
        notify(&app, Some(&ada.access_token), &body).await,
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;

    let mut events = subscribe(&app, &format!("user:{}", ada.user_id)).await;
    let response = notify(&app, Some(INTERNAL_TOKEN), &body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let job_id = response.json::<Value>().await.unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let pool = app.db.pool().await;
    let kind: String = sqlx::query_scalar("SELECT kind FROM jobs WHERE id = $1")
        .bind(Uuid::parse_str(&job_id).unwrap())
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(kind, "push.notify");
    assert_eq!(
        notify_jobs(&app).await,
        vec![
            json!({ "user_id": ada.user_id, "title": "Order shipped", "body": "Thursday", "data": { "order": 42 } })
        ]
    );
    let frame = next_frame(&mut events).await;
    assert_eq!(frame["event"], "notification");
    assert_eq!(frame["data"]["title"], "Order shipped");

    let cases = [
        (
            json!({ "user_id": Uuid::now_v7(), "title": "t", "body": "b" }),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            json!({ "user_id": ada.user_id, "title": "", "body": "b" }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_title",
        ),
        (
            json!({ "user_id": ada.user_id, "title": "t", "body": "x".repeat(1001) }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_body",
        ),
        (
            json!({ "user_id": ada.user_id, "title": "t", "body": "b", "data": [1] }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_data",
        ),
        (
            json!({ "user_id": ada.user_id, "title": "t", "body": "b", "data": { "k": "v".repeat(3000) } }),
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_data",
        ),
    ];
    for (body, status, code) in cases {
        assert_problem(
            notify(&app, Some(INTERNAL_TOKEN), &body).await,
            status,
            code,
        )
        .await;
    }
    assert_eq!(notify_jobs(&app).await.len(), 1);
}

#[tokio::test]
async fn internal_notifications_group_stay_silent_and_localise() {
    let app = TestApp::spawn().await;
    let ada = app.register("ada@example.com").await;
    let body = json!({
        "user_id": ada.user_id, "title": "Ann", "body": "New photo",
        "thread_id": "album-7", "collapse_id": "album-7-latest",
        "localized": { "title_key": "push.album.title", "title_args": ["Ann", "Trip"], "body_key": "push.album.photo" },
    });
    assert_eq!(
        notify(&app, Some(INTERNAL_TOKEN), &body).await.status(),
        StatusCode::ACCEPTED
    );
    let silent = json!({ "user_id": ada.user_id, "title": "sync", "body": "read", "silent": true });
    assert_eq!(
        notify(&app, Some(INTERNAL_TOKEN), &silent).await.status(),
        StatusCode::ACCEPTED
    );
    let jobs = notify_jobs(&app).await;
    assert_eq!(jobs[0]["thread_id"], "album-7");
    assert_eq!(jobs[0]["collapse_id"], "album-7-latest");
    assert_eq!(
        jobs[0]["localized"],
        json!({ "title_key": "push.album.title", "title_args": ["Ann", "Trip"], "body_key": "push.album.photo" })
    );
    assert!(
        jobs[0].get("kind").is_none(),
        "an alert, as before: {}",
        jobs[0]
    );
    assert_eq!(jobs[1]["kind"], "silent");

    for bad in [
        json!({ "thread_id": "" }),
        json!({ "thread_id": "has space" }),
        json!({ "collapse_id": "x".repeat(65) }),
        json!({ "localized": { "title_key": "not a key!" } }),
        json!({ "localized": { "body_args": vec!["a"; 11] } }),
        json!({ "localized": { "body_args": ["x".repeat(201)] } }),
    ] {
        let mut request = json!({ "user_id": ada.user_id, "title": "t", "body": "b" });
        for (key, value) in bad.as_object().unwrap() {
            request[key] = value.clone();
        }
        assert_problem(
            notify(&app, Some(INTERNAL_TOKEN), &request).await,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_push_options",
        )
        .await;
    }
    assert_eq!(notify_jobs(&app).await.len(), 2);
}

#[tokio::test]
async fn without_an_internal_token_the_endpoint_does_not_exist() {
    let app = TestApp::builder()
        .env("INTERNAL_API_TOKEN", "")
        .spawn()
        .await;
    let ada = app.register("ada@example.com").await;
    let body = json!({ "user_id": ada.user_id, "title": "t", "body": "b" });
    assert_problem(
        notify(&app, Some(INTERNAL_TOKEN), &body).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
}

#[tokio::test]
async fn a_message_enqueues_pushes_for_offline_members_only_once() {
    let app = TestApp::spawn().await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let cat = app.register("cat@example.com").await;
    let conversation = create(&app, &ada, &[bob.user_id.as_str(), cat.user_id.as_str()]).await;
    let conversation_id = conversation["id"].as_str().unwrap();

    // Cat has the app open (a gateway keeps her presence); Bob does not.
    let redis =
        mobile_runtime::redis::Redis::connect_lazy(&mobile_testkit::redis_url(), &app.redis_prefix)
            .unwrap();
    let cat_id: mobile_domain::UserId = cat.user_id.parse().unwrap();
    mobile_events::presence::renew(&redis, &[(cat_id, "conn-1")])
        .await
        .unwrap();

    let long = "x".repeat(150);
    let response = post(&app, &ada, conversation_id, "m1", &long).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let message: Value = response.json().await.unwrap();
    let jobs = notify_jobs(&app).await;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert_eq!(jobs[0]["user_id"], bob.user_id.as_str());
    assert_eq!(jobs[0]["title"], "Tester");
    assert_eq!(jobs[0]["body"], format!("{}…", "x".repeat(100)));
    assert_eq!(
        jobs[0]["data"],
        json!({ "type": "message", "conversation_id": conversation_id, "message_id": message["id"], "seq": "1" })
    );
    // A conversation's pushes stack as one thread on the phone.
    assert_eq!(jobs[0]["thread_id"], conversation_id);

    // A retried post is the same message: no second push.
    assert_eq!(
        post(&app, &ada, conversation_id, "m1", &long)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(notify_jobs(&app).await.len(), 1);

    // A post that fails (not a member) leaves no push behind.
    let outsider = app.register("dan@example.com").await;
    let response = post(&app, &outsider, conversation_id, "m2", "hi").await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(notify_jobs(&app).await.len(), 1);
}

#[tokio::test]
async fn when_redis_is_down_every_member_gets_a_push() {
    let mut redis = mobile_testkit::RedisServer::start().await;
    let app = TestApp::builder().redis_url(redis.url()).spawn().await;
    let ada = app.register("ada@example.com").await;
    let bob = app.register("bob@example.com").await;
    let conversation = create(&app, &ada, &[bob.user_id.as_str()]).await;
    redis.stop().await;

    let response = post(
        &app,
        &ada,
        conversation["id"].as_str().unwrap(),
        "m1",
        "hello",
    )
    .await;
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "the post does not need Redis"
    );
    let jobs = notify_jobs(&app).await;
    assert_eq!(jobs.len(), 1);
    assert_eq!(jobs[0]["user_id"], bob.user_id.as_str());
}
