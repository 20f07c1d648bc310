//! A fake OpenID issuer, as Apple's and Google's sign-in look to a server: HTTPS, a
//! discovery document at `/.well-known/openid-configuration` naming a `jwks_uri`, and
//! RS256 signing keys published there by `kid`. Tests mint id_tokens with it (claims
//! of their choosing) and rotate its key in the middle of a test.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use axum::{Json, Router, extract::State, routing::get};
use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rsa::{
    pkcs8::{EncodePrivateKey as _, LineEnding},
    traits::PublicKeyParts as _,
};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use tokio::net::TcpListener;

/// One signing key: its id, the key to sign with, and its public JWK.
struct SigningKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl SigningKey {
    fn generate(kid: &str) -> Self {
        let private =
            rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("generate an RSA key");
        let pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode the RSA key");
        let public = private.to_public_key();
        let jwk = json!({
            "kty": "RSA",
            "kid": kid,
            "use": "sig",
            "alg": "RS256",
            "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
            "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
        });
        Self {
            kid: kid.to_owned(),
            encoding: EncodingKey::from_rsa_pem(pem.as_bytes()).expect("encoding key"),
            jwk,
        }
    }
}

struct Shared {
    issuer: String,
    /// The key tokens are signed with, and every key the JWKS publishes.
    current: Mutex<usize>,
    keys: Mutex<Vec<SigningKey>>,
    discovery_fetches: AtomicUsize,
    jwks_fetches: AtomicUsize,
}

/// The fake issuer, serving until dropped.
pub struct FakeIssuer {
    shared: Arc<Shared>,
    dir: PathBuf,
    addr: SocketAddr,
    server: tokio::task::JoinHandle<()>,
}

impl FakeIssuer {
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("fake-oidc-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the fake's directory");
        let tls = crate::tls::self_signed_h2(&dir);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake issuer");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared {
            issuer: format!("https://{addr}"),
            current: Mutex::new(0),
            keys: Mutex::new(vec![SigningKey::generate("test-key-1")]),
            discovery_fetches: AtomicUsize::new(0),
            jwks_fetches: AtomicUsize::new(0),
        });
        let app = Router::new()
            .route("/.well-known/openid-configuration", get(discovery))
            .route("/auth/keys", get(jwks))
            .with_state(shared.clone());
        let server = tokio::spawn(crate::tls::serve_h2(listener, tls, app));
        Self {
            shared,
            dir,
            addr,
            server,
        }
    }

    /// `https://127.0.0.1:<port>`: the `iss` of its tokens.
    pub fn issuer(&self) -> String {
        self.shared.issuer.clone()
    }

    /// Its self-signed certificate, for `OIDC_CA_FILE`.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The API's settings that point `provider` (`APPLE`, `GOOGLE`) here, accepting
    /// `client_ids`.
    pub fn env(&self, provider: &str, client_ids: &str) -> Vec<(String, String)> {
        vec![
            (format!("{provider}_ISSUER"), self.issuer()),
            (format!("{provider}_CLIENT_IDS"), client_ids.to_owned()),
            (
                "OIDC_CA_FILE".to_owned(),
                self.ca_file().display().to_string(),
            ),
        ]
    }

    /// Signs `claims` (RS256) with the current key, naming it in `kid`.
    pub fn sign(&self, claims: &Value) -> String {
        let keys = self.shared.keys.lock().expect("keys");
        let key = &keys[*self.shared.current.lock().expect("current")];
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(key.kid.clone());
        jsonwebtoken::encode(&header, claims, &key.encoding).expect("sign a token")
    }

    /// An id_token as the provider issues it: this issuer, `aud`, `sub`, `email`
    /// (verified), issued now and valid ten minutes, with the SHA-256 of `raw_nonce`.
    pub fn id_token(&self, aud: &str, sub: &str, email: &str, raw_nonce: &str) -> String {
        self.sign(&self.claims(aud, sub, email, raw_nonce))
    }

    /// The claims of [`Self::id_token`], for a test to change before [`Self::sign`].
    pub fn claims(&self, aud: &str, sub: &str, email: &str, raw_nonce: &str) -> Value {
        let now = time_now();
        json!({
            "iss": self.issuer(),
            "aud": aud,
            "sub": sub,
            "email": email,
            "email_verified": "true",
            "iat": now,
            "exp": now + 600,
            "nonce": nonce_hash(raw_nonce),
        })
    }

    /// A new key signs from now on; the JWKS publishes it beside the old ones.
    pub fn rotate(&self) {
        let mut keys = self.shared.keys.lock().expect("keys");
        let kid = format!("test-key-{}", keys.len() + 1);
        keys.push(SigningKey::generate(&kid));
        *self.shared.current.lock().expect("current") = keys.len() - 1;
    }

    /// How often the JWKS was fetched.
    pub fn jwks_fetches(&self) -> usize {
        self.shared.jwks_fetches.load(Ordering::Relaxed)
    }

    /// How often the discovery document was fetched.
    pub fn discovery_fetches(&self) -> usize {
        self.shared.discovery_fetches.load(Ordering::Relaxed)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl std::fmt::Debug for FakeIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeIssuer")
            .field("issuer", &self.shared.issuer)
            .finish_non_exhaustive()
    }
}

impl Drop for FakeIssuer {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The SHA-256 (lower-case hex) of a raw nonce: what the app gives the provider.
pub fn nonce_hash(raw_nonce: &str) -> String {
    Sha256::digest(raw_nonce.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn time_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

async fn discovery(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.discovery_fetches.fetch_add(1, Ordering::Relaxed);
    Json(json!({
        "issuer": shared.issuer,
        "authorization_endpoint": format!("{}/auth/authorize", shared.issuer),
        "token_endpoint": format!("{}/auth/token", shared.issuer),
        "jwks_uri": format!("{}/auth/keys", shared.issuer),
        "response_types_supported": ["code"],
        "subject_types_supported": ["pairwise"],
        "id_token_signing_alg_values_supported": ["RS256"],
    }))
}

async fn jwks(State(shared): State<Arc<Shared>>) -> Json<Value> {
    shared.jwks_fetches.fetch_add(1, Ordering::Relaxed);
    let keys = shared.keys.lock().expect("keys");
    Json(json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }))
}
