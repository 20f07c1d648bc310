//! A phone's app installation and the token its platform push service knows it by.

use std::{fmt, str::FromStr};

use uuid::Uuid;

use crate::ValidationError;

/// The app installation's own identifier, generated once by the app and kept in its
/// storage, so re-registering after a reinstall or a token change updates one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceId(Uuid);

impl DeviceId {
    pub const fn from_uuid(id: Uuid) -> Self {
        Self(id)
    }

    pub const fn as_uuid(&self) -> Uuid {
        self.0
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The push platform a device is reached through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Platform {
    /// Apple Push Notification service.
    Ios,
    /// Firebase Cloud Messaging.
    Android,
}

impl Platform {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Ios => "ios",
            Self::Android => "android",
        }
    }
}

impl FromStr for Platform {
    type Err = ValidationError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "ios" => Ok(Self::Ios),
            "android" => Ok(Self::Android),
            _ => Err(ValidationError::new(
                "invalid_platform",
                "platform must be \"ios\" or \"android\"",
            )),
        }
    }
}

/// Which APNs environment issued an iOS token: development builds get sandbox tokens,
/// which production APNs rejects as `BadDeviceToken`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ApnsEnvironment {
    Production,
    Sandbox,
}

impl ApnsEnvironment {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Production => "production",
            Self::Sandbox => "sandbox",
        }
    }
}

impl FromStr for ApnsEnvironment {
    type Err = ValidationError;

    fn from_str(raw: &str) -> Result<Self, Self::Err> {
        match raw {
            "production" => Ok(Self::Production),
            "sandbox" => Ok(Self::Sandbox),
            _ => Err(ValidationError::new(
                "invalid_apns_environment",
                "apns_environment must be \"production\" or \"sandbox\"",
            )),
        }
    }
}

/// A device token as issued by APNs or FCM, checked against that platform's format.
///
/// APNs tokens are hexadecimal (32 bytes today; Apple warns the length may grow, so
/// anything from 32 to 100 bytes is taken). FCM registration tokens are opaque,
/// URL-safe text of a few hundred characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PushToken(String);

impl PushToken {
    pub fn parse(platform: Platform, raw: &str) -> Result<Self, ValidationError> {
        let invalid = |why: &str| ValidationError::new("invalid_push_token", why.to_owned());
        match platform {
            Platform::Ios => {
                let token = raw.to_ascii_lowercase();
                if !(64..=200).contains(&token.len()) || !token.len().is_multiple_of(2) {
                    return Err(invalid("an APNs token is 64 to 200 hexadecimal digits"));
                }
                if !token.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(invalid("an APNs token is hexadecimal"));
                }
                Ok(Self(token))
            }
            Platform::Android => {
                if !(16..=4096).contains(&raw.len()) {
                    return Err(invalid("an FCM token is 16 to 4096 characters"));
                }
                let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-_:.".contains(&b);
                if !raw.bytes().all(allowed) {
                    return Err(invalid("an FCM token has only letters, digits and -_:."));
                }
                Ok(Self(raw.to_owned()))
            }
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The app's version string as the app reports it (`2.14.0 (311)`): free text, short.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppVersion(String);

impl AppVersion {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let version = raw.trim();
        if version.is_empty() || version.len() > 64 || version.chars().any(char::is_control) {
            return Err(ValidationError::new(
                "invalid_app_version",
                "app_version must be 1 to 64 printable characters",
            ));
        }
        Ok(Self(version.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A BCP 47 language tag (`en`, `pt-BR`, `zh-Hant-TW`), used to localise pushes.
/// Checked for shape (alphanumeric subtags of 1 to 8, joined by `-` or `_`), not
/// against the IANA registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locale(String);

impl Locale {
    pub fn parse(raw: &str) -> Result<Self, ValidationError> {
        let tag = raw.trim().replace('_', "-");
        let mut subtags = tag.split('-');
        let primary_ok = subtags.next().is_some_and(|s| {
            (2..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphabetic())
        });
        let rest_ok = subtags
            .all(|s| (1..=8).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_alphanumeric()));
        if !primary_ok || !rest_ok || tag.len() > 35 {
            return Err(ValidationError::new(
                "invalid_locale",
                "locale must be a BCP 47 language tag such as \"en\" or \"pt-BR\"",
            ));
        }
        Ok(Self(tag))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn platforms_and_locales() {
        assert_eq!("ios".parse::<Platform>().unwrap(), Platform::Ios);
        assert!("iOS".parse::<Platform>().is_err());
        assert_eq!(Locale::parse("pt_BR").unwrap().as_str(), "pt-BR");
        assert!(Locale::parse("zh-Hant-TW").is_ok());
        assert!(Locale::parse("e").is_err());
        assert!(Locale::parse("en--US").is_err());
        assert!(AppVersion::parse("2.14.0 (311)").is_ok());
        assert!(AppVersion::parse("").is_err());
    }
}
