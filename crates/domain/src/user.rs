//! A user's email, password and display name.

use std::fmt;

use crate::{
    ValidationCode, ValidationError,
    text::{self, CONTROL, SPACE, WHITE_SPACE},
};

/// An email address, trimmed and lower-cased so that `Ann@Example.com` and
/// `ann@example.com` are one account.
///
/// The check is deliberately modest (one `@`, a local part of 1 to 64 characters, a
/// dotted domain whose labels do not start or end with `-`, no white space or control
/// characters inside, at most 254 characters as sent): the only real proof of an
/// address is a mail that arrives.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Email(String);

impl Email {
    pub const MAX_CHARS: usize = 254;
    pub const MAX_LOCAL_CHARS: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let invalid =
            |why: &str| ValidationError::new(ValidationCode::InvalidEmail, format!("email {why}"));
        if raw.chars().count() > Self::MAX_CHARS {
            return Err(invalid("is longer than 254 characters"));
        }
        let email = raw.trim();
        if email.is_empty() {
            return Err(invalid("is empty"));
        }
        if email.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(invalid("contains white space or control characters"));
        }
        let Some((local, domain)) = email.split_once('@') else {
            return Err(invalid("has no @"));
        };
        if local.is_empty() || local.chars().count() > Self::MAX_LOCAL_CHARS {
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
        Ok(Self(email.to_lowercase()))
    }

    /// The pattern [`Email::parse`] accepts (length: `maxLength` 254).
    pub fn pattern() -> String {
        let not_part = format!("{CONTROL}{SPACE}@");
        let label = format!(r"[^{not_part}.\-](?:[^{not_part}.]*[^{not_part}.\-])?");
        format!(
            r"[{WHITE_SPACE}]*[^{not_part}]{{1,{local}}}@{label}(?:\.{label})+[{WHITE_SPACE}]*",
            local = Self::MAX_LOCAL_CHARS
        )
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
/// megabyte "passwords" from being a denial of service), not one character repeated,
/// and not one of the passwords every credential-stuffing list starts with (compared
/// without regard to ASCII case).
#[derive(Clone, PartialEq, Eq)]
pub struct Password(String);

impl Password {
    pub const MIN_CHARS: usize = 10;
    pub const MAX_CHARS: usize = 128;
    /// What a sign-in may present: longer is refused before any hashing.
    pub const MAX_PRESENTED_CHARS: usize = 1024;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let chars = raw.chars().count();
        if chars < Self::MIN_CHARS {
            return Err(ValidationError::new(
                ValidationCode::WeakPassword,
                format!("password must have at least {} characters", Self::MIN_CHARS),
            ));
        }
        if chars > Self::MAX_CHARS {
            return Err(ValidationError::new(
                ValidationCode::InvalidPassword,
                format!("password must have at most {} characters", Self::MAX_CHARS),
            ));
        }
        let single_char = raw.chars().all(|c| raw.starts_with(c));
        let lowered = raw.to_ascii_lowercase();
        if single_char || COMMON_PASSWORDS.contains(&lowered.as_str()) {
            return Err(ValidationError::new(
                ValidationCode::WeakPassword,
                "password is too easy to guess",
            ));
        }
        Ok(Self(raw.to_owned()))
    }

    /// The pattern of what is not too easy to guess (lengths: `minLength`,
    /// `maxLength`): a negative lookahead over one repeated character and the common
    /// passwords, each letter as `[xX]`.
    pub fn pattern() -> String {
        let common: Vec<String> = COMMON_PASSWORDS
            .iter()
            .map(|password| {
                password
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphabetic() {
                            format!("[{}{}]", c.to_ascii_lowercase(), c.to_ascii_uppercase())
                        } else {
                            c.to_string()
                        }
                    })
                    .collect()
            })
            .collect();
        format!(r"^(?!(?:([\s\S])\1*|{})(?![\s\S]))", common.join("|"))
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

/// The name other users see: one line of 1 to 64 characters as sent, no control
/// characters, not blank; kept trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayName(String);

impl DisplayName {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        text::printable_line(raw, Self::MAX_CHARS)
            .map(|name| Self(name.to_owned()))
            .ok_or_else(|| {
                ValidationError::new(
                    ValidationCode::InvalidDisplayName,
                    format!(
                        "display_name must be 1 to {} printable characters, not blank",
                        Self::MAX_CHARS
                    ),
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
            "ann\0@example.com",
        ] {
            let err = Email::parse(raw).unwrap_err();
            assert_eq!(
                err.code,
                ValidationCode::InvalidEmail,
                "{raw:?} was accepted"
            );
        }
        let long = format!("{}@example.com", "a".repeat(250));
        assert!(Email::parse(&long).is_err());
    }

    #[test]
    fn password_policy() {
        let code = |raw: &str| Password::parse(raw).unwrap_err().code;
        assert_eq!(code("short"), ValidationCode::WeakPassword);
        assert_eq!(code("aaaaaaaaaaaa"), ValidationCode::WeakPassword);
        assert_eq!(code("Password123"), ValidationCode::WeakPassword);
        assert_eq!(code(&"x".repeat(129)), ValidationCode::InvalidPassword);
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

    proptest! {
        #[test]
        fn the_email_pattern_is_the_parser(raw in edgy_string(24), local in "[a-zA-Z0-9.!#$%&'*+/=?^_`{|}~-]{1,12}", domain in "[a-z0-9-]{1,8}(\\.[a-z0-9-]{1,8}){0,2}") {
            let pattern = matcher(&Email::pattern());
            let fits = |s: &str| s.chars().count() <= Email::MAX_CHARS && pattern.is_match(s);
            for candidate in [raw.clone(), format!("{local}@{domain}"), format!(" {local}@{domain}\t"), format!("{raw}@{domain}")] {
                prop_assert_eq!(Email::parse(&candidate).is_ok(), fits(&candidate), "{:?}", candidate);
            }
        }

        #[test]
        fn the_display_name_pattern_is_the_parser(raw in edgy_string(70)) {
            let pattern = matcher(&text::printable_line_pattern());
            let fits = raw.chars().count() <= DisplayName::MAX_CHARS && pattern.is_match(&raw);
            prop_assert_eq!(DisplayName::parse(&raw).is_ok(), fits, "{:?}", raw);
        }
    }

    #[test]
    fn the_password_pattern_names_what_the_parser_calls_weak() {
        // Rust's regex has no lookahead or backreferences: check the pattern's parts.
        let pattern = Password::pattern();
        assert!(pattern.starts_with(r"^(?!(?:([\s\S])\1*|"));
        for common in COMMON_PASSWORDS {
            let letters: String = common
                .chars()
                .map(|c| {
                    if c.is_ascii_alphabetic() {
                        format!("[{}{}]", c, c.to_ascii_uppercase())
                    } else {
                        c.to_string()
                    }
                })
                .collect();
            assert!(pattern.contains(&letters), "{common}");
            let shouting = common.to_ascii_uppercase();
            if shouting.chars().count() >= Password::MIN_CHARS {
                assert!(Password::parse(&shouting).is_err(), "{shouting}");
            }
        }
    }
}
