//! Register, login, refresh (rotation, reuse, concurrency), logout, and tokens that
//! must be refused.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Session, TestApp, assert_problem};

#[tokio::test]
async fn register_login_me_refresh_and_reuse_revokes_the_family() {
    let app = TestApp::spawn().await;

    // Register: 201 with the user and a token pair.
    let response = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "Ann@Example.com", "password": "correct horse battery", "display_name": "Ann"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["email"], "ann@example.com");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 900);
    let registered = Session::from_body(&body);

    // Login with the email in another case.
    let response = app.login("ANN@example.com", "correct horse battery").await;
    assert_eq!(response.status(), StatusCode::OK);
    let session = Session::from_body(&response.json::<Value>().await.unwrap());
    assert_eq!(session.user_id, registered.user_id);
    assert_ne!(
        session.refresh_token, registered.refresh_token,
        "login starts a new session"
    );

    // The access token works.
    let me = app.get_json("/v1/me", &session).await;
    assert_eq!(me["id"], session.user_id.as_str());

    // Refresh rotates: a new pair, and the new access token works.
    let response = app.refresh(&session.refresh_token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let pair: Value = response.json().await.unwrap();
    let second_refresh = pair["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second_refresh, session.refresh_token);
    let response = app
        .request(Method::GET, "/v1/me")
        .bearer_auth(pair["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);

    // The spent token again: 401, and the family is revoked...
    assert_problem(
        app.refresh(&session.refresh_token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
    // ...so the token that was live a moment ago is dead too.
    assert_problem(
        app.refresh(&second_refresh).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
    let reason: Option<String> = sqlx::query_scalar(
        "SELECT s.revoked_reason FROM sessions s JOIN refresh_tokens t ON t.session_id = s.id WHERE t.token_hash = sha256($1::bytea)",
    )
    .bind(session.refresh_token.as_bytes())
    .fetch_one(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(reason.as_deref(), Some("refresh_token_reuse"));

    // The registration session is another family and still lives.
    assert_eq!(
        app.refresh(&registered.refresh_token).await.status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn concurrent_refreshes_of_one_token_never_mint_two_live_families() {
    let app = TestApp::spawn().await;
    let session = app.register("race@example.com").await;

    let attempts = 8;
    let responses =
        futures_util::future::join_all((0..attempts).map(|_| app.refresh(&session.refresh_token)))
            .await;
    let mut winners = Vec::new();
    for response in responses {
        match response.status() {
            StatusCode::OK => {
                let pair: Value = response.json().await.unwrap();
                winners.push(pair["refresh_token"].as_str().unwrap().to_owned());
            }
            StatusCode::UNAUTHORIZED => {}
            other => panic!("unexpected status {other}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one refresh may rotate the token");
    // The losers presented a spent token, which revokes the family: the winner's token
    // is dead as well. No live token came out of the race at all.
    assert_eq!(
        app.refresh(&winners[0]).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM sessions WHERE revoked_at IS NULL")
        .fetch_one(&app.db.pool().await)
        .await
        .unwrap();
    assert_eq!(live, 0);
}

#[tokio::test]
async fn logout_revokes_the_family_and_is_idempotent() {
    let app = TestApp::spawn().await;
    let session = app.register("bye@example.com").await;
    let body = json!({"refresh_token": session.refresh_token});
    let response = app.post_json("/v1/auth/logout", &body).await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_problem(
        app.refresh(&session.refresh_token).await,
        StatusCode::UNAUTHORIZED,
        "invalid_refresh_token",
    )
    .await;
    // Again, and with garbage: still 204.
    assert_eq!(
        app.post_json("/v1/auth/logout", &body).await.status(),
        StatusCode::NO_CONTENT
    );
    let garbage = json!({"refresh_token": "rt_nope"});
    assert_eq!(
        app.post_json("/v1/auth/logout", &garbage).await.status(),
        StatusCode::NO_CONTENT
    );
}

#[tokio::test]
async fn unknown_email_and_wrong_password_get_the_same_answer() {
    let app = TestApp::spawn().await;
    app.register("known@example.com").await;

    let wrong = app.login("known@example.com", "wrong password!").await;
    let unknown = app.login("nobody@example.com", "wrong password!").await;
    assert_eq!(
        wrong.headers().get("www-authenticate"),
        unknown.headers().get("www-authenticate")
    );
    let wrong = assert_problem(wrong, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    let unknown = assert_problem(unknown, StatusCode::UNAUTHORIZED, "invalid_credentials").await;
    assert_eq!(wrong["detail"], unknown["detail"]);
    assert_eq!(wrong["title"], unknown["title"]);
}

#[tokio::test]
async fn registering_an_email_twice_is_a_conflict() {
    let app = TestApp::spawn().await;
    app.register("twice@example.com").await;
    let response = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "TWICE@example.com", "password": "another long password", "display_name": "B"}),
        )
        .await;
    assert_problem(response, StatusCode::CONFLICT, "email_taken").await;
}

/// Signs `claims` with the test key `key_index` and the given header fields.
fn sign(app: &TestApp, key_index: usize, claims: &Value, kid: Option<String>) -> String {
    let pem = std::fs::read(app.keys.signing(key_index)).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = kid;
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap()
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token).unwrap().kid.unwrap()
}

fn claims(user_id: &str, exp_offset: i64) -> Value {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    json!({
        "sub": user_id, "sid": uuid::Uuid::new_v4(), "iss": "mobile-backend", "aud": "mobile-app",
        "iat": now - 10, "exp": now + exp_offset,
    })
}

#[tokio::test]
async fn bad_access_tokens_are_refused_with_the_right_code() {
    let app = TestApp::spawn().await;
    let session = app.register("tokens@example.com").await;
    let kid = kid_of(&session.access_token);
    let get_me = |token: String| app.request(Method::GET, "/v1/me").bearer_auth(token).send();

    // No token at all.
    let response = app.request(Method::GET, "/v1/me").send().await.unwrap();
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert_problem(response, StatusCode::UNAUTHORIZED, "unauthenticated").await;

    // Not a bearer token.
    let response = app
        .request(Method::GET, "/v1/me")
        .header("authorization", "Basic YWxhZGRpbjpvcGVuc2VzYW1l")
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::UNAUTHORIZED, "invalid_token").await;

    // Expired a minute ago (well past the 5 s leeway), signed by the real key.
    let expired = sign(&app, 0, &claims(&session.user_id, -60), Some(kid.clone()));
    assert_problem(
        get_me(expired).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "token_expired",
    )
    .await;

    // A well-formed token from a key the server does not know, named by its real kid.
    let unknown_kid = mobile_auth::SigningKey::from_file(&app.keys.signing(1))
        .unwrap()
        .kid()
        .to_owned();
    let foreign = sign(&app, 1, &claims(&session.user_id, 600), Some(unknown_kid));
    assert_problem(
        get_me(foreign).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;

    // Key 1 claiming to be key 0: the signature does not verify.
    let impostor = sign(&app, 1, &claims(&session.user_id, 600), Some(kid.clone()));
    assert_problem(
        get_me(impostor).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;

    // A valid token with one signature bit flipped.
    let parts: Vec<&str> = session.access_token.split('.').collect();
    let mut signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    signature[5] ^= 0x01;
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        parts[1],
        URL_SAFE_NO_PAD.encode(signature)
    );
    assert_problem(
        get_me(forged).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;

    // alg: none.
    let none_header =
        URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#));
    let unsigned = format!("{none_header}.{}.", parts[1]);
    assert_problem(
        get_me(unsigned).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;

    // Another audience.
    let mut wrong_aud = claims(&session.user_id, 600);
    wrong_aud["aud"] = json!("someone-else");
    let wrong_aud = sign(&app, 0, &wrong_aud, Some(kid.clone()));
    assert_problem(
        get_me(wrong_aud).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;

    // Garbage.
    assert_problem(
        get_me("not.a.jwt".to_owned()).await.unwrap(),
        StatusCode::UNAUTHORIZED,
        "invalid_token",
    )
    .await;
}

#[tokio::test]
async fn tokens_of_a_rotated_out_signing_key_stay_valid_while_listed() {
    // The app signs with key 0 and also accepts key 1 (the previous signing key).
    let keys = mobile_testkit::TestKeys::generate(2);
    let app = TestApp::builder()
        .env(
            "JWT_VERIFY_KEYS_FILE",
            &keys.verify_file(&[1]).display().to_string(),
        )
        .env(
            "JWT_SIGNING_KEY_FILE",
            &keys.signing(0).display().to_string(),
        )
        .spawn()
        .await;
    let session = app.register("rotate@example.com").await;

    // A token the previous key signed, with that key's kid as the server computes it.
    let previous = mobile_auth::SigningKey::from_file(&keys.signing(1)).unwrap();
    let pem = std::fs::read(keys.signing(1)).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(previous.kid().to_owned());
    let token = jsonwebtoken::encode(
        &header,
        &claims(&session.user_id, 600),
        &EncodingKey::from_ed_pem(&pem).unwrap(),
    )
    .unwrap();
    let response = app
        .request(Method::GET, "/v1/me")
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_session_ends_after_session_max_age_days_however_often_it_refreshed() {
    let app = TestApp::builder()
        .env("SESSION_MAX_AGE_DAYS", "90")
        .spawn()
        .await;
    let session = app.register("old@example.com").await;
    let pool = app.db.pool().await;
    sqlx::query("UPDATE sessions SET created_at = now() - interval '90 days 1 minute'")
        .execute(&pool)
        .await
        .unwrap();
    let response = app.refresh(&session.refresh_token).await;
    assert_problem(response, StatusCode::UNAUTHORIZED, "invalid_refresh_token").await;
}
