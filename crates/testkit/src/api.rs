//! Talking to a running API the way an app does, for tests of the other services.

use serde_json::{Value, json};

/// A registered account and its first token pair.
#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: String,
    pub access_token: String,
    pub refresh_token: String,
}

impl Account {
    /// From a register or login response body.
    pub fn from_body(body: &Value) -> Self {
        let text = |value: &Value| value.as_str().expect("a string field").to_owned();
        Self {
            user_id: text(&body["user"]["id"]),
            access_token: text(&body["access_token"]),
            refresh_token: text(&body["refresh_token"]),
        }
    }
}

/// The password every test account has.
pub const PASSWORD: &str = "correct horse battery";

/// Registers `email` (display name `name`) with the API at `base`; 201 or panics.
pub async fn register(http: &reqwest::Client, base: &str, email: &str, name: &str) -> Account {
    let response = http
        .post(format!("{base}/v1/auth/register"))
        .json(&json!({"email": email, "password": PASSWORD, "display_name": name}))
        .send()
        .await
        .expect("register");
    assert_eq!(response.status(), 201, "register {email}");
    Account::from_body(&response.json().await.expect("a JSON body"))
}

/// The value of the first sample line of a Prometheus text exposition that starts
/// with `prefix` (a name with its labels), if there is one.
pub fn sample(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.rsplit(' ').next())
        .and_then(|value| value.parse().ok())
}
