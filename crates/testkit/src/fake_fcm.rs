//! A fake FCM HTTP v1 endpoint and the fake OAuth token endpoint in front of it.
//!
//! `/token` takes a service account's RS256 assertion (checked against the key of the
//! service-account file it generated: `iss`, `aud`, `scope`, `exp`) and issues an
//! access token; `/v1/projects/{project}/messages:send` takes only tokens it issued,
//! checks the message, and answers with Google's error shape (`{"error": {"code",
//! "status", "details": [{"@type": "...FcmError", "errorCode": "UNREGISTERED"}]}}`).

use std::{
    collections::{HashMap, HashSet, VecDeque},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use axum::{
    Form, Json, Router,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use rsa::pkcs8::{EncodePrivateKey as _, EncodePublicKey as _, LineEnding};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const PROJECT: &str = "test-project";
const CLIENT_EMAIL: &str = "push@test-project.iam.gserviceaccount.com";
const SCOPE: &str = "https://www.googleapis.com/auth/firebase.messaging";

/// A scripted answer for one send to one registration token.
#[derive(Debug, Clone, Copy)]
pub struct FcmReply {
    pub status: u16,
    pub status_name: &'static str,
    pub error_code: &'static str,
    pub retry_after: Option<u64>,
}

impl FcmReply {
    pub const UNREGISTERED: Self = Self::new(404, "NOT_FOUND", "UNREGISTERED");
    pub const QUOTA_EXCEEDED: Self = Self::new(429, "RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED");
    pub const UNAVAILABLE: Self = Self::new(503, "UNAVAILABLE", "UNAVAILABLE");
    pub const INVALID_ARGUMENT: Self = Self::new(400, "INVALID_ARGUMENT", "INVALID_ARGUMENT");

    pub const fn new(status: u16, status_name: &'static str, error_code: &'static str) -> Self {
        Self {
            status,
            status_name,
            error_code,
            retry_after: None,
        }
    }

    pub const fn retry_after(mut self, seconds: u64) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

#[derive(Default)]
struct Recorded {
    exchanges: usize,
    issued: HashSet<String>,
    messages: Vec<Value>,
    scripts: HashMap<String, VecDeque<FcmReply>>,
}

struct Shared {
    key: DecodingKey,
    token_uri: String,
    recorded: Mutex<Recorded>,
}

impl Shared {
    fn recorded(&self) -> std::sync::MutexGuard<'_, Recorded> {
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A running fake FCM + OAuth server, stopped when dropped.
pub struct FakeFcm {
    addr: SocketAddr,
    dir: PathBuf,
    shared: Arc<Shared>,
    server: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for FakeFcm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeFcm")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl FakeFcm {
    /// Generates a service account (RSA key) whose `token_uri` points here, and serves.
    pub async fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("fake-fcm-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).expect("create the fake's directory");
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake FCM");
        let addr = listener.local_addr().expect("local address");
        let token_uri = format!("http://{addr}/token");

        let private =
            rsa::RsaPrivateKey::new(&mut rand::rngs::OsRng, 2048).expect("generate an RSA key");
        let private_pem = private
            .to_pkcs8_pem(LineEnding::LF)
            .expect("encode the RSA key");
        let public_pem = private
            .to_public_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("encode the public key");
        let account = json!({
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "test-only-key-id",
            "private_key": private_pem.as_str(),
            "client_email": CLIENT_EMAIL,
            "client_id": "1",
            "token_uri": token_uri,
        });
        std::fs::write(dir.join("service-account.json"), account.to_string())
            .expect("write the service account");

        let shared = Arc::new(Shared {
            key: DecodingKey::from_rsa_pem(public_pem.as_bytes()).expect("decoding key"),
            token_uri,
            recorded: Mutex::new(Recorded::default()),
        });
        let app = Router::new()
            .route("/token", post(token))
            .route("/v1/projects/{project}/messages:send", post(send))
            .with_state(shared.clone());
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            dir,
            shared,
            server,
        }
    }

    /// `FCM_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `FCM_SERVICE_ACCOUNT_FILE`.
    pub fn service_account_file(&self) -> PathBuf {
        self.dir.join("service-account.json")
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "FCM_SERVICE_ACCOUNT_FILE".into(),
                self.service_account_file().display().to_string(),
            ),
            ("FCM_BASE_URL".into(), self.base_url()),
        ]
    }

    /// The next sends to `device_token` get these answers, in order; later ones 200.
    pub fn script(&self, device_token: &str, replies: impl IntoIterator<Item = FcmReply>) {
        self.shared
            .recorded()
            .scripts
            .entry(device_token.to_owned())
            .or_default()
            .extend(replies);
    }

    /// Accepted messages (the `message` object of each request).
    pub fn messages(&self) -> Vec<Value> {
        self.shared.recorded().messages.clone()
    }

    /// How many OAuth exchanges happened.
    pub fn token_exchanges(&self) -> usize {
        self.shared.recorded().exchanges
    }
}

impl Drop for FakeFcm {
    fn drop(&mut self) {
        self.server.abort();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[derive(Deserialize)]
struct TokenForm {
    grant_type: String,
    assertion: String,
}

#[derive(Deserialize)]
struct Assertion {
    iss: String,
    scope: String,
}

fn oauth_error(error: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": error, "error_description": description })),
    )
        .into_response()
}

async fn token(State(shared): State<Arc<Shared>>, Form(form): Form<TokenForm>) -> Response {
    if form.grant_type != "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return oauth_error("unsupported_grant_type", "Invalid grant_type");
    }
    let mut validation = Validation::new(Algorithm::RS256);
    validation.set_audience(&[shared.token_uri.as_str()]);
    validation.set_required_spec_claims(&["exp", "aud", "iss"]);
    let claims = match jsonwebtoken::decode::<Assertion>(&form.assertion, &shared.key, &validation)
    {
        Ok(decoded) => decoded.claims,
        Err(e) => return oauth_error("invalid_grant", &format!("Invalid JWT Signature: {e}")),
    };
    if claims.iss != CLIENT_EMAIL || !claims.scope.split(' ').any(|s| s == SCOPE) {
        return oauth_error("invalid_scope", "Invalid issuer or scope");
    }
    let access_token = format!("ya29.test-only-{}", uuid::Uuid::new_v4().simple());
    let mut recorded = shared.recorded();
    recorded.exchanges += 1;
    recorded.issued.insert(access_token.clone());
    Json(json!({ "access_token": access_token, "expires_in": 3599, "token_type": "Bearer" }))
        .into_response()
}

fn google_error(reply: FcmReply, message: &str) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = json!({
        "error": {
            "code": reply.status,
            "message": message,
            "status": reply.status_name,
            "details": [{
                "@type": "type.googleapis.com/google.firebase.fcm.v1.FcmError",
                "errorCode": reply.error_code,
            }],
        }
    });
    let mut response = (status, Json(body)).into_response();
    if let Some(seconds) = reply.retry_after {
        response.headers_mut().insert("retry-after", seconds.into());
    }
    response
}

async fn send(
    State(shared): State<Arc<Shared>>,
    Path(project): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !bearer.is_some_and(|t| shared.recorded().issued.contains(t)) {
        let mut reply = FcmReply::new(401, "UNAUTHENTICATED", "THIRD_PARTY_AUTH_ERROR");
        reply.error_code = "UNAUTHENTICATED";
        return google_error(reply, "Request had invalid authentication credentials.");
    }
    if project != PROJECT {
        return google_error(
            FcmReply::new(403, "PERMISSION_DENIED", "SENDER_ID_MISMATCH"),
            "Permission denied.",
        );
    }
    let message = body.get("message").cloned().unwrap_or(Value::Null);
    let Some(token) = message
        .get("token")
        .and_then(Value::as_str)
        .map(str::to_owned)
    else {
        return google_error(
            FcmReply::INVALID_ARGUMENT,
            "Request contains an invalid argument.",
        );
    };
    let data_is_strings = match message.get("data") {
        None => true,
        Some(Value::Object(data)) => data.values().all(Value::is_string),
        Some(_) => false,
    };
    if !data_is_strings {
        return google_error(
            FcmReply::INVALID_ARGUMENT,
            "Invalid value at 'message.data'",
        );
    }
    let mut recorded = shared.recorded();
    if let Some(reply) = recorded
        .scripts
        .get_mut(&token)
        .and_then(VecDeque::pop_front)
    {
        return google_error(reply, "scripted by the test");
    }
    recorded.messages.push(message);
    let name = format!(
        "projects/{PROJECT}/messages/{}",
        uuid::Uuid::new_v4().simple()
    );
    Json(json!({ "name": name })).into_response()
}
