//! Access tokens: EdDSA-signed JWTs that live 15 minutes.
//!
//! The verifier accepts `alg: EdDSA` and nothing else, whatever the token's header
//! claims, which closes the `alg: none` and algorithm-confusion attacks; it picks the
//! key by `kid` and refuses a token without one or with one it does not know. It
//! refuses a header with `crit` (RFC 7515 §4.1.11: no extension is understood here), a
//! token not yet valid (`nbf`), and one whose lifetime (`exp - iat`) is longer than the
//! configured TTL or whose `iat` is in the future: a leaked signing key aside, no
//! issuer of ours makes such a token, and refusing it caps what one stolen token is
//! worth.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, PoisonError},
    time::Duration,
};

use jsonwebtoken::{Algorithm, Header, Validation, errors::ErrorKind};
use mobile_domain::{SessionId, UserId};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::keys::{SigningKey, VerifyKeys};

/// What an access token says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// The user.
    pub sub: UserId,
    /// The session (refresh-token family) the token was issued under.
    pub sid: SessionId,
    pub iss: String,
    pub aud: String,
    pub iat: i64,
    pub exp: i64,
}

/// Why a token was refused. The variants are what a client may act on: an expired
/// token is refreshed; any other is a reason to sign in again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the access token has expired")]
    Expired,
    #[error("the access token was signed by an unknown key")]
    UnknownKey,
    #[error("the access token is invalid")]
    Invalid,
}

/// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
const LEEWAY_SECONDS: u64 = 5;

/// Issues and verifies access tokens. Holds key material: share it behind an `Arc`.
#[derive(Debug, Clone)]
pub struct AccessTokens {
    signing: Option<SigningKey>,
    verify: VerifyKeys,
    validation: Validation,
    issuer: String,
    audience: String,
    ttl: Duration,
    verified: Verified,
}

/// Tokens that passed verification, with their claims. An app sends the same access
/// token with every request for its 15 minutes, and the Ed25519 check is most of the
/// CPU a simple request costs (BENCHMARKS.md, `GET /v1/me`), so it is done once per
/// token and process. Keyed by the whole token: only the exact bytes that verified
/// hit. A hit is used only before the token's `exp`; after it, the full check runs
/// again (and says `Expired`). Bounded: when full, it starts over.
#[derive(Clone, Default)]
struct Verified(Arc<Mutex<HashMap<String, AccessClaims>>>);

/// Tokens remembered at most (about 0.5 KiB each).
const VERIFIED_CAPACITY: usize = 20_000;

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keys are bearer tokens: never print them.
        let len = self.0.lock().map_or(0, |m| m.len());
        f.debug_struct("Verified").field("len", &len).finish()
    }
}

impl Verified {
    fn get(&self, token: &str, now: i64) -> Option<AccessClaims> {
        let cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        cache.get(token).filter(|claims| claims.exp > now).cloned()
    }

    fn insert(&self, token: &str, claims: &AccessClaims) {
        let mut cache = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.len() >= VERIFIED_CAPACITY {
            cache.clear();
        }
        cache.insert(token.to_owned(), claims.clone());
    }
}

impl AccessTokens {
    /// A verifier (the gateway) or, with a signing key, an issuer too (the API). The
    /// signing key's public half is always among the verify keys.
    pub fn new(
        signing: Option<SigningKey>,
        mut verify: VerifyKeys,
        issuer: impl Into<String>,
        audience: impl Into<String>,
        ttl: Duration,
    ) -> Self {
        let issuer = issuer.into();
        let audience = audience.into();
        if let Some(key) = &signing {
            verify.insert(key.verify_key());
        }
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&issuer]);
        validation.set_audience(&[&audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        validation.validate_nbf = true;
        // Phones' clocks drift; a few seconds either way is not an attack.
        validation.leeway = LEEWAY_SECONDS;
        Self {
            signing,
            verify,
            validation,
            issuer,
            audience,
            ttl,
            verified: Verified::default(),
        }
    }

    /// The token lifetime, for the `expires_in` field.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn verify_keys(&self) -> &VerifyKeys {
        &self.verify
    }

    /// Signs a token for `user` under `session`. Fails only without a signing key.
    pub fn issue(&self, user: UserId, session: SessionId) -> Result<String, IssueError> {
        let key = self.signing.as_ref().ok_or(IssueError::NoSigningKey)?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        let claims = AccessClaims {
            sub: user,
            sid: session,
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            iat: now,
            exp: now.saturating_add(ttl),
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid().to_owned());
        jsonwebtoken::encode(&header, &claims, key.encoding())
            .map_err(|e| IssueError::Sign(e.to_string()))
    }

    /// Checks signature, algorithm, issuer, audience and expiry (once per token; see
    /// [`Verified`]).
    pub fn verify(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if let Some(claims) = self.verified.get(token, now) {
            return Ok(claims);
        }
        let claims = self.verify_signature(token)?;
        self.verified.insert(token, &claims);
        Ok(claims)
    }

    fn verify_signature(&self, token: &str) -> Result<AccessClaims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Invalid)?;
        if header.alg != Algorithm::EdDSA || header.crit.is_some() {
            return Err(TokenError::Invalid);
        }
        let kid = header.kid.ok_or(TokenError::Invalid)?;
        let key = self.verify.get(&kid).ok_or(TokenError::UnknownKey)?;
        let claims = jsonwebtoken::decode::<AccessClaims>(token, key, &self.validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let leeway = LEEWAY_SECONDS as i64;
        let ttl = i64::try_from(self.ttl.as_secs()).unwrap_or(i64::MAX);
        if claims.iat > now.saturating_add(leeway)
            || claims.exp.saturating_sub(claims.iat) > ttl.saturating_add(leeway)
        {
            return Err(TokenError::Invalid);
        }
        Ok(claims)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("this process has no signing key")]
    NoSigningKey,
    #[error("signing failed: {0}")]
    Sign(String),
}

#[cfg(test)]
mod tests {
    use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
    use ed25519_dalek::pkcs8::{EncodePrivateKey, spki::der::pem::LineEnding};
    use uuid::Uuid;

    use super::*;

    fn key(seed: u8) -> SigningKey {
        let pem = ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
            .to_pkcs8_pem(LineEnding::LF)
            .unwrap();
        SigningKey::from_pem(&pem, "test key").unwrap()
    }

    fn tokens(signing: SigningKey, ttl: Duration) -> AccessTokens {
        AccessTokens::new(Some(signing), VerifyKeys::default(), "iss", "aud", ttl)
    }

    #[test]
    fn round_trip() {
        let tokens = tokens(key(1), Duration::from_secs(900));
        let (user, session) = (UserId::new(), SessionId::new());
        let claims = tokens
            .verify(&tokens.issue(user, session).unwrap())
            .unwrap();
        assert_eq!(claims.sub, user);
        assert_eq!(claims.sid, session);
        assert_eq!(claims.exp - claims.iat, 900);
    }

    #[test]
    fn expired_tokens_are_refused() {
        let key = key(1);
        let tokens = tokens(key.clone(), Duration::from_secs(900));
        // An expiry a minute ago: well past the 5 s leeway.
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = AccessClaims {
            sub: UserId::new(),
            sid: SessionId::new(),
            iss: "iss".into(),
            aud: "aud".into(),
            iat: now - 120,
            exp: now - 60,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid().to_owned());
        let expired = jsonwebtoken::encode(&header, &claims, key.encoding()).unwrap();
        assert_eq!(tokens.verify(&expired), Err(TokenError::Expired));
    }

    /// A token of `key` with these claims and header fields, as an attacker holding
    /// an old signing key (or a buggy issuer) might make.
    fn forge(key: &SigningKey, claims: &serde_json::Value, header: serde_json::Value) -> String {
        let mut full = serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": key.kid()});
        for (name, value) in header.as_object().unwrap() {
            full[name] = value.clone();
        }
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(full.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let signature =
            jsonwebtoken::crypto::sign(signing_input.as_bytes(), key.encoding(), Algorithm::EdDSA)
                .unwrap();
        format!("{signing_input}.{signature}")
    }

    fn claims_at(iat: i64, exp: i64) -> serde_json::Value {
        serde_json::json!({
            "sub": UserId::new(), "sid": SessionId::new(), "iss": "iss", "aud": "aud",
            "iat": iat, "exp": exp,
        })
    }

    #[test]
    fn not_yet_valid_tokens_are_refused() {
        let key = key(1);
        let tokens = tokens(key.clone(), Duration::from_secs(900));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut claims = claims_at(now, now + 600);
        claims["nbf"] = (now + 120).into();
        let early = forge(&key, &claims, serde_json::json!({}));
        assert_eq!(tokens.verify(&early), Err(TokenError::Invalid));
        claims["nbf"] = (now - 1).into();
        assert!(
            tokens
                .verify(&forge(&key, &claims, serde_json::json!({})))
                .is_ok()
        );
    }

    #[test]
    fn a_critical_header_extension_is_refused() {
        let key = key(1);
        let tokens = tokens(key.clone(), Duration::from_secs(900));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let claims = claims_at(now, now + 600);
        // An extension this verifier cannot honour, marked must-understand.
        let critical = forge(&key, &claims, serde_json::json!({"crit": ["exp"]}));
        assert_eq!(tokens.verify(&critical), Err(TokenError::Invalid));
        assert!(
            tokens
                .verify(&forge(&key, &claims, serde_json::json!({})))
                .is_ok()
        );
    }

    #[test]
    fn tokens_living_longer_than_the_ttl_are_refused() {
        let key = key(1);
        let tokens = tokens(key.clone(), Duration::from_secs(900));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let header = serde_json::json!({});
        // A year-long token, properly signed.
        let long = forge(&key, &claims_at(now, now + 365 * 86_400), header.clone());
        assert_eq!(tokens.verify(&long), Err(TokenError::Invalid));
        // Issued "in the future" to stretch a TTL-long span forward.
        let future = forge(&key, &claims_at(now + 3600, now + 4400), header.clone());
        assert_eq!(tokens.verify(&future), Err(TokenError::Invalid));
        // Exactly the TTL is fine.
        assert!(
            tokens
                .verify(&forge(&key, &claims_at(now, now + 900), header))
                .is_ok()
        );
    }

    #[test]
    fn a_remembered_verification_serves_only_the_exact_token_and_never_leaks_it() {
        let tokens = tokens(key(1), Duration::from_secs(900));
        let token = tokens.issue(UserId::new(), SessionId::new()).unwrap();
        let first = tokens.verify(&token).unwrap();
        assert_eq!(tokens.verify(&token).unwrap(), first, "served again");
        assert!(format!("{tokens:?}").contains("len: 1"));
        assert!(
            !format!("{tokens:?}").contains(&token),
            "Debug never prints a token"
        );

        // One character of the signature changed: not the token that verified.
        let mut forged = token.clone();
        let last = forged.pop().unwrap();
        forged.push(if last == 'A' { 'B' } else { 'A' });
        assert_eq!(tokens.verify(&forged), Err(TokenError::Invalid));
    }

    #[test]
    fn a_remembered_token_is_checked_again_once_past_its_expiry() {
        let key = key(1);
        let tokens = tokens(key.clone(), Duration::from_secs(900));
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(key.kid().to_owned());
        // Expired 3 s ago: accepted within the 5 s leeway by the full check, never
        // served from memory (its `exp` has passed).
        let claims = AccessClaims {
            sub: UserId::new(),
            sid: SessionId::new(),
            iss: "iss".into(),
            aud: "aud".into(),
            iat: now - 100,
            exp: now - 3,
        };
        let token = jsonwebtoken::encode(&header, &claims, key.encoding()).unwrap();
        assert!(tokens.verify(&token).is_ok());
        assert!(tokens.verified.get(&token, now).is_none());
    }

    #[test]
    fn other_keys_issuers_and_audiences_are_refused() {
        let ours = tokens(key(1), Duration::from_secs(900));
        let theirs = tokens(key(2), Duration::from_secs(900));
        let foreign = theirs.issue(UserId::new(), SessionId::new()).unwrap();
        assert_eq!(ours.verify(&foreign), Err(TokenError::UnknownKey));

        let other_aud = AccessTokens::new(
            Some(key(1)),
            VerifyKeys::default(),
            "iss",
            "other",
            Duration::from_secs(9),
        );
        let token = other_aud.issue(UserId::new(), SessionId::new()).unwrap();
        assert_eq!(ours.verify(&token), Err(TokenError::Invalid));

        let other_iss = AccessTokens::new(
            Some(key(1)),
            VerifyKeys::default(),
            "evil",
            "aud",
            Duration::from_secs(9),
        );
        let token = other_iss.issue(UserId::new(), SessionId::new()).unwrap();
        assert_eq!(ours.verify(&token), Err(TokenError::Invalid));
    }

    #[test]
    fn forged_and_unsigned_tokens_are_refused() {
        let tokens = tokens(key(1), Duration::from_secs(900));
        let token = tokens.issue(UserId::new(), SessionId::new()).unwrap();
        let parts: Vec<&str> = token.split('.').collect();

        // Same header and claims, flipped signature.
        let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        sig[0] ^= 1;
        let forged = format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig));
        assert_eq!(tokens.verify(&forged), Err(TokenError::Invalid));

        // Claims edited to another user, original signature.
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        claims["sub"] = serde_json::json!(Uuid::new_v4());
        let edited = format!(
            "{}.{}.{}",
            parts[0],
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            parts[2]
        );
        assert_eq!(tokens.verify(&edited), Err(TokenError::Invalid));

        // alg: none, with and without a signature.
        let kid = key(1).kid().to_owned();
        let none_header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"none","typ":"JWT","kid":"{kid}"}}"#));
        assert_eq!(
            tokens.verify(&format!("{none_header}.{}.", parts[1])),
            Err(TokenError::Invalid)
        );
        assert_eq!(
            tokens.verify(&format!("{none_header}.{}.{}", parts[1], parts[2])),
            Err(TokenError::Invalid)
        );

        // HS256 "signed" with the public key (algorithm confusion).
        let hs_header =
            URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#));
        assert_eq!(
            tokens.verify(&format!("{hs_header}.{}.{}", parts[1], parts[2])),
            Err(TokenError::Invalid)
        );

        // No kid.
        let no_kid = URL_SAFE_NO_PAD.encode(r#"{"alg":"EdDSA","typ":"JWT"}"#);
        assert_eq!(
            tokens.verify(&format!("{no_kid}.{}.{}", parts[1], parts[2])),
            Err(TokenError::Invalid)
        );

        for garbage in ["", "abc", "a.b.c", "....", "Bearer x"] {
            assert_eq!(
                tokens.verify(garbage),
                Err(TokenError::Invalid),
                "{garbage:?}"
            );
        }
    }

    #[test]
    fn rotation_accepts_old_and_new_keys() {
        let old = tokens(key(1), Duration::from_secs(900));
        let old_token = old.issue(UserId::new(), SessionId::new()).unwrap();

        let mut verify = VerifyKeys::default();
        verify.insert(key(1).verify_key());
        let new = AccessTokens::new(Some(key(2)), verify, "iss", "aud", Duration::from_secs(900));
        let new_token = new.issue(UserId::new(), SessionId::new()).unwrap();

        assert!(
            new.verify(&old_token).is_ok(),
            "tokens of the previous key stay valid"
        );
        assert!(new.verify(&new_token).is_ok());
        assert_eq!(old.verify(&new_token), Err(TokenError::UnknownKey));
    }

    #[test]
    fn a_verifier_cannot_issue() {
        let verifier = AccessTokens::new(
            None,
            VerifyKeys::default(),
            "iss",
            "aud",
            Duration::from_secs(9),
        );
        assert!(matches!(
            verifier.issue(UserId::new(), SessionId::new()),
            Err(IssueError::NoSigningKey)
        ));
    }
}
