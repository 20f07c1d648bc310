//! The fan-out hub: one Redis Pub/Sub connection per process, shared by every client.
//!
//! ```text
//!   Redis ──frame──► hub task ──► channel table ──try_send──► connection queues (bounded)
//!                         ▲             │ gap? fill from PostgreSQL, in order
//!   connections ─SUBSCRIBE/UNSUBSCRIBE─┘ (reference-counted: Redis sees one per channel)
//! ```
//!
//! - **Reference-counted subscriptions.** A channel is SUBSCRIBEd when its first local
//!   subscriber arrives and UNSUBSCRIBEd when its last leaves, so each pod receives only
//!   the channels its own clients follow, never everything.
//! - **Encoded once.** A frame arrives from Redis as the exact bytes clients receive;
//!   only its small header is parsed, and every recipient gets a clone of the same
//!   reference-counted buffer.
//! - **In order, no gaps, no duplicates.** Per conversation channel the hub remembers
//!   the last offset it passed on. A duplicate is dropped; an offset beyond the next
//!   one means a lost publish, so the missing range is read from PostgreSQL (once, for
//!   all local subscribers) and delivered first, while later frames wait in order.
//! - **Slow consumers do not slow anyone.** Delivery is `try_send` into each
//!   connection's bounded queue; a full queue marks that connection for closing (4008)
//!   and fan-out moves on.
//! - **Redis loss.** The task reconnects with backoff, resubscribes every channel that
//!   has local subscribers, and catches each conversation channel up from PostgreSQL.
//!   While disconnected, readiness reports 503.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use axum::extract::ws::Utf8Bytes;
use futures_util::StreamExt;
use mobile_db::conversations::{self, Window};
use mobile_events::{Channel, FrameHeader, MessageData};
use sqlx::PgPool;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::metrics::{GatewayMetrics, OutcomeLabel};

/// A process-unique connection number.
pub type ConnId = u64;

/// One frame for one channel, cheap to clone for every recipient.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub channel: Channel,
    /// The message seq, for conversation events; `None` for ephemeral and user events.
    pub offset: Option<i64>,
    /// The sender of an ephemeral event; their own connections do not get it back.
    pub from: Option<Uuid>,
    pub frame: Utf8Bytes,
}

impl Delivery {
    /// A conversation event read from PostgreSQL, encoded as the API encodes it.
    pub fn from_message(message: conversations::Message) -> Self {
        let message = MessageData::from(message);
        Self {
            channel: Channel::Conversation(message.conversation_id),
            offset: Some(message.seq),
            from: None,
            frame: Utf8Bytes::from(mobile_events::message_created(&message)),
        }
    }
}

/// A connection's registration on a channel.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub conn: ConnId,
    pub user: Uuid,
    /// Shared deliveries: a queue slot is one pointer, however large the frame, so an
    /// idle connection's queue costs little memory.
    pub queue: mpsc::Sender<Arc<Delivery>>,
    /// Cancelled when the queue overflows: the connection closes itself with 4008.
    pub slow: CancellationToken,
}

#[derive(Debug)]
struct ChannelState {
    subscribers: Vec<Subscriber>,
    /// The newest offset passed on (conversation channels), once known.
    last_offset: Option<i64>,
    /// A gap fill is running; frames that arrive meanwhile wait in `pending`.
    filling: bool,
    pending: Vec<Arc<Delivery>>,
    /// Whether Redis has confirmed the SUBSCRIBE on the current connection.
    confirmed: watch::Sender<bool>,
}

impl ChannelState {
    fn new() -> Self {
        Self {
            subscribers: Vec::new(),
            last_offset: None,
            filling: false,
            pending: Vec::new(),
            confirmed: watch::Sender::new(false),
        }
    }
}

/// A range of offsets to read from PostgreSQL and deliver before what waits.
#[derive(Debug, Clone, Copy)]
struct Fill {
    channel: Channel,
    from: i64,
    to: i64,
}

#[derive(Debug)]
enum Command {
    Subscribe(Channel),
    Unsubscribe(Channel),
}

/// The hub, shared by every connection of the process. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    channels: Mutex<HashMap<Channel, ChannelState>>,
    commands: mpsc::Sender<Command>,
    live: AtomicBool,
    db: PgPool,
    prefix: String,
    metrics: GatewayMetrics,
}

/// How long a subscriber waits for Redis to confirm a new SUBSCRIBE before it goes
/// on without (a reconnect would resubscribe and catch up anyway).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Messages read from PostgreSQL per query when filling a gap.
const FILL_CHUNK: i64 = 1_000;

impl Hub {
    /// Creates the hub and the task that owns its Redis Pub/Sub connection; the task
    /// ends when `stop` is cancelled.
    pub fn start(
        redis_url: &str,
        prefix: &str,
        db: PgPool,
        metrics: GatewayMetrics,
        stop: CancellationToken,
    ) -> Result<Self, redis::RedisError> {
        let client = redis::Client::open(redis_url)?;
        let (commands, receiver) = mpsc::channel(1024);
        let hub = Self {
            inner: Arc::new(Inner {
                channels: Mutex::new(HashMap::new()),
                commands,
                live: AtomicBool::new(false),
                db,
                prefix: prefix.to_owned(),
                metrics,
            }),
        };
        tokio::spawn(hub.clone().run(client, receiver, stop));
        Ok(hub)
    }

    /// Whether the Pub/Sub connection is up (readiness).
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    fn channels(&self) -> MutexGuard<'_, HashMap<Channel, ChannelState>> {
        // A panic while holding the lock cannot leave the table half-updated in a way
        // that matters more than losing the process: keep serving.
        self.inner
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers a subscriber. Returns once Redis confirmed the channel's subscription
    /// (or at once if Pub/Sub is down), so everything published from now on reaches
    /// the subscriber's queue: read PostgreSQL *after* this to recover without a gap.
    pub async fn subscribe(&self, channel: Channel, subscriber: Subscriber) {
        let (first, mut confirmed) = {
            let mut channels = self.channels();
            let first = !channels.contains_key(&channel);
            let state = channels.entry(channel).or_insert_with(ChannelState::new);
            state.subscribers.push(subscriber);
            (first, state.confirmed.subscribe())
        };
        if first {
            self.inner.metrics.pubsub_channels.inc();
            let _ = self.inner.commands.send(Command::Subscribe(channel)).await;
        }
        if self.is_live() {
            let wait = confirmed.wait_for(|confirmed| *confirmed);
            if tokio::time::timeout(CONFIRM_TIMEOUT, wait).await.is_err() {
                tracing::warn!(%channel, "Redis did not confirm the subscription in time");
            }
        }
    }

    /// Removes a connection from a channel; the last one out unsubscribes from Redis.
    pub async fn unsubscribe(&self, channel: Channel, conn: ConnId) {
        let last = {
            let mut channels = self.channels();
            let Some(state) = channels.get_mut(&channel) else {
                return;
            };
            state.subscribers.retain(|s| s.conn != conn);
            let last = state.subscribers.is_empty();
            if last {
                channels.remove(&channel);
            }
            last
        };
        if last {
            self.inner.metrics.pubsub_channels.dec();
            let _ = self
                .inner
                .commands
                .send(Command::Unsubscribe(channel))
                .await;
        }
    }

    /// A subscriber recovered a conversation up to `offset` from PostgreSQL. If the
    /// hub has passed on less than that, its other subscribers missed the difference
    /// too: fill it for them.
    pub fn observe_offset(&self, channel: Channel, offset: i64) {
        let fill = {
            let mut channels = self.channels();
            let Some(state) = channels.get_mut(&channel) else {
                return;
            };
            match state.last_offset {
                None => {
                    state.last_offset = Some(offset);
                    None
                }
                Some(last) if offset > last && !state.filling => {
                    state.filling = true;
                    Some(Fill {
                        channel,
                        from: last + 1,
                        to: offset,
                    })
                }
                Some(_) => None,
            }
        };
        if let Some(fill) = fill {
            self.spawn_fill(fill);
        }
    }

    /// Handles one frame from Redis.
    fn on_frame(&self, payload: &[u8]) {
        let started = Instant::now();
        self.inner.metrics.pubsub_messages.inc();
        let delivery = match parse_delivery(payload) {
            Ok(delivery) => delivery,
            Err(reason) => {
                tracing::warn!(reason, "dropping a malformed frame from Redis");
                return;
            }
        };
        let fill = {
            let mut channels = self.channels();
            let Some(state) = channels.get_mut(&delivery.channel) else {
                // Unsubscribed a moment ago.
                return;
            };
            self.accept(state, Arc::new(delivery))
        };
        if let Some(fill) = fill {
            self.spawn_fill(fill);
        }
        self.inner
            .metrics
            .fanout_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Passes a delivery on in order, or holds it back behind a gap. Returns the fill
    /// to start, if this delivery revealed a gap.
    fn accept(&self, state: &mut ChannelState, delivery: Arc<Delivery>) -> Option<Fill> {
        let Some(offset) = delivery.offset else {
            self.broadcast(state, &delivery);
            return None;
        };
        if state.filling {
            state.pending.push(delivery);
            return None;
        }
        match state.last_offset {
            Some(last) if offset <= last => None,
            Some(last) if offset > last + 1 => {
                let fill = Fill {
                    channel: delivery.channel,
                    from: last + 1,
                    to: offset - 1,
                };
                state.filling = true;
                state.pending.push(delivery);
                Some(fill)
            }
            _ => {
                state.last_offset = Some(offset);
                self.broadcast(state, &delivery);
                None
            }
        }
    }

    /// Queues a delivery for every subscriber, never waiting for one.
    fn broadcast(&self, state: &ChannelState, delivery: &Arc<Delivery>) {
        for subscriber in &state.subscribers {
            if delivery.from == Some(subscriber.user) {
                continue;
            }
            match subscriber.queue.try_send(Arc::clone(delivery)) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(_)) => subscriber.slow.cancel(),
                // The connection is closing; it unsubscribes itself.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
            }
        }
    }

    fn spawn_fill(&self, fill: Fill) {
        let hub = self.clone();
        tokio::spawn(async move {
            let result = hub.read_range(fill).await;
            hub.finish_fill(fill, result);
        });
    }

    /// The messages of a conversation with offsets `from..=to`, from PostgreSQL.
    async fn read_range(&self, fill: Fill) -> Result<Vec<Arc<Delivery>>, sqlx::Error> {
        let Channel::Conversation(conversation) = fill.channel else {
            return Ok(Vec::new());
        };
        let mut deliveries = Vec::new();
        let mut after = fill.from - 1;
        while after < fill.to {
            let limit = (fill.to - after).min(FILL_CHUNK);
            let page = conversations::list_messages(
                &self.inner.db,
                conversation,
                Window::After(after),
                limit,
            )
            .await?;
            let Some(last) = page.last().map(|m| m.seq) else {
                break;
            };
            after = last;
            deliveries.extend(
                page.into_iter()
                    .map(|m| Arc::new(Delivery::from_message(m))),
            );
        }
        Ok(deliveries)
    }

    /// Delivers a fill's messages, then whatever waited behind it, in order.
    fn finish_fill(&self, fill: Fill, result: Result<Vec<Arc<Delivery>>, sqlx::Error>) {
        let channel = fill.channel;
        let next_fill = {
            let mut channels = self.channels();
            let Some(state) = channels.get_mut(&channel) else {
                return;
            };
            state.filling = false;
            let filled = match result {
                Ok(filled) => {
                    self.inner
                        .metrics
                        .gap_fills
                        .get_or_create(&OutcomeLabel { outcome: "filled" })
                        .inc();
                    filled
                }
                Err(e) => {
                    // Pass on what waits; each connection notices the gap and fills it
                    // for itself (or its client recovers with `since`).
                    tracing::warn!(%channel, error = %e, "gap fill failed");
                    self.inner
                        .metrics
                        .gap_fills
                        .get_or_create(&OutcomeLabel { outcome: "failed" })
                        .inc();
                    state.last_offset = None;
                    Vec::new()
                }
            };
            let mut waiting = std::mem::take(&mut state.pending);
            waiting.sort_by_key(|d| d.offset);
            let mut next_fill = None;
            for delivery in filled {
                // Within the range by construction: never starts another fill.
                let _ = self.accept(state, delivery);
            }
            if let Some(last) = state.last_offset
                && last < fill.to
            {
                // Seqs are committed before they are published, so PostgreSQL has every
                // offset below one that was published. If it does not, waiting would
                // stall the channel for good: move on, and say so.
                tracing::error!(%channel, last, missing_to = fill.to, "offsets missing from PostgreSQL; skipping them");
                state.last_offset = Some(fill.to);
            }
            for delivery in waiting {
                if let Some(fill) = self.accept(state, delivery) {
                    next_fill = Some(fill);
                }
            }
            next_fill
        };
        if let Some(fill) = next_fill {
            self.spawn_fill(fill);
        }
    }

    /// After a reconnect: anything published while the subscription was down is in
    /// PostgreSQL. Fill every conversation channel up to its newest seq.
    async fn catch_up(&self) {
        let conversations: Vec<Uuid> = self
            .channels()
            .keys()
            .filter_map(|channel| match channel {
                Channel::Conversation(id) => Some(*id),
                Channel::User(_) => None,
            })
            .collect();
        if conversations.is_empty() {
            return;
        }
        let newest = match conversations::last_seqs(&self.inner.db, &conversations).await {
            Ok(newest) => newest,
            Err(e) => {
                tracing::warn!(error = %e, "cannot catch up after reconnecting; clients recover with `since`");
                return;
            }
        };
        for (conversation, seq) in newest {
            self.observe_offset(Channel::Conversation(conversation), seq);
        }
    }

    /// The Pub/Sub task: connect, resubscribe, pump frames and commands, repeat.
    async fn run(
        self,
        client: redis::Client,
        mut commands: mpsc::Receiver<Command>,
        stop: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut connected_before = false;
        loop {
            let connected = tokio::select! {
                _ = stop.cancelled() => return,
                connected = tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()) => connected,
            };
            let pubsub = match connected {
                Ok(Ok(pubsub)) => pubsub,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, ?backoff, "Redis Pub/Sub unavailable; retrying");
                    if !self
                        .wait_discarding_commands(&mut commands, backoff, &stop)
                        .await
                    {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
                Err(_) => {
                    tracing::warn!(?backoff, "Redis Pub/Sub connect timed out; retrying");
                    if !self
                        .wait_discarding_commands(&mut commands, backoff, &stop)
                        .await
                    {
                        return;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            let (mut sink, mut stream) = pubsub.split();

            // Resubscribe every channel that has local subscribers.
            let channels: Vec<Channel> = self.channels().keys().copied().collect();
            if !channels.is_empty() {
                let names: Vec<String> = channels.iter().map(|c| self.redis_name(*c)).collect();
                if let Err(e) = sink.subscribe(names).await {
                    tracing::warn!(error = %e, "resubscribing failed; reconnecting");
                    continue;
                }
            }
            self.set_all_confirmed(true);
            self.inner.live.store(true, Ordering::Release);
            if connected_before {
                self.inner.metrics.pubsub_reconnects.inc();
                tracing::info!(
                    channels = channels.len(),
                    "Redis Pub/Sub reconnected; catching up from PostgreSQL"
                );
                let hub = self.clone();
                tokio::spawn(async move { hub.catch_up().await });
            } else {
                tracing::info!("Redis Pub/Sub connected");
            }
            connected_before = true;

            let mut health = tokio::time::interval(Duration::from_secs(5));
            health.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    frame = stream.next() => match frame {
                        Some(message) => self.on_frame(message.get_payload_bytes()),
                        None => break,
                    },
                    command = commands.recv() => match command {
                        Some(Command::Subscribe(channel)) => {
                            if let Err(e) = sink.subscribe(self.redis_name(channel)).await {
                                tracing::warn!(error = %e, "SUBSCRIBE failed; reconnecting");
                                break;
                            }
                            if let Some(state) = self.channels().get(&channel) {
                                state.confirmed.send_replace(true);
                            }
                        }
                        Some(Command::Unsubscribe(channel)) => {
                            // Resubscribed meanwhile: keep it.
                            if self.channels().contains_key(&channel) {
                                continue;
                            }
                            if let Err(e) = sink.unsubscribe(self.redis_name(channel)).await {
                                tracing::warn!(error = %e, "UNSUBSCRIBE failed; reconnecting");
                                break;
                            }
                        }
                        None => return,
                    },
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
            self.inner.live.store(false, Ordering::Release);
            self.set_all_confirmed(false);
            tracing::warn!("Redis Pub/Sub connection lost");
        }
    }

    /// Sleeps `duration` while Pub/Sub is down. Commands that arrive meanwhile are
    /// dropped: the channel table is the truth, and the next connection subscribes to
    /// what it says. Returns `false` if the hub is stopping.
    async fn wait_discarding_commands(
        &self,
        commands: &mut mpsc::Receiver<Command>,
        duration: Duration,
        stop: &CancellationToken,
    ) -> bool {
        let deadline = tokio::time::sleep(duration);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = &mut deadline => return true,
                command = commands.recv() => if command.is_none() { return false },
            }
        }
    }

    fn set_all_confirmed(&self, confirmed: bool) {
        for state in self.channels().values() {
            state.confirmed.send_replace(confirmed);
        }
    }

    fn redis_name(&self, channel: Channel) -> String {
        mobile_events::redis_channel(&self.inner.prefix, channel)
    }
}

/// A frame from Redis as a delivery: the bytes as they came, plus the parsed header.
fn parse_delivery(payload: &[u8]) -> Result<Delivery, &'static str> {
    let header = FrameHeader::parse(payload).map_err(|_| "not an event frame")?;
    let channel: Channel = header.channel.parse().map_err(|_| "unknown channel")?;
    let text = String::from_utf8(payload.to_vec()).map_err(|_| "not UTF-8")?;
    Ok(Delivery {
        channel,
        offset: header.offset,
        from: header.from,
        frame: Utf8Bytes::from(text),
    })
}
