//! Domain types for mobile-backend, parsed once at the edge of the system.
//!
//! A value of one of these types is valid by construction: a handler that holds an
//! [`Email`] never has to ask whether it is an email. Parsing returns a
//! [`ValidationError`] whose [`ValidationCode`] is stable, so clients can localise the
//! message.
//!
//! - [`ids`](UserId): one newtype per entity, from the edge to the SQL.
//! - enums stored as text ([`Platform`], [`ApnsEnvironment`], [`MediaStatus`]): one
//!   spelling each, parsed once.
//! - text ([`Email`], [`Password`], [`DisplayName`], [`Title`], [`MessageText`],
//!   [`PushToken`], ...): each rule written once, and published as a pattern by
//!   [`schema`] (feature `openapi`), so the API's document says exactly what the parser
//!   takes.
//!
//! This crate does no I/O and knows nothing of HTTP or Redis; the `sqlx` feature gives
//! the ids and enums their column mapping, nothing more.

mod conversation;
mod device;
mod enums;
mod error;
mod ids;
mod message;
#[cfg(feature = "openapi")]
pub mod schema;
pub mod text;
mod user;

pub use conversation::{ConversationUpdated, MemberAdded, MemberRemoved};
pub use device::{AppVersion, Locale, PushToken};
pub use enums::{
    ApnsEnvironment, ConversationEventKind, JobKind, MediaStatus, Platform, RemovalReason,
    UnknownVariant,
};
pub use error::{ValidationCode, ValidationError};
pub use ids::{ConversationId, DeviceId, JobId, MediaId, MessageId, SessionId, UserId};
pub use message::{ClientMsgId, MessageText, NotificationText, Text, Title};
pub use user::{DisplayName, Email, Password};
