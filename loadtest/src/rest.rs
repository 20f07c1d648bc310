//! The `rest` and `diurnal` scenarios: a realistic mix of REST calls against a release
//! `mobile-api`, at an open-loop rate (constant for `rest`; for `diurnal`, a compressed
//! day whose peak is `--peak` / `--trough` times its trough).
//!
//! The mix, per 100 requests: 40 `GET /v1/me`, 20 message pages, 10 conversation
//! lists, 15 message posts with an `Idempotency-Key`, 10 device upserts, 5 token
//! refreshes. Users and conversations are inserted with SQL; access tokens are minted
//! with the development key (the API runs with `APP_ENV=development`); the users who
//! refresh registered through the API, so their refresh tokens are real.

use std::{f64::consts::PI, sync::Arc, time::Duration};

use anyhow::Context as _;
use mobile_domain::{SessionId, UserId};
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use sqlx::PgPool;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::{
    Flags,
    open_loop::{self, Rate},
    procs::{Service, sibling},
};

/// Everything a request needs, shared by all of them.
struct World {
    client: Client,
    base: String,
    /// (user, access token, a conversation of theirs)
    users: Vec<(Uuid, String, Uuid)>,
    /// Users whose refresh tokens rotate: one refresh at a time each.
    refreshers: Vec<Mutex<String>>,
}

#[derive(Clone, Copy)]
enum Op {
    Me,
    Messages,
    Conversations,
    Post,
    Device,
    Refresh,
}

const MIX: [(u32, Op); 6] = [
    (40, Op::Me),
    (20, Op::Messages),
    (10, Op::Conversations),
    (15, Op::Post),
    (10, Op::Device),
    (5, Op::Refresh),
];

pub async fn rest(flags: &Flags) -> anyhow::Result<()> {
    let rate = flags.number("rate", 1_000)? as f64;
    let seconds = flags.number("seconds", 60)?;
    run(
        flags,
        "rest",
        Box::new(move |_| rate),
        seconds,
        &format!("rest: {rate:.0} requests/s"),
    )
    .await
}

pub async fn diurnal(flags: &Flags) -> anyhow::Result<()> {
    let peak = flags.number("peak", 2_400)? as f64;
    let trough = flags.number("trough", 200)? as f64;
    let seconds = flags.number("seconds", 120)?;
    let day = seconds as f64;
    // Night at the start and the end, the peak at midday: a raised cosine.
    let rate: Rate =
        Box::new(move |t| trough + (peak - trough) * (1.0 - (2.0 * PI * t / day).cos()) / 2.0);
    let title = format!(
        "diurnal: {trough:.0} → {peak:.0} → {trough:.0} requests/s over {seconds} s ({:.0}× swing)",
        peak / trough
    );
    run(flags, "diurnal", rate, seconds, &title).await
}

async fn run(
    flags: &Flags,
    name: &str,
    rate: Rate,
    seconds: u64,
    title: &str,
) -> anyhow::Result<()> {
    let users_count = flags.number("users", 1_000)?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/mobile_bench_rest".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let db = crate::ws::fresh_database(&database_url).await?;
    let env = [
        ("APP_ENV", "development".to_owned()),
        ("DATABASE_URL", database_url.clone()),
        ("REDIS_URL", redis_url),
        (
            "REDIS_KEY_PREFIX",
            format!("bench:{}:", Uuid::new_v4().simple()),
        ),
        ("DATABASE_MAX_CONNECTIONS", "20".to_owned()),
        ("RATE_LIMIT_AUTH_PER_MINUTE", "60000".to_owned()),
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
    let base = format!("http://127.0.0.1:{}", api.port);
    let client = Client::builder()
        .pool_max_idle_per_host(4096)
        .timeout(Duration::from_secs(10))
        .build()?;

    eprintln!("{name}: seeding {users_count} users, conversations and messages");
    let users = seed(&db, users_count).await?;
    let tokens = crate::procs::token_minter()?;
    let users = users
        .into_iter()
        .map(|(user, conversation)| {
            Ok((
                user,
                tokens.issue(UserId::from_uuid(user), SessionId::new())?,
                conversation,
            ))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut refreshers = Vec::new();
    for n in 0..32 {
        let response = client
            .post(format!("{base}/v1/auth/register"))
            .json(&json!({ "email": format!("refresher{n}@example.com"), "password": "correct horse battery", "display_name": "R" }))
            .send()
            .await?;
        let body: Value = response.json().await?;
        let token = body["refresh_token"]
            .as_str()
            .context("refresh_token")?
            .to_owned();
        refreshers.push(Mutex::new(token));
    }
    let world = Arc::new(World {
        client,
        base,
        users,
        refreshers,
    });

    let cpu_before = api.cpu_seconds();
    let report = open_loop::run(rate, Duration::from_secs(seconds), 8_192, move |n| {
        let world = world.clone();
        async move { request(&world, n).await }
    })
    .await;
    let api_cpu = api.cpu_seconds() - cpu_before;

    let mut result = report.to_json();
    result["scenario"] = json!(name);
    result["title"] = json!(title);
    result["api_cpu_seconds"] = json!(api_cpu);
    result["mix"] = json!({ "me": 40, "messages": 20, "conversations": 10, "post_message": 15, "device_upsert": 10, "refresh": 5 });
    let out = flags.out_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join(format!("{name}.svg")),
        report.svg(title, Vec::new()),
    )?;
    std::fs::write(
        out.join(format!("{name}.json")),
        serde_json::to_string_pretty(&result)?,
    )?;
    let summary = json!({
        "scenario": name,
        "requests": result["requests"],
        "errors": result["errors"],
        "throughput_per_second": result["throughput_per_second"],
        "latency_ms": result["latency_ms"],
        "api_cpu_seconds": api_cpu,
    });
    println!("{}", serde_json::to_string_pretty(&summary)?);
    eprintln!("written to {}/{name}.json and {name}.svg", out.display());
    Ok(())
}

async fn request(world: &World, n: u64) -> Result<(), String> {
    let (user, token, conversation) = &world.users[(n % world.users.len() as u64) as usize];
    let base = &world.base;
    let client = &world.client;
    let request = match open_loop::pick(&MIX, n) {
        Op::Me => client.get(format!("{base}/v1/me")).bearer_auth(token),
        Op::Messages => client
            .get(format!("{base}/v1/conversations/{conversation}/messages?limit=20"))
            .bearer_auth(token),
        Op::Conversations => client.get(format!("{base}/v1/conversations?limit=20")).bearer_auth(token),
        Op::Post => client
            .post(format!("{base}/v1/conversations/{conversation}/messages"))
            .bearer_auth(token)
            .header("idempotency-key", format!("bench-{n}"))
            .json(&json!({ "client_msg_id": format!("m-{n}"), "body": "a message of about the length a chat line has" })),
        Op::Device => client
            .put(format!("{base}/v1/devices/{}", Uuid::from_u64_pair(user.as_u64_pair().0, n % 3)))
            .bearer_auth(token)
            .json(&json!({ "platform": "android", "push_token": format!("fcm-{user}-{}", n % 3), "app_version": "2.14.0" })),
        Op::Refresh => {
            let slot = &world.refreshers[(n % world.refreshers.len() as u64) as usize];
            let Ok(mut refresh) = slot.try_lock() else {
                // This user is mid-refresh: a real app does not refresh twice at once.
                return Ok(());
            };
            let response = client
                .post(format!("{base}/v1/auth/refresh"))
                .json(&json!({ "refresh_token": *refresh }))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if response.status() != StatusCode::OK {
                return Err(format!("refresh: {}", response.status()));
            }
            let body: Value = response.json().await.map_err(|e| e.to_string())?;
            *refresh = body["refresh_token"].as_str().unwrap_or_default().to_owned();
            return Ok(());
        }
    };
    let response = request.send().await.map_err(|e| e.to_string())?;
    let status = response.status();
    // Read the body: a client that did not would not have the answer.
    let _ = response.bytes().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{status}"))
    }
}

/// Users in conversations of five, each conversation with 50 messages. Returns each
/// user with one of their conversations.
async fn seed(db: &PgPool, users: u64) -> anyhow::Result<Vec<(Uuid, Uuid)>> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "INSERT INTO users (id, email, password_hash, display_name)
         SELECT gen_random_uuid(), 'bench-' || gen_random_uuid() || '@example.com', 'x', 'Bench'
         FROM generate_series(1, $1) RETURNING id",
    )
    .bind(i64::try_from(users)?)
    .fetch_all(db)
    .await?;
    let mut pairs = Vec::with_capacity(ids.len());
    for group in ids.chunks(5) {
        let conversation = Uuid::now_v7();
        sqlx::query("INSERT INTO conversations (id, title, created_by, owner_id, last_seq) VALUES ($1, 'bench', $2, $2, 50)")
            .bind(conversation)
            .bind(group[0])
            .execute(db)
            .await?;
        sqlx::query("INSERT INTO conversation_members (conversation_id, user_id) SELECT $1, unnest($2::uuid[])")
            .bind(conversation)
            .bind(group)
            .execute(db)
            .await?;
        sqlx::query(
            "INSERT INTO messages (conversation_id, seq, id, sender_id, client_msg_id, body)
             SELECT $1, s, gen_random_uuid(), $2, 'seed-' || s, 'seeded message number ' || s
             FROM generate_series(1, 50) AS s",
        )
        .bind(conversation)
        .bind(group[0])
        .execute(db)
        .await?;
        pairs.extend(group.iter().map(|&user| (user, conversation)));
    }
    Ok(pairs)
}
