//! What a message, a conversation and a notification carry from the client.

use crate::{ValidationCode, ValidationError, text};

/// The client's own id for a message (a UUID, usually): 1 to 128 printable ASCII
/// characters. Retrying with the same one is how a client avoids duplicates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    pub const MAX_CHARS: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if !(1..=Self::MAX_CHARS).contains(&raw.len()) || !raw.bytes().all(|b| b.is_ascii_graphic())
        {
            return Err(ValidationError::new(
                ValidationCode::InvalidClientMsgId,
                "client_msg_id must be 1 to 128 printable ASCII characters",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The pattern of [`ClientMsgId::parse`] (lengths: `minLength`, `maxLength`).
    pub fn pattern() -> &'static str {
        r"[!-~]+"
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Free text a user writes (a message's body, a notification's body): not blank, at
/// most `MAX` characters, no NUL (which PostgreSQL cannot store); kept exactly as sent,
/// new lines included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Text<const MAX: usize>(String);

/// A message's text: a long chat message, not a document.
pub type MessageText = Text<4000>;
/// A push notification's body: what a lock screen shows, and then some.
pub type NotificationText = Text<1000>;

impl<const MAX: usize> Text<MAX> {
    pub const MAX_CHARS: usize = MAX;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        if raw.chars().count() > MAX || !text::is_free_text(raw) {
            return Err(ValidationError::new(
                ValidationCode::InvalidBody,
                format!("body must be 1 to {MAX} characters, not blank, without NUL"),
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A title (a conversation's, a notification's): one printable line of at most 200
/// characters, kept trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Title(String);

impl Title {
    pub const MAX_CHARS: usize = 200;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        text::printable_line(raw, Self::MAX_CHARS)
            .map(|title| Self(title.to_owned()))
            .ok_or_else(|| {
                ValidationError::new(
                    ValidationCode::InvalidTitle,
                    "title must be 1 to 200 printable characters, not blank",
                )
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::text::tests::{edgy_string, matcher};

    #[test]
    fn message_fields() {
        assert!(ClientMsgId::parse("0193a-local-7").is_ok());
        assert!(ClientMsgId::parse("").is_err());
        assert!(ClientMsgId::parse("has space").is_err());
        assert!(ClientMsgId::parse(&"x".repeat(129)).is_err());
        assert_eq!(MessageText::parse("  hi  ").unwrap().as_str(), "  hi  ");
        assert!(MessageText::parse(" \n ").is_err());
        assert!(MessageText::parse("a\0b").is_err());
        assert!(MessageText::parse("line one\nline two").is_ok());
        assert!(MessageText::parse(&"é".repeat(4000)).is_ok());
        assert!(MessageText::parse(&"é".repeat(4001)).is_err());
        assert!(NotificationText::parse(&"é".repeat(1001)).is_err());
        assert_eq!(Title::parse(" Team ").unwrap().as_str(), "Team");
        assert!(Title::parse("").is_err());
    }

    proptest! {
        #[test]
        fn the_text_patterns_are_the_parsers(raw in edgy_string(12)) {
            let free = matcher(&text::free_text_pattern());
            prop_assert_eq!(MessageText::parse(&raw).is_ok(), free.is_match(&raw), "{:?}", raw);
            let id = matcher(ClientMsgId::pattern());
            prop_assert_eq!(ClientMsgId::parse(&raw).is_ok(), id.is_match(&raw), "{:?}", raw);
            let line = matcher(&text::printable_line_pattern());
            prop_assert_eq!(Title::parse(&raw).is_ok(), line.is_match(&raw), "{:?}", raw);
        }
    }
}
