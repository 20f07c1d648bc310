//! Tokens on open sockets: a revoked session's sockets close on every gateway within
//! 2 s (logout, refresh-token reuse, a session ended from another, logout everywhere,
//! a password change, account deletion, and a revocation whose Redis message was lost),
//! an expired token closes its socket, and `refresh` keeps it open.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::helpers::{Client, Stack, User, close_frame, sample};

/// The session id inside an access token.
fn session_of(token: &str) -> String {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    let claims = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).unwrap()).unwrap();
    claims["sid"].as_str().unwrap().to_owned()
}

/// A token of `user` under `session`, signed with the stack's key, expiring at
/// `now + exp_in` (negative: already past, within the verifier's leeway).
fn token_expiring(stack: &Stack, user: &str, session: &str, exp_in: i64) -> String {
    let signing = mobile_auth::SigningKey::from_file(&stack.keys.signing(0)).unwrap();
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(signing.kid().to_owned());
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let claims = json!({"sub": user, "sid": session, "iss": "mobile-backend", "aud": "mobile-app",
                        "iat": now - 60, "exp": now + exp_in});
    let pem = std::fs::read(stack.keys.signing(0)).unwrap();
    jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ed_pem(&pem).unwrap()).unwrap()
}

async fn expect_revoked(client: &mut Client) {
    let (code, reason) = close_frame(&mut client.socket, Duration::from_secs(2)).await;
    assert_eq!((code, reason.as_str()), (4001, "session_revoked"));
}

#[tokio::test]
async fn logout_closes_the_sessions_sockets_on_every_gateway_within_2_s() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let other_session = stack.login("ann").await;
    let mut on_first = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let mut on_second = Client::connect(&stack.gateways[1].addr, &ann.token).await;
    let mut still_signed_in = Client::connect(&stack.gateways[1].addr, &other_session.token).await;

    let status = stack
        .api_post(
            "/v1/auth/logout",
            &json!({"refresh_token": ann.refresh_token}),
        )
        .await;
    assert_eq!(status, 204);
    expect_revoked(&mut on_first).await;
    expect_revoked(&mut on_second).await;

    // The other session's socket neither closes nor sees the revocation frame.
    assert!(
        still_signed_in
            .next_within(Duration::from_millis(500))
            .await
            .is_none()
    );
    for gateway in 0..2 {
        let metrics = stack.metrics(gateway).await;
        assert_eq!(
            sample(
                &metrics,
                r#"websocket_disconnects_total{reason="session_revoked"}"#
            ),
            1.0
        );
    }
}

#[tokio::test]
async fn a_session_ended_from_another_closes_its_sockets_only() {
    let stack = Stack::start(2, &[]).await;
    let desk = stack.register("ann").await;
    let lost = stack.login("ann").await;
    let mut lost_socket = Client::connect(&stack.gateways[1].addr, &lost.token).await;
    let mut desk_socket = Client::connect(&stack.gateways[0].addr, &desk.token).await;
    let path = format!("/v1/sessions/{}", session_of(&lost.token));
    assert_eq!(
        stack
            .api_as(&desk, reqwest::Method::DELETE, &path, None)
            .await,
        204
    );
    expect_revoked(&mut lost_socket).await;
    assert!(
        desk_socket
            .next_within(Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn logout_everywhere_closes_every_socket_of_the_user() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let tablet = stack.login("ann").await;
    let bob = stack.register("bob").await;
    let mut sockets = vec![
        Client::connect(&stack.gateways[0].addr, &ann.token).await,
        Client::connect(&stack.gateways[1].addr, &tablet.token).await,
    ];
    let mut bobs = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    let status = stack
        .api_as(&tablet, reqwest::Method::POST, "/v1/auth/logout-all", None)
        .await;
    assert_eq!(status, 204);
    for socket in &mut sockets {
        expect_revoked(socket).await;
    }
    assert!(bobs.next_within(Duration::from_millis(500)).await.is_none());
}

#[tokio::test]
async fn a_password_change_closes_the_other_sessions_sockets() {
    let stack = Stack::start(1, &[]).await;
    let here = stack.register("ann").await;
    let there = stack.login("ann").await;
    let mut here_socket = Client::connect(&stack.gateways[0].addr, &here.token).await;
    let mut there_socket = Client::connect(&stack.gateways[0].addr, &there.token).await;
    let change = json!({"current_password": mobile_testkit::api::PASSWORD,
                        "new_password": "a much better passphrase"});
    let status = stack
        .api_as(
            &here,
            reqwest::Method::POST,
            "/v1/me/password",
            Some(&change),
        )
        .await;
    assert_eq!(status, 204);
    expect_revoked(&mut there_socket).await;
    assert!(
        here_socket
            .next_within(Duration::from_millis(500))
            .await
            .is_none()
    );
}

#[tokio::test]
async fn deleting_the_account_closes_every_socket_and_no_new_one_opens() {
    let stack = Stack::start(2, &[]).await;
    let ann = stack.register("ann").await;
    let tablet = stack.login("ann").await;
    let mut sockets = vec![
        Client::connect(&stack.gateways[0].addr, &ann.token).await,
        Client::connect(&stack.gateways[1].addr, &tablet.token).await,
    ];
    let body = json!({"password": mobile_testkit::api::PASSWORD});
    let status = stack
        .api_as(&ann, reqwest::Method::DELETE, "/v1/me", Some(&body))
        .await;
    assert_eq!(status, 204);
    for socket in &mut sockets {
        expect_revoked(socket).await;
    }
    let mut socket = crate::helpers::Client::connect_raw(&format!(
        "{}?access_token={}",
        stack.gateways[0].addr, ann.token
    ))
    .await;
    let (code, reason) = close_frame(&mut socket, Duration::from_secs(2)).await;
    assert_eq!((code, reason.as_str()), (4001, "session_revoked"));
}

#[tokio::test]
async fn a_revoked_sessions_token_cannot_open_a_socket() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let logout = json!({"refresh_token": ann.refresh_token});
    assert_eq!(stack.api_post("/v1/auth/logout", &logout).await, 204);
    // The access token itself is still unexpired; its session is not live.
    let mut socket = crate::helpers::Client::connect_raw(&format!(
        "{}?access_token={}",
        stack.gateways[0].addr, ann.token
    ))
    .await;
    let (code, reason) = close_frame(&mut socket, Duration::from_secs(2)).await;
    assert_eq!((code, reason.as_str()), (4001, "session_revoked"));
}

#[tokio::test]
async fn refresh_token_reuse_closes_the_familys_sockets() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let refresh = json!({"refresh_token": ann.refresh_token});
    assert_eq!(stack.api_post("/v1/auth/refresh", &refresh).await, 200);
    // The spent token again: theft, as far as the server can tell.
    assert_eq!(stack.api_post("/v1/auth/refresh", &refresh).await, 401);
    expect_revoked(&mut client).await;
}

#[tokio::test]
async fn a_revocation_whose_message_was_lost_is_found_by_the_session_check() {
    let stack = Stack::start(1, &[("WS_SESSION_CHECK_SECONDS", "1")]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let mut anns = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let mut bobs = Client::connect(&stack.gateways[0].addr, &bob.token).await;
    // Revoked in PostgreSQL with no message to the gateways; Bob's account deleted.
    let pool = stack.db.pool().await;
    sqlx::query(
        "UPDATE sessions SET revoked_at = now(), revoked_reason = 'logout' WHERE id = $1::uuid",
    )
    .bind(session_of(&ann.token))
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("DELETE FROM users WHERE id = $1::uuid")
        .bind(&bob.id)
        .execute(&pool)
        .await
        .unwrap();
    for client in [&mut anns, &mut bobs] {
        let (code, reason) = close_frame(&mut client.socket, Duration::from_secs(3)).await;
        assert_eq!((code, reason.as_str()), (4001, "session_revoked"));
    }
}

#[tokio::test]
async fn an_expired_token_closes_its_socket_unless_refreshed() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let bob = stack.register("bob").await;
    let session = session_of(&ann.token);
    // Expired 3 s ago: still accepted within the 5 s leeway, so it has 2 s left.
    let short = token_expiring(&stack, &ann.id, &session, -3);

    let mut lapsing = Client::connect(&stack.gateways[0].addr, &short).await;
    let (code, reason) = close_frame(&mut lapsing.socket, Duration::from_secs(4)).await;
    assert_eq!((code, reason.as_str()), (4001, "token_expired"));

    // Expired a second ago: 4 s left.
    let short = token_expiring(&stack, &ann.id, &session, -1);
    let mut refreshing = Client::connect(&stack.gateways[0].addr, &short).await;
    // Refused refreshes leave the old expiry standing.
    refreshing
        .send(json!({"type": "refresh", "id": 1, "token": "garbage"}))
        .await;
    let answer = refreshing.next().await;
    assert_eq!(
        (answer["id"].as_u64(), answer["code"].as_str()),
        (Some(1), Some("invalid_token"))
    );
    refreshing
        .send(json!({"type": "refresh", "id": 2, "token": bob.token}))
        .await;
    let answer = refreshing.next().await;
    assert_eq!(
        (answer["id"].as_u64(), answer["code"].as_str()),
        (Some(2), Some("forbidden"))
    );
    // A fresh token of Ann's: the socket lives on it.
    refreshing
        .send(json!({"type": "refresh", "id": 3, "token": ann.token}))
        .await;
    let answer = refreshing.next().await;
    assert_eq!(answer["type"], "refreshed", "{answer}");
    assert_eq!(answer["id"], 3);
    let expires_at = time::OffsetDateTime::parse(
        answer["expires_at"].as_str().unwrap(),
        &time::format_description::well_known::Rfc3339,
    )
    .unwrap();
    assert!(expires_at > time::OffsetDateTime::now_utc() + time::Duration::minutes(10));
    assert!(
        (600..=900).contains(&answer["expires_in"].as_i64().unwrap()),
        "{answer}"
    );
    // Past the old expiry, still open and serving.
    assert!(
        refreshing
            .next_within(Duration::from_secs(5))
            .await
            .is_none()
    );
    refreshing
        .send(json!({"type": "subscribe", "id": 4, "channel": format!("user:{}", ann.id)}))
        .await;
    assert_eq!(refreshing.next().await["type"], "subscribed");

    let metrics = stack.metrics(0).await;
    assert_eq!(
        sample(
            &metrics,
            r#"websocket_disconnects_total{reason="token_expired"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn a_refresh_under_a_new_sign_in_moves_the_socket_to_that_session() {
    let stack = Stack::start(1, &[]).await;
    let ann = stack.register("ann").await;
    let mut client = Client::connect(&stack.gateways[0].addr, &ann.token).await;
    let again: User = stack.login("ann").await;
    client
        .send(json!({"type": "refresh", "id": 1, "token": again.token}))
        .await;
    assert_eq!(client.next().await["type"], "refreshed");
    // Logging the first session out no longer concerns this socket; the second does.
    let first = json!({"refresh_token": ann.refresh_token});
    assert_eq!(stack.api_post("/v1/auth/logout", &first).await, 204);
    assert!(
        client
            .next_within(Duration::from_millis(500))
            .await
            .is_none()
    );
    let second = json!({"refresh_token": again.refresh_token});
    assert_eq!(stack.api_post("/v1/auth/logout", &second).await, 204);
    expect_revoked(&mut client).await;
}
