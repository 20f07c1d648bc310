//! The hub's Redis Pub/Sub connection: one per process. It connects (retrying with
//! backoff while Redis is away), subscribes every channel the hub has local
//! subscribers for, then pumps frames in and SUBSCRIBE/UNSUBSCRIBE commands out until
//! the connection fails, and starts over. After a reconnect the hub catches every
//! conversation up from PostgreSQL; while disconnected, readiness reports 503 (this
//! pod's own fault: Redis may well answer others).

use std::time::Duration;

use futures_util::StreamExt;
use mobile_events::Channel;
use mobile_runtime::redis::Redis;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::hub::Hub;

/// A change to the set of channels this process follows.
#[derive(Debug)]
pub enum Command {
    Subscribe(Channel),
    Unsubscribe(Channel),
}

/// Longest pause between connection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// How often an idle connection is asked whether it is still there.
const HEALTH_EVERY: Duration = Duration::from_secs(5);

/// The connection loop; ends when `stop` is cancelled.
pub async fn run(
    hub: Hub,
    redis: Redis,
    mut commands: mpsc::Receiver<Command>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_before = false;
    loop {
        let session = tokio::select! {
            () = stop.cancelled() => return,
            session = connect(&hub, &redis) => session,
        };
        let (mut sink, mut stream, subscribed) = match session {
            Ok(session) => session,
            Err(error) => {
                tracing::warn!(%error, ?backoff, "Redis Pub/Sub unavailable; retrying");
                if !wait_discarding_commands(&mut commands, backoff, &stop).await {
                    return;
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        backoff = Duration::from_millis(100);
        hub.set_live(true);
        if connected_before {
            hub.metrics().pubsub_reconnects.inc();
            tracing::info!(
                channels = subscribed,
                "Redis Pub/Sub reconnected; catching up from PostgreSQL"
            );
            let hub = hub.clone();
            tokio::spawn(async move { hub.catch_up().await });
        } else {
            tracing::info!("Redis Pub/Sub connected");
        }
        connected_before = true;

        let mut health = tokio::time::interval(HEALTH_EVERY);
        health.tick().await;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                frame = stream.next() => match frame {
                    Some(message) => hub.on_frame(message.get_payload_bytes()),
                    None => break,
                },
                command = commands.recv() => {
                    let result = match command {
                        Some(Command::Subscribe(channel)) => {
                            let done = sink.subscribe(redis.key(channel)).await;
                            if done.is_ok() {
                                hub.confirm(channel);
                            }
                            done
                        }
                        // Resubscribed meanwhile: keep it.
                        Some(Command::Unsubscribe(channel)) if hub.has(channel) => Ok(()),
                        Some(Command::Unsubscribe(channel)) => sink.unsubscribe(redis.key(channel)).await,
                        None => return,
                    };
                    if let Err(error) = result {
                        tracing::warn!(%error, "SUBSCRIBE or UNSUBSCRIBE failed; reconnecting");
                        break;
                    }
                }
                _ = health.tick() => {
                    // A half-open connection never ends the stream: ask. (A subscribed
                    // connection answers PING with ["pong", ""], not "PONG".)
                    let ping = tokio::time::timeout(Duration::from_secs(2), sink.ping::<redis::Value>());
                    if !matches!(ping.await, Ok(Ok(_))) {
                        tracing::warn!("Redis Pub/Sub did not answer PING; reconnecting");
                        break;
                    }
                }
            }
        }
        hub.set_live(false);
        tracing::warn!("Redis Pub/Sub connection lost");
    }
}

type Sink = redis::aio::PubSubSink;
type Stream = redis::aio::PubSubStream;

/// Connects and subscribes every channel the hub has subscribers for. Returns the
/// connection's halves and how many channels it subscribed.
async fn connect(hub: &Hub, redis: &Redis) -> redis::RedisResult<(Sink, Stream, usize)> {
    let (mut sink, stream) = redis.pubsub().await?.split();
    let channels = hub.channel_list();
    if !channels.is_empty() {
        let names: Vec<String> = channels.iter().map(|c| redis.key(c)).collect();
        sink.subscribe(names).await?;
    }
    Ok((sink, stream, channels.len()))
}

/// Sleeps `duration` while Pub/Sub is down. Commands that arrive meanwhile are dropped:
/// the hub's channel table is the truth, and the next connection subscribes to what it
/// says. Returns `false` if the hub is stopping.
async fn wait_discarding_commands(
    commands: &mut mpsc::Receiver<Command>,
    duration: Duration,
    stop: &CancellationToken,
) -> bool {
    let deadline = tokio::time::sleep(duration);
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            () = stop.cancelled() => return false,
            () = &mut deadline => return true,
            command = commands.recv() => if command.is_none() { return false },
        }
    }
}
