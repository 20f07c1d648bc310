//! The one error every parser in this crate returns.

/// Why a value from outside was refused.
///
/// `code` is a stable, machine-readable identifier (`invalid_email`, `weak_password`,
/// ...) that clients may branch on; `message` is for humans and may change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub code: &'static str,
    pub message: String,
}

impl ValidationError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
