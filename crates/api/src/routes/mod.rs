//! The REST resources. Each module exposes `router()`; [`crate::app`] merges them.
//! Bodies shared between modules live here.

pub mod auth;
pub mod conversations;
pub mod devices;
pub mod email;
pub mod internal;
pub mod me;
pub mod media;
pub mod members;
pub mod pagination;
pub mod sessions;

use mobile_domain::UserId;
use serde::Serialize;
use time::OffsetDateTime;
use utoipa::ToSchema;

/// A user as the API shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct User {
    pub id: UserId,
    pub email: String,
    /// Whether the address was proven to be the account's: by the link in a mail
    /// (`POST /v1/me/email/verify`), or by Apple or Google.
    pub email_verified: bool,
    pub display_name: String,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub updated_at: OffsetDateTime,
}

impl From<mobile_db::users::User> for User {
    fn from(user: mobile_db::users::User) -> Self {
        Self {
            id: user.id,
            email: user.email,
            email_verified: user.email_verified,
            display_name: user.display_name,
            created_at: user.created_at,
            updated_at: user.updated_at,
        }
    }
}
