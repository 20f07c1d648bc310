//! Verifying the `id_token` that Sign in with Apple or Google handed the app.
//!
//! Each provider is an OpenID issuer (`APPLE_ISSUER`, `GOOGLE_ISSUER`). Its signing keys
//! are found the way OpenID Connect says: the discovery document at
//! `<issuer>/.well-known/openid-configuration` names the `jwks_uri`, and the JWKS there
//! holds the public keys by `kid`. Keys are cached; a token signed with a `kid` not in
//! the cache (the provider rotated) makes one refetch, but no more often than
//! `OIDC_JWKS_MIN_REFRESH_SECONDS`, so tokens with made-up key ids cannot make this
//! server hammer the provider.
//!
//! A token is accepted when its RS256 signature verifies with the provider's key, `iss`
//! is the issuer, `aud` one of the app's client ids (`APPLE_CLIENT_IDS`,
//! `GOOGLE_CLIENT_IDS`), `exp` is ahead (60 s leeway), and its `nonce` claim is the
//! SHA-256 (lower-case hex) of the raw nonce the app sends alongside: the app generated
//! the nonce, gave the provider its hash, and only it knows the raw value, so a token
//! lifted from another app or an earlier sign-in is refused.

use std::{
    collections::HashMap,
    sync::RwLock,
    time::{Duration, Instant},
};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest as _, Sha256};

/// A sign-in provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    Apple,
    Google,
}

impl Provider {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Apple => "apple",
            Self::Google => "google",
        }
    }

    /// The real issuer, the default of `APPLE_ISSUER` / `GOOGLE_ISSUER`.
    pub const fn default_issuer(self) -> &'static str {
        match self {
            Self::Apple => "https://appleid.apple.com",
            Self::Google => "https://accounts.google.com",
        }
    }
}

/// One provider's settings.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// `APPLE_ISSUER` / `GOOGLE_ISSUER`: an `https://` URL.
    pub issuer: String,
    /// `APPLE_CLIENT_IDS` / `GOOGLE_CLIENT_IDS`: the accepted audiences (bundle ids,
    /// service ids, OAuth client ids). Empty: the provider is off.
    pub client_ids: Vec<String>,
}

/// What a verified token says about its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The provider's stable id of the user (`sub`).
    pub subject: String,
    /// The email, if the token carries one (Apple's may be a private relay address).
    pub email: Option<String>,
    /// Whether the provider vouches for the email.
    pub email_verified: bool,
    /// The name, if the token carries one (Google's does; Apple's never does).
    pub name: Option<String>,
    /// When the provider issued the token (seconds since the epoch).
    pub issued_at: i64,
    /// When it expires (seconds since the epoch).
    pub expires_at: i64,
}

/// Why a token was refused, or could not be checked.
#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    /// The token is not one to accept; the reason is for the log and the `detail`.
    #[error("{0}")]
    Invalid(String),
    /// The provider's keys could not be fetched.
    #[error("the provider's keys could not be fetched: {0}")]
    Unavailable(String),
}

/// The longest `sub` kept (Apple's are about 44 bytes, Google's 21).
const MAX_SUBJECT_BYTES: usize = 255;

/// How long fetched keys are trusted without asking the provider again: a key it
/// withdrew stops being accepted within this.
const KEYS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

fn invalid(reason: impl Into<String>) -> OidcError {
    OidcError::Invalid(reason.into())
}

/// Verifies one provider's tokens; cheap to share (`Arc`).
#[derive(Debug)]
pub struct Verifier {
    provider: Provider,
    settings: ProviderSettings,
    http: reqwest::Client,
    min_refresh: Duration,
    keys: RwLock<Keys>,
    /// The last fetch: when, and whether it failed. Held while fetching, so one fetch
    /// serves all the requests that were waiting for it.
    fetched: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

/// The cached keys by `kid`, and when they were fetched.
#[derive(Debug, Default)]
struct Keys {
    by_kid: HashMap<String, DecodingKey>,
    fetched_at: Option<Instant>,
}

#[derive(Debug, Deserialize)]
struct Discovery {
    jwks_uri: String,
}

#[derive(Debug, Deserialize)]
struct Jwks {
    keys: Vec<Jwk>,
}

#[derive(Debug, Deserialize)]
struct Jwk {
    kty: String,
    kid: Option<String>,
    n: Option<String>,
    e: Option<String>,
    #[serde(rename = "use")]
    usage: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    iat: i64,
    exp: i64,
    nonce: Option<String>,
    email: Option<String>,
    /// Apple sends `"true"`, Google `true`.
    email_verified: Option<Value>,
    name: Option<String>,
}

impl Verifier {
    pub fn new(
        provider: Provider,
        settings: ProviderSettings,
        http: reqwest::Client,
        min_refresh: Duration,
    ) -> Self {
        Self {
            provider,
            settings,
            http,
            min_refresh,
            keys: RwLock::new(Keys::default()),
            fetched: tokio::sync::Mutex::new(None),
        }
    }

    /// Whether the provider is on (it has client ids).
    pub fn enabled(&self) -> bool {
        !self.settings.client_ids.is_empty()
    }

    /// Verifies `id_token` against the provider's keys and `raw_nonce` (see the module).
    pub async fn verify(&self, id_token: &str, raw_nonce: &str) -> Result<Identity, OidcError> {
        let header = jsonwebtoken::decode_header(id_token)
            .map_err(|e| invalid(format!("the id_token is not a JWT: {e}")))?;
        if header.alg != Algorithm::RS256 {
            return Err(invalid(format!(
                "the id_token is signed with {:?}, not RS256",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| invalid("the id_token names no key (kid)"))?;
        let key = self.key(&kid).await?;

        let mut validation = Validation::new(Algorithm::RS256);
        validation.leeway = 60;
        // Google's tokens carry its issuer with or without the scheme.
        let bare = self
            .settings
            .issuer
            .strip_prefix("https://")
            .unwrap_or_default();
        if self.provider == Provider::Google
            && self.settings.issuer == Provider::Google.default_issuer()
        {
            validation.set_issuer(&[self.settings.issuer.as_str(), bare]);
        } else {
            validation.set_issuer(&[self.settings.issuer.as_str()]);
        }
        validation.set_audience(&self.settings.client_ids);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<Claims>(id_token, &key, &validation)
            .map_err(|e| invalid(format!("the id_token is not valid: {e}")))?
            .claims;

        if claims.sub.is_empty() || claims.sub.len() > MAX_SUBJECT_BYTES {
            return Err(invalid(
                "the id_token's sub is empty or longer than 255 bytes",
            ));
        }
        let expected = hex::encode(Sha256::digest(raw_nonce.as_bytes()));
        if claims.nonce.as_deref() != Some(expected.as_str()) {
            return Err(invalid(
                "the id_token's nonce is not the SHA-256 of the nonce given",
            ));
        }
        let email_verified = matches!(claims.email_verified, Some(Value::Bool(true)))
            || matches!(&claims.email_verified, Some(Value::String(s)) if s == "true");
        Ok(Identity {
            subject: claims.sub,
            email: claims.email.map(|e| e.to_lowercase()),
            email_verified,
            name: claims.name,
            issued_at: claims.iat,
            expires_at: claims.exp,
        })
    }

    /// The key `kid`, from the cache or (at most once per `min_refresh`) the provider.
    /// Keys older than a day are fetched again before use.
    async fn key(&self, kid: &str) -> Result<DecodingKey, OidcError> {
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        let mut fetched = self.fetched.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        if let Some((at, ok)) = *fetched
            && at.elapsed() < self.min_refresh
        {
            return Err(if ok {
                invalid(format!("the id_token's key {kid:?} is not the provider's"))
            } else {
                OidcError::Unavailable("the last fetch of the keys failed".to_owned())
            });
        }
        let result = self.fetch().await;
        *fetched = Some((Instant::now(), result.is_ok()));
        let keys = result?;
        tracing::info!(
            provider = self.provider.as_str(),
            keys = keys.len(),
            "fetched the provider's signing keys"
        );
        let found = keys.get(kid).cloned();
        if let Ok(mut cache) = self.keys.write() {
            // An empty set is a provider's hiccup, not a withdrawal of every key.
            if !keys.is_empty() {
                cache.by_kid = keys;
            }
            cache.fetched_at = Some(Instant::now());
        }
        found.ok_or_else(|| invalid(format!("the id_token's key {kid:?} is not the provider's")))
    }

    /// A cached key, unless the cache is older than [`KEYS_MAX_AGE`].
    fn cached(&self, kid: &str) -> Option<DecodingKey> {
        let keys = self.keys.read().ok()?;
        let fresh = keys
            .fetched_at
            .is_some_and(|at| at.elapsed() < KEYS_MAX_AGE);
        fresh.then(|| keys.by_kid.get(kid).cloned()).flatten()
    }

    /// The provider's signing keys: discovery, then the JWKS it names.
    async fn fetch(&self) -> Result<HashMap<String, DecodingKey>, OidcError> {
        let discovery_url = format!(
            "{}/.well-known/openid-configuration",
            self.settings.issuer.trim_end_matches('/')
        );
        let discovery: Discovery = self.get_json(&discovery_url).await?;
        if !discovery.jwks_uri.starts_with("https://") {
            return Err(OidcError::Unavailable(format!(
                "the discovery document's jwks_uri {:?} is not https",
                discovery.jwks_uri
            )));
        }
        let jwks: Jwks = self.get_json(&discovery.jwks_uri).await?;
        let mut keys = HashMap::new();
        for jwk in jwks.keys {
            if jwk.kty != "RSA" || jwk.usage.as_deref().is_some_and(|u| u != "sig") {
                continue;
            }
            let (Some(kid), Some(n), Some(e)) = (jwk.kid, jwk.n, jwk.e) else {
                continue;
            };
            match DecodingKey::from_rsa_components(&n, &e) {
                Ok(key) => {
                    keys.insert(kid, key);
                }
                Err(error) => {
                    tracing::warn!(provider = self.provider.as_str(), %kid, %error, "skipping a key of the provider's JWKS");
                }
            }
        }
        Ok(keys)
    }
}

impl Verifier {
    async fn get_json<T: serde::de::DeserializeOwned>(&self, url: &str) -> Result<T, OidcError> {
        let unavailable = |e: reqwest::Error| OidcError::Unavailable(format!("{url}: {e}"));
        self.http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)
    }
}

/// The HTTP client for the providers: rustls, with `OIDC_CA_FILE`'s root added if set
/// (a private issuer, or the tests' own).
pub fn http_client(extra_root: Option<&[u8]>) -> anyhow::Result<reqwest::Client> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(true)
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10));
    if let Some(pem) = extra_root {
        builder = builder.add_root_certificate(reqwest::Certificate::from_pem(pem)?);
    }
    Ok(builder.build()?)
}
