//! The `rooms` scenario: chat-shaped load, where chat apps live.
//!
//! `--users` connections (default 10 000) over two gateways, each user a member of about
//! five conversations of 2 to 50 members (sizes drawn uniformly; memberships at random)
//! and subscribed to each. One `mobile-api` takes the writes, `--rate` per second
//! (default 100) for `--seconds` (default 30), open loop: posts (70 %), edits of a
//! recent message by its sender (10 %), deletions (5 %) and reads (15 %, a member's
//! `POST .../read`). Every message and edit carries its send time; each client records
//! send → receive for every event it gets.
//!
//! Reported: deliveries per second, send → deliver p50/p99/p99.9 (the whole path: the
//! API's transaction and publish, Redis, the gateways, the socket), the writes' p99,
//! deliveries lost (each event's members, all connected, against what arrived), and
//! each gateway's resident memory per connection with its subscriptions: the growth of
//! its RSS from before the connections to after the subscriptions, divided by its
//! connections, and the same for the second half of the connections alone (the
//! marginal cost, after the first half paid the process's one-time costs).

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use futures_util::{SinkExt, StreamExt, stream};
use hdrhistogram::Histogram;
use mobile_domain::UserId;
use reqwest::Client;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{
    Message, client::IntoClientRequest, protocol::WebSocketConfig,
};
use uuid::Uuid;

use crate::{
    Flags,
    chart::{Axis, Chart, Series},
    open_loop::{self, pick},
    procs::{Service, sibling},
    ws::{Socket, fresh_database, insert_users, now_nanos, session_of},
};

/// What one write of the mix does.
#[derive(Debug, Clone, Copy)]
enum Write {
    Post,
    Edit,
    Delete,
    Read,
}

const MIX: [(u32, Write); 4] = [
    (70, Write::Post),
    (10, Write::Edit),
    (5, Write::Delete),
    (15, Write::Read),
];

/// A small deterministic generator (xorshift), so two runs draw the same rooms.
struct Draw(u64);

impl Draw {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

struct Room {
    id: Uuid,
    members: Vec<Uuid>,
}

/// What the clients saw, per second of the run.
struct Seen {
    started: Instant,
    deliveries: Vec<AtomicU64>,
    latency: Vec<Mutex<Histogram<u64>>>,
}

impl Seen {
    fn second(&self) -> usize {
        (self.started.elapsed().as_secs() as usize).min(self.deliveries.len() - 1)
    }
}

pub async fn run(flags: &Flags) -> anyhow::Result<()> {
    let users = flags.number("users", 10_000)?;
    let rate = flags.number("rate", 100)? as f64;
    let seconds = flags.number("seconds", 30)?;

    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/mobile_bench".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let db = fresh_database(&database_url).await?;
    let env = [
        ("APP_ENV", "development".to_owned()),
        ("DATABASE_URL", database_url.clone()),
        ("REDIS_URL", redis_url),
        (
            "REDIS_KEY_PREFIX",
            format!("bench:{}:", Uuid::new_v4().simple()),
        ),
        ("DATABASE_MAX_CONNECTIONS", "20".to_owned()),
        ("RATE_LIMIT_WRITE_PER_MINUTE", "60000".to_owned()),
        (
            "STORAGE_URL",
            format!(
                "file://{}",
                std::env::temp_dir().join("mobile-bench-media").display()
            ),
        ),
    ];
    let api = Service::start(&sibling("mobile-api")?, &env).await?;
    let gateways = [
        Service::start(&sibling("mobile-gateway")?, &env).await?,
        Service::start(&sibling("mobile-gateway")?, &env).await?,
    ];

    // The rooms: sizes 2..=50 until every user has about five memberships.
    eprintln!("rooms: {users} users");
    let people = insert_users(&db, users).await?;
    let mut draw = Draw(0x9E37_79B9_7F4A_7C15);
    let mut rooms = Vec::new();
    let mut memberships = 0;
    while memberships < people.len() * 5 {
        let size = 2 + draw.below(49);
        let mut members: Vec<Uuid> = (0..size)
            .map(|_| people[draw.below(people.len())])
            .collect();
        members.sort_unstable();
        members.dedup();
        if members.len() < 2 {
            continue;
        }
        memberships += members.len();
        rooms.push(Room {
            id: Uuid::now_v7(),
            members,
        });
    }
    for chunk in rooms.chunks(500) {
        let ids: Vec<Uuid> = chunk.iter().map(|r| r.id).collect();
        let owners: Vec<Uuid> = chunk.iter().map(|r| r.members[0]).collect();
        sqlx::query(
            "INSERT INTO conversations (id, created_by, owner_id)
             SELECT id, owner, owner FROM unnest($1::uuid[], $2::uuid[]) AS r(id, owner)",
        )
        .bind(&ids)
        .bind(&owners)
        .execute(&db)
        .await?;
        let (room_ids, member_ids): (Vec<Uuid>, Vec<Uuid>) = chunk
            .iter()
            .flat_map(|r| r.members.iter().map(move |m| (r.id, *m)))
            .unzip();
        sqlx::query(
            "INSERT INTO conversation_members (conversation_id, user_id)
             SELECT * FROM unnest($1::uuid[], $2::uuid[])",
        )
        .bind(&room_ids)
        .bind(&member_ids)
        .execute(&db)
        .await?;
    }
    let mut rooms_of: HashMap<Uuid, Vec<Uuid>> = HashMap::new();
    for room in &rooms {
        for member in &room.members {
            rooms_of.entry(*member).or_default().push(room.id);
        }
    }
    eprintln!(
        "rooms: {} conversations, {memberships} memberships",
        rooms.len()
    );

    // Connect everyone (alternating gateways) and subscribe each to their rooms.
    let minter = crate::procs::token_minter()?;
    let rss_before: Vec<u64> = gateways.iter().map(Service::rss).collect();
    let targets = people
        .iter()
        .enumerate()
        .map(|(i, &user)| {
            let token = minter.issue(UserId::from_uuid(user), session_of(user))?;
            let url = format!("ws://127.0.0.1:{}/v1/ws", gateways[i % 2].port);
            let channels = rooms_of.get(&user).cloned().unwrap_or_default();
            Ok((url, token, channels))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    // In two halves: the first also pays what a process pays once (allocator arenas,
    // the I/O slab, table growth); the second's growth is what one more connection
    // with its subscriptions costs, as the `ws` scenario's idle figure is measured.
    let connecting = Instant::now();
    let mut targets = targets;
    let second_half = targets.split_off(targets.len() / 2);
    let second_count = second_half.len();
    let mut sockets = connect_and_subscribe(targets).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_half: Vec<u64> = gateways.iter().map(Service::rss).collect();
    sockets.extend(connect_and_subscribe(second_half).await?);
    eprintln!(
        "rooms: {} connections subscribed in {:.1} s",
        sockets.len(),
        connecting.elapsed().as_secs_f64()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after: Vec<u64> = gateways.iter().map(Service::rss).collect();
    let growth = |from: &[u64], connections: usize| -> Vec<f64> {
        from.iter()
            .zip(&rss_after)
            .map(|(before, after)| {
                after.saturating_sub(*before) as f64 / (connections / 2).max(1) as f64
            })
            .collect()
    };
    let per_connection = growth(&rss_before, people.len());
    let marginal = growth(&rss_half, second_count);
    eprintln!(
        "rooms: resident memory per connection {per_connection:?} bytes in all, {marginal:?} for the second half"
    );

    // The clients: count every conversation event, time those that carry a send time.
    let slots = seconds as usize + 10;
    let seen = Arc::new(Seen {
        started: Instant::now(),
        deliveries: (0..slots).map(|_| AtomicU64::new(0)).collect(),
        latency: (0..slots).map(|_| Mutex::new(histogram())).collect(),
    });
    let readers: Vec<_> = sockets
        .into_iter()
        .map(|mut socket| {
            let seen = seen.clone();
            tokio::spawn(async move {
                while let Some(Ok(message)) = socket.next().await {
                    let Message::Text(text) = message else {
                        continue;
                    };
                    if !text.contains("\"channel\":\"conversation:") {
                        continue;
                    }
                    let second = seen.second();
                    seen.deliveries[second].fetch_add(1, Ordering::Relaxed);
                    if let Some(sent) = sent_at(&text) {
                        let micros = now_nanos().saturating_sub(sent) / 1_000;
                        let mut histogram = seen.latency[second]
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let _ = histogram.record(micros.max(1));
                    }
                }
            })
        })
        .collect();

    // The writes.
    let client = Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(10))
        .build()?;
    let tokens: Arc<HashMap<Uuid, String>> = Arc::new(
        people
            .iter()
            .map(|&u| Ok((u, minter.issue(UserId::from_uuid(u), session_of(u))?)))
            .collect::<anyhow::Result<_>>()?,
    );
    let rooms = Arc::new(rooms);
    // Messages posted lately, for edits and deletions by their senders.
    let recent: Arc<Mutex<Vec<(Uuid, String, Uuid)>>> = Arc::new(Mutex::new(Vec::new()));
    // Conversation events the writes made, times the members who should get each.
    let expected = Arc::new(AtomicU64::new(0));
    let base = format!("http://127.0.0.1:{}", api.port);
    let api_cpu_before = api.cpu_seconds();
    let gateway_cpu_before: f64 = gateways.iter().map(Service::cpu_seconds).sum();
    let report = {
        let (client, tokens, rooms, recent, expected) = (
            client.clone(),
            tokens.clone(),
            rooms.clone(),
            recent.clone(),
            expected.clone(),
        );
        open_loop::run(
            Box::new(move |_| rate),
            Duration::from_secs(seconds),
            512,
            move |n| {
                let (client, tokens, rooms, recent, expected, base) = (
                    client.clone(),
                    tokens.clone(),
                    rooms.clone(),
                    recent.clone(),
                    expected.clone(),
                    base.clone(),
                );
                async move { write(n, &client, &base, &tokens, &rooms, &recent, &expected).await }
            },
        )
        .await
    };
    let api_cpu = api.cpu_seconds() - api_cpu_before;
    // Let the last deliveries arrive.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let gateway_cpu = gateways.iter().map(Service::cpu_seconds).sum::<f64>() - gateway_cpu_before;
    for reader in readers {
        reader.abort();
    }

    let delivered: u64 = seen
        .deliveries
        .iter()
        .map(|d| d.load(Ordering::Relaxed))
        .sum();
    let expected = expected.load(Ordering::Relaxed);
    let mut latency = histogram();
    for second in &seen.latency {
        latency.add(
            &*second
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )?;
    }
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1_000.0;
    let writes = report.to_json();
    let result = json!({
        "scenario": "rooms",
        "users": users,
        "conversations": rooms.len(),
        "memberships": memberships,
        "gateways": 2,
        "rate_per_second": rate,
        "seconds": seconds,
        "mix": { "post": 70, "edit": 10, "delete": 5, "read": 15 },
        "memory": { "rss_before_bytes": rss_before, "rss_half_bytes": rss_half,
                    "rss_after_bytes": rss_after,
                    "bytes_per_connection": per_connection,
                    "marginal_bytes_per_connection": marginal },
        "deliveries": { "expected": expected, "delivered": delivered,
                        "lost": expected.saturating_sub(delivered),
                        "per_second": delivered as f64 / seconds as f64,
                        "gateway_cpu_seconds": gateway_cpu },
        "latency_ms": { "p50": ms(&latency, 0.5), "p99": ms(&latency, 0.99),
                        "p999": ms(&latency, 0.999), "max": latency.max() as f64 / 1_000.0 },
        "writes": writes,
        "api_cpu_seconds": api_cpu,
    });
    let chart = Chart {
        title: "rooms: chat-shaped load over two gateways (posts, edits, deletions, reads)",
        left_unit: "deliveries/s",
        right_unit: "ms",
        series: vec![
            Series {
                label: "deliveries".into(),
                color: "#1f77b4",
                axis: Axis::Left,
                values: seen.deliveries[..seconds as usize]
                    .iter()
                    .map(|d| d.load(Ordering::Relaxed) as f64)
                    .collect(),
            },
            Series {
                label: "send → deliver p50".into(),
                color: "#2ca02c",
                axis: Axis::Right,
                values: per_second(&seen, seconds, 0.5),
            },
            Series {
                label: "send → deliver p99".into(),
                color: "#ff7f0e",
                axis: Axis::Right,
                values: per_second(&seen, seconds, 0.99),
            },
        ],
        marks: Vec::new(),
    };
    let out = flags.out_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("rooms.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    std::fs::write(out.join("rooms.svg"), chart.render())?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    eprintln!("written to {}/rooms.json and rooms.svg", out.display());
    if writes["errors"].as_u64().unwrap_or(0) > 0 {
        bail!("some writes failed: {}", writes["first_errors"]);
    }
    Ok(())
}

/// One write of the mix, by a member of a room drawn from `n`.
async fn write(
    n: u64,
    client: &Client,
    base: &str,
    tokens: &HashMap<Uuid, String>,
    rooms: &[Room],
    recent: &Mutex<Vec<(Uuid, String, Uuid)>>,
    expected: &AtomicU64,
) -> Result<(), String> {
    let mut draw = Draw(n.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1);
    let room = &rooms[draw.below(rooms.len())];
    let member = room.members[draw.below(room.members.len())];
    // One of the 50 newest messages; a deletion takes it out, so nothing is deleted
    // twice or edited after its deletion (but by an edit already under way).
    let lately = |draw: &mut Draw, take: bool| {
        let mut recent = recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if recent.is_empty() {
            return None;
        }
        let index = recent.len() - 1 - draw.below(recent.len().min(50));
        Some(if take {
            recent.swap_remove(index)
        } else {
            recent[index].clone()
        })
    };
    let (request, members) = match *pick(&MIX, n) {
        Write::Post => (
            client
                .post(format!("{base}/v1/conversations/{}/messages", room.id))
                .bearer_auth(&tokens[&member])
                .json(&json!({ "client_msg_id": format!("rooms-{n}"),
                               "body": format!("t:{} a line of chat, about as long as most are", now_nanos()) })),
            room.members.len(),
        ),
        Write::Edit | Write::Delete => {
            let edit = matches!(pick(&MIX, n), Write::Edit);
            let Some((conversation, message, sender)) = lately(&mut draw, !edit) else {
                return Ok(());
            };
            let path = format!("{base}/v1/conversations/{conversation}/messages/{message}");
            let request = if edit {
                client
                    .patch(path)
                    .json(&json!({ "body": format!("t:{} edited", now_nanos()) }))
            } else {
                client.delete(path)
            };
            let size = rooms
                .iter()
                .find(|r| r.id == conversation)
                .map_or(0, |r| r.members.len());
            (request.bearer_auth(&tokens[&sender]), size)
        }
        Write::Read => (
            client
                .post(format!("{base}/v1/conversations/{}/read", room.id))
                .bearer_auth(&tokens[&member])
                .json(&json!({ "offset": i64::MAX / 2 })),
            0,
        ),
    };
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.unwrap_or(Value::Null);
    if body["code"] == "message_deleted" {
        // An edit that lost the race with the deletion: refused, as it should be.
        return Ok(());
    }
    if !status.is_success() {
        return Err(format!("{status} {body}"));
    }
    if matches!(pick(&MIX, n), Write::Post)
        && let Some(id) = body["id"].as_str()
    {
        let mut recent = recent
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        recent.push((room.id, id.to_owned(), member));
        if recent.len() > 1_000 {
            recent.drain(..500);
        }
    }
    // Every write here makes one event for each member (an edit's body always differs;
    // nothing is deleted twice), but a read, whose event goes to the reader alone.
    expected.fetch_add(members as u64, Ordering::Relaxed);
    Ok(())
}

fn histogram() -> Histogram<u64> {
    Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

fn per_second(seen: &Seen, seconds: u64, quantile: f64) -> Vec<f64> {
    seen.latency[..seconds as usize]
        .iter()
        .map(|h| {
            h.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .value_at_quantile(quantile) as f64
                / 1_000.0
        })
        .collect()
}

/// The send time a message body carries (`"body":"t:<nanos> …"`), without parsing the
/// rest of the frame.
fn sent_at(frame: &str) -> Option<u64> {
    let start = frame.find("\"body\":\"t:")? + 10;
    let digits: String = frame[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// Opens every connection (100 at a time), reads its welcome, and subscribes it to its
/// channels.
async fn connect_and_subscribe(
    targets: Vec<(String, String, Vec<Uuid>)>,
) -> anyhow::Result<Vec<Socket>> {
    stream::iter(targets)
        .map(|(url, token, channels)| async move {
            let mut request = url.into_client_request()?;
            request
                .headers_mut()
                .insert("authorization", format!("Bearer {token}").parse()?);
            let config = WebSocketConfig::default().read_buffer_size(8 * 1024);
            let (mut socket, _) =
                tokio_tungstenite::connect_async_with_config(request, Some(config), true).await?;
            match socket.next().await {
                Some(Ok(Message::Text(text))) if text.contains("\"welcome\"") => {}
                other => bail!("expected a welcome, got {other:?}"),
            }
            for (id, channel) in channels.iter().enumerate() {
                let frame = json!({"type": "subscribe", "id": id, "channel": format!("conversation:{channel}")});
                socket.send(Message::text(frame.to_string())).await?;
            }
            let mut answered = 0;
            while answered < channels.len() {
                match socket.next().await {
                    Some(Ok(Message::Text(text))) if text.contains("\"subscribed\"") => {
                        answered += 1;
                    }
                    Some(Ok(Message::Text(text))) if text.contains("\"error\"") => {
                        bail!("a subscribe was refused: {text}")
                    }
                    Some(Ok(_)) => {}
                    other => bail!("expected subscribed, got {other:?}"),
                }
            }
            Ok(socket)
        })
        .buffer_unordered(100)
        .collect::<Vec<anyhow::Result<Socket>>>()
        .await
        .into_iter()
        .collect()
}
