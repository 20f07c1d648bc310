//! `Stack`: the API and gateways sharing one database and Redis prefix; `Client`: a
//! WebSocket client that reads frames as JSON.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mobile_runtime::{Env, Shutdown, service::Listeners};
use mobile_testkit::{TestDb, TestKeys};
use serde_json::{Value, json};
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_tungstenite::{
    MaybeTlsStream, WebSocketStream,
    tungstenite::{Message, client::IntoClientRequest},
};

pub struct Gateway {
    pub addr: String,
    pub metrics: String,
    pub shutdown: Shutdown,
    pub server: JoinHandle<anyhow::Result<()>>,
}

pub struct Stack {
    pub api: String,
    pub gateways: Vec<Gateway>,
    pub http: reqwest::Client,
    pub db: TestDb,
    pub keys: TestKeys,
    pub prefix: String,
    pub redis_url: String,
    _api_shutdown: Shutdown,
}

#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub token: String,
    pub refresh_token: String,
}

async fn listeners() -> Listeners {
    Listeners {
        public: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        metrics: TcpListener::bind("127.0.0.1:0").await.unwrap(),
    }
}

impl Stack {
    /// The API and `gateways` gateways, with `extra` settings for the gateways.
    pub async fn start(gateways: usize, extra: &[(&str, &str)]) -> Self {
        Self::start_with_redis(gateways, extra, mobile_testkit::redis_url()).await
    }

    pub async fn start_with_redis(
        gateways: usize,
        extra: &[(&str, &str)],
        redis_url: String,
    ) -> Self {
        mobile_runtime::telemetry::init_for_tests();
        let db = TestDb::new().await;
        let keys = TestKeys::generate(2);
        let prefix = mobile_testkit::unique_redis_prefix();
        let common = |listen: &str| -> Vec<(String, String)> {
            let mut vars: Vec<(String, String)> = vec![
                ("APP_ENV".into(), "test".into()),
                ("REDIS_URL".into(), redis_url.clone()),
                ("REDIS_KEY_PREFIX".into(), prefix.clone()),
                ("LISTEN_ADDR".into(), listen.into()),
                ("SHUTDOWN_TIMEOUT_SECONDS".into(), "4".into()),
            ];
            vars.extend(db.service_env());
            vars
        };

        let mut api_env = common("127.0.0.1:0");
        api_env.push((
            "JWT_SIGNING_KEY_FILE".into(),
            keys.signing(0).display().to_string(),
        ));
        api_env.push(("RATE_LIMIT_AUTH_PER_MINUTE".into(), "60000".into()));
        api_env.push(("RATE_LIMIT_WRITE_PER_MINUTE".into(), "60000".into()));
        let api_settings = mobile_api::ApiSettings::from_env(&Env::from_pairs(api_env)).unwrap();
        let api_listeners = listeners().await;
        let api = format!("http://{}", api_listeners.public.local_addr().unwrap());
        let api_shutdown = Shutdown::new();
        tokio::spawn(mobile_api::serve(
            api_settings,
            api_listeners,
            api_shutdown.clone(),
        ));

        let verify = keys.verify_file(&[0]);
        let mut started = Vec::new();
        for _ in 0..gateways {
            let mut env = common("127.0.0.1:0");
            env.push(("JWT_VERIFY_KEYS_FILE".into(), verify.display().to_string()));
            env.extend(
                extra
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            );
            let settings =
                mobile_gateway::GatewaySettings::from_env(&Env::from_pairs(env)).unwrap();
            let listeners = listeners().await;
            let addr = format!("ws://{}/v1/ws", listeners.public.local_addr().unwrap());
            let metrics_url = format!("http://{}/metrics", listeners.metrics.local_addr().unwrap());
            let shutdown = Shutdown::new();
            let server = tokio::spawn(mobile_gateway::serve(settings, listeners, shutdown.clone()));
            started.push(Gateway {
                addr,
                metrics: metrics_url,
                shutdown,
                server,
            });
        }
        let stack = Self {
            api,
            gateways: started,
            http: reqwest::Client::new(),
            db,
            keys,
            prefix,
            redis_url,
            _api_shutdown: api_shutdown,
        };
        for gateway in &stack.gateways {
            stack.wait_ready(gateway).await;
        }
        stack
    }

    /// Waits until `gateway` is ready and not degraded: its Pub/Sub subscription is up.
    pub async fn wait_ready(&self, gateway: &Gateway) {
        let ready = gateway
            .addr
            .replace("ws://", "http://")
            .replace("/v1/ws", "/health/ready");
        for _ in 0..100 {
            if let Ok(response) = self.http.get(&ready).send().await
                && let Ok(body) = response.json::<Value>().await
                && body["status"] == "ready"
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway {} did not become ready", gateway.addr);
    }

    pub async fn register(&self, name: &str) -> User {
        let email = format!("{name}@example.com");
        let account = mobile_testkit::api::register(&self.http, &self.api, &email, name).await;
        User {
            id: account.user_id,
            token: account.access_token,
            refresh_token: account.refresh_token,
        }
    }

    /// Signs `name` (registered before) in again: a second session.
    pub async fn login(&self, name: &str) -> User {
        let response = self
            .http
            .post(format!("{}/v1/auth/login", self.api))
            .json(&json!({"email": format!("{name}@example.com"), "password": mobile_testkit::api::PASSWORD}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let account = mobile_testkit::api::Account::from_body(&response.json().await.unwrap());
        User {
            id: account.user_id,
            token: account.access_token,
            refresh_token: account.refresh_token,
        }
    }

    /// POSTs `body` to the API's `path`; the status.
    pub async fn api_post(&self, path: &str, body: &Value) -> u16 {
        self.http
            .post(format!("{}{path}", self.api))
            .json(body)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// Sends `method` to the API's `path` as `user` (with `body`, if any); the status.
    pub async fn api_as(
        &self,
        user: &User,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> u16 {
        let request = self
            .http
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&user.token);
        let request = match body {
            Some(body) => request.json(body),
            None => request,
        };
        request.send().await.unwrap().status().as_u16()
    }

    pub async fn conversation(&self, creator: &User, members: &[&User]) -> String {
        let ids: Vec<&str> = members.iter().map(|m| m.id.as_str()).collect();
        let body: Value = self
            .http
            .post(format!("{}/v1/conversations", self.api))
            .bearer_auth(&creator.token)
            .json(&json!({"member_ids": ids}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["id"].as_str().unwrap().to_owned()
    }

    /// Posts a message; returns its seq.
    pub async fn post(&self, sender: &User, conversation: &str, body: &str) -> i64 {
        let response = self
            .http
            .post(format!(
                "{}/v1/conversations/{conversation}/messages",
                self.api
            ))
            .bearer_auth(&sender.token)
            .json(&json!({"client_msg_id": uuid::Uuid::new_v4().to_string(), "body": body}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 201);
        response.json::<Value>().await.unwrap()["seq"]
            .as_i64()
            .unwrap()
    }

    /// Commits a message without publishing it, as a post whose publish never
    /// reached Redis would leave it; returns its seq.
    pub async fn post_unpublished(&self, sender: &User, conversation: &str, body: &str) -> i64 {
        use mobile_db::conversations::{NewMessage, PostMessage, insert_message};
        use mobile_domain::{ClientMsgId, MessageText};
        let pool = self.db.pool().await;
        let mut tx = pool.begin().await.unwrap();
        let client_msg_id = ClientMsgId::parse(&uuid::Uuid::new_v4().to_string()).unwrap();
        let message = NewMessage {
            conversation_id: conversation.parse().unwrap(),
            sender_id: sender.id.parse().unwrap(),
            client_msg_id: &client_msg_id,
            body: &MessageText::parse(body).unwrap(),
            media_id: None,
        };
        let PostMessage::Created(message) = insert_message(&mut tx, &message).await.unwrap() else {
            panic!("posted");
        };
        tx.commit().await.unwrap();
        pool.close().await;
        message.seq
    }

    /// Publishes `frame` on `channel` (`conversation:<id>`) straight to Redis, as a
    /// publisher would.
    pub async fn publish_raw(&self, channel: &str, frame: &str) {
        let client = redis::Client::open(self.redis_url.as_str()).unwrap();
        let mut redis = client.get_multiplexed_async_connection().await.unwrap();
        let _: i64 = redis::cmd("PUBLISH")
            .arg(format!("{}{channel}", self.prefix))
            .arg(frame)
            .query_async(&mut redis)
            .await
            .unwrap();
    }

    pub async fn metrics(&self, gateway: usize) -> String {
        self.http
            .get(&self.gateways[gateway].metrics)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }
}

/// The value of one sample line of a Prometheus exposition; 0 when absent (a counter
/// not yet incremented).
pub fn sample(text: &str, prefix: &str) -> f64 {
    mobile_testkit::api::sample(text, prefix).unwrap_or(0.0)
}

pub type Socket = WebSocketStream<MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Client {
    pub socket: Socket,
    pub welcome: Value,
}

/// How a connection ended, as the client saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum Closed {
    Code(u16),
    /// The connection ended without a close frame.
    Abruptly,
}

impl Client {
    pub async fn connect(url: &str, token: &str) -> Self {
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let (socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
        let mut client = Self {
            socket,
            welcome: Value::Null,
        };
        client.welcome = client.next().await;
        assert_eq!(client.welcome["type"], "welcome", "{}", client.welcome);
        client
    }

    /// Connects without expecting a welcome (for refused tokens).
    pub async fn connect_raw(url: &str) -> Socket {
        tokio_tungstenite::connect_async(url).await.unwrap().0
    }

    pub async fn send(&mut self, frame: Value) {
        self.socket
            .send(Message::text(frame.to_string()))
            .await
            .unwrap();
    }

    /// The next JSON frame within 5 s.
    pub async fn next(&mut self) -> Value {
        self.next_within(Duration::from_secs(5))
            .await
            .expect("a frame within the time limit")
    }

    pub async fn next_within(&mut self, limit: Duration) -> Option<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let message = tokio::time::timeout_at(deadline, self.socket.next())
                .await
                .ok()??;
            match message.unwrap() {
                Message::Text(text) => return Some(serde_json::from_str(&text).unwrap()),
                Message::Close(frame) => panic!("closed: {frame:?}"),
                _ => {}
            }
        }
    }

    pub async fn subscribe(&mut self, conversation: &str, since: Option<i64>) -> Value {
        let mut frame = json!({"type": "subscribe", "id": 1, "channel": format!("conversation:{conversation}")});
        if let Some(since) = since {
            frame["since"] = json!(since);
        }
        self.send(frame).await;
        let answer = self.next().await;
        assert_eq!(answer["type"], "subscribed", "{answer}");
        answer
    }

    /// The offsets of the next `n` message events.
    pub async fn offsets(&mut self, n: usize) -> Vec<i64> {
        let mut offsets = Vec::new();
        while offsets.len() < n {
            let frame = self.next().await;
            if frame["event"] == "message.created" {
                offsets.push(frame["offset"].as_i64().unwrap());
            }
        }
        offsets
    }

    /// Reads until the connection ends; returns how (within `limit`).
    pub async fn closed(&mut self, limit: Duration) -> Closed {
        closed(&mut self.socket, limit).await
    }
}

/// Reads until the close frame; its code and reason (within `limit`). Panics if the
/// connection ends without one.
pub async fn close_frame(socket: &mut Socket, limit: Duration) -> (u16, String) {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("the connection stayed open for {limit:?}"),
            Ok(None) | Ok(Some(Err(_))) => panic!("the connection ended without a close frame"),
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string());
            }
            Ok(Some(Ok(Message::Close(None)))) => panic!("a close frame without a code"),
            Ok(Some(Ok(_))) => {}
        }
    }
}

pub async fn closed(socket: &mut Socket, limit: Duration) -> Closed {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Err(_) => panic!("the connection stayed open"),
            Ok(None) | Ok(Some(Err(_))) => return Closed::Abruptly,
            Ok(Some(Ok(Message::Close(frame)))) => {
                return frame.map_or(Closed::Abruptly, |f| Closed::Code(u16::from(f.code)));
            }
            Ok(Some(Ok(_))) => {}
        }
    }
}
