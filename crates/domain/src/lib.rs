//! Domain types for mobile-backend, parsed once at the edge of the system.
//!
//! A value of one of these types is valid by construction: a handler that holds an
//! [`Email`] never has to ask whether it is an email. Parsing returns a
//! [`ValidationError`] whose `code` is stable, so clients can localise the message.
//! This crate does no I/O and knows nothing of HTTP, SQL or Redis.

mod device;
mod error;
mod ids;
mod message;
mod user;

pub use device::{ApnsEnvironment, AppVersion, DeviceId, Locale, Platform, PushToken};
pub use error::ValidationError;
pub use ids::{SessionId, UserId};
pub use message::{ClientMsgId, MessageText, Title};
pub use user::{DisplayName, Email, Password};
