//! Pushes end to end: a notify job in PostgreSQL, the worker in-process, and the fake
//! APNs (TLS, HTTP/2) and FCM (with OAuth) servers speaking the real protocols.

use std::time::Duration;

use axum::http::Version;
use mobile_db::push::{self, Notification};
use mobile_domain::{DeviceId, Platform, UserId};
use mobile_testkit::{ApnsReply, FakeApns, FakeFcm, FcmReply, TestDb};
use serde_json::json;
use sqlx::PgPool;

use crate::helpers::{TestWorker, apns_token, device, eventually, jobs_left, user};

const TOPIC: &str = "com.example.mobile";

struct Fakes {
    apns: FakeApns,
    fcm: FakeFcm,
}

impl Fakes {
    async fn start() -> Self {
        Self {
            apns: FakeApns::start(TOPIC).await,
            fcm: FakeFcm::start().await,
        }
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = self.apns.env();
        env.extend(self.fcm.env());
        env
    }
}

fn notification(user_id: UserId, body: &str) -> Notification {
    Notification {
        user_id,
        title: "Ada".into(),
        body: body.into(),
        data: Some(json!({ "conversation_id": "c-1", "seq": 5 })),
        collapse_id: Some("c-1".into()),
        thread_id: None,
        kind: mobile_db::push::PushKind::Alert,
        localized: None,
        badge: None,
        unread_badge: false,
        message_id: None,
    }
}

async fn notify(pool: &PgPool, notifications: &[Notification]) {
    let mut conn = pool.acquire().await.unwrap();
    push::enqueue_notifications(&mut conn, notifications)
        .await
        .unwrap();
}

async fn drained(pool: &PgPool) {
    eventually(
        Duration::from_secs(30),
        "every push job to finish",
        || async { jobs_left(pool).await.is_empty().then_some(()) },
    )
    .await;
}

async fn device_count(pool: &PgPool, user: UserId) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM devices WHERE user_id = $1")
        .bind(user)
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_notification_reaches_every_device_of_the_user() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let fakes = Fakes::start().await;
    let worker = TestWorker::spawn(&db, &fakes.env()).await;
    let ada = user(&pool, "Ada").await;
    device(&pool, ada, Platform::Ios, &apns_token(1)).await;
    device(&pool, ada, Platform::Android, "fcm-token-1").await;

    notify(&pool, &[notification(ada, "hello")]).await;
    drained(&pool).await;

    let deliveries = fakes.apns.deliveries();
    assert_eq!(deliveries.len(), 1);
    let apns = &deliveries[0];
    assert_eq!(apns.version, Version::HTTP_2);
    assert_eq!(apns.device_token, apns_token(1));
    let header = |name: &str| apns.headers.get(name).unwrap().to_str().unwrap().to_owned();
    assert_eq!(header("apns-topic"), TOPIC);
    assert_eq!(header("apns-push-type"), "alert");
    assert_eq!(header("apns-priority"), "10");
    assert_eq!(header("apns-collapse-id"), "c-1");
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expiration: i64 = header("apns-expiration").parse().unwrap();
    assert!(expiration > now + 3600, "expires in the future");
    assert_eq!(
        apns.payload["aps"]["alert"],
        json!({ "title": "Ada", "body": "hello" })
    );
    assert_eq!(apns.payload["seq"], "5");

    let messages = fakes.fcm.messages();
    assert_eq!(messages.len(), 1);
    assert_eq!(messages[0]["token"], "fcm-token-1");
    assert_eq!(
        messages[0]["notification"],
        json!({ "title": "Ada", "body": "hello" })
    );
    assert_eq!(
        messages[0]["data"],
        json!({ "conversation_id": "c-1", "seq": "5" })
    );
    assert_eq!(messages[0]["android"]["collapse_key"], "c-1");

    let metrics = worker.metrics_text().await;
    assert!(
        metrics.contains(r#"push_notifications_total{platform="ios",outcome="sent"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"push_notifications_total{platform="android",outcome="sent"} 1"#));
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn one_provider_token_and_one_oauth_exchange_serve_many_sends() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let fakes = Fakes::start().await;
    let worker = TestWorker::spawn(&db, &fakes.env()).await;
    let ada = user(&pool, "Ada").await;
    device(&pool, ada, Platform::Ios, &apns_token(2)).await;
    device(&pool, ada, Platform::Android, "fcm-token-2").await;

    let many: Vec<_> = (0..30)
        .map(|n| notification(ada, &format!("message {n}")))
        .collect();
    notify(&pool, &many).await;
    drained(&pool).await;

    assert_eq!(fakes.apns.deliveries().len(), 30);
    assert_eq!(fakes.fcm.messages().len(), 30);
    assert_eq!(
        fakes.apns.provider_tokens(),
        1,
        "one APNs provider token, reused"
    );
    assert_eq!(fakes.fcm.token_exchanges(), 1, "one OAuth exchange, reused");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn dead_tokens_remove_their_devices() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let fakes = Fakes::start().await;
    let worker = TestWorker::spawn(&db, &fakes.env()).await;
    let ada = user(&pool, "Ada").await;
    device(&pool, ada, Platform::Ios, &apns_token(3)).await;
    device(&pool, ada, Platform::Ios, &apns_token(4)).await;
    device(&pool, ada, Platform::Android, "fcm-uninstalled").await;
    let alive = device(&pool, ada, Platform::Android, "fcm-alive").await;
    fakes.apns.script(&apns_token(3), [ApnsReply::UNREGISTERED]);
    fakes
        .apns
        .script(&apns_token(4), [ApnsReply::BAD_DEVICE_TOKEN]);
    fakes
        .fcm
        .script("fcm-uninstalled", [FcmReply::UNREGISTERED]);

    notify(&pool, &[notification(ada, "hello")]).await;
    drained(&pool).await;

    let left: Vec<DeviceId> = sqlx::query_scalar("SELECT id FROM devices WHERE user_id = $1")
        .bind(ada)
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(left, vec![alive]);
    assert_eq!(fakes.fcm.messages().len(), 1);
    let metrics = worker.metrics_text().await;
    assert!(
        metrics.contains(r#"push_notifications_total{platform="ios",outcome="device_removed"} 2"#),
        "{metrics}"
    );
    assert!(
        metrics
            .contains(r#"push_notifications_total{platform="android",outcome="device_removed"} 1"#)
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn throttling_and_outages_are_retried_until_delivered() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let fakes = Fakes::start().await;
    let worker = TestWorker::spawn(&db, &fakes.env()).await;
    let ada = user(&pool, "Ada").await;
    device(&pool, ada, Platform::Ios, &apns_token(5)).await;
    device(&pool, ada, Platform::Android, "fcm-busy").await;
    fakes.apns.script(
        &apns_token(5),
        [
            ApnsReply::TOO_MANY_REQUESTS.retry_after(1),
            ApnsReply::SERVICE_UNAVAILABLE,
        ],
    );
    fakes.fcm.script(
        "fcm-busy",
        [
            FcmReply::QUOTA_EXCEEDED.retry_after(1),
            FcmReply::UNAVAILABLE,
        ],
    );

    notify(&pool, &[notification(ada, "hello")]).await;
    drained(&pool).await;

    assert_eq!(fakes.apns.deliveries().len(), 1);
    assert_eq!(fakes.apns.requests(), 3);
    assert_eq!(fakes.fcm.messages().len(), 1);
    assert_eq!(
        device_count(&pool, ada).await,
        2,
        "throttling removes no device"
    );
    let metrics = worker.metrics_text().await;
    assert!(
        metrics.contains(r#"push_notifications_total{platform="ios",outcome="retried"} 2"#),
        "{metrics}"
    );
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn an_oversized_notification_fails_without_a_retry() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let fakes = Fakes::start().await;
    let worker = TestWorker::spawn(&db, &fakes.env()).await;
    let ada = user(&pool, "Ada").await;
    device(&pool, ada, Platform::Ios, &apns_token(6)).await;

    notify(&pool, &[notification(ada, &"x".repeat(5000))]).await;
    let dead = eventually(Duration::from_secs(20), "the send job to die", || async {
        jobs_left(&pool)
            .await
            .into_iter()
            .find(|(_, state, _)| state == "dead")
    })
    .await;
    assert_eq!(dead, ("push.send".to_owned(), "dead".to_owned(), 1));
    assert_eq!(fakes.apns.requests(), 0, "refused before sending");
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn without_credentials_a_platform_is_disabled_not_failing() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let worker = TestWorker::spawn(&db, &[]).await;
    let ada = user(&pool, "Ada").await;
    device(&pool, ada, Platform::Ios, &apns_token(7)).await;
    device(&pool, ada, Platform::Android, "fcm-token-7").await;

    notify(&pool, &[notification(ada, "hello")]).await;
    drained(&pool).await;
    let metrics = worker.metrics_text().await;
    assert!(
        metrics.contains(r#"push_notifications_total{platform="ios",outcome="disabled"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"push_notifications_total{platform="android",outcome="disabled"} 1"#)
    );
    assert_eq!(device_count(&pool, ada).await, 2);
    worker.stop().await.unwrap();
}

#[tokio::test]
async fn threads_silent_pushes_badges_and_localised_text_reach_both_platforms() {
    let db = TestDb::new().await;
    let pool = db.pool().await;
    let fakes = Fakes::start().await;
    let _worker = TestWorker::spawn(&db, &fakes.env()).await;
    let ada = user(&pool, "Ada").await;
    device(&pool, ada, Platform::Ios, &apns_token(7)).await;
    device(&pool, ada, Platform::Android, "fcm-token-7").await;

    let mut alert = notification(ada, "hello");
    alert.collapse_id = None;
    alert.thread_id = Some("conversation-1".into());
    alert.localized = Some(push::Localized {
        title_key: Some("push.message.title".into()),
        title_args: vec!["Ada".into(), "Family".into()],
        body_key: None,
        body_args: vec![],
    });
    alert.badge = Some(3);
    let mut silent = notification(ada, "");
    silent.badge = Some(0);
    silent.kind = push::PushKind::Silent;
    silent.collapse_id = None;
    silent.data = Some(json!({ "type": "read", "conversation_id": "conversation-1" }));
    notify(&pool, &[alert]).await;
    drained(&pool).await;
    notify(&pool, &[silent]).await;
    drained(&pool).await;

    let deliveries = fakes.apns.deliveries();
    assert_eq!(deliveries.len(), 2);
    let header = |i: usize, name: &str| {
        deliveries[i]
            .headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    // The alert: grouped by its thread, the title from the app's strings.
    assert_eq!(header(0, "apns-push-type").as_deref(), Some("alert"));
    assert_eq!(header(0, "apns-priority").as_deref(), Some("10"));
    assert_eq!(header(0, "apns-collapse-id"), None);
    assert_eq!(
        deliveries[0].payload["aps"],
        json!({
            "alert": {
                "body": "hello",
                "title-loc-key": "push.message.title",
                "title-loc-args": ["Ada", "Family"],
            },
            "sound": "default",
            "thread-id": "conversation-1",
            "badge": 3,
        })
    );
    // The silent one: a background push at priority 5, nothing shown.
    assert_eq!(header(1, "apns-push-type").as_deref(), Some("background"));
    assert_eq!(header(1, "apns-priority").as_deref(), Some("5"));
    assert_eq!(
        deliveries[1].payload["aps"],
        json!({ "content-available": 1, "badge": 0 }),
        "a read elsewhere clears the badge"
    );
    assert_eq!(deliveries[1].payload["type"], "read");

    let messages = fakes.fcm.messages();
    assert_eq!(messages.len(), 2);
    assert_eq!(messages[0]["android"]["priority"], "high");
    assert_eq!(
        messages[0]["android"]["notification"],
        json!({
            "title_loc_key": "push.message.title",
            "title_loc_args": ["Ada", "Family"],
            "notification_count": 3,
        })
    );
    assert_eq!(messages[0]["data"]["badge"], "3");
    assert_eq!(messages[0]["notification"]["title"], "Ada");
    assert_eq!(messages[0]["data"]["thread_id"], "conversation-1");
    // Data only, at normal priority.
    assert!(messages[1].get("notification").is_none(), "{}", messages[1]);
    assert_eq!(messages[1]["android"]["priority"], "normal");
    assert_eq!(messages[1]["data"]["type"], "read");
    assert_eq!(messages[1]["data"]["badge"], "0");
}
