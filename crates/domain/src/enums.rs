//! Closed sets of values that are stored as text and sent as JSON strings: each is
//! parsed once, where it enters (a request body, a row, a job payload), and matched as
//! an enum everywhere after.

use std::fmt;

use crate::{ValidationCode, ValidationError};

/// A string that is none of an enum's spellings.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} must be one of {expected}")]
pub struct UnknownVariant {
    pub what: &'static str,
    pub expected: String,
}

impl UnknownVariant {
    fn new(what: &'static str, all: impl Iterator<Item = &'static str>) -> Self {
        let expected: Vec<String> = all.map(|v| format!("{v:?}")).collect();
        Self {
            what,
            expected: expected.join(", "),
        }
    }
}

/// Declares an enum whose variants have one spelling each: `as_str`, `FromStr`, serde
/// as that string, and, behind features, a `text` column mapping and an OpenAPI
/// string enum. With `code = ...`, also `parse`, which refuses with that validation
/// code (for values a client sends).
macro_rules! text_enum {
    (
        $(#[$doc:meta])*
        $name:ident $(, code = $code:expr)?, $what:literal {
            $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)?
        }
    ) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),+
        }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub const fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownVariant;

            fn from_str(raw: &str) -> Result<Self, Self::Err> {
                match raw {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownVariant::new($what, Self::ALL.iter().map(|v| v.as_str()))),
                }
            }
        }

        $(
            impl $name {
                /// Parses a client's value; refuses with this type's validation code.
                pub fn parse(raw: &str) -> Result<Self, ValidationError> {
                    raw.parse().map_err(|e: UnknownVariant| ValidationError::new($code, e.to_string()))
                }
            }
        )?

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
                raw.parse().map_err(serde::de::Error::custom)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Type<sqlx::Postgres> for $name {
            fn type_info() -> sqlx::postgres::PgTypeInfo {
                <&str as sqlx::Type<sqlx::Postgres>>::type_info()
            }

            fn compatible(ty: &sqlx::postgres::PgTypeInfo) -> bool {
                <&str as sqlx::Type<sqlx::Postgres>>::compatible(ty)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Encode<'_, sqlx::Postgres> for $name {
            fn encode_by_ref(
                &self,
                buf: &mut sqlx::postgres::PgArgumentBuffer,
            ) -> Result<sqlx::encode::IsNull, sqlx::error::BoxDynError> {
                <&str as sqlx::Encode<sqlx::Postgres>>::encode_by_ref(&self.as_str(), buf)
            }
        }

        #[cfg(feature = "sqlx")]
        impl sqlx::Decode<'_, sqlx::Postgres> for $name {
            fn decode(value: sqlx::postgres::PgValueRef<'_>) -> Result<Self, sqlx::error::BoxDynError> {
                let raw = <&str as sqlx::Decode<sqlx::Postgres>>::decode(value)?;
                Ok(raw.parse()?)
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                crate::schema::string_enum($what, Self::ALL.iter().map(|v| v.as_str()))
            }
        }

        #[cfg(feature = "openapi")]
        impl utoipa::ToSchema for $name {}
    };
}

text_enum!(
    /// The push platform a device is reached through.
    Platform, code = ValidationCode::InvalidPlatform, "platform" {
        /// Apple Push Notification service.
        Ios => "ios",
        /// Firebase Cloud Messaging.
        Android => "android",
    }
);

text_enum!(
    /// Which APNs environment issued an iOS token: development builds get sandbox
    /// tokens, which production APNs rejects as `BadDeviceToken`.
    ApnsEnvironment, code = ValidationCode::InvalidApnsEnvironment, "apns_environment" {
        Production => "production",
        Sandbox => "sandbox",
    }
);

text_enum!(
    /// Where an uploaded image is in its processing.
    MediaStatus, "status" {
        /// Stored; the worker has not rendered the variants yet.
        Processing => "processing",
        /// The variants exist.
        Ready => "ready",
        /// The image could not be processed (`failure_reason` says why).
        Failed => "failed",
    }
);

text_enum!(
    /// A kind of background job: which handler runs it and what its payload is.
    JobKind, "kind" {
        /// Render an upload's variants.
        MediaProcess => "media.process",
        /// Remove an upload's objects from storage (its row is gone).
        MediaDelete => "media.delete",
        /// Remove what Redis holds under a deleted account's id.
        AccountForget => "account.forget",
        /// Tell a user: one `push.send` per device.
        PushNotify => "push.notify",
        /// Send one notification to one device.
        PushSend => "push.send",
        /// Send one mail (a verification link, a reset link, a notice).
        MailSend => "mail.send",
    }
);

text_enum!(
    /// What changed in a conversation: the `event` of a frame on a `conversation:`
    /// channel, each at its own offset.
    ConversationEventKind, "event" {
        /// A message was posted; its `seq` is the offset.
        MessageCreated => "message.created",
        /// Its sender edited a message's body.
        MessageUpdated => "message.updated",
        /// Its sender deleted a message: a tombstone stays at its offset.
        MessageDeleted => "message.deleted",
        /// Members joined (added by the owner).
        MemberAdded => "member.added",
        /// A member left, was removed by the owner, or deleted their account.
        MemberRemoved => "member.removed",
        /// The title changed.
        ConversationUpdated => "conversation.updated",
    }
);

text_enum!(
    /// Why a member is no longer in a conversation.
    RemovalReason, "reason" {
        /// The owner removed them.
        Removed => "removed",
        /// They left.
        Left => "left",
        /// They deleted their account.
        AccountDeleted => "account_deleted",
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_spelling_each() {
        assert_eq!(Platform::parse("ios").unwrap(), Platform::Ios);
        assert_eq!(
            Platform::parse("iOS").unwrap_err().code,
            ValidationCode::InvalidPlatform
        );
        assert!("done".parse::<MediaStatus>().is_err());
        assert_eq!(
            serde_json::to_string(&ApnsEnvironment::Sandbox).unwrap(),
            "\"sandbox\""
        );
        assert_eq!(
            serde_json::from_str::<MediaStatus>("\"ready\"").unwrap(),
            MediaStatus::Ready
        );
        assert!(serde_json::from_str::<MediaStatus>("\"done\"").is_err());
    }
}
