//! The `rollout` scenario: a rolling restart under load, on loopback, as Kubernetes
//! does it, and what the users saw.
//!
//! Two `mobile-api` and two `mobile-gateway` processes sit behind a local nginx
//! configured like the Ingress component (WebSocket upgrade, an hour's read timeout,
//! keep-alive to the upstreams, `proxy_next_upstream` so a request that meets a
//! closing connection goes to the other replica). Under it:
//!
//! - the REST mix of `rest` at `--rate` requests per second, open loop;
//! - `--clients` WebSocket clients (10 per conversation) through nginx, each following
//!   its conversation; a poster sends `--posts` messages per second to the
//!   conversations over REST. A client told to reconnect (1012) reconnects through
//!   nginx and resubscribes with `since`, as the protocol says.
//!
//! The services run with `SHUTDOWN_DELAY_SECONDS=3` (what the preStop sleep does on
//! Kubernetes: unready while still serving, so nginx stops sending new connections)
//! and the rollout is: SIGTERM api-1 and gateway-1, wait for them to exit, start them
//! again on the same ports, wait until ready, then the same for the second pair.
//! Reported: failed requests (target 0), reconnects, and per client any message seq
//! missing or seen twice (target 0 and 0).

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use futures_util::{SinkExt as _, StreamExt as _};
use mobile_domain::UserId;
use reqwest::Client;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest as _};
use uuid::Uuid;

use crate::{
    Flags,
    chart::Mark,
    open_loop,
    procs::{Service, free_port, sibling},
};

pub async fn run(flags: &Flags) -> anyhow::Result<()> {
    let rate = flags.number("rate", 300)? as f64;
    let clients = flags.number("clients", 100)?;
    let posts = flags.number("posts", 20)?;
    let database_url = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/mobile_bench_rollout".to_owned());
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let db = crate::ws::fresh_database(&database_url).await?;
    let env = vec![
        ("APP_ENV", "development".to_owned()),
        ("DATABASE_URL", database_url.clone()),
        ("REDIS_URL", redis_url),
        (
            "REDIS_KEY_PREFIX",
            format!("bench:{}:", Uuid::new_v4().simple()),
        ),
        ("DATABASE_MAX_CONNECTIONS", "10".to_owned()),
        ("RATE_LIMIT_AUTH_PER_MINUTE", "60000".to_owned()),
        ("RATE_LIMIT_WRITE_PER_MINUTE", "60000".to_owned()),
        ("SHUTDOWN_DELAY_SECONDS", "3".to_owned()),
        ("SHUTDOWN_TIMEOUT_SECONDS", "15".to_owned()),
        ("TRUSTED_PROXY_HOPS", "1".to_owned()),
        (
            "STORAGE_URL",
            format!(
                "file://{}",
                std::env::temp_dir().join("mobile-bench-media").display()
            ),
        ),
    ];
    let (api_bin, gateway_bin) = (sibling("mobile-api")?, sibling("mobile-gateway")?);
    let ports: Vec<(u16, u16)> = (0..4)
        .map(|_| Ok((free_port()?, free_port()?)))
        .collect::<anyhow::Result<_>>()?;
    let mut apis = [
        Some(Service::start_on(&api_bin, &env, ports[0].0, ports[0].1).await?),
        Some(Service::start_on(&api_bin, &env, ports[1].0, ports[1].1).await?),
    ];
    let mut gateways = [
        Some(Service::start_on(&gateway_bin, &env, ports[2].0, ports[2].1).await?),
        Some(Service::start_on(&gateway_bin, &env, ports[3].0, ports[3].1).await?),
    ];
    let nginx_port = free_port()?;
    let nginx_dir =
        std::env::temp_dir().join(format!("mobile-rollout-nginx-{}", std::process::id()));
    let _nginx = start_nginx(
        &nginx_dir,
        nginx_port,
        &[ports[0].0, ports[1].0],
        &[ports[2].0, ports[3].0],
    )
    .await?;
    let base = format!("http://127.0.0.1:{nginx_port}");

    // Users, conversations of ten, tokens.
    let users = crate::ws::insert_users(&db, clients).await?;
    let mut conversations = Vec::new();
    for group in users.chunks(10) {
        let id = Uuid::now_v7();
        sqlx::query("INSERT INTO conversations (id, created_by, owner_id) VALUES ($1, $2, $2)")
            .bind(id)
            .bind(group[0])
            .execute(&db)
            .await?;
        sqlx::query("INSERT INTO conversation_members (conversation_id, user_id) SELECT $1, unnest($2::uuid[])")
            .bind(id)
            .bind(group)
            .execute(&db)
            .await?;
        conversations.push((id, group.to_vec()));
    }
    let minter = crate::procs::token_minter()?;
    let token = |user: Uuid| minter.issue(UserId::from_uuid(user), crate::ws::session_of(user));

    // WebSocket followers.
    let stop = Arc::new(AtomicBool::new(false));
    let reconnects = Arc::new(AtomicU64::new(0));
    let mut followers = Vec::new();
    for (conversation, members) in &conversations {
        for &member in members {
            let follower = Follower {
                url: format!("ws://127.0.0.1:{nginx_port}/v1/ws"),
                token: token(member)?,
                conversation: *conversation,
                seen: Arc::new(Mutex::new(Vec::new())),
            };
            let seen = follower.seen.clone();
            let (stop, reconnects) = (stop.clone(), reconnects.clone());
            followers.push((
                *conversation,
                seen,
                tokio::spawn(follower.follow(stop, reconnects)),
            ));
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // REST load and the poster, both through nginx.
    let client = Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(10))
        .build()?;
    let tokens: Arc<Vec<(String, Uuid)>> = Arc::new(
        conversations
            .iter()
            .flat_map(|(c, members)| members.iter().map(move |m| (*m, *c)))
            .map(|(m, c)| Ok((token(m)?, c)))
            .collect::<anyhow::Result<_>>()?,
    );
    let duration = Duration::from_secs(flags.number("seconds", 60)?);
    // The chart's time axis starts here, with the load.
    let load_started = Instant::now();
    let load = {
        let (client, base, tokens) = (client.clone(), base.clone(), tokens.clone());
        tokio::spawn(open_loop::run(
            Box::new(move |_| rate),
            duration,
            4_096,
            move |n| {
                let (client, base, tokens) = (client.clone(), base.clone(), tokens.clone());
                async move {
                    let (token, conversation) = &tokens[(n % tokens.len() as u64) as usize];
                    let request = if n % 3 == 0 {
                        client.get(format!(
                            "{base}/v1/conversations/{conversation}/messages?limit=20"
                        ))
                    } else {
                        client.get(format!("{base}/v1/me"))
                    };
                    let response = request
                        .bearer_auth(token)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    let status = response.status();
                    let _ = response.bytes().await.map_err(|e| e.to_string())?;
                    if status.is_success() {
                        Ok(())
                    } else {
                        Err(status.to_string())
                    }
                }
            },
        ))
    };
    let posted = Arc::new(Mutex::new(vec![0u64; conversations.len()]));
    let poster = {
        let (client, base, posted) = (client.clone(), base.clone(), posted.clone());
        let targets: Vec<(Uuid, String)> = conversations
            .iter()
            .map(|(c, m)| Ok((*c, token(m[0])?)))
            .collect::<anyhow::Result<_>>()?;
        tokio::spawn(open_loop::run(
            Box::new(move |_| posts as f64),
            duration,
            256,
            move |n| {
                let (client, base, posted, targets) = (
                    client.clone(),
                    base.clone(),
                    posted.clone(),
                    targets.clone(),
                );
                async move {
                    let index = (n % targets.len() as u64) as usize;
                    let (conversation, token) = &targets[index];
                    let response = client
                    .post(format!("{base}/v1/conversations/{conversation}/messages"))
                    .bearer_auth(token)
                    .header("idempotency-key", format!("rollout-{n}"))
                    .json(&json!({ "client_msg_id": format!("r-{n}"), "body": format!("message {n}") }))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                    let status = response.status();
                    let body: Value = response.json().await.map_err(|e| e.to_string())?;
                    if !status.is_success() {
                        return Err(format!("post: {status} {body}"));
                    }
                    let seq = body["seq"].as_u64().unwrap_or(0);
                    let mut posted = posted
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    posted[index] = posted[index].max(seq);
                    Ok(())
                }
            },
        ))
    };

    // The rollout: one api and one gateway at a time, as maxSurge 1 / maxUnavailable 0
    // would (here the replacement starts after the old one stops, the harder case).
    let third = duration / 4;
    tokio::time::sleep(third).await;
    let mut exit_codes = Vec::new();
    let mut marks = Vec::new();
    for replica in 0..2 {
        eprintln!("\nrollout: restarting api-{replica} and gateway-{replica}");
        marks.push(Mark {
            at: load_started.elapsed().as_secs_f64(),
            label: format!("api-{replica} + gateway-{replica} stop"),
        });
        let (api, gateway) = (
            apis[replica].take().context("api")?,
            gateways[replica].take().context("gateway")?,
        );
        let (api_exit, gateway_exit) = tokio::join!(api.terminate(), gateway.terminate());
        exit_codes.push(json!({ "api": api_exit?, "gateway": gateway_exit? }));
        apis[replica] =
            Some(Service::start_on(&api_bin, &env, ports[replica].0, ports[replica].1).await?);
        gateways[replica] = Some(
            Service::start_on(
                &gateway_bin,
                &env,
                ports[2 + replica].0,
                ports[2 + replica].1,
            )
            .await?,
        );
        marks.push(Mark {
            at: load_started.elapsed().as_secs_f64(),
            label: format!("replicas {replica} ready"),
        });
        tokio::time::sleep(third / 2).await;
    }
    let load = load.await?;
    let poster = poster.await?;
    // Let the last deliveries arrive, then stop the followers.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    for (_, _, task) in &followers {
        task.abort();
    }

    // What each follower saw against what was posted.
    let posted = posted
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let (mut lost, mut duplicated, mut out_of_order) = (0u64, 0u64, 0u64);
    for (conversation, seen, _) in &followers {
        let index = conversations
            .iter()
            .position(|(c, _)| c == conversation)
            .unwrap_or(0);
        let seen = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let unique: BTreeSet<u64> = seen.iter().copied().collect();
        duplicated += (seen.len() - unique.len()) as u64;
        out_of_order += seen.windows(2).filter(|w| w[1] <= w[0]).count() as u64;
        lost += (1..=posted[index]).filter(|s| !unique.contains(s)).count() as u64;
    }
    let result = json!({
        "scenario": "rollout",
        "rest": load.to_json(),
        "posts": poster.to_json(),
        "websocket": {
            "clients": followers.len(),
            "reconnects": reconnects.load(Ordering::Relaxed),
            "messages_posted": posted.iter().sum::<u64>(),
            "deliveries_expected": posted.iter().sum::<u64>() * 10,
            "lost": lost,
            "duplicated": duplicated,
            "out_of_order": out_of_order,
        },
        "exit_codes": exit_codes,
        "marks": marks.iter().map(|m| json!({ "at": m.at, "label": m.label })).collect::<Vec<_>>(),
    });
    let out = flags.out_dir();
    std::fs::create_dir_all(&out)?;
    std::fs::write(
        out.join("rollout.json"),
        serde_json::to_string_pretty(&result)?,
    )?;
    std::fs::write(out.join("rollout.svg"), load.svg(TITLE, marks))?;
    println!(
        "{}",
        serde_json::to_string_pretty(&json!({
            "rest_requests": result["rest"]["requests"],
            "rest_failed": result["rest"]["errors"],
            "posts": result["posts"]["requests"],
            "posts_failed": result["posts"]["errors"],
            "websocket": result["websocket"],
            "exit_codes": result["exit_codes"],
        }))?
    );
    if std::env::var_os("ROLLOUT_VERBOSE").is_none() {
        let _ = std::fs::remove_dir_all(&nginx_dir);
    }
    Ok(())
}

/// The chart's title.
pub const TITLE: &str =
    "rollout: REST through nginx while api and gateway replicas restart one at a time";

/// One WebSocket client following one conversation through restarts.
struct Follower {
    url: String,
    token: String,
    conversation: Uuid,
    /// Every seq delivered, in arrival order.
    seen: Arc<Mutex<Vec<u64>>>,
}

impl Follower {
    async fn follow(self, stop: Arc<AtomicBool>, reconnects: Arc<AtomicU64>) {
        let mut since: Option<u64> = None;
        while !stop.load(Ordering::Relaxed) {
            if let Err(e) = self.session(&mut since).await {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                log_verbose(&format!("follower reconnecting: {e}"));
            }
            reconnects.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// One connection: subscribe (with `since` after the first), record events, until
    /// the server closes it.
    async fn session(&self, since: &mut Option<u64>) -> anyhow::Result<()> {
        let mut request = self.url.as_str().into_client_request()?;
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {}", self.token).parse()?);
        let (mut socket, _) = tokio_tungstenite::connect_async(request).await?;
        let mut subscribe = json!({ "type": "subscribe", "id": 1, "channel": format!("conversation:{}", self.conversation) });
        if let Some(since) = since {
            subscribe["since"] = json!(since);
        }
        socket.send(Message::text(subscribe.to_string())).await?;
        while let Some(message) = socket.next().await {
            log_verbose(&format!("follower got {message:?}"));
            match message? {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(&text)?;
                    if frame["type"] == "event"
                        && let Some(offset) = frame["offset"].as_u64()
                    {
                        self.seen
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(offset);
                        *since = Some(offset);
                    } else if frame["type"] == "subscribed" && since.is_none() {
                        *since = Some(0);
                    } else if frame["type"] == "error" {
                        bail!("error frame: {text}");
                    }
                }
                Message::Close(frame) => {
                    log_verbose(&format!("follower closed by the server: {frame:?}"));
                    return Ok(());
                }
                _ => {}
            }
        }
        Ok(())
    }
}

fn log_verbose(message: &str) {
    if std::env::var_os("ROLLOUT_VERBOSE").is_some() {
        eprintln!("{message}");
    }
}

/// nginx as the Ingress component configures it, in a directory of its own. On
/// Kubernetes, readiness takes a draining pod out of the endpoints; here nginx learns
/// it from the 503 a draining replica answers (`proxy_next_upstream`), and never
/// marks a replica down (`max_fails=0`), so a replica that just came back is tried at
/// once.
async fn start_nginx(
    dir: &Path,
    port: u16,
    apis: &[u16],
    gateways: &[u16],
) -> anyhow::Result<tokio::process::Child> {
    std::fs::create_dir_all(dir.join("logs"))?;
    let servers = |ports: &[u16]| {
        ports
            .iter()
            .map(|p| format!("server 127.0.0.1:{p} max_fails=0;"))
            .collect::<Vec<_>>()
            .join("\n        ")
    };
    let config = format!(
        // One process, no master: killing the child (on drop, too) stops all of
        // nginx. With a master, a SIGKILLed master left its worker serving.
        r#"master_process off;
worker_processes 1;
error_log {dir}/logs/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    upstream api {{
        {apis}
        keepalive 64;
    }}
    upstream gateway {{
        {gateways}
    }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen 127.0.0.1:{port};
        location = /v1/ws {{
            proxy_pass http://gateway;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
            proxy_next_upstream error timeout http_503;
        }}
        location / {{
            proxy_pass http://api;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            # A request that meets a closing replica goes to the other one. Writes are
            # safe to resend: every POST here carries an Idempotency-Key.
            proxy_next_upstream error timeout http_502 http_503 non_idempotent;
            proxy_next_upstream_tries 3;
        }}
    }}
}}
"#,
        dir = dir.display(),
        apis = servers(apis),
        gateways = servers(gateways),
    );
    let conf = dir.join("nginx.conf");
    std::fs::write(&conf, config)?;
    let nginx = PathBuf::from(if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    });
    let child = tokio::process::Command::new(nginx)
        .args([
            "-c",
            &conf.display().to_string(),
            "-p",
            &dir.display().to_string(),
            "-g",
            "daemon off;",
        ])
        .kill_on_drop(true)
        .spawn()
        .context("start nginx (apt-get install nginx-light)")?;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(child);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("nginx did not start")
}
