//! `DELETE /v1/me`: what goes, what stays by policy (`mobile_db::accounts`), and that
//! nothing else of the user is left in PostgreSQL, Redis or storage once the worker (run
//! in-process) has done its part.

use image::ImageFormat;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::{
    conversations::{create, post},
    helpers::{Session, TestApp, assert_problem},
    media::{Worker, image_bytes, post_with_media, stored_files, upload, wait_until_ready},
    sessions::register_device,
};

const PASSWORD: &str = mobile_testkit::api::PASSWORD;

async fn delete_me(app: &TestApp, session: &Session, password: &str) -> reqwest::Response {
    app.authed(Method::DELETE, "/v1/me", session)
        .json(&json!({ "password": password }))
        .send()
        .await
        .unwrap()
}

/// The rows of every table (but the migrator's) whose JSON mentions `needle`, as
/// `table: row`.
async fn rows_mentioning(app: &TestApp, needle: &str) -> Vec<String> {
    let pool = app.db.pool().await;
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables
         WHERE table_schema = 'public' AND table_type = 'BASE TABLE'
           AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let mut found = Vec::new();
    for table in tables {
        let rows: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT row_to_json(t)::text FROM \"{table}\" t WHERE row_to_json(t)::text LIKE $1"
        ))
        .bind(format!("%{needle}%"))
        .fetch_all(&pool)
        .await
        .unwrap();
        found.extend(rows.into_iter().map(|row| format!("{table}: {row}")));
    }
    found
}

/// Keys under the app's Redis prefix that mention `needle`, with their TTLs in seconds.
async fn redis_keys_mentioning(app: &TestApp, needle: &str) -> Vec<(String, i64)> {
    let client = redis::Client::open(mobile_testkit::redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", app.redis_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut found = Vec::new();
    for key in keys.into_iter().filter(|k| k.contains(needle)) {
        let ttl: i64 = redis::cmd("TTL")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        found.push((key, ttl));
    }
    found
}

#[tokio::test]
async fn deleting_an_account_leaves_only_what_the_policy_keeps() {
    let app = TestApp::spawn().await;
    let worker = Worker::start(&app, &[]).await;
    let ann = app.register("ann@example.com").await;
    let anns_tablet = Session::from_body(
        &app.login("ann@example.com", PASSWORD)
            .await
            .json::<Value>()
            .await
            .unwrap(),
    );
    let bob = app.register("bob@example.com").await;
    let (_, response) = register_device(&app, &ann, "ios", &"ab".repeat(32)).await;
    assert_eq!(response.status(), StatusCode::CREATED);

    // An upload, rendered by the worker, posted to a conversation with Bob; a message
    // of hers there, and one to a conversation of hers alone. One write carries an
    // Idempotency-Key, whose stored response Redis keeps.
    let png = image_bytes(300, 200, ImageFormat::Png);
    let uploaded: Value = upload(&app, &ann, "image/png", png)
        .await
        .json()
        .await
        .unwrap();
    let media_id = uploaded["id"].as_str().unwrap().to_owned();
    assert_eq!(
        wait_until_ready(&app, &ann, &media_id).await["status"],
        "ready"
    );
    assert!(stored_files(&app) >= 4, "the original and three variants");
    let shared = create(&app, &ann, &[&bob.user_id]).await;
    let shared_id = shared["id"].as_str().unwrap().to_owned();
    let with_media = post_with_media(&app, &ann, &shared, "m1", "a photo for Bob", &media_id).await;
    assert_eq!(with_media.status(), StatusCode::CREATED);
    let keyed = app
        .authed(
            Method::POST,
            &format!("/v1/conversations/{shared_id}/messages"),
            &ann,
        )
        .header("idempotency-key", "ann-key-1")
        .json(&json!({"client_msg_id": "m2", "body": "see you at ten"}))
        .send()
        .await
        .unwrap();
    assert_eq!(keyed.status(), StatusCode::CREATED);
    assert_eq!(
        post(&app, &bob, &shared_id, "b1", "ok!").await.status(),
        StatusCode::CREATED
    );
    let alone = create(&app, &ann, &[]).await;
    let alone_id = alone["id"].as_str().unwrap().to_owned();
    assert_eq!(
        post(&app, &ann, &alone_id, "n1", "note to self")
            .await
            .status(),
        StatusCode::CREATED
    );
    assert!(!redis_keys_mentioning(&app, &ann.user_id).await.is_empty());

    // The password is needed, and a wrong one changes nothing.
    assert_problem(
        delete_me(&app, &ann, "not my password").await,
        StatusCode::FORBIDDEN,
        "wrong_password",
    )
    .await;
    assert_eq!(
        delete_me(&app, &ann, PASSWORD).await.status(),
        StatusCode::NO_CONTENT
    );
    // Again, with the still-unexpired token: 204, nothing more.
    assert_eq!(
        delete_me(&app, &anns_tablet, "anything").await.status(),
        StatusCode::NO_CONTENT
    );
    crate::helpers::wait_until_no_jobs(&app, "TRUE").await;
    worker.stop().await;

    // PostgreSQL: the tombstone, and her messages in the conversation Bob is still in;
    // nothing else names her id, and nothing at all names her email.
    assert!(rows_mentioning(&app, "ann@example.com").await.is_empty());
    let mut left = rows_mentioning(&app, &ann.user_id).await;
    left.sort();
    assert_eq!(left.len(), 6, "{left:#?}");
    // Her leaving is an event of the conversation's log, which its members replay.
    assert!(
        left[0].starts_with("conversation_events: ")
            && left[0].contains("member.removed")
            && left[0].contains("account_deleted"),
        "{left:#?}"
    );
    assert!(
        left[1].starts_with("conversations: ") && left[1].contains(&shared_id),
        "{left:#?}"
    );
    for (row, body) in left[2..4].iter().zip(["a photo for Bob", "see you at ten"]) {
        assert!(row.starts_with("messages: ") && row.contains(body), "{row}");
        assert!(row.contains("\"media_id\":null"), "{row}");
    }
    // Bob's own channel's log still says who was in the conversation he was told of;
    // hers is gone.
    assert!(
        left[4].starts_with(&format!("user_events: {{\"user_id\":\"{}\"", bob.user_id)),
        "{left:#?}"
    );
    assert!(
        left[5].starts_with("users: ") && left[5].contains("\"display_name\":\"Deleted account\"")
    );
    assert!(left[5].contains("@deleted.invalid") && left[5].contains("\"password_hash\":\"\""));

    // Storage: her upload's original and variants are gone.
    assert_eq!(stored_files(&app), 0);
    // Redis: the stored response went; what is left are counters that expire soon.
    for (key, ttl) in redis_keys_mentioning(&app, &ann.user_id).await {
        assert!(!key.contains("idem:"), "{key}");
        assert!((0..=60).contains(&ttl), "{key} lives {ttl} s");
    }

    // Bob still reads the conversation, her messages under the tombstone, without the
    // image; her conversation alone is gone; her tokens do nothing.
    let messages = app
        .get_json(&format!("/v1/conversations/{shared_id}/messages"), &bob)
        .await;
    let bodies: Vec<&str> = messages["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["a photo for Bob", "see you at ten", "ok!"]);
    let members = app
        .get_json(&format!("/v1/conversations/{shared_id}"), &bob)
        .await;
    assert_eq!(members["member_ids"], json!([bob.user_id]));
    assert_problem(
        app.login("ann@example.com", PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    assert_eq!(
        app.refresh(&anns_tablet.refresh_token).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_problem(
        app.authed(Method::GET, "/v1/me", &ann)
            .send()
            .await
            .unwrap(),
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    // The address is free for a new account.
    let again = app.register("ann@example.com").await;
    assert_ne!(again.user_id, ann.user_id);
}

#[tokio::test]
async fn a_deleted_accounts_unexpired_token_creates_nothing() {
    let app = TestApp::spawn().await;
    let ann = app.register("ann@example.com").await;
    let bob = app.register("bob@example.com").await;
    let shared = create(&app, &bob, &[&ann.user_id]).await;
    let shared_id = shared["id"].as_str().unwrap().to_owned();
    assert_eq!(
        delete_me(&app, &ann, PASSWORD).await.status(),
        StatusCode::NO_CONTENT
    );
    // Her token posts nothing to a conversation she was in.
    assert_problem(
        post(&app, &ann, &shared_id, "late", "still here?").await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    let (_, response) = register_device(&app, &ann, "ios", &"cd".repeat(32)).await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let png = image_bytes(64, 64, ImageFormat::Png);
    assert_problem(
        upload(&app, &ann, "image/png", png).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    assert_eq!(stored_files(&app), 0);
    let response = app
        .authed(Method::POST, "/v1/conversations", &ann)
        .json(&json!({"member_ids": [bob.user_id]}))
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    let change = json!({"current_password": PASSWORD, "new_password": "another long passphrase"});
    let response = app
        .authed(Method::POST, "/v1/me/password", &ann)
        .json(&change)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    // Bob cannot start a conversation with her either.
    let response = app
        .authed(Method::POST, "/v1/conversations", &bob)
        .json(&json!({"member_ids": [ann.user_id]}))
        .send()
        .await
        .unwrap();
    assert_problem(
        response,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown_members",
    )
    .await;
    // Nothing was created: her tombstone, and the job (no worker runs here) that will
    // clear Redis of her, her leaving Bob's conversation and Bob's own log of it, are
    // all that name her.
    let left = rows_mentioning(&app, &ann.user_id).await;
    assert_eq!(left.len(), 4, "{left:#?}");
    assert!(
        left[0].starts_with("conversation_events: ") && left[0].contains("member.removed"),
        "{left:#?}"
    );
    assert!(
        left[1].starts_with("jobs: ") && left[1].contains("account.forget"),
        "{left:#?}"
    );
    assert!(
        left[2].starts_with(&format!("user_events: {{\"user_id\":\"{}\"", bob.user_id)),
        "{left:#?}"
    );
    assert!(left[3].starts_with("users: "), "{left:#?}");
}
