//! The one error every parser in this crate returns, and its codes.

use std::fmt;

/// Why a value from outside was refused: the stable, machine-readable part. Clients
/// may branch on [`ValidationCode::as_str`]; the API answers each with 422.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ValidationCode {
    InvalidEmail,
    WeakPassword,
    InvalidPassword,
    InvalidDisplayName,
    InvalidPlatform,
    InvalidApnsEnvironment,
    InvalidPushToken,
    InvalidAppVersion,
    InvalidLocale,
    InvalidClientMsgId,
    InvalidBody,
    InvalidTitle,
}

impl ValidationCode {
    /// Every code, for the OpenAPI document.
    pub const ALL: [Self; 12] = [
        Self::InvalidEmail,
        Self::WeakPassword,
        Self::InvalidPassword,
        Self::InvalidDisplayName,
        Self::InvalidPlatform,
        Self::InvalidApnsEnvironment,
        Self::InvalidPushToken,
        Self::InvalidAppVersion,
        Self::InvalidLocale,
        Self::InvalidClientMsgId,
        Self::InvalidBody,
        Self::InvalidTitle,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::InvalidEmail => "invalid_email",
            Self::WeakPassword => "weak_password",
            Self::InvalidPassword => "invalid_password",
            Self::InvalidDisplayName => "invalid_display_name",
            Self::InvalidPlatform => "invalid_platform",
            Self::InvalidApnsEnvironment => "invalid_apns_environment",
            Self::InvalidPushToken => "invalid_push_token",
            Self::InvalidAppVersion => "invalid_app_version",
            Self::InvalidLocale => "invalid_locale",
            Self::InvalidClientMsgId => "invalid_client_msg_id",
            Self::InvalidBody => "invalid_body",
            Self::InvalidTitle => "invalid_title",
        }
    }

    /// What the code means, for the API's documentation.
    pub const fn meaning(self) -> &'static str {
        match self {
            Self::InvalidEmail => "the email address is malformed",
            Self::WeakPassword => "the password is too short or too easy to guess",
            Self::InvalidPassword => "the password is too long",
            Self::InvalidDisplayName => {
                "the display name is blank, too long or has control characters"
            }
            Self::InvalidPlatform => "the platform is neither `ios` nor `android`",
            Self::InvalidApnsEnvironment => {
                "the APNs environment is unknown, or given for a non-iOS device"
            }
            Self::InvalidPushToken => "the push token does not have its platform's format",
            Self::InvalidAppVersion => {
                "the app version is blank, too long or has control characters"
            }
            Self::InvalidLocale => "the locale is not a BCP 47 language tag",
            Self::InvalidClientMsgId => {
                "the client_msg_id is not 1 to 128 printable ASCII characters"
            }
            Self::InvalidBody => "the text is blank, too long or contains NUL",
            Self::InvalidTitle => "the title is blank, too long or has control characters",
        }
    }
}

impl fmt::Display for ValidationCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A value from outside that was refused: the stable `code` and a message for humans
/// (which may change between versions).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ValidationError {
    pub code: ValidationCode,
    pub message: String,
}

impl ValidationError {
    pub fn new(code: ValidationCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}
