//! Sessions: the list with what signed in and its device, ending one from another,
//! logout everywhere, and the password change that ends the other sessions.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Session, TestApp, assert_problem};

const PASSWORD: &str = mobile_testkit::api::PASSWORD;

/// Signs `email` in again with `user_agent`: a new session.
async fn sign_in(app: &TestApp, email: &str, user_agent: &str) -> Session {
    let response = app
        .request(Method::POST, "/v1/auth/login")
        .header("user-agent", user_agent)
        .json(&json!({"email": email, "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    Session::from_body(&response.json().await.unwrap())
}

/// `PUT /v1/devices/{id}` under a new id as `session`; the id and the response.
pub(crate) async fn register_device(
    app: &TestApp,
    session: &Session,
    platform: &str,
    token: &str,
) -> (String, reqwest::Response) {
    let id = uuid::Uuid::now_v7().to_string();
    let response = app
        .authed(Method::PUT, &format!("/v1/devices/{id}"), session)
        .json(&json!({"platform": platform, "push_token": token, "app_version": "2.1.0"}))
        .send()
        .await
        .unwrap();
    (id, response)
}

async fn put_device(app: &TestApp, session: &Session, platform: &str, token: &str) -> String {
    let (id, response) = register_device(app, session, platform, token).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    id
}

async fn end(app: &TestApp, as_session: &Session, id: &str) -> reqwest::Response {
    app.authed(Method::DELETE, &format!("/v1/sessions/{id}"), as_session)
        .send()
        .await
        .unwrap()
}

fn ids(page: &Value) -> Vec<String> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn the_list_shows_each_sign_in_newest_first_with_its_device() {
    let app = TestApp::spawn().await;
    let phone = app.register("ann@example.com").await;
    let tablet = sign_in(&app, "ann@example.com", "Chat/2.1.0 (Android 15; Pixel 9)").await;
    let device = put_device(&app, &tablet, "android", "fcm-token-of-the-tablet").await;
    let bob = app.register("bob@example.com").await;

    let page = app.get_json("/v1/sessions", &phone).await;
    let items = page["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{page}");
    assert_eq!(page["next_cursor"], Value::Null);
    // Newest first: the tablet, with its device and User-Agent.
    assert_eq!(items[0]["current"], false);
    assert_eq!(items[0]["user_agent"], "Chat/2.1.0 (Android 15; Pixel 9)");
    assert_eq!(
        items[0]["device"],
        json!({"device_id": device, "platform": "android", "app_version": "2.1.0"})
    );
    assert_eq!(items[1]["current"], true);
    assert_eq!(items[1]["device"], Value::Null);
    for item in items {
        assert!(item["created_at"].as_str().unwrap() <= item["last_used_at"].as_str().unwrap());
    }

    // Pages of one, by cursor; Bob sees only his own.
    let first = app.get_json("/v1/sessions?limit=1", &phone).await;
    let cursor = first["next_cursor"].as_str().unwrap();
    let second = app
        .get_json(&format!("/v1/sessions?limit=1&cursor={cursor}"), &phone)
        .await;
    assert_eq!([ids(&first), ids(&second)].concat(), ids(&page));
    assert_eq!(ids(&app.get_json("/v1/sessions", &bob).await).len(), 1);

    // A refresh moves last_used_at; a revoked session leaves the list.
    let refreshed: Value = app
        .refresh(&tablet.refresh_token)
        .await
        .json()
        .await
        .unwrap();
    assert!(refreshed["refresh_token"].is_string());
    let after = app.get_json("/v1/sessions", &phone).await;
    assert!(after["items"][0]["last_used_at"].as_str() > items[0]["last_used_at"].as_str());
    let logout = json!({"refresh_token": refreshed["refresh_token"]});
    assert_eq!(
        app.post_json("/v1/auth/logout", &logout).await.status(),
        StatusCode::NO_CONTENT
    );
    let after = app.get_json("/v1/sessions", &phone).await;
    assert_eq!(ids(&after), [ids(&page)[1].clone()]);
}

#[tokio::test]
async fn ending_a_session_revokes_it_and_removes_its_device() {
    let app = TestApp::spawn().await;
    let desk = app.register("ann@example.com").await;
    let lost = sign_in(&app, "ann@example.com", "Chat/2.1.0 iOS").await;
    put_device(&app, &lost, "ios", &"ab".repeat(32)).await;
    let kept = put_device(&app, &desk, "ios", &"cd".repeat(32)).await;
    let bob = app.register("bob@example.com").await;
    let lost_id = ids(&app.get_json("/v1/sessions", &desk).await)[0].clone();

    // Bob cannot end Ann's session, nor learn it exists; an unknown id is the same.
    assert_problem(
        end(&app, &bob, &lost_id).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    let unknown = uuid::Uuid::now_v7().to_string();
    assert_problem(
        end(&app, &desk, &unknown).await,
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;

    assert_eq!(
        end(&app, &desk, &lost_id).await.status(),
        StatusCode::NO_CONTENT
    );
    // Again: still 204, nothing more happens.
    assert_eq!(
        end(&app, &desk, &lost_id).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_problem(
        app.refresh(&lost.refresh_token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
    let devices = app.get_json("/v1/devices", &desk).await;
    let device_ids: Vec<&str> = devices["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["device_id"].as_str().unwrap())
        .collect();
    assert_eq!(device_ids, [kept.as_str()]);
    // The ended session's access token is still unexpired; it registers no device
    // that would outlive the session.
    let (_, response) = register_device(&app, &lost, "ios", &"ef".repeat(32)).await;
    assert_problem(response, StatusCode::NOT_FOUND, "not_found").await;
    assert_eq!(
        app.get_json("/v1/sessions", &desk).await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        app.refresh(&desk.refresh_token).await.status(),
        StatusCode::OK
    );
    let reason: String =
        sqlx::query_scalar("SELECT revoked_reason FROM sessions WHERE id = $1::uuid")
            .bind(&lost_id)
            .fetch_one(&app.db.pool().await)
            .await
            .unwrap();
    assert_eq!(reason, "ended");
}

#[tokio::test]
async fn logout_all_ends_every_session_and_device() {
    let app = TestApp::spawn().await;
    let phone = app.register("ann@example.com").await;
    let tablet = sign_in(&app, "ann@example.com", "Chat/2.1.0 Android").await;
    put_device(&app, &phone, "ios", &"ab".repeat(32)).await;
    put_device(&app, &tablet, "android", "fcm-token-of-the-tablet").await;
    let bob = app.register("bob@example.com").await;

    let response = app
        .authed(Method::POST, "/v1/auth/logout-all", &tablet)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    for session in [&phone, &tablet] {
        assert_eq!(
            app.refresh(&session.refresh_token).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let pool = app.db.pool().await;
    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices WHERE user_id = $1::uuid")
        .bind(&phone.user_id)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(devices, 0);
    // Bob is untouched.
    assert_eq!(
        app.refresh(&bob.refresh_token).await.status(),
        StatusCode::OK
    );
    // Without an access token: 401.
    assert_problem(
        app.request(Method::POST, "/v1/auth/logout-all")
            .send()
            .await
            .unwrap(),
        StatusCode::UNAUTHORIZED,
        "unauthenticated",
    )
    .await;
}

async fn change_password(
    app: &TestApp,
    session: &Session,
    current: &str,
    new: &str,
) -> reqwest::Response {
    app.authed(Method::POST, "/v1/me/password", session)
        .json(&json!({"current_password": current, "new_password": new}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_password_change_keeps_this_session_and_ends_the_others() {
    let app = TestApp::spawn().await;
    let here = app.register("ann@example.com").await;
    let there = sign_in(&app, "ann@example.com", "Chat/2.1.0 Android").await;
    put_device(&app, &there, "android", "fcm-token-over-there").await;
    let new = "a much better passphrase";

    assert_problem(
        change_password(&app, &here, "not my password", new).await,
        StatusCode::FORBIDDEN,
        "wrong_password",
    )
    .await;
    assert_problem(
        change_password(&app, &here, PASSWORD, "short").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "weak_password",
    )
    .await;
    // Neither refusal changed anything.
    assert_eq!(
        app.login("ann@example.com", PASSWORD).await.status(),
        StatusCode::OK
    );

    assert_eq!(
        change_password(&app, &here, PASSWORD, new).await.status(),
        StatusCode::NO_CONTENT
    );
    assert_problem(
        app.login("ann@example.com", PASSWORD).await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    assert_eq!(
        app.login("ann@example.com", new).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.refresh(&there.refresh_token).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        app.refresh(&here.refresh_token).await.status(),
        StatusCode::OK
    );
    let devices: i64 = sqlx::query_scalar("SELECT count(*) FROM devices")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    assert_eq!(devices, 0);
}

#[tokio::test]
async fn guessing_the_current_password_is_counted_like_failed_sign_ins() {
    let app = TestApp::builder()
        .env("LOGIN_FAILURES_PER_ADDRESS", "3")
        .spawn()
        .await;
    let stolen = app.register("ann@example.com").await;
    for guess in 0..3 {
        assert_problem(
            change_password(
                &app,
                &stolen,
                &format!("guess number {guess}"),
                "whatever it is 1",
            )
            .await,
            StatusCode::FORBIDDEN,
            "wrong_password",
        )
        .await;
    }
    // The fourth try from this address is refused before any check, even the right one.
    assert_problem(
        change_password(&app, &stolen, PASSWORD, "whatever it is 1").await,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    )
    .await;
}
