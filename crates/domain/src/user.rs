//! A user's email, password and display name.

use std::fmt;

use crate::ValidationError;

/// An email address, trimmed and lower-cased so that `Ann@Example.com` and
/// `ann@example.com` are one account.
///
/// The check is deliberately modest (one `@`, a dotted domain, no spaces, at most 254
/// bytes as RFC 5321 allows): the only real proof of an address is a mail that arrives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let email = raw.trim().to_lowercase();
        let invalid = |why: &str| ValidationError::new("invalid_email", format!("email {why}"));
        if email.is_empty() {
            return Err(invalid("is empty"));
        }
        if email.len() > 254 {
            return Err(invalid("is longer than 254 bytes"));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains white space"));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(invalid("has no @"));
        };
        if local.is_empty() || local.len() > 64 {
            return Err(invalid("has an empty or over-long local part"));
        }
        if domain.contains('@') {
            return Err(invalid("has more than one @"));
        }
        let labels_ok = domain
            .split('.')
            .all(|label| !label.is_empty() && !label.starts_with('-') && !label.ends_with('-'));
        if !domain.contains('.') || !labels_ok {
            return Err(invalid("has no valid domain"));
        }
        Ok(Self(email))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A new password that meets the policy. Its `Debug` never shows the value.
///
/// The policy follows NIST SP 800-63B: length matters, composition rules do not. At
/// least 10 characters, at most 128 (argon2 would take more, but a cap stops
/// megabyte "passwords" from being a denial of service), and not one of the passwords
/// every credential-stuffing list starts with.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub const MIN_CHARS: usize = 10;
    pub const MAX_CHARS: usize = 128;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let chars = raw.chars().count();
        if chars < Self::MIN_CHARS {
            return Err(ValidationError::new(
                "weak_password",
                format!("password must have at least {} characters", Self::MIN_CHARS),
            ));
        }
        if chars > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "invalid_password",
                format!("password must have at most {} characters", Self::MAX_CHARS),
            ));
        }
        let lowered = raw.to_lowercase();
        let single_char = raw.chars().all(|c| raw.starts_with(c));
        if single_char || COMMON_PASSWORDS.contains(&lowered.as_str()) {
            return Err(ValidationError::new(
                "weak_password",
                "password is too easy to guess",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// The first entries of public breached-password lists that pass the length rule.
const COMMON_PASSWORDS: &[&str] = &[
    "1234567890",
    "12345678910",
    "0987654321",
    "1q2w3e4r5t",
    "qwertyuiop",
    "password12",
    "password123",
    "password1234",
    "iloveyou12",
    "qwerty1234",
    "1qaz2wsx3edc",
    "abcdefghij",
    "letmein123",
    "welcome123",
    "administrator",
];

/// The name other users see: 1 to 64 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let name = raw.trim();
        if name.is_empty() {
            return Err(ValidationError::new(
                "invalid_display_name",
                "display_name must not be empty",
            ));
        }
        if name.chars().count() > Self::MAX_CHARS {
            return Err(ValidationError::new(
                "invalid_display_name",
                format!(
                    "display_name must have at most {} characters",
                    Self::MAX_CHARS
                ),
            ));
        }
        if name.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "invalid_display_name",
                "display_name must not contain control characters",
            ));
        }
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_normalised() {
        let email = Email::parse("  Ann.Lee@Example.COM ").unwrap();
        assert_eq!(email.as_str(), "ann.lee@example.com");
    }

    #[test]
    fn bad_emails_are_refused() {
        for raw in [
            "",
            "ann",
            "ann@",
            "@example.com",
            "ann@example",
            "ann@@example.com",
            "ann@exa mple.com",
            "ann@-example.com",
            "ann@example..com",
        ] {
            let err = Email::parse(raw).unwrap_err();
            assert_eq!(err.code, "invalid_email", "{raw:?} was accepted");
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn password_policy() {
        assert_eq!(Password::parse("short").unwrap_err().code, "weak_password");
        assert_eq!(
            Password::parse("aaaaaaaaaaaa").unwrap_err().code,
            "weak_password"
        );
        assert_eq!(
            Password::parse("Password123").unwrap_err().code,
            "weak_password"
        );
        assert_eq!(
            Password::parse(&"x".repeat(129)).unwrap_err().code,
            "invalid_password"
        );
        assert!(Password::parse("correct horse battery").is_ok());
        // Ten characters, counted as characters, not bytes.
        assert!(Password::parse("ééééééééé").is_err());
        assert!(Password::parse("éééééééééa").is_ok());
    }

    #[test]
    fn password_debug_is_redacted() {
        let password = Password::parse("correct horse battery").unwrap();
        assert!(!format!("{password:?}").contains("horse"));
    }

    #[test]
    fn display_names() {
        assert_eq!(DisplayName::parse("  Ann ").unwrap().as_str(), "Ann");
        assert!(DisplayName::parse("   ").is_err());
        assert!(DisplayName::parse("a\u{0007}b").is_err());
        assert!(DisplayName::parse(&"é".repeat(64)).is_ok());
        assert!(DisplayName::parse(&"é".repeat(65)).is_err());
    }
}
