//! Email against a mail server started by the tests that speaks real SMTP
//! (`mobile_testkit::FakeSmtp`), with the worker sending: each test reads the mail the
//! server received, follows its link's token, and completes the flow through the API.

use std::time::Duration;

use mobile_testkit::{FakeSmtp, ReceivedMail, SmtpSecurity, api::PASSWORD};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

use crate::{
    helpers::{Session, TestApp, assert_problem, sample},
    media::Worker,
};

/// How long a mail may take: a worker's poll, a retry's backoff, the SMTP round trips.
const MAIL_WAIT: Duration = Duration::from_secs(20);

async fn worker_for(app: &TestApp, smtp: &FakeSmtp, extra: &[(&str, &str)]) -> Worker {
    let mut env = smtp.worker_env();
    env.push(("JOB_BACKOFF_BASE_MS".into(), "100".into()));
    env.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Worker::start(app, &env).await
}

async fn register_with(app: &TestApp, email: &str, accept_language: Option<&str>) -> Session {
    let mut request = app
        .request(Method::POST, "/v1/auth/register")
        .json(&json!({"email": email, "password": PASSWORD, "display_name": "Ann"}));
    if let Some(language) = accept_language {
        request = request.header("accept-language", language);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    Session::from_body(&response.json().await.unwrap())
}

/// The first mail to `to` with a link to `path` (`/verify-email`, `/reset-password`).
async fn link_mail(smtp: &FakeSmtp, to: &str, path: &str) -> ReceivedMail {
    smtp.wait_for_mail(MAIL_WAIT, |m| m.to == [to] && m.link(path).is_some())
        .await
}

fn token_of(mail: &ReceivedMail, path: &str) -> String {
    let (link, token) = mail
        .link(path)
        .unwrap_or_else(|| panic!("no {path} link in {}", mail.body()));
    assert!(
        link.starts_with(&format!("https://chatty.example/app{path}#token=")),
        "{link}"
    );
    token
}

async fn verify(app: &TestApp, session: &Session, token: &str) -> reqwest::Response {
    app.authed(Method::POST, "/v1/me/email/verify", session)
        .json(&json!({"token": token}))
        .send()
        .await
        .unwrap()
}

async fn forgot(app: &TestApp, email: &str) -> reqwest::Response {
    app.post_json("/v1/auth/password/forgot", &json!({"email": email}))
        .await
}

async fn reset(app: &TestApp, token: &str, password: &str) -> reqwest::Response {
    app.post_json(
        "/v1/auth/password/reset",
        &json!({"token": token, "password": password}),
    )
    .await
}

/// Waits until the worker's `sample` reads `value` (the worker counts a mail after the
/// server's 250, which the test may see first).
async fn wait_for_sample(worker: &Worker, sample_name: &str, value: f64) {
    for _ in 0..200 {
        if sample(&worker.metrics_text().await, sample_name) == Some(value) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = worker.metrics_text().await;
    panic!("{sample_name} is not {value} after 20 s: {metrics}");
}

/// The state and error of the mail job to `to` once an attempt failed, waiting for one.
async fn mail_error(app: &TestApp, to: &str) -> (String, String) {
    let pool = app.db.pool().await;
    for _ in 0..200 {
        let failed: Option<(String, String)> = sqlx::query_as(
            "SELECT state, last_error FROM jobs
             WHERE kind = 'mail.send' AND payload->>'email' = $1 AND last_error IS NOT NULL",
        )
        .bind(to)
        .fetch_optional(&pool)
        .await
        .unwrap();
        if let Some(failed) = failed {
            return failed;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no mail job failed within 20 s");
}

/// Waits until no `mail.send` job is left queued or running.
async fn mail_jobs_done(app: &TestApp) {
    crate::helpers::wait_until_no_jobs(app, "kind = 'mail.send' AND state <> 'dead'").await;
}

#[tokio::test]
async fn registration_mails_a_link_that_verifies_the_address_once() {
    let smtp = FakeSmtp::with_credentials(SmtpSecurity::StartTls, "mailer", "s3cret p@ss").await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;

    let ann = register_with(&app, "ann@example.com", None).await;
    assert_eq!(app.get_json("/v1/me", &ann).await["email_verified"], false);

    let mail = link_mail(&smtp, "ann@example.com", "/verify-email").await;
    assert!(mail.tls, "the mail went over TLS (STARTTLS)");
    assert_eq!(mail.user.as_deref(), Some("mailer"));
    assert_eq!(mail.from, "no-reply@chatty.example");
    assert_eq!(
        mail.header("From").as_deref(),
        Some("Chatty <no-reply@chatty.example>")
    );
    assert_eq!(mail.subject(), "Confirm your email address for Chatty");
    assert!(
        mail.body().contains("works once, for 1 day"),
        "{}",
        mail.body()
    );
    let token = token_of(&mail, "/verify-email");

    // Only the token's hash is stored, and the job that asked for it is gone.
    let pool = app.db.pool().await;
    let stored: Vec<Vec<u8>> = sqlx::query_scalar("SELECT token_hash FROM email_tokens")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(stored, vec![Sha256::digest(token.as_bytes()).to_vec()]);
    mail_jobs_done(&app).await;

    // Another account's token is not ours to use, and spends nothing.
    let bob = app.register("bob@example.com").await;
    assert_problem(
        verify(&app, &bob, &token).await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;

    let response = verify(&app, &ann, &token).await;
    assert_eq!(response.status(), StatusCode::OK);
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["email"], "ann@example.com");
    assert_eq!(user["email_verified"], true);
    assert_eq!(app.get_json("/v1/me", &ann).await["email_verified"], true);

    // Once.
    assert_problem(
        verify(&app, &ann, &token).await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;
    // Nothing left to prove.
    let response = app
        .authed(Method::POST, "/v1/me/email/verification", &ann)
        .send()
        .await
        .unwrap();
    assert_problem(response, StatusCode::CONFLICT, "email_already_verified").await;

    link_mail(&smtp, "bob@example.com", "/verify-email").await;
    wait_for_sample(
        &worker,
        r#"mails_total{template="verify_email",outcome="sent"}"#,
        2.0,
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn a_forgotten_password_is_reset_by_the_link_and_every_session_ends() {
    let smtp = FakeSmtp::start(SmtpSecurity::ImplicitTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;
    let ann = app.register("ann@example.com").await;
    let phone = Session::from_body(
        &app.login("ann@example.com", PASSWORD)
            .await
            .json::<Value>()
            .await
            .unwrap(),
    );

    // The same answer for an address no account has; only Ann gets a mail.
    assert_eq!(
        forgot(&app, "nobody@example.com").await.status(),
        StatusCode::ACCEPTED
    );
    assert_eq!(
        forgot(&app, "Ann@Example.com").await.status(),
        StatusCode::ACCEPTED
    );
    let mail = link_mail(&smtp, "ann@example.com", "/reset-password").await;
    assert!(mail.tls);
    assert_eq!(mail.subject(), "Reset your password for Chatty");
    assert!(mail.body().contains("for 1 hour"), "{}", mail.body());
    let token = token_of(&mail, "/reset-password");
    mail_jobs_done(&app).await;
    assert!(
        smtp.mails()
            .iter()
            .all(|m| m.to != ["nobody@example.com".to_owned()]),
        "no mail to an address no account has"
    );
    wait_for_sample(
        &worker,
        r#"mails_total{template="reset_password",outcome="skipped"}"#,
        1.0,
    )
    .await;

    assert_problem(
        reset(&app, &token, "short").await,
        StatusCode::UNPROCESSABLE_ENTITY,
        "weak_password",
    )
    .await;
    assert_problem(
        reset(&app, "not-a-token-we-made", "a brand new passphrase").await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;
    assert_eq!(
        reset(&app, &token, "a brand new passphrase").await.status(),
        StatusCode::NO_CONTENT
    );

    // Every session ended; the old password is gone, the new one works.
    for session in [&ann, &phone] {
        assert_eq!(
            app.refresh(&session.refresh_token).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_eq!(
        app.login("ann@example.com", PASSWORD).await.status(),
        StatusCode::UNAUTHORIZED
    );
    let response = app.login("ann@example.com", "a brand new passphrase").await;
    assert_eq!(response.status(), StatusCode::OK);
    // The link proved the mailbox.
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["user"]["email_verified"], true);

    // Once.
    assert_problem(
        reset(&app, &token, "yet another passphrase").await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn a_reset_link_stops_working_when_it_expires() {
    let smtp = FakeSmtp::start(SmtpSecurity::StartTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[("PASSWORD_RESET_TTL_SECONDS", "1800")]).await;
    app.register("ann@example.com").await;
    forgot(&app, "ann@example.com").await;
    let mail = link_mail(&smtp, "ann@example.com", "/reset-password").await;
    assert!(mail.body().contains("for 30 minutes"), "{}", mail.body());
    let token = token_of(&mail, "/reset-password");

    // Half an hour later.
    let pool = app.db.pool().await;
    sqlx::query("UPDATE email_tokens SET expires_at = now() - interval '1 second'")
        .execute(&pool)
        .await
        .unwrap();
    assert_problem(
        reset(&app, &token, "a brand new passphrase").await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;
    assert_eq!(
        app.login("ann@example.com", PASSWORD).await.status(),
        StatusCode::OK
    );
    worker.stop().await;
}

#[tokio::test]
async fn an_email_change_happens_when_the_new_address_is_verified() {
    let smtp = FakeSmtp::start(SmtpSecurity::StartTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;
    let ann = app.register("ann@example.com").await;
    let link = link_mail(&smtp, "ann@example.com", "/verify-email").await;
    let response = verify(&app, &ann, &token_of(&link, "/verify-email")).await;
    assert_eq!(response.status(), StatusCode::OK);
    app.register("taken@example.com").await;
    let change = |email: &str, password: &str| {
        app.authed(Method::POST, "/v1/me/email", &ann)
            .json(&json!({"email": email, "password": password}))
            .send()
    };

    assert_problem(
        change("ann@example.org", "not her password").await.unwrap(),
        StatusCode::FORBIDDEN,
        "wrong_password",
    )
    .await;
    assert_problem(
        change("taken@example.com", PASSWORD).await.unwrap(),
        StatusCode::CONFLICT,
        "email_taken",
    )
    .await;
    assert_problem(
        change("ann@example.com", PASSWORD).await.unwrap(),
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_email",
    )
    .await;

    // A reset link sent to the old address before the change.
    forgot(&app, "ann@example.com").await;
    let reset_mail = link_mail(&smtp, "ann@example.com", "/reset-password").await;
    let old_reset = token_of(&reset_mail, "/reset-password");

    assert_eq!(
        change("ann@example.org", PASSWORD).await.unwrap().status(),
        StatusCode::ACCEPTED
    );
    let link = link_mail(&smtp, "ann@example.org", "/verify-email").await;
    let notice = smtp
        .wait_for_mail(MAIL_WAIT, |m| {
            m.to == ["ann@example.com"] && m.subject().contains("about to change")
        })
        .await;
    assert_eq!(
        notice.subject(),
        "Your Chatty email address is about to change"
    );
    assert!(
        notice.body().contains("to ann@example.org"),
        "{}",
        notice.body()
    );
    assert!(notice.link("/verify-email").is_none());
    // Until the link is used, the address stays.
    assert_eq!(
        app.get_json("/v1/me", &ann).await["email"],
        "ann@example.com"
    );

    let response = verify(&app, &ann, &token_of(&link, "/verify-email")).await;
    assert_eq!(response.status(), StatusCode::OK);
    let user: Value = response.json().await.unwrap();
    assert_eq!(user["email"], "ann@example.org");
    assert_eq!(user["email_verified"], true);
    assert_eq!(
        app.login("ann@example.org", PASSWORD).await.status(),
        StatusCode::OK
    );
    assert_eq!(
        app.login("ann@example.com", PASSWORD).await.status(),
        StatusCode::UNAUTHORIZED
    );
    // The old mailbox can no longer reset the password.
    assert_problem(
        reset(&app, &old_reset, "a brand new passphrase").await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;

    // It was not Ann: the notice's link takes her address back, ends every session and
    // removes the password whoever changed it knew.
    let restore = token_of(&notice, "/restore-email");
    assert!(notice.body().contains("for 7 days"), "{}", notice.body());
    let response = app
        .post_json("/v1/auth/email/restore", &json!({"token": restore}))
        .await;
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        app.refresh(&ann.refresh_token).await.status(),
        StatusCode::UNAUTHORIZED
    );
    for address in ["ann@example.com", "ann@example.org"] {
        assert_eq!(
            app.login(address, PASSWORD).await.status(),
            StatusCode::UNAUTHORIZED
        );
    }
    assert_problem(
        app.post_json("/v1/auth/email/restore", &json!({"token": restore}))
            .await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;
    // She sets a new password by mail, at her old address.
    forgot(&app, "ann@example.com").await;
    let again = smtp
        .wait_for_mail(MAIL_WAIT, |m| {
            m.to == ["ann@example.com"]
                && m.link("/reset-password")
                    .is_some_and(|(_, token)| token != old_reset)
        })
        .await;
    assert_eq!(
        reset(
            &app,
            &token_of(&again, "/reset-password"),
            "ann's own passphrase"
        )
        .await
        .status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.login("ann@example.com", "ann's own passphrase")
            .await
            .status(),
        StatusCode::OK
    );

    // An address never verified (anyone may have registered it) gets no notice.
    let bob = app.register("bob@example.com").await;
    link_mail(&smtp, "bob@example.com", "/verify-email").await;
    let response = app
        .authed(Method::POST, "/v1/me/email", &bob)
        .json(&json!({"email": "bob@example.org", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    link_mail(&smtp, "bob@example.org", "/verify-email").await;
    mail_jobs_done(&app).await;
    let to_bob = smtp
        .mails()
        .into_iter()
        .filter(|m| m.to == ["bob@example.com"])
        .count();
    assert_eq!(to_bob, 1, "only his registration's link");
    worker.stop().await;
}

#[tokio::test]
async fn a_password_change_or_signing_out_everywhere_voids_outstanding_links() {
    let smtp = FakeSmtp::start(SmtpSecurity::StartTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;
    let ann = app.register("ann@example.com").await;

    // Someone with Ann's password asks for a reset and an address change...
    forgot(&app, "ann@example.com").await;
    let taken = link_mail(&smtp, "ann@example.com", "/reset-password").await;
    let response = app
        .authed(Method::POST, "/v1/me/email", &ann)
        .json(&json!({"email": "mallory@example.org", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let change = link_mail(&smtp, "mallory@example.org", "/verify-email").await;

    // ...and Ann changes her password: neither link works any more.
    let response = app
        .authed(Method::POST, "/v1/me/password", &ann)
        .json(&json!({"current_password": PASSWORD, "new_password": "a brand new passphrase"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_problem(
        reset(
            &app,
            &token_of(&taken, "/reset-password"),
            "mallory's passphrase",
        )
        .await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;
    assert_problem(
        verify(&app, &ann, &token_of(&change, "/verify-email")).await,
        StatusCode::BAD_REQUEST,
        "invalid_email_token",
    )
    .await;

    // The same after signing out everywhere.
    forgot(&app, "ann@example.com").await;
    let pool = app.db.pool().await;
    mail_jobs_done(&app).await;
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM email_tokens WHERE purpose = 'reset_password'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(live, 1);
    let response = app
        .authed(Method::POST, "/v1/auth/logout-all", &ann)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let live: i64 =
        sqlx::query_scalar("SELECT count(*) FROM email_tokens WHERE purpose = 'reset_password'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(live, 0);
    worker.stop().await;
}

#[tokio::test]
async fn a_mail_goes_only_to_the_exact_address_the_account_holds() {
    let smtp = FakeSmtp::start(SmtpSecurity::StartTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;
    // Accepted as an account's address, but written as a name and an address: the
    // mail would go to someone else.
    let response = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "x<victim@corp.example>", "password": PASSWORD, "display_name": "X"}),
        )
        .await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let (state, error) = mail_error(&app, "x<victim@corp.example>").await;
    assert_eq!(state, "dead", "{error}");
    assert!(error.contains("not an address"), "{error}");
    assert!(smtp.mails().is_empty());
    worker.stop().await;
}

#[tokio::test]
async fn the_mail_speaks_the_language_of_the_request_else_of_the_device() {
    let smtp = FakeSmtp::start(SmtpSecurity::StartTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;

    register_with(&app, "ann@example.com", Some("de-CH, en;q=0.5")).await;
    let mail = link_mail(&smtp, "ann@example.com", "/verify-email").await;
    assert_eq!(mail.subject(), "Bestätige deine E-Mail-Adresse für Chatty");
    assert!(mail.body().contains("1 Tag lang"), "{}", mail.body());
    token_of(&mail, "/verify-email");

    // A language we have no templates in: English.
    register_with(&app, "bob@example.com", Some("fr-FR")).await;
    let mail = link_mail(&smtp, "bob@example.com", "/verify-email").await;
    assert_eq!(mail.subject(), "Confirm your email address for Chatty");

    // No Accept-Language: the language of the account's latest device.
    let cara = register_with(&app, "cara@example.com", None).await;
    let device = uuid::Uuid::now_v7();
    let response = app
        .authed(Method::PUT, &format!("/v1/devices/{device}"), &cara)
        .json(&json!({"platform": "ios", "push_token": "ca".repeat(32), "locale": "de-DE"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    forgot(&app, "cara@example.com").await;
    let mail = link_mail(&smtp, "cara@example.com", "/reset-password").await;
    assert_eq!(mail.subject(), "Setze dein Passwort für Chatty zurück");
    worker.stop().await;
}

#[tokio::test]
async fn a_temporary_failure_is_retried_and_a_refused_address_is_not() {
    let smtp = FakeSmtp::start(SmtpSecurity::StartTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;

    smtp.fail_next(1);
    let ann = app.register("ann@example.com").await;
    let mail = link_mail(&smtp, "ann@example.com", "/verify-email").await;
    // The failed attempt's token was deleted: only the sent one works.
    let pool = app.db.pool().await;
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM email_tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tokens, 1);
    assert_eq!(
        verify(&app, &ann, &token_of(&mail, "/verify-email"))
            .await
            .status(),
        StatusCode::OK
    );

    smtp.refuse("gone@example.com");
    app.register("gone@example.com").await;
    // Final at once: dead after one attempt, not retried.
    let (state, dead) = mail_error(&app, "gone@example.com").await;
    assert_eq!(state, "dead");
    assert!(dead.contains("550"), "{dead}");
    wait_for_sample(
        &worker,
        r#"mails_total{template="verify_email",outcome="failed"}"#,
        2.0,
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn mail_never_goes_to_a_server_without_tls() {
    let smtp = FakeSmtp::start(SmtpSecurity::Plain).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;
    app.register("ann@example.com").await;

    let (_, error) = mail_error(&app, "ann@example.com").await;
    assert!(smtp.connections() >= 1, "the worker did try");
    assert!(smtp.mails().is_empty(), "{error}");
    // Its token went with the failure.
    let pool = app.db.pool().await;
    let tokens: i64 = sqlx::query_scalar("SELECT count(*) FROM email_tokens")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tokens, 0);
    worker.stop().await;
}

#[tokio::test]
async fn credentials_may_come_from_a_file_and_a_wrong_password_sends_nothing() {
    let smtp = FakeSmtp::with_credentials(SmtpSecurity::ImplicitTls, "mailer", "right").await;
    let app = TestApp::spawn().await;
    let dir = std::env::temp_dir().join(format!("smtp-secret-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let password_file = dir.join("password");
    std::fs::write(&password_file, "right\n").unwrap();
    // SMTP_URL without its password, which comes from the file.
    let url = smtp.url().replace("mailer:right@", "mailer@");
    let file = password_file.display().to_string();
    let worker = worker_for(
        &app,
        &smtp,
        &[
            ("SMTP_URL", url.as_str()),
            ("SMTP_PASSWORD_FILE", file.as_str()),
        ],
    )
    .await;
    app.register("ann@example.com").await;
    let mail = link_mail(&smtp, "ann@example.com", "/verify-email").await;
    assert_eq!(mail.user.as_deref(), Some("mailer"));
    worker.stop().await;

    let wrong = smtp.url().replace("mailer:right@", "mailer:wrong@");
    let worker = worker_for(&app, &smtp, &[("SMTP_URL", wrong.as_str())]).await;
    app.register("bob@example.com").await;
    let (state, error) = mail_error(&app, "bob@example.com").await;
    assert_eq!(state, "dead", "a refused login is final: {error}");
    assert!(error.contains("535"), "{error}");
    assert_eq!(smtp.mails().len(), 1);
    worker.stop().await;
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn mail_requests_are_limited_per_address_and_per_ip() {
    let app = TestApp::builder()
        .env("MAIL_PER_ADDRESS_PER_HOUR", "2")
        .env("MAIL_PER_IP_PER_HOUR", "3")
        .env("TRUSTED_PROXY_HOPS", "1")
        .spawn()
        .await;
    let from = |ip: &'static str, email: &'static str| {
        app.request(Method::POST, "/v1/auth/password/forgot")
            .header("x-forwarded-for", ip)
            .json(&json!({"email": email}))
            .send()
    };
    // An address no account has counts like any other: the answers tell nothing.
    for _ in 0..2 {
        assert_eq!(
            from("192.0.2.1", "nobody@example.com")
                .await
                .unwrap()
                .status(),
            StatusCode::ACCEPTED
        );
    }
    // The address's limit, from the same IP and from another.
    let limited = from("192.0.2.1", "nobody@example.com").await.unwrap();
    assert!(limited.headers().contains_key("retry-after"));
    assert_problem(limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited").await;
    assert_problem(
        from("198.51.100.7", "nobody@example.com").await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    )
    .await;
    // The first IP's limit (three asked), for any address; the other IP still asks.
    assert_problem(
        from("192.0.2.1", "other@example.com").await.unwrap(),
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    )
    .await;
    assert_eq!(
        from("198.51.100.7", "other@example.com")
            .await
            .unwrap()
            .status(),
        StatusCode::ACCEPTED
    );
    // A registration over the address's limit makes the account, and no mail.
    let response = app
        .request(Method::POST, "/v1/auth/register")
        .header("x-forwarded-for", "203.0.113.9")
        .json(&json!({"email": "nobody@example.com", "password": PASSWORD, "display_name": "N"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    // Two jobs per address at most made it to the queue.
    let pool = app.db.pool().await;
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = 'mail.send'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(queued, 3);
}

#[tokio::test]
async fn without_smtp_the_worker_says_so_and_drops_the_mail() {
    let app = TestApp::spawn().await;
    let worker = Worker::start(&app, &[]).await;
    app.register("ann@example.com").await;
    mail_jobs_done(&app).await;
    wait_for_sample(
        &worker,
        r#"mails_total{template="verify_email",outcome="disabled"}"#,
        1.0,
    )
    .await;
    worker.stop().await;
}

#[tokio::test]
async fn deleting_the_account_takes_its_links_and_unsent_mails() {
    let smtp = FakeSmtp::start(SmtpSecurity::StartTls).await;
    let app = TestApp::spawn().await;
    let worker = worker_for(&app, &smtp, &[]).await;
    let ann = app.register("ann@example.com").await;
    link_mail(&smtp, "ann@example.com", "/verify-email").await;
    mail_jobs_done(&app).await;
    worker.stop().await;
    // A reset asked for while no worker runs: its mail waits in the queue.
    forgot(&app, "ann@example.com").await;

    let response = app
        .authed(Method::DELETE, "/v1/me", &ann)
        .json(&json!({"password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let pool = app.db.pool().await;
    let (tokens, mails): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM email_tokens),
                (SELECT count(*) FROM jobs WHERE kind = 'mail.send')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((tokens, mails), (0, 0));
}
