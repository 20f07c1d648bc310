//! A fake APNs: TLS and HTTP/2 only, like `api.push.apple.com`, checking what Apple
//! checks and answering with Apple's status codes and `{"reason": ...}` bodies.
//!
//! It verifies each request's provider token (an ES256 JWT whose `kid` is the key id
//! and `iss` the team id, signed by the `.p8` key it generated, not older than an
//! hour), the `apns-topic`, `apns-push-type`, the device token's format and the payload
//! size. Tests script answers per device token (`410 Unregistered`, `429
//! TooManyRequests`, ...) and read what was delivered.

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use axum::{
    Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode, Version},
    response::{IntoResponse, Response},
    routing::post,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use p256::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use serde_json::{Value, json};
use tokio::net::TcpListener;

/// A notification the fake accepted.
#[derive(Debug, Clone)]
pub struct ApnsDelivery {
    pub device_token: String,
    pub headers: HeaderMap,
    pub payload: Value,
    pub version: Version,
}

/// A scripted answer for one request to one device token.
#[derive(Debug, Clone, Copy)]
pub struct ApnsReply {
    pub status: u16,
    pub reason: &'static str,
    pub retry_after: Option<u64>,
    /// Hold the answer this long (a slow or hung APNs).
    pub delay: std::time::Duration,
}

impl ApnsReply {
    pub const UNREGISTERED: Self = Self::new(410, "Unregistered");
    pub const BAD_DEVICE_TOKEN: Self = Self::new(400, "BadDeviceToken");
    pub const TOO_MANY_REQUESTS: Self = Self::new(429, "TooManyRequests");
    pub const SERVICE_UNAVAILABLE: Self = Self::new(503, "ServiceUnavailable");

    pub const fn new(status: u16, reason: &'static str) -> Self {
        Self {
            status,
            reason,
            retry_after: None,
            delay: std::time::Duration::ZERO,
        }
    }

    /// A `200` held for `delay`.
    pub const fn stall(delay: std::time::Duration) -> Self {
        let mut reply = Self::new(200, "");
        reply.delay = delay;
        reply
    }

    pub const fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

#[derive(Default)]
struct Recorded {
    deliveries: Vec<ApnsDelivery>,
    provider_tokens: HashSet<String>,
    requests: usize,
    scripts: HashMap<String, VecDeque<ApnsReply>>,
}

struct Shared {
    key: DecodingKey,
    key_id: String,
    team_id: String,
    topic: String,
    recorded: Mutex<Recorded>,
}

/// A running fake APNs, stopped when dropped.
pub struct FakeApns {
    addr: SocketAddr,
    dir: PathBuf,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeApns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApns")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

pub const TEST_APNS_KEY_ID: &str = "TESTKEY123";
pub const TEST_APNS_TEAM_ID: &str = "TESTTEAM45";

impl FakeApns {
    /// Generates a `.p8` key and a TLS certificate, and serves on a loopback port.
    pub async fn start(topic: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fake-apns-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the fake's directory");

        let secret = p256::SecretKey::random(&mut rand::rngs::OsRng);
        let p8 = secret
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode the .p8 key");
        std::fs::write(dir.join("AuthKey.p8"), p8.as_bytes()).expect("write the .p8 key");
        let public = secret
            .public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("encode the public key");

        let tls = crate::tls::self_signed_h2(&dir);

        let shared = Arc::new(Shared {
            key: DecodingKey::from_ec_pem(public.as_bytes()).expect("decoding key"),
            key_id: TEST_APNS_KEY_ID.to_owned(),
            team_id: TEST_APNS_TEAM_ID.to_owned(),
            topic: topic.to_owned(),
            recorded: Mutex::new(Recorded::default()),
        });
        let app = Router::new()
            .route("/3/device/{token}", post(push))
            .with_state(shared.clone());
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake APNs");
        let addr = listener.local_addr().expect("local address");
        let server = tokio::spawn(crate::tls::serve_h2(listener, tls, app));
        Self {
            addr,
            dir,
            shared,
            server,
        }
    }

    /// `APNS_BASE_URL` (and `APNS_SANDBOX_BASE_URL`).
    pub fn base_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// `APNS_KEY_FILE`.
    pub fn key_file(&self) -> PathBuf {
        self.dir.join("AuthKey.p8")
    }

    /// `PUSH_CA_FILE`: the fake's self-signed certificate.
    pub fn ca_file(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The worker's environment for this fake (APNs plus `PUSH_CA_FILE`).
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "APNS_KEY_FILE".into(),
                self.key_file().display().to_string(),
            ),
            ("APNS_KEY_ID".into(), TEST_APNS_KEY_ID.into()),
            ("APNS_TEAM_ID".into(), TEST_APNS_TEAM_ID.into()),
            ("APNS_TOPIC".into(), self.shared.topic.clone()),
            ("APNS_BASE_URL".into(), self.base_url()),
            ("APNS_SANDBOX_BASE_URL".into(), self.base_url()),
            ("PUSH_CA_FILE".into(), self.ca_file().display().to_string()),
        ]
    }

    /// The next requests for `device_token` get these answers, in order; later ones 200.
    pub fn script(&self, device_token: &str, replies: impl IntoIterator<Item = ApnsReply>) {
        self.recorded()
            .scripts
            .entry(device_token.to_owned())
            .or_default()
            .extend(replies);
    }

    pub fn deliveries(&self) -> Vec<ApnsDelivery> {
        self.recorded().deliveries.clone()
    }

    /// Every request, accepted or not.
    pub fn requests(&self) -> usize {
        self.recorded().requests
    }

    /// How many distinct provider tokens were presented: the client signs one and
    /// reuses it, so a test of many sends expects 1.
    pub fn provider_tokens(&self) -> usize {
        self.recorded().provider_tokens.len()
    }

    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.shared
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drop for FakeApns {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn reply(status: u16, reason: &str, retry_after: Option<u64>) -> Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut body = json!({ "reason": reason });
    if status == StatusCode::GONE {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        body["timestamp"] = json!(now);
    }
    let mut response = (
        status,
        [("apns-id", uuid::Uuid::new_v4().to_string())],
        axum::Json(body),
    )
        .into_response();
    if let Some(seconds) = retry_after {
        response.headers_mut().insert("retry-after", seconds.into());
    }
    response
}

#[derive(serde::Deserialize)]
struct ProviderClaims {
    iss: String,
    iat: u64,
}

/// Checks a provider token as APNs does: ES256 by the team's key, `kid` and `iss`
/// matching, issued within the hour. The error is Apple's `reason`.
fn verify_provider_token(shared: &Shared, jwt: &str) -> Result<(), &'static str> {
    let mut validation = Validation::new(Algorithm::ES256);
    validation.required_spec_claims = HashSet::new();
    validation.validate_exp = false;
    let Ok(decoded) = jsonwebtoken::decode::<ProviderClaims>(jwt, &shared.key, &validation) else {
        return Err("InvalidProviderToken");
    };
    if decoded.header.kid.as_deref() != Some(shared.key_id.as_str())
        || decoded.claims.iss != shared.team_id
    {
        return Err("InvalidProviderToken");
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if decoded.claims.iat + 3600 < now {
        return Err("ExpiredProviderToken");
    }
    Ok(())
}

async fn push(
    State(shared): State<Arc<Shared>>,
    Path(token): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    shared
        .recorded
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .requests += 1;

    // Authentication first, as APNs does.
    let Some(jwt) = header("authorization").and_then(|v| {
        v.strip_prefix("bearer ")
            .or_else(|| v.strip_prefix("Bearer "))
    }) else {
        return reply(403, "MissingProviderToken", None);
    };
    // A token verified once is remembered (APNs caches them too), so a benchmark
    // measures the client rather than this fake's ECDSA.
    let known = shared
        .recorded
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .provider_tokens
        .contains(jwt);
    if !known && let Err(reason) = verify_provider_token(&shared, jwt) {
        return reply(403, reason, None);
    }

    match header("apns-topic") {
        None => return reply(400, "MissingTopic", None),
        Some(topic) if topic != shared.topic => return reply(400, "TopicDisallowed", None),
        Some(_) => {}
    }
    if !matches!(
        header("apns-push-type"),
        Some("alert" | "background" | "voip")
    ) {
        return reply(400, "InvalidPushType", None);
    }
    if token.len() < 64 || token.len() % 2 != 0 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return reply(400, "BadDeviceToken", None);
    }
    if body.is_empty() {
        return reply(400, "PayloadEmpty", None);
    }
    if body.len() > 4096 {
        return reply(413, "PayloadTooLarge", None);
    }
    let Ok(payload) = serde_json::from_slice::<Value>(&body) else {
        return reply(400, "BadPayload", None);
    };
    if payload.get("aps").is_none() {
        return reply(400, "BadPayload", None);
    }

    let scripted = {
        let mut recorded = shared
            .recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recorded.provider_tokens.insert(jwt.to_owned());
        recorded
            .scripts
            .get_mut(&token)
            .and_then(VecDeque::pop_front)
    };
    if let Some(scripted) = scripted {
        tokio::time::sleep(scripted.delay).await;
        if scripted.status != 200 {
            return reply(scripted.status, scripted.reason, scripted.retry_after);
        }
    }
    let mut recorded = shared
        .recorded
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    recorded.deliveries.push(ApnsDelivery {
        device_token: token,
        headers: headers.clone(),
        payload,
        version,
    });
    (
        StatusCode::OK,
        [("apns-id", uuid::Uuid::new_v4().to_string())],
    )
        .into_response()
}
