//! Devices: the app installations a user receives pushes on.

use crate::Db;
use crate::metrics::timed;
use mobile_domain::{
    ApnsEnvironment, AppVersion, DeviceId, Locale, Platform, PushToken, SessionId, UserId,
};
use sqlx::PgExecutor;
use time::OffsetDateTime;

/// A device as stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Device {
    pub id: DeviceId,
    pub user_id: UserId,
    pub platform: Platform,
    pub push_token: String,
    pub app_version: Option<String>,
    pub locale: Option<String>,
    pub apns_environment: Option<ApnsEnvironment>,
    pub created_at: OffsetDateTime,
    pub updated_at: OffsetDateTime,
}

/// What a `PUT /v1/devices/{id}` registers.
#[derive(Debug, Clone)]
pub struct DeviceRegistration {
    pub id: DeviceId,
    pub platform: Platform,
    pub push_token: PushToken,
    pub app_version: Option<AppVersion>,
    pub locale: Option<Locale>,
    pub apns_environment: Option<ApnsEnvironment>,
}

/// Whether [`upsert_device`] created the row or updated it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Upsert {
    Created,
    Updated,
}

/// Registers a device for `user_id`, idempotently; `None` (and nothing changed) if the
/// installation id is another user's, or `session_id` has ended (its access token is
/// still unexpired: a device registered now would outlive the session's end), or the
/// account was deleted (which deletes its sessions).
///
/// The row is keyed by the app's installation id, and an id stays with the account
/// that registered it: another account presenting it cannot move it (or learn more
/// than that it is not theirs). An app signing out deletes its device; one that did
/// not, and finds its id refused after a new sign-in, registers under a new id. A push
/// token names one installation, so any other row holding the same token is stale and
/// goes, in the same transaction: that is what moves a phone from one account to the
/// next.
///
/// The device is tied to `session_id`, the session registering it; ending that session
/// removes it (see `crate::sessions`).
pub async fn upsert_device(
    db: &Db,
    user_id: UserId,
    session_id: SessionId,
    device: &DeviceRegistration,
) -> Result<Option<(Device, Upsert)>, sqlx::Error> {
    timed("devices.upsert_device", async move {
        let mut tx = db.begin().await?;
        sqlx::query("DELETE FROM devices WHERE platform = $1 AND push_token = $2 AND id <> $3")
            .bind(device.platform)
            .bind(device.push_token.as_str())
            .bind(device.id)
            .execute(&mut *tx)
            .await?;
        // `xmax = 0` holds only for a row this statement inserted, not one it updated.
        let (inserted, row): (bool, Device) = {
            let row = sqlx::query_as::<_, DeviceWithFlag>(
                "INSERT INTO devices (id, user_id, platform, push_token, app_version, locale, apns_environment, session_id)
                 SELECT $1, $2, $3, $4, $5, $6, $7, $8
                 WHERE EXISTS (SELECT 1 FROM sessions
                               WHERE id = $8 AND user_id = $2 AND revoked_at IS NULL
                               FOR SHARE)
                 ON CONFLICT (id) DO UPDATE SET
                     user_id = EXCLUDED.user_id,
                     session_id = EXCLUDED.session_id,
                     platform = EXCLUDED.platform,
                     push_token = EXCLUDED.push_token,
                     app_version = EXCLUDED.app_version,
                     locale = EXCLUDED.locale,
                     apns_environment = EXCLUDED.apns_environment,
                     updated_at = now()
                 WHERE devices.user_id = EXCLUDED.user_id
                 RETURNING (xmax = 0) AS inserted, id, user_id, platform, push_token, app_version,
                           locale, apns_environment, created_at, updated_at",
            )
            .bind(device.id)
            .bind(user_id)
            .bind(device.platform)
            .bind(device.push_token.as_str())
            .bind(device.app_version.as_ref().map(AppVersion::as_str))
            .bind(device.locale.as_ref().map(Locale::as_str))
            .bind(device.apns_environment)
            .bind(session_id)
            .fetch_optional(&mut *tx)
            .await?;
            // No row: the id is another user's, or the session ended (the account may
            // be deleted). Dropping `tx` undoes the token clean-up.
            let Some(row) = row else {
                return Ok(None);
            };
            (row.inserted, row.device)
        };
        tx.commit().await?;
        let outcome = if inserted {
            Upsert::Created
        } else {
            Upsert::Updated
        };
        Ok(Some((row, outcome)))
    })
    .await
}

#[derive(sqlx::FromRow)]
struct DeviceWithFlag {
    inserted: bool,
    #[sqlx(flatten)]
    device: Device,
}

/// One page of a user's devices in id order, starting after `after`.
pub async fn list_devices(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    after: Option<DeviceId>,
    limit: i64,
) -> Result<Vec<Device>, sqlx::Error> {
    timed("devices.list_devices", async move {
        sqlx::query_as(
            "SELECT id, user_id, platform, push_token, app_version, locale, apns_environment,
                    created_at, updated_at
             FROM devices
             WHERE user_id = $1 AND ($2::uuid IS NULL OR id > $2)
             ORDER BY id
             LIMIT $3",
        )
        .bind(user_id)
        .bind(after)
        .bind(limit)
        .fetch_all(db)
        .await
    })
    .await
}

/// Deletes a user's device; another user's device counts as not found.
pub async fn delete_device(
    db: impl PgExecutor<'_>,
    user_id: UserId,
    id: DeviceId,
) -> Result<bool, sqlx::Error> {
    timed("devices.delete_device", async move {
        let result = sqlx::query("DELETE FROM devices WHERE id = $1 AND user_id = $2")
            .bind(id)
            .bind(user_id)
            .execute(db)
            .await?;
        Ok(result.rows_affected() == 1)
    })
    .await
}

#[cfg(test)]
mod tests {
    use mobile_domain::{DisplayName, Email};

    use super::*;
    use crate::users::{InsertUser, insert_user};

    /// A user and a session of theirs, whose refresh token hashes to `[token; 32]`.
    async fn user(pool: &crate::Db, email: &str, token: u8) -> (UserId, SessionId) {
        let email = Email::parse(email).unwrap();
        let name = DisplayName::parse("Someone").unwrap();
        let id = match insert_user(pool, &email, "hash", &name).await.unwrap() {
            InsertUser::Inserted(user) => user.id,
            InsertUser::EmailTaken => unreachable!(),
        };
        let mut conn = pool.pool().acquire().await.unwrap();
        let later = OffsetDateTime::now_utc() + time::Duration::days(1);
        let session = crate::sessions::create_session(&mut conn, id, &[token; 32], later, None)
            .await
            .unwrap()
            .unwrap();
        (id, session)
    }

    fn registration(id: DeviceId, token: &str) -> DeviceRegistration {
        DeviceRegistration {
            id,
            platform: Platform::Ios,
            push_token: PushToken::parse(Platform::Ios, token).unwrap(),
            app_version: Some(AppVersion::parse("1.0").unwrap()),
            locale: None,
            apns_environment: Some(ApnsEnvironment::Sandbox),
        }
    }

    #[tokio::test]
    async fn upsert_is_idempotent_and_an_id_stays_with_its_user() {
        let db = mobile_testkit::TestDb::new().await;
        let pool = crate::Db::from(db.pool().await);
        let (ann, anns_session) = user(&pool, "ann@example.com", 1).await;
        let (bob, bobs_session) = user(&pool, "bob@example.com", 2).await;
        let id = DeviceId::new();
        let token = "ab".repeat(32);

        let (first, outcome) = upsert_device(&pool, ann, anns_session, &registration(id, &token))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome, Upsert::Created);
        let (again, outcome) = upsert_device(&pool, ann, anns_session, &registration(id, &token))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(outcome, Upsert::Updated);
        assert_eq!(again.created_at, first.created_at);

        // Bob presents Ann's installation id (and a token of his): refused, and
        // nothing of Ann's moved or went.
        let bobs_token = "cd".repeat(32);
        assert!(
            upsert_device(&pool, bob, bobs_session, &registration(id, &bobs_token))
                .await
                .unwrap()
                .is_none()
        );
        let anns = list_devices(&pool, ann, None, 10).await.unwrap();
        assert_eq!(anns.len(), 1);
        assert_eq!(anns[0].push_token, token);
        assert!(list_devices(&pool, bob, None, 10).await.unwrap().is_empty());

        // Bob signs in on Ann's phone without her signing out: a new id, the same
        // token, which moves the phone to him. A reinstall looks the same: a new id,
        // the token APNs hands out again; the stale row goes.
        let reinstall = DeviceId::new();
        upsert_device(&pool, bob, bobs_session, &registration(reinstall, &token))
            .await
            .unwrap()
            .unwrap();
        assert!(list_devices(&pool, ann, None, 10).await.unwrap().is_empty());
        let devices = list_devices(&pool, bob, None, 10).await.unwrap();
        assert_eq!(
            devices.iter().map(|d| d.id).collect::<Vec<_>>(),
            vec![reinstall]
        );

        assert!(!delete_device(&pool, ann, reinstall).await.unwrap());
        assert!(delete_device(&pool, bob, reinstall).await.unwrap());
    }
}
