//! `Idempotency-Key`: replay, 422 on reuse with another body, 409 while in flight; and
//! what is never stored: anything before authentication, anything of the auth
//! endpoints, a response over the size bound.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{Session, TestApp, assert_problem};

async fn conversation_count(app: &TestApp) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM conversations")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap()
}

/// The idempotency records this app has in Redis.
async fn records(app: &TestApp) -> Vec<String> {
    let client = redis::Client::open(mobile_testkit::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("KEYS")
        .arg(format!("{}idem:*", app.redis_prefix))
        .query_async(&mut conn)
        .await
        .unwrap()
}

async fn create(app: &TestApp, session: &Session, key: &str, body: &Value) -> reqwest::Response {
    app.authed(Method::POST, "/v1/conversations", session)
        .header("idempotency-key", key)
        .json(body)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn same_key_and_body_replays_the_first_response() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let body = json!({"member_ids": [], "title": "Idem"});

    let first = create(&app, &ann, "key-1", &body).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    assert!(first.headers().get("idempotent-replayed").is_none());
    let first_body: Value = first.json().await.unwrap();

    let replay = create(&app, &ann, "key-1", &body).await;
    assert_eq!(replay.status(), StatusCode::CREATED);
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    assert_eq!(replay.headers()["content-type"], "application/json");
    let replay_body: Value = replay.json().await.unwrap();
    assert_eq!(replay_body, first_body, "byte-for-byte the first answer");
    assert_eq!(conversation_count(&app).await, 1);

    // Same key, different body: refused, nothing created.
    let reused = create(&app, &ann, "key-1", &json!({"member_ids": []})).await;
    assert_problem(
        reused,
        StatusCode::UNPROCESSABLE_ENTITY,
        "idempotency_key_reused",
    )
    .await;
    assert_eq!(conversation_count(&app).await, 1);

    // Error responses (4xx) replay too: the request will not succeed on retry.
    let unknown = json!({"member_ids": [Uuid::new_v4()]});
    let refused = create(&app, &ann, "key-2", &unknown).await;
    assert_problem(refused, StatusCode::UNPROCESSABLE_ENTITY, "unknown_members").await;
    let again = create(&app, &ann, "key-2", &unknown).await;
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_problem(again, StatusCode::UNPROCESSABLE_ENTITY, "unknown_members").await;
}

#[tokio::test]
async fn a_duplicate_while_the_first_is_in_flight_is_a_conflict() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let conversation: Value = create(&app, &ann, "make-it", &json!({"member_ids": []}))
        .await
        .json()
        .await
        .unwrap();
    let id = conversation["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/conversations/{id}/messages");
    let post = || {
        app.authed(Method::POST, &path, &ann)
            .header("idempotency-key", "together")
            .json(&json!({"client_msg_id": "m-1", "body": "hello"}))
            .send()
    };

    // Hold the conversation's row: the first post waits for it, in flight.
    let pool = app.db.pool().await;
    let mut lock = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM conversations WHERE id = $1::uuid FOR UPDATE")
        .bind(&id)
        .execute(&mut *lock)
        .await
        .unwrap();
    let before = records(&app).await.len();
    let first = tokio::spawn(post());
    // The first has claimed its key once its record appears.
    for _ in 0..200 {
        if records(&app).await.len() > before {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let in_flight = post().await.unwrap();
    assert_problem(
        in_flight,
        StatusCode::CONFLICT,
        "idempotency_request_in_flight",
    )
    .await;
    lock.rollback().await.unwrap();

    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), StatusCode::CREATED);
    let replay = post().await.unwrap();
    assert_eq!(replay.headers()["idempotent-replayed"], "true");
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM messages")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(seqs, [1], "the request ran once");
}

#[tokio::test]
async fn keys_are_scoped_to_the_user_and_validated() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let body = json!({"member_ids": []});
    // The same key from two users: two separate requests, neither a replay.
    let mut ids = Vec::new();
    for session in [&ann, &bob] {
        let response = create(&app, session, "shared-key", &body).await;
        assert_eq!(response.status(), StatusCode::CREATED);
        assert!(response.headers().get("idempotent-replayed").is_none());
        let created: Value = response.json().await.unwrap();
        ids.push(created["id"].clone());
    }
    assert_ne!(ids[0], ids[1]);
    assert_eq!(records(&app).await.len(), 2);

    let response = create(&app, &ann, &"x".repeat(256), &body).await;
    assert_problem(response, StatusCode::BAD_REQUEST, "invalid_idempotency_key").await;
}

#[tokio::test]
async fn nothing_is_stored_for_a_request_without_a_valid_token() {
    let app = TestApp::spawn().await;
    // Sign-up and sign-in with a key: answered, never recorded (their bodies hold
    // tokens), and a second registration is the second one, not a replay.
    let registration = json!({"email": "ann@example.com", "password": "correct horse battery", "display_name": "Ann"});
    for expected in [StatusCode::CREATED, StatusCode::CONFLICT] {
        let response = app
            .request(Method::POST, "/v1/auth/register")
            .header("idempotency-key", "sign-up")
            .json(&registration)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), expected);
        assert!(response.headers().get("idempotent-replayed").is_none());
    }
    let login = app
        .request(Method::POST, "/v1/auth/login")
        .header("idempotency-key", "sign-in")
        .json(&json!({"email": "ann@example.com", "password": "correct horse battery"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::OK);

    // A write with a key and no token, or a forged one: 401, nothing stored.
    for token in [None, Some("not-a-token")] {
        let mut request = app
            .request(Method::POST, "/v1/conversations")
            .header("idempotency-key", "anonymous")
            .json(&json!({"member_ids": [], "title": "x".repeat(60)}));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    assert_eq!(records(&app).await, Vec::<String>::new());

    // Signed in, but on no route: answered, not recorded (so not past the write limit).
    let ann = app.register("bob@example.com").await;
    for n in 0..3 {
        let response = app
            .authed(Method::POST, &format!("/v1/nowhere/{n}"), &ann)
            .header("idempotency-key", format!("k{n}"))
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
    }
    assert_eq!(records(&app).await, Vec::<String>::new());
}

#[tokio::test]
async fn a_refresh_with_a_key_is_never_replayed_after_logout() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let refresh = |token: &str| {
        // A valid access token alongside: authenticated, and still not recorded.
        app.authed(Method::POST, "/v1/auth/refresh", &ann)
            .header("idempotency-key", "refresh-1")
            .json(&json!({"refresh_token": token}))
            .send()
    };
    let first = refresh(&ann.refresh_token).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let pair: Value = first.json().await.unwrap();
    assert_eq!(
        records(&app).await,
        Vec::<String>::new(),
        "no token at rest"
    );

    let logout = app
        .post_json(
            "/v1/auth/logout",
            &json!({"refresh_token": pair["refresh_token"]}),
        )
        .await;
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    // The same key and body again: the spent token is presented, not a stored pair.
    let replay = refresh(&ann.refresh_token).await.unwrap();
    assert_problem(replay, StatusCode::UNAUTHORIZED, "invalid_refresh_token").await;
}

#[tokio::test]
async fn a_response_over_the_bound_is_answered_whole_and_not_stored() {
    let app = TestApp::builder()
        .env("IDEMPOTENCY_MAX_RESPONSE_BYTES", "1024")
        .spawn()
        .await;
    let ann = app.register("ann@example.com").await;
    let mut members = Vec::new();
    for i in 0..40 {
        members.push(app.register(&format!("m{i}@example.com")).await.user_id);
    }
    let body = json!({"member_ids": members});
    let first = create(&app, &ann, "big", &body).await;
    assert_eq!(first.status(), StatusCode::CREATED);
    let created: Value = first.json().await.unwrap();
    assert_eq!(created["member_ids"].as_array().unwrap().len(), 41);
    assert_eq!(records(&app).await, Vec::<String>::new());
    // The key was released: a retry runs again instead of meeting a stale claim.
    let again = create(&app, &ann, "big", &body).await;
    assert_eq!(again.status(), StatusCode::CREATED);
    assert!(again.headers().get("idempotent-replayed").is_none());
}
