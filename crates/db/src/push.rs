//! Push notifications as jobs, in two stages:
//!
//! 1. [`Notification`] (`push.notify`): "tell this user". Enqueued by the API in the
//!    transaction of the write that caused it (a message post, `POST
//!    /internal/v1/notifications`).
//! 2. [`DeviceNotification`] (`push.send`): "send to this device". The worker turns one
//!    notify job into one send job per device of the user, in one transaction with
//!    completing the notify job ([`fan_out`]), so each device gets exactly one send
//!    job, and each send job retries on its own: a 429 from APNs for one phone does not
//!    resend to the user's tablet.

use crate::metrics::timed;
use mobile_domain::{ApnsEnvironment, DeviceId, JobId, JobKind, MessageId, Platform, UserId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;

use crate::jobs::{self, Payload};

/// What to tell a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Notification {
    pub user_id: UserId,
    pub title: String,
    pub body: String,
    /// Custom key/values for the app (strings, as FCM wants them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// Notifications with the same id replace each other on the device (a chat's
    /// newest message replaces the previous one's banner).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collapse_id: Option<String>,
    /// Notifications with the same thread are grouped in the notification centre (a
    /// conversation's id): APNs `thread-id`; on Android, `data.thread_id` for the
    /// app's own grouping.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub thread_id: Option<String>,
    /// Shown to the user, or a silent hint to sync.
    #[serde(default, skip_serializing_if = "PushKind::is_alert")]
    pub kind: PushKind,
    /// The title and body as keys of the app's own strings, so the phone shows them in
    /// its user's language; `title` and `body` are the fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localized: Option<Localized>,
    /// The app icon's badge: the user's unread total (APNs `aps.badge`, FCM
    /// `notification_count`, and `data.badge` for the app); `None` leaves it alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub badge: Option<u32>,
    /// Set `badge` to the user's unread total when the worker fans the notification out
    /// ([`fan_out`]), rather than when it is enqueued: counted after the commit of the
    /// write that caused it, off the request's path, and as fresh as the send.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unread_badge: bool,
    /// The message this announces: a notification not yet sent when its message is
    /// deleted is not sent at all (the preview must not outlive the message), and one
    /// not yet sent when it is edited shows the edited text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<MessageId>,
}

/// What a push does on the phone. Jobs enqueued before this existed are alerts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushKind {
    /// A banner, a sound: APNs `alert` at priority 10, an FCM notification at high
    /// priority.
    #[default]
    Alert,
    /// Nothing shown; the app is woken to sync (read state moved on another device, a
    /// message was edited): APNs `background` (`content-available`) at priority 5, an
    /// FCM data-only message at normal priority. The platforms throttle these: they
    /// are hints, never the only way news arrives.
    Silent,
}

impl PushKind {
    pub const fn is_alert(&self) -> bool {
        matches!(self, Self::Alert)
    }
}

/// Localisable text: a key of the app's strings (`Localizable.strings` on iOS,
/// `strings.xml` on Android) and its arguments, for the title and for the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Localized {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub title_args: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_key: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub body_args: Vec<String>,
}

impl Payload for Notification {
    const KIND: JobKind = JobKind::PushNotify;
}

/// One notification to one device: everything the sender needs, so sending reads
/// nothing from the database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceNotification {
    pub device_id: DeviceId,
    pub platform: Platform,
    pub push_token: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub apns_environment: Option<ApnsEnvironment>,
    pub notification: Notification,
}

impl Payload for DeviceNotification {
    const KIND: JobKind = JobKind::PushSend;
    /// With the worker's backoff (capped at 5 minutes), about half an hour of APNs or
    /// FCM being unavailable before a notification is given up.
    const MAX_ATTEMPTS: i32 = 12;
}

/// Enqueues one notify job per notification (one statement, one wake-up), inside the
/// caller's transaction. Returns how many were enqueued.
pub async fn enqueue_notifications(
    conn: &mut PgConnection,
    notifications: &[Notification],
) -> Result<u64, sqlx::Error> {
    jobs::enqueue_many(conn, notifications).await
}

/// Stage two: one send job per device of the notified user, and the notify job
/// completed, in one transaction. Returns the number of send jobs, or `None` if this
/// worker no longer held the notify job (nothing was enqueued). A notification of a
/// message deleted meanwhile completes with no send, and one of a message edited
/// meanwhile shows its text as it is now; `unread_badge` is counted here.
pub async fn fan_out(
    db: &crate::Db,
    notify_job: JobId,
    worker: &str,
    notification: &Notification,
) -> Result<Option<u64>, sqlx::Error> {
    timed("push.fan_out", async move {
        let mut tx = db.begin().await?;
        if jobs::complete(&mut *tx, &[notify_job], worker).await? == 0 {
            return Ok(None);
        }
        let mut notification = notification.clone();
        if let Some(message) = notification.message_id {
            // Held until the commit, so an edit or a deletion (each locks the row
            // `FOR UPDATE`, then rewrites or drops the queued sends) comes either
            // before this, and is read here, or after, and finds the sends queued.
            let text: Option<Option<String>> = sqlx::query_scalar(
                "SELECT CASE WHEN deleted_at IS NULL THEN body END
                 FROM messages WHERE id = $1 FOR KEY SHARE",
            )
            .bind(message)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(Some(text)) = text else {
                tx.commit().await?;
                return Ok(Some(0));
            };
            // The text as it is now: edited since the post, the push says so.
            notification.body = preview(&text);
        }
        if notification.unread_badge {
            let total = crate::conversations::total_unread(&mut *tx, &[notification.user_id])
                .await?
                .first()
                .map_or(0, |(_, total)| *total);
            notification.badge = Some(u32::try_from(total).unwrap_or(u32::MAX));
        }
        let devices: Vec<(DeviceId, Platform, String, Option<ApnsEnvironment>)> = sqlx::query_as(
            "SELECT id, platform, push_token, apns_environment FROM devices WHERE user_id = $1 ORDER BY id",
        )
        .bind(notification.user_id)
        .fetch_all(&mut *tx)
        .await?;
        let sends: Vec<DeviceNotification> = devices
            .into_iter()
            .map(
                |(device_id, platform, push_token, apns_environment)| DeviceNotification {
                    device_id,
                    platform,
                    push_token,
                    apns_environment,
                    notification: notification.clone(),
                },
            )
            .collect();
        let sent = jobs::enqueue_many(&mut *tx, &sends).await?;
        tx.commit().await?;
        Ok(Some(sent))
    })
    .await
}

/// The characters of a message a push shows, at most: the rest is cut, marked `…`.
pub const PREVIEW_CHARS: usize = 100;

/// A push's preview of a message's text: its first [`PREVIEW_CHARS`] characters.
pub fn preview(text: &str) -> String {
    let mut chars = text.chars();
    let mut preview: String = chars.by_ref().take(PREVIEW_CHARS).collect();
    if chars.next().is_some() {
        preview.push('…');
    }
    preview
}

/// The jobs of message `$1`'s pushes not yet sent: notify jobs still queued, and send
/// jobs queued or running. A running send that fails is retried from its row, so the row
/// must follow the message too; a running notify job is a fan-out's, which reads the
/// message itself (and locks the job before the message, so an edit or a deletion,
/// holding the message, must not wait for it). Matched by `jobs_push_message_idx`: the
/// kinds are written out for the planner to see that index's predicate.
const UNSENT_FOR_MESSAGE: &str = "kind IN ('push.notify', 'push.send')
    AND coalesce(payload->>'message_id', payload->'notification'->>'message_id') = $1::uuid::text
    AND (state = 'queued' OR (kind = 'push.send' AND state = 'running'))";

/// Drops the notifications of `message` not yet sent, inside the transaction that
/// deletes it (which holds the message's row: see [`fan_out`]). A send a worker is
/// making goes, but is not retried. Returns how many were dropped.
pub async fn drop_for_message(
    conn: &mut PgConnection,
    message: MessageId,
) -> Result<u64, sqlx::Error> {
    let dropped = sqlx::query(&format!("DELETE FROM jobs WHERE {UNSENT_FOR_MESSAGE}"))
        .bind(message)
        .execute(&mut *conn)
        .await?;
    Ok(dropped.rows_affected())
}

/// Shows `text`, the message's new text, in the notifications of `message` not yet
/// sent, inside the transaction that edits it (which holds the message's row: see
/// [`fan_out`]). A send a worker is making goes as it was; if it is retried, the retry
/// shows the new text. Returns how many were rewritten.
pub async fn retext_for_message(
    conn: &mut PgConnection,
    message: MessageId,
    text: &str,
) -> Result<u64, sqlx::Error> {
    let rewritten = sqlx::query(&format!(
        "UPDATE jobs SET payload = CASE kind
             WHEN 'push.notify' THEN jsonb_set(payload, '{{body}}', to_jsonb($2::text))
             ELSE jsonb_set(payload, '{{notification,body}}', to_jsonb($2::text))
         END
         WHERE {UNSENT_FOR_MESSAGE}"
    ))
    .bind(message)
    .bind(preview(text))
    .execute(&mut *conn)
    .await?;
    Ok(rewritten.rows_affected())
}

/// Forgets a device whose token the platform says is dead, unless the app registered a
/// new token for it since the job was enqueued. Returns whether a row went.
pub async fn remove_dead_token(
    db: impl sqlx::PgExecutor<'_>,
    device_id: DeviceId,
    push_token: &str,
) -> Result<bool, sqlx::Error> {
    timed("push.remove_dead_token", async move {
        let result = sqlx::query("DELETE FROM devices WHERE id = $1 AND push_token = $2")
            .bind(device_id)
            .bind(push_token)
            .execute(db)
            .await?;
        Ok(result.rows_affected() == 1)
    })
    .await
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    async fn user_with_devices(pool: &crate::Db, devices: usize) -> UserId {
        let id = UserId::new();
        sqlx::query(
            "INSERT INTO users (id, email, password_hash, display_name) VALUES ($1, $2, 'x', 'U')",
        )
        .bind(id)
        .bind(format!("{id}@example.com"))
        .execute(pool)
        .await
        .unwrap();
        for n in 0..devices {
            sqlx::query("INSERT INTO devices (id, user_id, platform, push_token) VALUES ($1, $2, 'android', $3)")
                .bind(DeviceId::new())
                .bind(id)
                .bind(format!("token-{id}-{n}"))
                .execute(pool)
                .await
                .unwrap();
        }
        id
    }

    fn notification(user_id: UserId) -> Notification {
        Notification {
            user_id,
            title: "Ada".into(),
            body: "hello".into(),
            data: None,
            collapse_id: None,
            thread_id: None,
            kind: PushKind::Alert,
            localized: None,
            badge: None,
            unread_badge: false,
            message_id: None,
        }
    }

    #[tokio::test]
    async fn a_notify_job_fans_out_once_per_device() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user = user_with_devices(&pool, 3).await;
        let mut conn = pool.pool().acquire().await.unwrap();
        enqueue_notifications(&mut conn, &[notification(user)])
            .await
            .unwrap();

        let lease = Duration::from_secs(30);
        let job = jobs::claim(&pool, JobKind::PushNotify, "w1", lease, 10)
            .await
            .unwrap()
            .pop()
            .unwrap();
        let n: Notification = job.payload().unwrap();
        assert_eq!(fan_out(&pool, job.id, "w1", &n).await.unwrap(), Some(3));
        assert_eq!(
            fan_out(&pool, job.id, "w1", &n).await.unwrap(),
            None,
            "a second fan-out of the same job enqueues nothing"
        );
        let sends = jobs::claim(&pool, JobKind::PushSend, "w1", lease, 10)
            .await
            .unwrap();
        assert_eq!(sends.len(), 3);
        let send: DeviceNotification = sends[0].payload().unwrap();
        assert_eq!(send.notification, n);
        assert_eq!(send.platform, Platform::Android);
        assert_eq!(sends[0].max_attempts, DeviceNotification::MAX_ATTEMPTS);
        assert!(
            sends[0].payload::<Notification>().is_err(),
            "a send job is not read as a notify job"
        );

        assert!(
            remove_dead_token(&pool, send.device_id, &send.push_token)
                .await
                .unwrap()
        );
        assert!(
            !remove_dead_token(&pool, send.device_id, &send.push_token)
                .await
                .unwrap()
        );
    }

    /// Ann, with no device, and Bob, with one, in a conversation Ann created.
    async fn ann_and_bob(pool: &crate::Db) -> (UserId, UserId, mobile_domain::ConversationId) {
        let ann = user_with_devices(pool, 0).await;
        let bob = user_with_devices(pool, 1).await;
        let mut tx = pool.begin().await.unwrap();
        let crate::conversations::CreateConversation::Created(conversation) =
            crate::conversations::create_conversation(&mut tx, ann, &[bob], None)
                .await
                .unwrap()
        else {
            panic!("created");
        };
        tx.commit().await.unwrap();
        (ann, bob, conversation.id)
    }

    /// Posts `text` from `sender`, committed.
    async fn posted(
        pool: &crate::Db,
        conversation: mobile_domain::ConversationId,
        sender: UserId,
        text: &str,
    ) -> MessageId {
        use crate::conversations::{NewMessage, PostMessage, insert_message};
        use mobile_domain::{ClientMsgId, MessageText};
        let mut tx = pool.begin().await.unwrap();
        let PostMessage::Created(message) = insert_message(
            &mut tx,
            &NewMessage {
                conversation_id: conversation,
                sender_id: sender,
                client_msg_id: &ClientMsgId::parse(text).unwrap(),
                body: &MessageText::parse(text).unwrap(),
                media_id: None,
            },
        )
        .await
        .unwrap() else {
            panic!("posted");
        };
        tx.commit().await.unwrap();
        message.id
    }

    /// Its sender edits `message` to `text`, or deletes it (`None`), committed.
    async fn changed(
        pool: &crate::Db,
        conversation: mobile_domain::ConversationId,
        sender: UserId,
        message: MessageId,
        text: Option<&str>,
    ) {
        use crate::conversations::{ChangeMessage, delete_message, edit_message};
        let mut tx = pool.begin().await.unwrap();
        let outcome = match text {
            Some(text) => {
                let text = mobile_domain::MessageText::parse(text).unwrap();
                edit_message(&mut tx, conversation, sender, message, &text).await
            }
            None => delete_message(&mut tx, conversation, sender, message).await,
        };
        assert!(matches!(outcome.unwrap(), ChangeMessage::Changed { .. }));
        tx.commit().await.unwrap();
    }

    /// `notification` enqueued, and fanned out by worker `w1` to its one device.
    async fn fanned_out(pool: &crate::Db, notification: Notification) {
        let mut conn = pool.pool().acquire().await.unwrap();
        enqueue_notifications(&mut conn, &[notification])
            .await
            .unwrap();
        let job = claim_one(pool, JobKind::PushNotify).await;
        let n: Notification = job.payload().unwrap();
        assert_eq!(fan_out(pool, job.id, "w1", &n).await.unwrap(), Some(1));
    }

    /// One job of `kind`, claimed by worker `w1`.
    async fn claim_one(pool: &crate::Db, kind: JobKind) -> jobs::Job {
        jobs::claim(pool, kind, "w1", Duration::from_secs(30), 1)
            .await
            .unwrap()
            .pop()
            .expect("a job to claim")
    }

    async fn queued(pool: &crate::Db, kind: JobKind) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM jobs WHERE kind = $1 AND state = 'queued'")
            .bind(kind)
            .fetch_one(pool)
            .await
            .unwrap()
    }

    /// A message's push: the badge counted as it fans out; not sent once the message is
    /// deleted, whether the deletion finds it queued, taken by a worker, or fanned out.
    #[tokio::test]
    async fn a_message_push_counts_its_badge_late_and_dies_with_its_message() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let (ann, bob, id) = ann_and_bob(&pool).await;
        let push = |message| Notification {
            unread_badge: true,
            message_id: Some(message),
            ..notification(bob)
        };
        let mut conn = pool.pool().acquire().await.unwrap();

        // Queued when its message goes: it goes too.
        let kept = posted(&pool, id, ann, "one").await;
        let gone = posted(&pool, id, ann, "two").await;
        enqueue_notifications(&mut conn, &[push(kept), push(gone)])
            .await
            .unwrap();
        changed(&pool, id, ann, gone, None).await;
        assert_eq!(queued(&pool, JobKind::PushNotify).await, 1);
        let job = claim_one(&pool, JobKind::PushNotify).await;
        let n: Notification = job.payload().unwrap();
        assert_eq!(n.message_id, Some(kept));
        assert_eq!(fan_out(&pool, job.id, "w1", &n).await.unwrap(), Some(1));
        let send: DeviceNotification = claim_one(&pool, JobKind::PushSend).await.payload().unwrap();
        assert_eq!(
            send.notification.badge,
            Some(1),
            "one unread: the deleted message is not counted"
        );

        // Taken by a worker, then deleted: the fan-out sends nothing.
        let taken = posted(&pool, id, ann, "three").await;
        enqueue_notifications(&mut conn, &[push(taken)])
            .await
            .unwrap();
        let job = claim_one(&pool, JobKind::PushNotify).await;
        changed(&pool, id, ann, taken, None).await;
        let n: Notification = job.payload().unwrap();
        assert_eq!(fan_out(&pool, job.id, "w1", &n).await.unwrap(), Some(0));

        // Fanned out, then deleted: the queued sends go.
        let fanned = posted(&pool, id, ann, "four").await;
        fanned_out(&pool, push(fanned)).await;
        assert_eq!(queued(&pool, JobKind::PushSend).await, 1);
        changed(&pool, id, ann, fanned, None).await;
        assert_eq!(queued(&pool, JobKind::PushSend).await, 0);

        // Being sent when it is deleted: that attempt goes, but it is not retried.
        let sending = posted(&pool, id, ann, "five").await;
        fanned_out(&pool, push(sending)).await;
        let send = claim_one(&pool, JobKind::PushSend).await;
        changed(&pool, id, ann, sending, None).await;
        let failed = jobs::fail(&pool, send.id, "w1", "APNs: 503", Duration::ZERO, false);
        assert_eq!(failed.await.unwrap(), jobs::Failed::NotHeld);
        assert_eq!(queued(&pool, JobKind::PushSend).await, 0);
    }

    /// A message's push shows the text as it is when it is sent: an edit reaches it
    /// whether it finds the push queued, taken by a worker, or fanned out.
    #[tokio::test]
    async fn a_message_push_shows_its_text_as_edited() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let (ann, bob, id) = ann_and_bob(&pool).await;
        let push = |message, text: &str| Notification {
            body: preview(text),
            message_id: Some(message),
            ..notification(bob)
        };
        let mut conn = pool.pool().acquire().await.unwrap();
        #[derive(Debug, PartialEq)]
        enum Edited {
            Queued,
            Taken,
            FannedOut,
            /// While a worker sends it: the retry shows the new text.
            Sending,
        }
        // The last edit is longer than a preview: the push shows the new preview.
        let long = "é".repeat(PREVIEW_CHARS + 1);
        let cut = format!("{}…", "é".repeat(PREVIEW_CHARS));
        for (when, text, edit, shown) in [
            (Edited::Queued, "helo", "hello", "hello"),
            (Edited::Taken, "tkaen", "taken", "taken"),
            (Edited::FannedOut, "short", long.as_str(), cut.as_str()),
            (Edited::Sending, "sned", "send", "send"),
        ] {
            let message = posted(&pool, id, ann, text).await;
            enqueue_notifications(&mut conn, &[push(message, text)])
                .await
                .unwrap();
            if when == Edited::Queued {
                changed(&pool, id, ann, message, Some(edit)).await;
            }
            let job = claim_one(&pool, JobKind::PushNotify).await;
            let n: Notification = job.payload().unwrap();
            if when == Edited::Queued {
                assert_eq!(n.body, shown, "the queued job itself is rewritten");
            }
            // Taken by a worker (its payload read), then edited: the fan-out reads it.
            if when == Edited::Taken {
                changed(&pool, id, ann, message, Some(edit)).await;
            }
            assert_eq!(fan_out(&pool, job.id, "w1", &n).await.unwrap(), Some(1));
            if when == Edited::FannedOut {
                changed(&pool, id, ann, message, Some(edit)).await;
            }
            let mut send = claim_one(&pool, JobKind::PushSend).await;
            if when == Edited::Sending {
                changed(&pool, id, ann, message, Some(edit)).await;
                let failed = jobs::fail(&pool, send.id, "w1", "APNs: 429", Duration::ZERO, false);
                assert_eq!(failed.await.unwrap(), jobs::Failed::Retrying);
                send = claim_one(&pool, JobKind::PushSend).await;
            }
            let send: DeviceNotification = send.payload().unwrap();
            assert_eq!(send.notification.body, shown, "{when:?}");
        }
    }

    /// An edit or a deletion finds its message's pushes through an index, not by
    /// reading the whole queue (which is longest when APNs or FCM is down).
    #[tokio::test]
    async fn a_messages_pushes_are_found_by_index() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let mut conn = pool.pool().acquire().await.unwrap();
        sqlx::query("SET enable_seqscan = off")
            .execute(&mut *conn)
            .await
            .unwrap();
        let plan: Vec<String> = sqlx::query_scalar(&format!(
            "EXPLAIN DELETE FROM jobs WHERE {}",
            UNSENT_FOR_MESSAGE.replace("$1", &format!("'{}'", MessageId::new()))
        ))
        .fetch_all(&mut *conn)
        .await
        .unwrap();
        assert!(
            plan.iter()
                .any(|line| line.contains("jobs_push_message_idx")),
            "{plan:#?}"
        );
    }

    #[tokio::test]
    async fn a_reregistered_token_survives_a_stale_dead_token_report() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let user = user_with_devices(&pool, 1).await;
        let (device, old): (DeviceId, String) =
            sqlx::query_as("SELECT id, push_token FROM devices WHERE user_id = $1")
                .bind(user)
                .fetch_one(&pool)
                .await
                .unwrap();
        sqlx::query("UPDATE devices SET push_token = 'fresh' WHERE id = $1")
            .bind(device)
            .execute(&pool)
            .await
            .unwrap();
        assert!(!remove_dead_token(&pool, device, &old).await.unwrap());
    }
}
