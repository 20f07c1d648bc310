//! Sign in with Apple and Google against a local issuer that speaks HTTPS, OpenID
//! discovery and JWKS: creation, sign-in, the checks on the token, a key rotation, the
//! refetch floor, linking by verified email, and deletion confirmed by a fresh token.

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::helpers::{Session, TestApp, assert_problem, sample};
use mobile_testkit::FakeIssuer;

const APP_ID: &str = "com.example.chat";

async fn app_with(issuer: &FakeIssuer, provider: &str, extra: &[(&str, &str)]) -> TestApp {
    let mut builder = TestApp::builder();
    for (name, value) in issuer.env(provider, &format!("{APP_ID},com.example.chat.web")) {
        builder = builder.env(&name, &value);
    }
    for (name, value) in extra {
        builder = builder.env(name, value);
    }
    builder.spawn().await
}

fn nonce() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

async fn sign_in(app: &TestApp, path: &str, id_token: &str, nonce: &str) -> reqwest::Response {
    app.post_json(path, &json!({"id_token": id_token, "nonce": nonce}))
        .await
}

#[tokio::test]
async fn apple_creates_an_account_then_signs_it_in_across_a_key_rotation() {
    let issuer = FakeIssuer::start().await;
    let app = app_with(&issuer, "APPLE", &[("OIDC_JWKS_MIN_REFRESH_SECONDS", "1")]).await;
    let relay = "x7y2k9@privaterelay.appleid.com";

    let first = nonce();
    let token = issuer.id_token(APP_ID, "001234.abcd.0999", relay, &first);
    let response = app
        .post_json(
            "/v1/auth/apple",
            &json!({"id_token": token, "nonce": first, "display_name": "Ann"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["email"], relay);
    assert_eq!(body["user"]["display_name"], "Ann");
    let ann = Session::from_body(&body);
    assert_eq!(app.get_json("/v1/me", &ann).await["email"], relay);
    // No password to sign in with.
    assert_problem(
        app.login(relay, "any password at all").await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;

    // Nor a password to change.
    let change =
        json!({"current_password": "anything at all", "new_password": "a long new passphrase"});
    let response = app
        .authed(Method::POST, "/v1/me/password", &ann)
        .json(&change)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "no_password").await;

    // Again, with a new nonce: the same account, 200.
    let second = nonce();
    let token = issuer.id_token(APP_ID, "001234.abcd.0999", relay, &second);
    let response = sign_in(&app, "/v1/auth/apple", &token, &second).await;
    assert_eq!(response.status(), StatusCode::OK);
    let again: Value = response.json().await.unwrap();
    assert_eq!(again["user"]["id"], body["user"]["id"]);

    // A nonce signs in once, even with a fresh token.
    let replay = issuer.id_token(APP_ID, "001234.abcd.0999", relay, &second);
    assert_problem(
        sign_in(&app, "/v1/auth/apple", &replay, &second).await,
        StatusCode::UNAUTHORIZED,
        "invalid_id_token",
    )
    .await;

    // Apple rotates its key: a token with the new kid makes one refetch.
    assert_eq!(issuer.jwks_fetches(), 1);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    issuer.rotate();
    let third = nonce();
    let token = issuer.id_token(APP_ID, "001234.abcd.0999", relay, &third);
    assert_eq!(
        sign_in(&app, "/v1/auth/apple", &token, &third)
            .await
            .status(),
        StatusCode::OK
    );
    assert_eq!(issuer.jwks_fetches(), 2);
    assert_eq!(issuer.discovery_fetches(), 2);

    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            r#"auth_sign_ins_total{provider="apple",outcome="created"}"#
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &metrics,
            r#"auth_sign_ins_total{provider="apple",outcome="existing"}"#
        ),
        Some(2.0)
    );
}

#[tokio::test]
async fn tokens_that_are_not_the_providers_for_this_app_are_refused() {
    let issuer = FakeIssuer::start().await;
    let app = app_with(&issuer, "GOOGLE", &[]).await;
    let raw = nonce();
    let claims = issuer.claims(APP_ID, "1094", "ann@example.com", &raw);
    let now = claims["iat"].as_i64().unwrap();

    let mut cases: Vec<(&str, Value)> = Vec::new();
    let mut change = |label, field: &str, value: Value| {
        let mut changed = claims.clone();
        changed[field] = value;
        cases.push((label, changed));
    };
    change("another app", "aud", json!("com.example.other"));
    change(
        "another issuer",
        "iss",
        json!("https://accounts.example.com"),
    );
    change("expired", "exp", json!(now - 120));
    change(
        "another nonce",
        "nonce",
        json!(mobile_testkit::nonce_hash("not it")),
    );
    change("the raw nonce", "nonce", json!(raw));
    for (label, claims) in cases {
        let token = issuer.sign(&claims);
        let response = sign_in(&app, "/v1/auth/google", &token, &raw).await;
        let problem = assert_problem(response, StatusCode::UNAUTHORIZED, "invalid_id_token").await;
        assert!(problem["detail"].is_string(), "{label}");
    }
    // Unsigned, and signed with a shared secret: refused before any key is looked up.
    let header = |alg: &str| {
        use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
        let header = URL_SAFE_NO_PAD.encode(json!({"alg": alg, "kid": "test-key-1"}).to_string());
        let payload = URL_SAFE_NO_PAD.encode(claims.to_string());
        format!("{header}.{payload}.c2lnbmF0dXJl")
    };
    for alg in ["none", "HS256"] {
        assert_problem(
            sign_in(&app, "/v1/auth/google", &header(alg), &raw).await,
            StatusCode::UNAUTHORIZED,
            "invalid_id_token",
        )
        .await;
    }
    // The right token still works: none of the refusals spent its nonce.
    let token = issuer.sign(&claims);
    assert_eq!(
        sign_in(&app, "/v1/auth/google", &token, &raw)
            .await
            .status(),
        StatusCode::CREATED
    );
    // Apple is off on this server.
    assert_problem(
        sign_in(&app, "/v1/auth/apple", &token, &raw).await,
        StatusCode::NOT_FOUND,
        "provider_not_configured",
    )
    .await;
}

#[tokio::test]
async fn unknown_key_ids_refetch_the_keys_at_most_once_per_floor() {
    let issuer = FakeIssuer::start().await;
    let app = app_with(
        &issuer,
        "GOOGLE",
        &[("OIDC_JWKS_MIN_REFRESH_SECONDS", "60")],
    )
    .await;
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "1094", "ann@example.com", &raw);
    assert_eq!(
        sign_in(&app, "/v1/auth/google", &token, &raw)
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(issuer.jwks_fetches(), 1);
    // A rotation inside the floor: tokens with the new kid are refused, and the
    // provider is not asked again however many come.
    issuer.rotate();
    for _ in 0..5 {
        let raw = nonce();
        let token = issuer.id_token(APP_ID, "1094", "ann@example.com", &raw);
        assert_problem(
            sign_in(&app, "/v1/auth/google", &token, &raw).await,
            StatusCode::UNAUTHORIZED,
            "invalid_id_token",
        )
        .await;
    }
    assert_eq!(issuer.jwks_fetches(), 1);
}

#[tokio::test]
async fn a_password_account_whose_address_was_proven_keeps_its_password_when_linked() {
    let issuer = FakeIssuer::start().await;
    let app = app_with(&issuer, "GOOGLE", &[]).await;
    let bob = app.register("bob@example.com").await;
    // Bob used the link mailed at registration (tests/api/email.rs follows one).
    let pool = app.db.pool().await;
    sqlx::query("UPDATE users SET email_verified_at = now() WHERE email = 'bob@example.com'")
        .execute(&pool)
        .await
        .unwrap();

    let raw = nonce();
    let token = issuer.id_token(APP_ID, "3001", "bob@example.com", &raw);
    let response = sign_in(&app, "/v1/auth/google", &token, &raw).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["id"], bob.user_id.as_str());
    // His session and his password both still work.
    assert_eq!(
        app.refresh(&bob.refresh_token).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.login("bob@example.com", mobile_testkit::api::PASSWORD)
            .await
            .status(),
        StatusCode::OK
    );
}

#[tokio::test]
async fn a_verified_email_links_the_password_account_and_removes_its_password() {
    let issuer = FakeIssuer::start().await;
    let app = app_with(&issuer, "GOOGLE", &[]).await;
    // Someone registered Bob's address with a password before Bob came with Google.
    let squatter = app.register("bob@example.com").await;
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "2001", "Bob@Example.com", &raw);
    let response = sign_in(&app, "/v1/auth/google", &token, &raw).await;
    assert_eq!(response.status(), StatusCode::OK);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["id"], squatter.user_id.as_str());
    // The squatter's session and password are gone; Bob's new session works.
    assert_eq!(
        app.refresh(&squatter.refresh_token).await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert_problem(
        app.login("bob@example.com", mobile_testkit::api::PASSWORD)
            .await,
        StatusCode::UNAUTHORIZED,
        "invalid_credentials",
    )
    .await;
    let bob = Session::from_body(&body);
    assert_eq!(
        app.refresh(&bob.refresh_token).await.status(),
        StatusCode::OK
    );

    // An address the provider does not vouch for links nothing.
    app.register("carol@example.com").await;
    let raw = nonce();
    let mut claims = issuer.claims(APP_ID, "2002", "carol@example.com", &raw);
    claims["email_verified"] = json!(false);
    assert_problem(
        sign_in(&app, "/v1/auth/google", &issuer.sign(&claims), &raw).await,
        StatusCode::CONFLICT,
        "email_taken_unverified",
    )
    .await;
    // Nor makes an account for an address no one proved.
    let raw = nonce();
    let mut claims = issuer.claims(APP_ID, "2004", "dave@example.com", &raw);
    claims["email_verified"] = json!(false);
    assert_problem(
        sign_in(&app, "/v1/auth/google", &issuer.sign(&claims), &raw).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "email_unverified",
    )
    .await;
    // An account with a Google identity is not linked to a second one by email (an
    // address handed to someone else).
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "2099", "bob@example.com", &raw);
    assert_problem(
        sign_in(&app, "/v1/auth/google", &token, &raw).await,
        StatusCode::CONFLICT,
        "email_taken",
    )
    .await;
    // A first sign-in without an email cannot make an account.
    let raw = nonce();
    let mut claims = issuer.claims(APP_ID, "2003", "x@example.com", &raw);
    claims.as_object_mut().unwrap().remove("email");
    assert_problem(
        sign_in(&app, "/v1/auth/google", &issuer.sign(&claims), &raw).await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "email_required",
    )
    .await;
    let linked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM identities WHERE provider = 'google' AND user_id = $1::uuid",
    )
    .bind(&squatter.user_id)
    .fetch_one(&app.db.pool().await)
    .await
    .unwrap();
    assert_eq!(linked, 1);
}

#[tokio::test]
async fn an_account_made_by_one_provider_links_the_other_and_stays_signed_in() {
    let issuer = FakeIssuer::start().await;
    let mut builder = TestApp::builder();
    for provider in ["APPLE", "GOOGLE"] {
        for (name, value) in issuer.env(provider, APP_ID) {
            builder = builder.env(&name, &value);
        }
    }
    let app = builder.spawn().await;
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "google-erin", "erin@example.com", &raw);
    let response = sign_in(&app, "/v1/auth/google", &token, &raw).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let created: Value = response.json().await.unwrap();
    let phone = Session::from_body(&created);

    let raw = nonce();
    let token = issuer.id_token(APP_ID, "apple-erin", "erin@example.com", &raw);
    let response = sign_in(&app, "/v1/auth/apple", &token, &raw).await;
    assert_eq!(response.status(), StatusCode::OK);
    let linked: Value = response.json().await.unwrap();
    assert_eq!(linked["user"]["id"], created["user"]["id"]);
    // Google had verified the address: nothing was taken over, nothing ends.
    assert_eq!(
        app.refresh(&phone.refresh_token).await.status(),
        StatusCode::OK
    );
    let metrics = app.metrics_text().await;
    assert_eq!(
        sample(
            &metrics,
            r#"auth_sign_ins_total{provider="apple",outcome="linked"}"#
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn a_provider_account_is_deleted_with_a_fresh_token_of_its_own() {
    let issuer = FakeIssuer::start().await;
    let app = app_with(&issuer, "APPLE", &[("REAUTH_MAX_AGE_SECONDS", "300")]).await;
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "apple-ann", "ann@example.com", &raw);
    let ann = Session::from_body(
        &sign_in(&app, "/v1/auth/apple", &token, &raw)
            .await
            .json::<Value>()
            .await
            .unwrap(),
    );
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "apple-bob", "bob@example.com", &raw);
    assert_eq!(
        sign_in(&app, "/v1/auth/apple", &token, &raw).await.status(),
        StatusCode::CREATED
    );

    let delete = |body: Value| {
        app.authed(Method::DELETE, "/v1/me", &ann)
            .json(&body)
            .send()
    };
    // Bob's token does not confirm Ann's deletion; nor does an old one of hers.
    let raw = nonce();
    let bobs = issuer.id_token(APP_ID, "apple-bob", "bob@example.com", &raw);
    let response = delete(json!({"provider": "apple", "id_token": bobs, "nonce": raw}))
        .await
        .unwrap();
    assert_problem(response, StatusCode::FORBIDDEN, "reauthentication_required").await;
    let raw = nonce();
    let mut claims = issuer.claims(APP_ID, "apple-ann", "ann@example.com", &raw);
    let now = claims["iat"].as_i64().unwrap();
    claims["iat"] = json!(now - 400);
    let response =
        delete(json!({"provider": "apple", "id_token": issuer.sign(&claims), "nonce": raw}))
            .await
            .unwrap();
    assert_problem(response, StatusCode::FORBIDDEN, "reauthentication_required").await;
    // A password does not either: she has none.
    let response = delete(json!({"password": "anything at all"}))
        .await
        .unwrap();
    assert_problem(response, StatusCode::FORBIDDEN, "wrong_password").await;

    let raw = nonce();
    let fresh = issuer.id_token(APP_ID, "apple-ann", "ann@example.com", &raw);
    let response = delete(json!({"provider": "apple", "id_token": fresh, "nonce": raw}))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let identities: i64 =
        sqlx::query_scalar("SELECT count(*) FROM identities WHERE subject = 'apple-ann'")
            .fetch_one(&app.db.pool().await)
            .await
            .unwrap();
    assert_eq!(identities, 0);
    // Signing in with Apple again makes a new account.
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "apple-ann", "ann@example.com", &raw);
    let response = sign_in(&app, "/v1/auth/apple", &token, &raw).await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_ne!(body["user"]["id"], ann.user_id.as_str());
}

#[tokio::test]
async fn an_unreachable_provider_is_a_503_to_retry() {
    let issuer = FakeIssuer::start().await;
    let app = app_with(&issuer, "APPLE", &[]).await;
    let raw = nonce();
    let token = issuer.id_token(APP_ID, "apple-ann", "ann@example.com", &raw);
    // The app has read OIDC_CA_FILE once it answers; then the issuer goes away.
    assert!(
        app.request(Method::GET, "/health/live")
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    drop(issuer);
    assert_problem(
        sign_in(&app, "/v1/auth/apple", &token, &raw).await,
        StatusCode::SERVICE_UNAVAILABLE,
        "provider_unavailable",
    )
    .await;
}
