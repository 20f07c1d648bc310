//! What a phone's app installation registers: the token its platform push service
//! knows it by, its app version and its language.

use crate::{
    Platform, ValidationCode, ValidationError,
    text::{self},
};

/// A device token as issued by APNs or FCM, checked against that platform's format.
///
/// APNs tokens are hexadecimal (32 bytes today; Apple warns the length may grow, so
/// anything from 32 to 100 bytes is taken), stored lower-case. FCM registration
/// tokens are opaque, URL-safe text of a few hundred characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PushToken(String);

impl PushToken {
    /// APNs: 32 to 100 bytes, as hexadecimal digits.
    pub const APNS_BYTES: (usize, usize) = (32, 100);
    /// FCM: 16 to 4096 characters.
    pub const FCM_CHARS: (usize, usize) = (16, 4096);

    pub fn parse(platform: Platform, raw: &str) -> Result<Self, ValidationError> {
        let invalid = |why: &str| ValidationError::new(ValidationCode::InvalidPushToken, why);
        match platform {
            Platform::Ios => {
                let (min, max) = Self::APNS_BYTES;
                if !(2 * min..=2 * max).contains(&raw.len()) || !raw.len().is_multiple_of(2) {
                    return Err(invalid(
                        "an APNs token is 64 to 200 hexadecimal digits, an even number of them",
                    ));
                }
                if !raw.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid("an APNs token is hexadecimal"));
                }
                Ok(Self(raw.to_ascii_lowercase()))
            }
            Platform::Android => {
                let (min, max) = Self::FCM_CHARS;
                if !(min..=max).contains(&raw.len()) {
                    return Err(invalid("an FCM token is 16 to 4096 characters"));
                }
                if !raw.bytes().all(is_fcm_byte) {
                    return Err(invalid("an FCM token has only letters, digits and -_:."));
                }
                Ok(Self(raw.to_owned()))
            }
        }
    }

    /// The pattern of a token of `platform` (lengths included).
    pub fn pattern(platform: Platform) -> String {
        match platform {
            Platform::Ios => {
                let (min, max) = Self::APNS_BYTES;
                format!("(?:[0-9A-Fa-f]{{2}}){{{min},{max}}}")
            }
            Platform::Android => {
                let (min, max) = Self::FCM_CHARS;
                format!(r"[A-Za-z0-9_:.\-]{{{min},{max}}}")
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_fcm_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-_:.".contains(&b)
}

/// The app's version string as the app reports it (`2.14.0 (311)`): one printable
/// line of at most 64 characters, kept trimmed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppVersion(String);

impl AppVersion {
    pub const MAX_CHARS: usize = 64;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        text::printable_line(raw, Self::MAX_CHARS)
            .map(|version| Self(version.to_owned()))
            .ok_or_else(|| {
                ValidationError::new(
                    ValidationCode::InvalidAppVersion,
                    "app_version must be 1 to 64 printable characters, not blank",
                )
            })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A BCP 47 language tag (`en`, `pt-BR`, `zh-Hant-TW`), used to localise pushes.
/// Checked for shape (a primary tag of 2 to 8 letters, then subtags of 1 to 8 letters
/// or digits, joined by `-` or `_`; at most 35 characters), not against the IANA
/// registry. Stored with `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locale(String);

impl Locale {
    pub const MAX_CHARS: usize = 35;

    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let mut subtags = raw.split(['-', '_']);
        let primary_ok = subtags.next().is_some_and(|s| {
            (2..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphabetic())
        });
        let rest_ok = subtags
            .all(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()));
        if !primary_ok || !rest_ok || raw.len() > Self::MAX_CHARS {
            return Err(ValidationError::new(
                ValidationCode::InvalidLocale,
                "locale must be a BCP 47 language tag such as \"en\" or \"pt-BR\"",
            ));
        }
        Ok(Self(raw.replace('_', "-")))
    }

    /// The pattern of [`Locale::parse`] (length: `maxLength`).
    pub fn pattern() -> &'static str {
        "[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*"
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
    fn apns_tokens() {
        let hex = "A1".repeat(32);
        assert_eq!(
            PushToken::parse(Platform::Ios, &hex).unwrap().as_str(),
            "a1".repeat(32)
        );
        assert!(PushToken::parse(Platform::Ios, "abc").is_err());
        assert!(PushToken::parse(Platform::Ios, &"zz".repeat(32)).is_err());
        assert!(PushToken::parse(Platform::Ios, &"a".repeat(65)).is_err());
    }

    #[test]
    fn fcm_tokens() {
        let token = "dQw4w9WgXcQ:APA91bH-example_token.value";
        assert!(PushToken::parse(Platform::Android, token).is_ok());
        assert!(PushToken::parse(Platform::Android, "short").is_err());
        assert!(PushToken::parse(Platform::Android, "has spaces in the token here").is_err());
    }

    #[test]
    fn locales_and_versions() {
        assert_eq!(Locale::parse("pt_BR").unwrap().as_str(), "pt-BR");
        assert!(Locale::parse("zh-Hant-TW").is_ok());
        assert!(Locale::parse("e").is_err());
        assert!(Locale::parse("en--US").is_err());
        assert!(AppVersion::parse("2.14.0 (311)").is_ok());
        assert!(AppVersion::parse("").is_err());
    }

    proptest! {
        #[test]
        fn the_push_token_patterns_are_the_parser(raw in edgy_string(8), hex in "[0-9a-fA-F]{60,70}", fcm in "[A-Za-z0-9_:.-]{10,20}") {
            for platform in [Platform::Ios, Platform::Android] {
                let pattern = matcher(&PushToken::pattern(platform));
                for candidate in [&raw, &hex, &fcm] {
                    prop_assert_eq!(
                        PushToken::parse(platform, candidate).is_ok(),
                        pattern.is_match(candidate),
                        "{:?} {:?}", platform, candidate
                    );
                }
            }
        }

        #[test]
        fn the_locale_and_version_patterns_are_the_parsers(raw in edgy_string(12), tag in "[a-zA-Z]{1,9}([-_][a-zA-Z0-9]{0,9}){0,3}") {
            let locale = matcher(Locale::pattern());
            for candidate in [&raw, &tag] {
                let fits = candidate.chars().count() <= Locale::MAX_CHARS && locale.is_match(candidate);
                prop_assert_eq!(Locale::parse(candidate).is_ok(), fits, "{:?}", candidate);
            }
            let version = matcher(&text::printable_line_pattern());
            let fits = raw.chars().count() <= AppVersion::MAX_CHARS && version.is_match(&raw);
            prop_assert_eq!(AppVersion::parse(&raw).is_ok(), fits, "{:?}", raw);
        }
    }
}
