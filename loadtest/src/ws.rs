//! The `ws` scenario: the gateway's memory per idle connection, its fan-out
//! throughput, and publish → deliver latency across two gateways.
//!
//! Setup: a fresh database (`mobile_bench`), two `mobile-gateway` processes with
//! `APP_ENV=development` (so this driver can mint tokens with the published development
//! key), users and conversations inserted with SQL, and events published straight to
//! Redis exactly as the API publishes them after a commit.
//!
//! 1. **Idle memory**: `--idle` connections (default 16000) open on gateway A, half as a
//!    warm-up; the growth of its resident memory over the second half divided by that
//!    half's number (the marginal cost of one more idle connection).
//! 2. **Fan-out**: `--subscribers` clients (default 1000) of one conversation on gateway A,
//!    `--messages` events (default 2000, 100-byte body) published as fast as the clients
//!    take them (at most 100 events ahead of the slowest client, so none is closed as
//!    slow). Deliveries per second of wall time, and per second of gateway CPU time,
//!    the figure that does not depend on how much CPU the clients took.
//!    Then the same through Socket.IO with its Redis adapter
//!    (`loadtest/peers/socketio`, skipped with `--peer none`), for the ratio.
//! 3. **Latency**: 200 clients of another conversation, half on each gateway, `--rate`
//!    events per second (default 200) for `--seconds` (default 10); each event carries
//!    its publish time, each client records receive − publish.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use mobile_domain::{SessionId, UserId};
use serde_json::json;
use sqlx::{Executor, PgPool};
use tokio_tungstenite::tungstenite::{
    Message, client::IntoClientRequest, protocol::WebSocketConfig,
};
use uuid::Uuid;

use crate::{
    Flags,
    procs::{Service, sibling},
};

pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Events published ahead of the slowest client, at most (well inside the gateway's
/// outbound queue of 256, so no client is closed as slow).
const WINDOW: u64 = 100;
/// Where `loadtest/peers/install.sh` installs the Socket.IO peer.
const SOCKETIO_PEER: &str = "loadtest/peers/socketio";
const BODY: &str = "a message of exactly one hundred bytes, which is about what a chat line is, give or take a word....";

pub async fn run(flags: &Flags) -> anyhow::Result<()> {
    let idle = flags.number("idle", 16_000)?;
    let subscribers = flags.number("subscribers", 1_000)?;
    let messages = flags.number("messages", 2_000)?;
    let rate = flags.number("rate", 200)?;
    let seconds = flags.number("seconds", 10)?;
    let latency_clients = 200;
    let with_peer = flags.text("peer", "socketio") != "none";
    if with_peer && !Path::new(SOCKETIO_PEER).join("node_modules").exists() {
        bail!(
            "the Socket.IO peer is not installed: run loadtest/peers/install.sh (or pass --peer none)"
        );
    }

    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/mobile_bench".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let db = fresh_database(&database_url).await?;
    let prefix = format!("bench:{}:", Uuid::new_v4().simple());
    let gateway = sibling("mobile-gateway")?;
    let env = [
        ("APP_ENV", "development".to_owned()),
        ("DATABASE_URL", database_url.clone()),
        ("REDIS_URL", redis_url.clone()),
        ("REDIS_KEY_PREFIX", prefix.clone()),
        ("DATABASE_MAX_CONNECTIONS", "20".to_owned()),
    ];
    let a = Service::start(&gateway, &env).await?;
    let b = Service::start(&gateway, &env).await?;
    let tokens = crate::procs::token_minter()?;
    let mint = |user: Uuid| tokens.issue(UserId::from_uuid(user), session_of(user));
    let redis = redis::Client::open(redis_url.as_str())?;
    let mut publisher = redis.get_multiplexed_async_connection().await?;

    // 1. Idle memory: the marginal cost of a connection. The first half of the
    //    connections warms up what is paid once (allocator arenas, buffers of the
    //    Redis client, the runtime's I/O slab); the growth over the second half,
    //    divided by its size, is what one more idle connection costs.
    eprintln!("idle: opening {idle} connections");
    let users = insert_users(&db, idle).await?;
    let targets: Vec<(String, String)> = users
        .iter()
        .map(|&u| Ok((ws_url(&a), mint(u)?)))
        .collect::<anyhow::Result<_>>()?;
    let (warm_up, measured) = targets.split_at(targets.len() / 2);
    let warm_sockets = connect_all(warm_up.to_vec()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = a.rss();
    let measured_count = measured.len();
    let idle_sockets = connect_all(measured.to_vec()).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = a.rss();
    let per_connection = rss_after.saturating_sub(rss_before) as f64 / measured_count as f64;
    eprintln!("idle: {per_connection:.0} bytes per connection");
    drop(idle_sockets);
    drop(warm_sockets);
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2. Fan-out throughput on one gateway.
    eprintln!("fan-out: {subscribers} subscribers, {messages} events");
    let members = insert_users(&db, subscribers).await?;
    let conversation = insert_conversation(&db, &members).await?;
    let urls: Vec<(String, String)> = members
        .iter()
        .map(|&u| Ok((ws_url(&a), mint(u)?)))
        .collect::<anyhow::Result<_>>()?;
    let sockets = subscribe_all(connect_all(urls).await?, conversation).await?;
    // One counter per client: the publisher keeps within WINDOW of the slowest one.
    let counters: Arc<Vec<AtomicU64>> =
        Arc::new((0..sockets.len()).map(|_| AtomicU64::new(0)).collect());
    let readers: Vec<_> = sockets
        .into_iter()
        .enumerate()
        .map(|(i, mut socket)| {
            let counters = counters.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() {
                        counters[i].fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    let slowest = || {
        counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let delivered = || {
        counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let channel = format!("{prefix}conversation:{conversation}");
    let total = messages * subscribers;
    let cpu_before = a.cpu_seconds();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(120);
    for offset in 1..=messages {
        while slowest() + WINDOW < offset {
            if Instant::now() > deadline {
                bail!(
                    "deliveries stalled at {} of {total}; gateway: {}",
                    delivered(),
                    a.metric_lines("websocket_disconnects").await
                );
            }
            tokio::task::yield_now().await;
        }
        let frame = event(conversation, offset, json!({ "body": BODY }));
        let _: () = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(frame)
            .query_async(&mut publisher)
            .await?;
    }
    while delivered() < total {
        if Instant::now() > deadline {
            bail!(
                "only {} of {total} deliveries arrived; gateway: {}",
                delivered(),
                a.metric_lines("websocket_disconnects").await
            );
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let gateway_cpu = a.cpu_seconds() - cpu_before;
    for reader in readers {
        reader.abort();
    }
    let per_second = total as f64 / elapsed;
    let per_cpu_second = total as f64 / gateway_cpu.max(0.01);
    eprintln!(
        "fan-out: {per_second:.0} deliveries/s wall, {per_cpu_second:.0} per gateway CPU-second"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 2b. The same fan-out through the peer a Node.js team would deploy instead, in
    //     this run, so the ratio compares figures from one machine state.
    let peer = if with_peer {
        eprintln!("fan-out peer: Socket.IO, {subscribers} subscribers, {messages} events");
        let peer = socketio_fanout(subscribers, messages).await?;
        let peer_per_cpu = peer["deliveries_per_server_cpu_second"]
            .as_f64()
            .unwrap_or(0.0);
        let ratio = per_cpu_second / peer_per_cpu.max(1e-9);
        eprintln!("fan-out peer: {peer_per_cpu:.0} per server CPU-second; ratio {ratio:.2}");
        json!({ "result": peer, "ratio_per_server_cpu_second": ratio })
    } else {
        serde_json::Value::Null
    };

    // 3. Latency across two gateways at a steady rate.
    eprintln!(
        "latency: {latency_clients} clients on two gateways, {rate} events/s for {seconds} s"
    );
    let members = insert_users(&db, latency_clients).await?;
    let conversation = insert_conversation(&db, &members).await?;
    let urls: Vec<(String, String)> = members
        .iter()
        .enumerate()
        .map(|(i, &u)| Ok((ws_url(if i % 2 == 0 { &a } else { &b }), mint(u)?)))
        .collect::<anyhow::Result<_>>()?;
    let sockets = subscribe_all(connect_all(urls).await?, conversation).await?;
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            tokio::spawn(async move {
                let mut histogram =
                    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds");
                while let Ok(Some(Ok(message))) =
                    tokio::time::timeout(Duration::from_secs(3), socket.next()).await
                {
                    if let Message::Text(text) = message
                        && let Some(sent) = sent_at(&text)
                    {
                        let micros = now_nanos().saturating_sub(sent) / 1_000;
                        let _ = histogram.record(micros.max(1));
                    }
                }
                histogram
            })
        })
        .collect();
    let channel = format!("{prefix}conversation:{conversation}");
    let events = rate * seconds;
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for offset in 1..=events {
        tick.tick().await;
        let frame = event(
            conversation,
            offset,
            json!({ "t": now_nanos(), "body": BODY }),
        );
        let _: () = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(frame)
            .query_async(&mut publisher)
            .await?;
    }
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for reader in readers {
        latency.add(reader.await?)?;
    }
    let expected = events * latency_clients;
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1_000.0;
    eprintln!(
        "latency: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} of {expected} delivered",
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1_000.0,
        latency.len()
    );

    let result = json!({
        "scenario": "ws",
        "machine": machine(),
        "idle": { "connections": idle, "measured_connections": measured_count,
                  "rss_before_bytes": rss_before, "rss_after_bytes": rss_after,
                  "bytes_per_connection": per_connection.round() },
        "fanout": { "subscribers": subscribers, "events": messages, "payload_bytes": BODY.len(),
                    "deliveries": total, "seconds": elapsed, "gateway_cpu_seconds": gateway_cpu,
                    "deliveries_per_second": per_second.round(),
                    "deliveries_per_gateway_cpu_second": per_cpu_second.round() },
        "fanout_peer_socketio": peer,
        "latency": { "clients": latency_clients, "gateways": 2, "rate_per_second": rate, "seconds": seconds,
                     "expected_deliveries": expected, "deliveries": latency.len(),
                     "p50_ms": ms(0.5), "p90_ms": ms(0.9), "p99_ms": ms(0.99), "p999_ms": ms(0.999),
                     "max_ms": latency.max() as f64 / 1_000.0 },
    });
    let dir = flags.out_dir();
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("ws.json");
    std::fs::write(&path, serde_json::to_string_pretty(&result)?)?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    eprintln!("written to {}", path.display());
    Ok(())
}

/// Runs `loadtest/peers/socketio/bench.js` (Socket.IO with its Redis adapter, the same
/// fan-out shape) and returns the JSON line it prints.
async fn socketio_fanout(subscribers: u64, messages: u64) -> anyhow::Result<serde_json::Value> {
    let output = tokio::process::Command::new("node")
        .arg("bench.js")
        .arg(subscribers.to_string())
        .arg(messages.to_string())
        .current_dir(SOCKETIO_PEER)
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .output();
    let output = tokio::time::timeout(Duration::from_secs(300), output)
        .await
        .context("the Socket.IO peer did not finish within 300 s")?
        .context("start node (is Node.js installed?)")?;
    if !output.status.success() {
        bail!("the Socket.IO peer failed: {}", output.status);
    }
    let line = String::from_utf8_lossy(&output.stdout);
    serde_json::from_str(line.trim()).context("the Socket.IO peer's result")
}

fn ws_url(service: &Service) -> String {
    format!("ws://127.0.0.1:{}/v1/ws", service.port)
}

/// An event frame as the API publishes it.
fn event(conversation: Uuid, offset: u64, data: serde_json::Value) -> String {
    json!({"type": "event", "channel": format!("conversation:{conversation}"), "event": "message.created",
           "offset": offset, "data": data})
    .to_string()
}

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The publish time carried in a latency event (`"t":<nanos>`), without parsing the rest.
fn sent_at(frame: &str) -> Option<u64> {
    let start = frame.find("\"t\":")? + 4;
    let digits: String = frame[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The session [`insert_users`] signed `user` in under.
pub fn session_of(user: Uuid) -> SessionId {
    SessionId::from_uuid(user)
}

/// Drops and re-creates the database `url` names, migrated. The URL is read as the
/// services read it (`?sslmode=…` and the rest stay options, not part of the name).
pub async fn fresh_database(url: &str) -> anyhow::Result<PgPool> {
    let options: sqlx::postgres::PgConnectOptions = url.parse().context("a postgres:// URL")?;
    let name = options.get_database().unwrap_or("mobile_bench").to_owned();
    let admin = PgPool::connect_with(options.database("postgres"))
        .await
        .context("connect to PostgreSQL")?;
    admin
        .execute(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)").as_str())
        .await?;
    admin.close().await;
    mobile_db::migrate(url).await?;
    Ok(PgPool::connect(url).await?)
}

/// Inserts `count` users, each signed in once under a session whose id is the user's
/// own: [`session_of`] names it in the tokens minted for them, and the gateway, which
/// checks its sockets' sessions now and then, finds it live.
pub async fn insert_users(db: &PgPool, count: u64) -> anyhow::Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "WITH inserted AS (
             INSERT INTO users (id, email, password_hash, display_name)
             SELECT gen_random_uuid(), 'bench-' || gen_random_uuid() || '@example.com', 'x', 'Bench'
             FROM generate_series(1, $1)
             RETURNING id
         ), signed_in AS (
             INSERT INTO sessions (id, user_id) SELECT id, id FROM inserted
         )
         SELECT id FROM inserted",
    )
    .bind(i64::try_from(count)?)
    .fetch_all(db)
    .await?)
}

async fn insert_conversation(db: &PgPool, members: &[Uuid]) -> anyhow::Result<Uuid> {
    let id = Uuid::now_v7();
    sqlx::query("INSERT INTO conversations (id, created_by, owner_id) VALUES ($1, $2, $2)")
        .bind(id)
        .bind(members[0])
        .execute(db)
        .await?;
    sqlx::query(
        "INSERT INTO conversation_members (conversation_id, user_id) SELECT $1, unnest($2::uuid[])",
    )
    .bind(id)
    .bind(members)
    .execute(db)
    .await?;
    Ok(id)
}

/// Opens every connection (100 at a time) and reads its welcome.
async fn connect_all(targets: Vec<(String, String)>) -> anyhow::Result<Vec<Socket>> {
    stream::iter(targets)
        .map(|(url, token)| async move {
            let mut request = url.into_client_request()?;
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            // tungstenite zero-fills its whole read buffer (128 KiB by default) before
            // every read; a thousand clients doing that per event would make the
            // load generator, not the gateway, the bottleneck.
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
            let (mut socket, _) =
                tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
            match socket.next().await {
                Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => Ok(socket),
                other => bail!("expected a welcome, got {other:?}"),
            }
        })
        .buffer_unordered(100)
        .collect::<Vec<anyhow::Result<Socket>>>()
        .await
        .into_iter()
        .collect()
}

async fn subscribe_all(sockets: Vec<Socket>, conversation: Uuid) -> anyhow::Result<Vec<Socket>> {
    let frame =
        json!({"type": "subscribe", "id": 1, "channel": format!("conversation:{conversation}")})
            .to_string();
    stream::iter(sockets)
        .map(|mut socket| {
            let frame = frame.clone();
            async move {
                socket.send(Message::text(frame)).await?;
                match socket.next().await {
                    Some(Ok(Message::Text(text))) if text.contains("\"subscribed\"") => Ok(socket),
                    other => bail!("expected subscribed, got {other:?}"),
                }
            }
        })
        .buffer_unordered(100)
        .collect::<Vec<anyhow::Result<Socket>>>()
        .await
        .into_iter()
        .collect()
}

fn machine() -> serde_json::Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")?
                    .split(':')
                    .nth(1)
                    .map(|m| m.trim().to_owned())
            })
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, std::num::NonZeroUsize::get);
    json!({ "cpu": cpu, "cores": cores })
}
