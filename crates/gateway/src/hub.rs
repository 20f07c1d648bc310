//! The fan-out hub: this process's channel table, shared by every connection.
//!
//! ```text
//!   Redis ──frame──► pubsub task ──► hub: channel table ──try_send──► connection queues (bounded)
//!                                         │ sequencer says: deliver / fill / reset
//!                                         ▼
//!                                 backfill from PostgreSQL (one fill per channel at a time)
//! ```
//!
//! - **Reference-counted subscriptions.** A channel is SUBSCRIBEd ([`crate::pubsub`])
//!   when its first local subscriber arrives and UNSUBSCRIBEd when its last leaves, so
//!   each pod receives only the channels its own clients follow, never everything.
//! - **Encoded once.** A frame arrives from Redis as the exact bytes clients receive;
//!   only its small header is parsed. It is framed once, as the WebSocket frame every
//!   recipient is sent, and every recipient gets a pointer to that one delivery, whose
//!   bytes its connection copies into its socket's buffer.
//! - **In order, no gaps, no duplicates.** Each conversation channel's order is its
//!   [`Sequencer`]'s (pure, and tested on its own); the hub does what it says: passes
//!   frames on, reads a missing range from PostgreSQL ([`crate::backfill`]) once for all
//!   local subscribers, or, when a range cannot be read, closes the channel's
//!   subscribers with 1012 so they recover with `since`.
//! - **Where a channel starts.** A subscriber registers, then reads the channel's
//!   newest offset from PostgreSQL and reports it ([`Hub::recovered`]); it needs every
//!   offset above its reading. A channel new to this process starts at the lowest
//!   reading of the subscribers that registered before it started (the sequencer
//!   waits for each of them); anyone registering later finds frames flowing from at
//!   most its own reading on, and drops what it read itself.
//! - **Slow consumers do not slow anyone.** Delivery is `try_send` into each
//!   connection's bounded queue; a full queue evicts that connection (4008) and fan-out
//!   moves on.

use std::{
    collections::HashMap,
    future::poll_fn,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU8, Ordering},
    },
    task::Poll,
    time::{Duration, Instant},
};

use futures_util::task::AtomicWaker;
use mobile_db::Db;
use mobile_db::{conversations, user_events};
use mobile_domain::{ConversationId, RemovalReason, UserId};
use mobile_events::{Channel, FrameHeader, Revoke};
use mobile_runtime::redis::Redis;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::{
    backfill,
    inbox::{self, Refused},
    metrics::GatewayMetrics,
    pubsub::{self, Command},
    sequencer::{Fill, FillCase, Sequencer, Steps},
    sessions::Sessions,
    socket::text_frame,
};

/// A process-unique connection number.
pub type ConnId = u64;

/// One frame for one channel, shared by every recipient (as `Arc<Delivery>`).
#[derive(Debug)]
pub struct Delivery {
    pub channel: Channel,
    /// The event's offset, for conversation and user events; `None` for ephemeral
    /// events.
    pub offset: Option<i64>,
    /// The sender of an ephemeral event; their own connections do not get it back.
    pub from: Option<UserId>,
    /// On a `member.removed` event: who is no longer a member, and why. Their
    /// subscriptions end once it is delivered.
    pub removes: Option<(UserId, RemovalReason)>,
    /// The event as a complete WebSocket frame, encoded once for every subscriber
    /// ([`crate::socket::text_frame`]).
    pub frame: Box<[u8]>,
}

impl Delivery {
    /// An event of a user's log read from PostgreSQL, encoded as it was published.
    pub fn from_user_event(event: &mobile_db::user_events::UserEvent) -> Self {
        Self {
            channel: Channel::User(event.user_id),
            offset: Some(event.seq),
            from: None,
            removes: None,
            frame: text_frame(&mobile_events::logged_user_event(event)),
        }
    }

    /// A conversation event read from PostgreSQL, encoded as the API encoded it.
    pub fn from_event(conversation: ConversationId, event: conversations::Event) -> Self {
        let offset = event.seq;
        let frame = mobile_events::logged_event(conversation, event);
        let removes = FrameHeader::parse(frame.as_bytes())
            .ok()
            .and_then(|header| header.removal(frame.as_bytes()))
            .map(|removed| (removed.user_id, removed.reason));
        Self {
            channel: Channel::Conversation(conversation),
            offset: Some(offset),
            from: None,
            removes,
            frame: text_frame(&frame),
        }
    }

    /// A frame from Redis: the bytes as they came, plus the parsed header; or a
    /// revocation, which is for the gateway, not for clients.
    fn parse(payload: &[u8]) -> Result<Incoming, &'static str> {
        let header = FrameHeader::parse(payload).map_err(|_| "not an event frame")?;
        let channel: Channel = header.channel.parse().map_err(|_| "unknown channel")?;
        if let Some(revoke) = header.revoke {
            return match channel {
                Channel::User(user) => Ok(Incoming::Revoke(user, revoke)),
                Channel::Conversation(_) => Err("a revocation on a conversation channel"),
            };
        }
        let removes = header
            .removal(payload)
            .map(|removed| (removed.user_id, removed.reason));
        let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8")?;
        Ok(Incoming::Delivery(Self {
            channel,
            offset: header.offset,
            from: header.from,
            removes,
            frame: text_frame(text),
        }))
    }
}

/// What a frame from Redis is.
enum Incoming {
    Delivery(Delivery),
    Revoke(UserId, Revoke),
}

/// Why a connection is ended from outside it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Its queue overflowed: it does not read fast enough (4008).
    SlowConsumer,
    /// A channel it follows lost continuity on this gateway (1012): resubscribing with
    /// `since` recovers exactly what it missed.
    Resync,
    /// Its session was revoked (4001 `session_revoked`).
    SessionRevoked,
}

impl Eviction {
    const ALL: [Self; 3] = [Self::SlowConsumer, Self::Resync, Self::SessionRevoked];

    /// As stored in [`Evict`]: never 0, which means "not evicted".
    const fn code(self) -> u8 {
        match self {
            Self::SlowConsumer => 1,
            Self::Resync => 2,
            Self::SessionRevoked => 3,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|reason| reason.code() == code)
    }
}

/// A connection's "close, for this reason" switch: thrown by the hub and the sessions
/// table, watched by the connection. The first reason stands.
///
/// A byte and a waker: every connection has one, and its task looks at it on every
/// turn of its loop, so it is neither a lock nor a list of waiters. Only one task
/// waits on a switch (its connection's), which is all [`AtomicWaker`] allows.
#[derive(Debug, Clone, Default)]
pub struct Evict(Arc<EvictState>);

#[derive(Debug, Default)]
struct EvictState {
    /// 0 until evicted, then the reason's [`Eviction::code`].
    reason: AtomicU8,
    waker: AtomicWaker,
}

impl Evict {
    pub fn evict(&self, reason: Eviction) {
        // Only the first reason is kept; a later one changes nothing.
        let _ =
            self.0
                .reason
                .compare_exchange(0, reason.code(), Ordering::AcqRel, Ordering::Acquire);
        self.0.waker.wake();
    }

    /// Completes once evicted, with the reason. Cancel-safe.
    pub async fn evicted(&self) -> Eviction {
        poll_fn(|cx| {
            // Registered before looking, so an eviction after the look wakes the task.
            self.0.waker.register(cx.waker());
            match self.reason() {
                Some(reason) => Poll::Ready(reason),
                None => Poll::Pending,
            }
        })
        .await
    }

    pub fn is_evicted(&self) -> bool {
        self.reason().is_some()
    }

    fn reason(&self) -> Option<Eviction> {
        Eviction::from_code(self.0.reason.load(Ordering::Acquire))
    }
}

/// A connection's registration on a channel.
#[derive(Debug, Clone)]
pub struct Subscriber {
    pub conn: ConnId,
    pub user: UserId,
    /// Shared deliveries: a queue slot is one pointer, however large the frame, so an
    /// idle connection's queue costs little memory.
    pub queue: inbox::Sender<Arc<Delivery>>,
    pub evict: Evict,
}

#[derive(Debug)]
struct ChannelState {
    subscribers: Vec<Subscriber>,
    sequence: Sequencer<Arc<Delivery>>,
    /// Whether Redis has confirmed the SUBSCRIBE on the current connection.
    confirmed: bool,
    /// Subscribers waiting for that confirmation (none, nearly always: a plain flag
    /// and a list that is empty costs a channel a few bytes, where a `watch` channel
    /// cost every one of them, a user's own included, a few hundred).
    awaiting: Vec<oneshot::Sender<()>>,
}

impl ChannelState {
    fn new() -> Self {
        Self {
            // Room for one: a user's own channel has one subscriber on a gateway, the
            // common case by far (a first push would make room for four).
            subscribers: Vec::with_capacity(1),
            sequence: Sequencer::default(),
            confirmed: false,
            awaiting: Vec::new(),
        }
    }

    /// Redis has the channel subscribed (or not, `confirmed` false): waiters go on.
    fn set_confirmed(&mut self, confirmed: bool) {
        self.confirmed = confirmed;
        if confirmed {
            for waiter in std::mem::take(&mut self.awaiting) {
                let _ = waiter.send(());
            }
        }
    }

    /// A receiver that completes once the channel is confirmed (or dropped); `None` if
    /// it already is.
    fn confirmation(&mut self) -> Option<oneshot::Receiver<()>> {
        if self.confirmed {
            return None;
        }
        // Those that gave up waiting go first.
        self.awaiting.retain(|waiter| !waiter.is_closed());
        let (waiter, confirmation) = oneshot::channel();
        self.awaiting.push(waiter);
        Some(confirmation)
    }
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
    /// How many times the Pub/Sub connection has come up: watched by whatever must be
    /// redone when Redis returns (presence, which a restarted Redis has lost).
    connected: watch::Sender<u64>,
    db: Db,
    metrics: GatewayMetrics,
    sessions: Sessions,
}

/// How long a subscriber waits for Redis to confirm a new SUBSCRIBE before it goes
/// on without (a reconnect would resubscribe and catch up anyway).
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(2);
/// Attempts at a fill, and the pause before each retry, before its channel is reset.
const FILL_RETRIES: [Duration; 2] = [Duration::from_millis(200), Duration::from_secs(1)];

impl Hub {
    /// Creates the hub and the task that owns its Redis Pub/Sub connection; the task
    /// ends when `stop` is cancelled.
    pub fn start(
        redis: Redis,
        db: Db,
        metrics: GatewayMetrics,
        sessions: Sessions,
        stop: CancellationToken,
    ) -> Self {
        let (commands, receiver) = mpsc::channel(1024);
        let hub = Self {
            inner: Arc::new(Inner {
                channels: Mutex::new(HashMap::new()),
                commands,
                live: AtomicBool::new(false),
                connected: watch::Sender::new(0),
                db,
                metrics,
                sessions,
            }),
        };
        tokio::spawn(pubsub::run(hub.clone(), redis, receiver, stop));
        hub
    }

    /// Whether the Pub/Sub connection is up (readiness).
    pub fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Acquire)
    }

    /// Changes each time the Pub/Sub connection comes up, the first time included:
    /// Redis is back, perhaps empty.
    pub fn connections(&self) -> watch::Receiver<u64> {
        self.inner.connected.subscribe()
    }

    pub(crate) fn metrics(&self) -> &GatewayMetrics {
        &self.inner.metrics
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
    /// the subscriber's queue: read PostgreSQL *after* this to recover without a gap,
    /// then report what was read ([`Hub::recovered`]).
    pub async fn subscribe(&self, channel: Channel, subscriber: Subscriber) {
        let (first, confirmation) = {
            let mut channels = self.channels();
            let first = !channels.contains_key(&channel);
            let state = channels.entry(channel).or_insert_with(ChannelState::new);
            state.sequence.joined(subscriber.conn);
            state.subscribers.push(subscriber);
            (first, state.confirmation())
        };
        if first {
            self.inner.metrics.pubsub_channels.inc();
            let _ = self.inner.commands.send(Command::Subscribe(channel)).await;
        }
        if let Some(confirmation) = confirmation.filter(|_| self.is_live())
            && tokio::time::timeout(CONFIRM_TIMEOUT, confirmation)
                .await
                .is_err()
        {
            tracing::warn!(%channel, "Redis did not confirm the subscription in time");
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
            } else {
                // Perhaps it left before reporting: the start waits for it no longer.
                let steps = state.sequence.left(conn);
                self.apply(channel, state, steps);
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

    /// The subscriber `conn` read `channel`'s newest offset from PostgreSQL after it
    /// registered: it has everything up to `offset`, and needs everything after.
    pub fn recovered(&self, channel: Channel, conn: ConnId, offset: i64) {
        let mut channels = self.channels();
        let Some(state) = channels.get_mut(&channel) else {
            return;
        };
        let steps = state.sequence.reading(conn, offset);
        self.apply(channel, state, steps);
    }

    /// The hub read `channel`'s newest offset itself (catching up after a reconnect).
    fn known(&self, channel: Channel, offset: i64, case: FillCase) {
        let mut channels = self.channels();
        if let Some(state) = channels.get_mut(&channel) {
            let steps = state.sequence.known(offset, case);
            self.apply(channel, state, steps);
        }
    }

    /// Handles one frame from Redis.
    pub(crate) fn on_frame(&self, payload: &[u8]) {
        let started = Instant::now();
        self.inner.metrics.pubsub_messages.inc();
        let delivery = match Delivery::parse(payload) {
            Ok(Incoming::Delivery(delivery)) => Arc::new(delivery),
            Ok(Incoming::Revoke(user, revoke)) => {
                let closed = self.inner.sessions.revoke(user, revoke);
                tracing::debug!(%user, ?revoke, closed, "session revoked");
                return;
            }
            Err(reason) => {
                tracing::warn!(reason, "dropping a malformed frame from Redis");
                return;
            }
        };
        {
            let mut channels = self.channels();
            // None: unsubscribed a moment ago.
            if let Some(state) = channels.get_mut(&delivery.channel) {
                match delivery.offset {
                    None => broadcast(state, &delivery),
                    Some(offset) => {
                        let steps = state.sequence.frame(offset, Arc::clone(&delivery));
                        self.apply(delivery.channel, state, steps);
                    }
                }
            }
        }
        self.inner
            .metrics
            .fanout_duration
            .observe(started.elapsed().as_secs_f64());
    }

    /// Does what a sequencer step says.
    fn apply(&self, channel: Channel, state: &mut ChannelState, steps: Steps<Arc<Delivery>>) {
        if steps.duplicates > 0 {
            self.inner
                .metrics
                .duplicates_dropped
                .inc_by(steps.duplicates as u64);
        }
        for delivery in &steps.deliver {
            broadcast(state, delivery);
        }
        if let Some(fill) = steps.fill {
            self.spawn_fill(channel, fill);
        }
        if steps.reset {
            tracing::warn!(%channel, subscribers = state.subscribers.len(), "channel lost continuity; its subscribers resubscribe");
            self.inner.metrics.channel_resets.inc();
            // Whoever subscribes next starts it afresh.
            for subscriber in &state.subscribers {
                subscriber.evict.evict(Eviction::Resync);
            }
        }
    }

    /// Reads a fill's range from PostgreSQL (retrying briefly) and hands it back.
    fn spawn_fill(&self, channel: Channel, fill: Fill) {
        let hub = self.clone();
        tokio::spawn(async move {
            let mut read = backfill::read(&hub.inner.db, channel, fill.range.clone()).await;
            for pause in FILL_RETRIES {
                if read.is_ok() {
                    break;
                }
                tokio::time::sleep(pause).await;
                read = backfill::read(&hub.inner.db, channel, fill.range.clone()).await;
            }
            let outcome = if read.is_ok() { "filled" } else { "failed" };
            hub.inner.metrics.gap_fill(fill.case, outcome);
            let mut channels = hub.channels();
            let Some(state) = channels.get_mut(&channel) else {
                return;
            };
            let steps = match read {
                Ok(deliveries) => {
                    let expected = fill.range.end() - fill.range.start() + 1;
                    if i64::try_from(deliveries.len()).unwrap_or(i64::MAX) < expected {
                        tracing::error!(%channel, range = ?fill.range, found = deliveries.len(), "offsets missing from PostgreSQL; skipping them");
                    }
                    state.sequence.filled(
                        deliveries
                            .into_iter()
                            .filter_map(|d| d.offset.map(|offset| (offset, d))),
                    )
                }
                Err(error) => {
                    tracing::warn!(%channel, %error, "gap fill failed");
                    state.sequence.fill_failed()
                }
            };
            hub.apply(channel, state, steps);
        });
    }

    /// The channels with local subscribers, for (re)subscribing.
    pub(crate) fn channel_list(&self) -> Vec<Channel> {
        self.channels().keys().copied().collect()
    }

    /// Whether `channel` still has local subscribers.
    pub(crate) fn has(&self, channel: Channel) -> bool {
        self.channels().contains_key(&channel)
    }

    /// The Pub/Sub connection came up (every channel in the table is subscribed) or
    /// went down.
    pub(crate) fn set_live(&self, live: bool) {
        for state in self.channels().values_mut() {
            state.set_confirmed(live);
        }
        self.inner.live.store(live, Ordering::Release);
        if live {
            self.inner.connected.send_modify(|count| *count += 1);
        }
    }

    /// Redis confirmed the SUBSCRIBE of one channel.
    pub(crate) fn confirm(&self, channel: Channel) {
        if let Some(state) = self.channels().get_mut(&channel) {
            state.set_confirmed(true);
        }
    }

    /// After a reconnect: anything published while the subscription was down is in
    /// PostgreSQL. Tell every channel its newest offset; the sequencers ask for what is
    /// missing.
    pub(crate) async fn catch_up(&self) {
        let (mut conversations, mut users) = (Vec::new(), Vec::new());
        for channel in self.channels().keys() {
            match channel {
                Channel::Conversation(id) => conversations.push(*id),
                Channel::User(id) => users.push(*id),
            }
        }
        if !conversations.is_empty() {
            match conversations::last_seqs(&self.inner.db, &conversations).await {
                Ok(newest) => {
                    for (conversation, seq) in newest {
                        self.known(
                            Channel::Conversation(conversation),
                            seq,
                            FillCase::Reconnect,
                        );
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot catch conversations up after reconnecting; clients recover with `since`");
                }
            }
        }
        if !users.is_empty() {
            match user_events::last_seqs(&self.inner.db, &users).await {
                Ok(newest) => {
                    for (user, seq) in newest {
                        self.known(Channel::User(user), seq, FillCase::Reconnect);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot catch user channels up after reconnecting; clients recover with `since`");
                }
            }
        }
    }
}

/// Queues a delivery for every subscriber of a channel, never waiting for one.
fn broadcast(state: &ChannelState, delivery: &Arc<Delivery>) {
    for subscriber in &state.subscribers {
        if delivery.from == Some(subscriber.user) {
            continue;
        }
        match subscriber.queue.try_send(Arc::clone(delivery)) {
            Ok(()) => {}
            Err(Refused::Full) => subscriber.evict.evict(Eviction::SlowConsumer),
            // The connection is closing; it unsubscribes itself.
            Err(Refused::Closed) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures_util::FutureExt;

    use super::*;

    #[test]
    fn the_first_eviction_reason_stands() {
        let evict = Evict::default();
        assert!(!evict.is_evicted());
        assert_eq!(evict.evicted().now_or_never(), None);
        evict.evict(Eviction::SessionRevoked);
        evict.clone().evict(Eviction::SlowConsumer);
        assert!(evict.is_evicted());
        assert_eq!(
            evict.evicted().now_or_never(),
            Some(Eviction::SessionRevoked)
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_eviction_from_another_thread_wakes_the_waiting_connection() {
        for reason in Eviction::ALL {
            let evict = Evict::default();
            let thrower = evict.clone();
            let waiting = tokio::spawn(async move { evict.evicted().await });
            tokio::task::yield_now().await;
            std::thread::spawn(move || thrower.evict(reason))
                .join()
                .expect("thrown");
            // Only the wake-up can finish the task in time: nothing else polls it.
            let got = tokio::time::timeout(Duration::from_secs(1), waiting)
                .await
                .expect("the eviction woke the waiting task")
                .expect("the task ran");
            assert_eq!(got, reason);
        }
    }
}
