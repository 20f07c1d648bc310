//! Ed25519 keys for access tokens.
//!
//! The API signs with one private key (`JWT_SIGNING_KEY_FILE`, PKCS#8 PEM); the API and
//! the gateway verify with any of a set of public keys (`JWT_VERIFY_KEYS_FILE`, one or
//! more SPKI PEMs in one file). Each key is named by its RFC 7638 JWK thumbprint, which
//! goes into the token's `kid` header: no key ids to keep in step by hand.
//!
//! Rotation: publish the new public key in every verifier's file, roll out, switch the
//! signing key, roll out, and drop the old public key once the last token signed with
//! it has expired (15 minutes later).
//!
//! A binary loads its keys once, through [`TokenConfig`]: the API as an issuer, the
//! gateway as a verifier.

use std::{
    collections::HashMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey};
use jsonwebtoken::{DecodingKey, EncodingKey};
use sha2::{Digest, Sha256};

use crate::AccessTokens;

/// The development signing key: publicly known, so any token it signs is forgeable.
/// Used only when `APP_ENV=development` and no key file is configured, with a warning.
pub const DEVELOPMENT_SIGNING_KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----
MC4CAQAwBQYDK2VwBCIEIFk9qi9ytz/QteLB66mfkcj8ngRbIS7XSy/AYe1Z7I4A
-----END PRIVATE KEY-----
";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{what} is not an Ed25519 {format} PEM: {reason}")]
    Parse {
        what: String,
        format: &'static str,
        reason: String,
    },
    #[error("{0} holds no public key")]
    Empty(String),
    #[error(
        "{0} is required (only APP_ENV=development may fall back to the published development key)"
    )]
    Missing(&'static str),
}

/// Where a binary's access-token keys come from and what its tokens say: the `JWT_*`
/// settings.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// `JWT_SIGNING_KEY_FILE`: Ed25519 PKCS#8 PEM (issuers only).
    pub signing_key_file: Option<PathBuf>,
    /// `JWT_VERIFY_KEYS_FILE`: one or more SPKI PEMs.
    pub verify_keys_file: Option<PathBuf>,
    /// `JWT_ISSUER`.
    pub issuer: String,
    /// `JWT_AUDIENCE`.
    pub audience: String,
    /// How long issued tokens live (`ACCESS_TOKEN_TTL_SECONDS`); a verifier refuses a
    /// token whose `exp - iat` is longer.
    pub ttl: Duration,
    /// `APP_ENV=development`: a missing key falls back to the published development
    /// key, with a loud warning.
    pub development: bool,
}

impl TokenConfig {
    pub const DEFAULT_ISSUER: &'static str = "mobile-backend";
    pub const DEFAULT_AUDIENCE: &'static str = "mobile-app";

    /// For the API: signs with `JWT_SIGNING_KEY_FILE` and accepts its public half plus
    /// any keys in `JWT_VERIFY_KEYS_FILE` (a rotation's).
    pub fn issuer(&self) -> Result<AccessTokens, KeyError> {
        let signing = match &self.signing_key_file {
            Some(path) => SigningKey::from_file(path)?,
            None if self.development => {
                tracing::warn!(
                    "JWT_SIGNING_KEY_FILE is not set: signing with the PUBLISHED DEVELOPMENT KEY. \
                     Anyone can forge tokens for this server. Never run this outside development."
                );
                SigningKey::development()?
            }
            None => return Err(KeyError::Missing("JWT_SIGNING_KEY_FILE")),
        };
        let verify = match &self.verify_keys_file {
            Some(path) => VerifyKeys::from_file(path)?,
            None => VerifyKeys::default(),
        };
        Ok(self.tokens(Some(signing), verify))
    }

    /// For the gateway: accepts the keys in `JWT_VERIFY_KEYS_FILE`, signs nothing.
    pub fn verifier(&self) -> Result<AccessTokens, KeyError> {
        let verify = match &self.verify_keys_file {
            Some(path) => VerifyKeys::from_file(path)?,
            None if self.development => {
                tracing::warn!(
                    "JWT_VERIFY_KEYS_FILE is not set: accepting tokens of the PUBLISHED DEVELOPMENT KEY. \
                     Anyone can forge them. Never run this outside development."
                );
                let mut keys = VerifyKeys::default();
                keys.insert(SigningKey::development()?.verify_key());
                keys
            }
            None => return Err(KeyError::Missing("JWT_VERIFY_KEYS_FILE")),
        };
        Ok(self.tokens(None, verify))
    }

    fn tokens(&self, signing: Option<SigningKey>, verify: VerifyKeys) -> AccessTokens {
        let tokens = AccessTokens::new(
            signing,
            verify,
            self.issuer.clone(),
            self.audience.clone(),
            self.ttl,
        );
        tracing::info!(verify_kids = ?tokens.verify_keys().kids(), "access-token keys loaded");
        tokens
    }
}

/// The key access tokens are signed with.
#[derive(Clone)]
pub struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    verifying: ed25519_dalek::VerifyingKey,
}

impl SigningKey {
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let pem = read(path)?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Parses a PKCS#8 PEM; `what` names its origin in errors.
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, KeyError> {
        install_crypto_provider();
        let parse_error = |reason: String| KeyError::Parse {
            what: what.to_owned(),
            format: "PKCS#8",
            reason,
        };
        let key = ed25519_dalek::SigningKey::from_pkcs8_pem(pem.trim())
            .map_err(|e| parse_error(e.to_string()))?;
        let der = key.to_pkcs8_der().map_err(|e| parse_error(e.to_string()))?;
        let verifying = key.verifying_key();
        Ok(Self {
            kid: thumbprint(&verifying),
            encoding: EncodingKey::from_ed_der(der.as_bytes()),
            verifying,
        })
    }

    /// The development key; see [`DEVELOPMENT_SIGNING_KEY_PEM`].
    pub fn development() -> Result<Self, KeyError> {
        Self::from_pem(DEVELOPMENT_SIGNING_KEY_PEM, "the development key")
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub(crate) fn encoding(&self) -> &EncodingKey {
        &self.encoding
    }

    /// The public half, so a signer always accepts what it signs.
    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey::new(self.verifying)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// One public key and its `kid`.
#[derive(Clone)]
pub struct VerifyKey {
    kid: String,
    decoding: DecodingKey,
}

impl fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl VerifyKey {
    fn new(verifying: ed25519_dalek::VerifyingKey) -> Self {
        Self {
            kid: thumbprint(&verifying),
            decoding: DecodingKey::from_ed_der(verifying.as_bytes()),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }
}

/// Every public key a token may be signed with, by `kid`.
#[derive(Clone, Default)]
pub struct VerifyKeys {
    keys: HashMap<String, DecodingKey>,
}

impl VerifyKeys {
    /// Reads every `PUBLIC KEY` PEM block in the file.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let pems = read(path)?;
        let what = path.display().to_string();
        let mut keys = Self::default();
        for block in pem_blocks(&pems, "PUBLIC KEY") {
            let verifying =
                ed25519_dalek::VerifyingKey::from_public_key_pem(&block).map_err(|e| {
                    KeyError::Parse {
                        what: what.clone(),
                        format: "SPKI public key",
                        reason: e.to_string(),
                    }
                })?;
            keys.insert(VerifyKey::new(verifying));
        }
        if keys.keys.is_empty() {
            return Err(KeyError::Empty(what));
        }
        Ok(keys)
    }

    pub fn insert(&mut self, key: VerifyKey) {
        install_crypto_provider();
        self.keys.insert(key.kid, key.decoding);
    }

    pub fn get(&self, kid: &str) -> Option<&DecodingKey> {
        self.keys.get(kid)
    }

    /// The key ids, sorted, for the start-up log.
    pub fn kids(&self) -> Vec<&str> {
        let mut kids: Vec<&str> = self.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        kids
    }
}

impl fmt::Debug for VerifyKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyKeys")
            .field("kids", &self.kids())
            .finish()
    }
}

/// RFC 7638 thumbprint of an Ed25519 public key as an OKP JWK (RFC 8037).
fn thumbprint(key: &ed25519_dalek::VerifyingKey) -> String {
    // Members in lexicographic order, no white space, as RFC 7638 prescribes.
    let jwk = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        URL_SAFE_NO_PAD.encode(key.as_bytes())
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(jwk.as_bytes()))
}

/// The PEM blocks of one label in a file that may hold several.
fn pem_blocks(text: &str, label: &str) -> Vec<String> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut blocks = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find(&begin) {
        let Some(stop) = rest[start..].find(&end) else {
            break;
        };
        let stop = start + stop + end.len();
        blocks.push(format!("{}\n", &rest[start..stop]));
        rest = &rest[stop..];
    }
    blocks
}

fn read(path: &Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(|source| KeyError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Names the RustCrypto backend as jsonwebtoken's provider. Idempotent.
fn install_crypto_provider() {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc_8037_example() {
        // RFC 8037, appendix A.3: the thumbprint of the example public key.
        let x = URL_SAFE_NO_PAD
            .decode("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo")
            .unwrap();
        let key = ed25519_dalek::VerifyingKey::from_bytes(&x.try_into().unwrap()).unwrap();
        assert_eq!(
            thumbprint(&key),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn development_key_loads_and_names_itself() {
        let key = SigningKey::development().unwrap();
        assert_eq!(key.kid().len(), 43);
        assert_eq!(key.verify_key().kid(), key.kid());
    }

    #[test]
    fn bad_pem_is_refused() {
        assert!(
            SigningKey::from_pem(
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "x"
            )
            .is_err()
        );
        assert!(SigningKey::from_pem("", "x").is_err());
    }

    #[test]
    fn a_production_binary_refuses_to_start_without_keys() {
        let config = TokenConfig {
            signing_key_file: None,
            verify_keys_file: None,
            issuer: TokenConfig::DEFAULT_ISSUER.into(),
            audience: TokenConfig::DEFAULT_AUDIENCE.into(),
            ttl: Duration::from_secs(900),
            development: false,
        };
        assert!(matches!(
            config.issuer(),
            Err(KeyError::Missing("JWT_SIGNING_KEY_FILE"))
        ));
        assert!(matches!(
            config.verifier(),
            Err(KeyError::Missing("JWT_VERIFY_KEYS_FILE"))
        ));

        // Development falls back to the published key, on both sides alike.
        let development = TokenConfig {
            development: true,
            ..config
        };
        let issuer = development.issuer().unwrap();
        let verifier = development.verifier().unwrap();
        let token = issuer
            .issue(
                mobile_domain::UserId::new(),
                mobile_domain::SessionId::new(),
            )
            .unwrap();
        assert!(verifier.verify(&token).is_ok());
    }

    #[test]
    fn several_public_keys_in_one_file() {
        let dir = std::env::temp_dir().join(format!("mobile-auth-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("verify.pem");
        let one = SigningKey::development().unwrap();
        let pem = |key: &ed25519_dalek::VerifyingKey| {
            use ed25519_dalek::pkcs8::{EncodePublicKey, spki::der::pem::LineEnding};
            key.to_public_key_pem(LineEnding::LF).unwrap()
        };
        let other = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        std::fs::write(
            &path,
            format!("{}{}", pem(&one.verifying), pem(&other.verifying_key())),
        )
        .unwrap();
        let keys = VerifyKeys::from_file(&path).unwrap();
        assert_eq!(keys.kids().len(), 2);
        assert!(keys.get(one.kid()).is_some());

        std::fs::write(&path, "nothing here").unwrap();
        assert!(matches!(
            VerifyKeys::from_file(&path),
            Err(KeyError::Empty(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
