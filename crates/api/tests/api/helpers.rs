//! `TestApp`: the API served in-process on port 0 with a fresh database.

use std::{net::SocketAddr, time::Duration};

use mobile_api::ApiSettings;
use mobile_runtime::{Env, Shutdown, service::Listeners};
pub use mobile_testkit::api::{Account as Session, sample};
use mobile_testkit::{TestDb, TestKeys};
use reqwest::{Client, Method, RequestBuilder, Response, StatusCode};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};

pub struct TestApp {
    pub base: String,
    pub metrics: String,
    pub client: Client,
    pub db: TestDb,
    pub keys: TestKeys,
    pub shutdown: Shutdown,
    pub server: JoinHandle<anyhow::Result<()>>,
    pub redis_prefix: String,
    /// `STORAGE_URL`'s directory (unless a test points it elsewhere).
    pub storage_dir: std::path::PathBuf,
}

/// `INTERNAL_API_TOKEN` of every test app.
pub const INTERNAL_TOKEN: &str = "test-only-internal-token-0123456789abcdef";

/// Settings a test may override before the app starts.
pub struct Builder {
    vars: Vec<(String, String)>,
    redis_url: String,
    direct_database: bool,
}

impl Builder {
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.vars.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Straight to PostgreSQL even when the suite runs through PgBouncer, for a test
    /// of what a direct connection does.
    pub fn direct_database(mut self) -> Self {
        self.direct_database = true;
        self
    }

    pub fn redis_url(mut self, url: String) -> Self {
        self.redis_url = url;
        self
    }

    pub async fn spawn(self) -> TestApp {
        mobile_runtime::telemetry::init_for_tests();
        let db = TestDb::new().await;
        // Key 0 signs; key 1 is "another issuer's" key, known to no one.
        let keys = TestKeys::generate(2);
        let redis_prefix = mobile_testkit::unique_redis_prefix();
        let storage_dir =
            std::env::temp_dir().join(format!("api-media-{}", uuid::Uuid::new_v4().simple()));
        let mut vars = vec![
            (
                "STORAGE_URL".to_owned(),
                format!("file://{}", storage_dir.display()),
            ),
            ("INTERNAL_API_TOKEN".to_owned(), INTERNAL_TOKEN.to_owned()),
            ("APP_ENV".to_owned(), "test".to_owned()),
            ("REDIS_URL".to_owned(), self.redis_url),
            ("REDIS_KEY_PREFIX".to_owned(), redis_prefix.clone()),
            (
                "JWT_SIGNING_KEY_FILE".to_owned(),
                keys.signing(0).display().to_string(),
            ),
            // Tests make many auth calls from one IP; those about limits lower these.
            ("RATE_LIMIT_AUTH_PER_MINUTE".to_owned(), "10000".to_owned()),
            ("RATE_LIMIT_WRITE_PER_MINUTE".to_owned(), "10000".to_owned()),
            ("SHUTDOWN_TIMEOUT_SECONDS".to_owned(), "5".to_owned()),
        ];
        if self.direct_database {
            vars.push(("DATABASE_URL".to_owned(), db.url().to_owned()));
        } else {
            vars.extend(db.service_env());
        }
        vars.extend(self.vars);
        let settings = ApiSettings::from_env(&Env::from_pairs(vars)).expect("valid test settings");

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let metrics_listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        let metrics_addr: SocketAddr = metrics_listener.local_addr().expect("addr");
        let shutdown = Shutdown::new();
        let listeners = Listeners {
            public: listener,
            metrics: metrics_listener,
        };
        let server = tokio::spawn(mobile_api::serve(settings, listeners, shutdown.clone()));
        TestApp {
            base: format!("http://{addr}"),
            metrics: format!("http://{metrics_addr}/metrics"),
            client: Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("client"),
            db,
            keys,
            shutdown,
            server,
            redis_prefix,
            storage_dir,
        }
    }
}

impl TestApp {
    pub fn builder() -> Builder {
        Builder {
            vars: Vec::new(),
            redis_url: mobile_testkit::redis_url(),
            direct_database: false,
        }
    }

    pub async fn spawn() -> Self {
        Self::builder().spawn().await
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base))
    }

    pub async fn post_json(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path)
            .json(body)
            .send()
            .await
            .expect("request")
    }

    /// A request with the session's access token.
    pub fn authed(&self, method: Method, path: &str, session: &Session) -> RequestBuilder {
        self.request(method, path)
            .bearer_auth(&session.access_token)
    }

    /// GETs `path` as `session`, asserts 200, and returns the JSON body.
    pub async fn get_json(&self, path: &str, session: &Session) -> Value {
        let response = self
            .authed(Method::GET, path, session)
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.expect("a JSON body")
    }

    pub async fn register(&self, email: &str) -> Session {
        mobile_testkit::api::register(&self.client, &self.base, email, "Tester").await
    }

    pub async fn login(&self, email: &str, password: &str) -> Response {
        self.post_json(
            "/v1/auth/login",
            &json!({"email": email, "password": password}),
        )
        .await
    }

    pub async fn refresh(&self, refresh_token: &str) -> Response {
        self.post_json("/v1/auth/refresh", &json!({"refresh_token": refresh_token}))
            .await
    }

    pub async fn metrics_text(&self) -> String {
        self.client
            .get(&self.metrics)
            .send()
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text")
    }
}

/// Asserts the response is problem+json with `status` and `code`; returns the body.
pub async fn assert_problem(response: Response, status: StatusCode, code: &str) -> Value {
    let actual = response.status();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    let request_id = response.headers().get("x-request-id").cloned();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body: Value = response.json().await.expect("a JSON body");
    assert_eq!(actual, status, "status; body: {body}");
    assert_eq!(
        content_type, "application/problem+json",
        "content type; body: {body}"
    );
    assert_eq!(body["code"], code, "code; body: {body}");
    assert_eq!(body["status"], status.as_u16());
    assert_eq!(
        body["type"].as_str(),
        Some(format!("urn:mobile-backend:problem:{code}").as_str())
    );
    assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
    let request_id = request_id.expect("x-request-id on an error");
    if replayed {
        // A replay is the stored response: it names the request that did the work.
        assert!(body["request_id"].is_string());
    } else {
        assert_eq!(body["request_id"].as_str(), request_id.to_str().ok());
    }
    body
}

/// Waits until no job matching `condition` (SQL over `jobs`) is left, for at most 20 s.
pub async fn wait_until_no_jobs(app: &TestApp, condition: &str) {
    let pool = app.db.pool().await;
    let query = format!("SELECT count(*) FROM jobs WHERE {condition}");
    for _ in 0..200 {
        let left: i64 = sqlx::query_scalar(&query).fetch_one(&pool).await.unwrap();
        if left == 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("jobs ({condition}) still left after 20 s");
}
