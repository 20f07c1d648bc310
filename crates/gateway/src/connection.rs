//! One client connection: a single task that reads the client's frames, writes the
//! hub's deliveries, pings, and closes with the right code.
//!
//! Per conversation channel the connection tracks the next offset its client should
//! see. Recovery (subscribe with `since`) reads PostgreSQL *after* the hub confirmed the
//! Redis subscription, so every later event is in the queue; anything at or below what
//! was recovered is then a duplicate and dropped. The hub passes each channel on
//! without gaps, from at most this connection's reading on, so a gap here would be a
//! broken promise: the connection says so in its log and closes with 1012, and the
//! client recovers with `since`. The client sees each offset once, in order.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures_util::SinkExt;
use mobile_auth::{AccessClaims, TokenError};
use mobile_db::conversations;
use mobile_domain::UserId;
use mobile_events::Channel;
use rand::Rng;
use serde_json::value::RawValue;
use tokio::{sync::mpsc, time::Instant};
use uuid::Uuid;

use crate::{
    Context, backfill,
    hub::{ConnId, Delivery, Evict, Eviction, Subscriber},
    metrics::OutcomeLabel,
    protocol::{ClientFrame, ServerFrame, close, frame_id},
};

/// How long an evicted client gets to take the frame in flight and the close.
const EVICTION_GRACE: Duration = Duration::from_secs(2);

/// Queued deliveries written per flush, at most: enough to turn a burst into a few
/// socket writes, few enough that pings and the client's own frames are not kept
/// waiting behind a long backlog.
pub(crate) const MAX_BATCH: usize = 64;

/// One operation on the socket's sending side.
enum Write {
    Feed(Message),
    Flush,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Why a connection ended, for `websocket_disconnects_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    ClientClosed,
    SlowConsumer,
    PingTimeout,
    ProtocolViolation,
    TooBig,
    Shutdown,
    /// A channel lost continuity on this gateway: the client resubscribes with `since`.
    Resync,
    /// The socket failed or a write did not complete in time.
    Gone,
}

impl End {
    const fn reason(self) -> &'static str {
        match self {
            Self::ClientClosed => "client_closed",
            Self::SlowConsumer => "slow_consumer",
            Self::PingTimeout => "ping_timeout",
            Self::ProtocolViolation => "protocol_violation",
            Self::TooBig => "too_big",
            Self::Shutdown => "shutdown",
            Self::Resync => "resync",
            Self::Gone => "gone",
        }
    }
}

/// What a connection knows about one of its channels.
#[derive(Debug, Clone, Copy)]
enum Sub {
    User,
    /// The next offset the client should get.
    Conversation {
        next: i64,
    },
}

/// Serves one upgraded socket. `auth` is the outcome of the token check done before
/// the upgrade: a bad token is answered with close 4001.
pub async fn serve(
    mut socket: WebSocket,
    auth: Result<AccessClaims, TokenError>,
    ctx: Arc<Context>,
) {
    let claims = match auth {
        Ok(claims) => claims,
        Err(error) => {
            let reason = match error {
                TokenError::Expired => "token_expired",
                TokenError::UnknownKey | TokenError::Invalid => "invalid_token",
            };
            let frame = CloseFrame {
                code: close::BAD_TOKEN,
                reason: Utf8Bytes::from_static(reason),
            };
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                socket.send(Message::Close(Some(frame))),
            )
            .await;
            ctx.metrics.disconnect("bad_token");
            return;
        }
    };
    ctx.metrics.connections_active.inc();
    let (queue, deliveries) = mpsc::channel(ctx.settings.outbound_queue);
    let mut connection = Connection {
        id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
        public_id: Uuid::new_v4().to_string(),
        user: claims.sub,
        socket,
        queue,
        deliveries,
        evict: Evict::default(),
        subs: HashMap::new(),
        last_pong: Instant::now(),
        unflushed: 0,
        publish_tokens: f64::from(ctx.settings.publish_per_second),
        publish_refilled: Instant::now(),
        ctx: ctx.clone(),
    };
    let end = connection.run().await;
    connection.cleanup().await;
    ctx.metrics.connections_active.dec();
    ctx.metrics.disconnect(end.reason());
    tracing::debug!(user_id = %connection.user, reason = end.reason(), "connection closed");
}

struct Connection {
    id: ConnId,
    /// The id the client sees in `welcome`, and presence records.
    public_id: String,
    user: UserId,
    socket: WebSocket,
    /// The sending half, cloned into each hub subscription.
    queue: mpsc::Sender<Arc<Delivery>>,
    deliveries: mpsc::Receiver<Arc<Delivery>>,
    /// Thrown by the hub: `deliveries` overflowed, or a channel lost continuity.
    evict: Evict,
    subs: HashMap<Channel, Sub>,
    last_pong: Instant,
    /// Text frames fed since the last flush: counted as sent once they are written.
    unflushed: u64,
    /// Token bucket for ephemeral publishes.
    publish_tokens: f64,
    publish_refilled: Instant,
    ctx: Arc<Context>,
}

impl Connection {
    async fn run(&mut self) -> End {
        // Online and subscribed to its own channel before the welcome: a client that
        // has its welcome gets every `user:` event from then on, and is not sent a
        // push for a message it can see live.
        self.ctx
            .presence
            .connected(self.user, &self.public_id)
            .await;
        let own = Channel::User(self.user);
        self.ctx.hub.subscribe(own, self.subscriber()).await;
        self.subs.insert(own, Sub::User);
        let interval = self.ctx.settings.ping_interval;
        let welcome = ServerFrame::Welcome {
            connection_id: &self.public_id,
            ping_interval_s: interval.as_secs(),
        }
        .to_text();
        if let Err(end) = self.send_text(welcome).await {
            return end;
        }

        let mut ping = tokio::time::interval_at(Instant::now() + interval, interval);
        let shutdown = self.ctx.shutdown.clone();
        let mut close_at: Option<Instant> = None;
        loop {
            let end = tokio::select! {
                biased;
                reason = self.evict.evicted() => Some(self.evicted(reason).await),
                _ = shutdown.triggered(), if close_at.is_none() => {
                    close_at = Some(Instant::now() + self.ctx.drain_offset());
                    None
                }
                _ = tokio::time::sleep_until(close_at.unwrap_or_else(Instant::now)), if close_at.is_some() => {
                    Some(self.restart().await)
                }
                // The handlers are boxed: their state (database queries included) lives
                // on the heap only while they run, so the future an idle connection
                // parks in stays small. Memory per idle connection is what decides how
                // many a pod can hold.
                incoming = self.socket.recv() => match incoming {
                    Some(Ok(Message::Text(text))) => Box::pin(self.on_text(&text)).await.err(),
                    Some(Ok(Message::Pong(_))) => {
                        self.last_pong = Instant::now();
                        None
                    }
                    // Pings are answered by the WebSocket layer itself.
                    Some(Ok(Message::Ping(_))) => None,
                    Some(Ok(Message::Binary(_))) => Some(
                        self.close(close::PROTOCOL_VIOLATION, "binary frames are not part of the protocol", End::ProtocolViolation)
                            .await,
                    ),
                    Some(Ok(Message::Close(_))) => Some(End::ClientClosed),
                    Some(Err(error)) => Some(self.on_read_error(error).await),
                    None => Some(End::ClientClosed),
                },
                Some(delivery) = self.deliveries.recv() => Box::pin(self.deliver_queued(delivery)).await.err(),
                _ = ping.tick() => {
                    // Two intervals without a pong: two pings went unanswered.
                    if self.last_pong.elapsed() > interval * 2 + Duration::from_secs(1) {
                        Some(self.close(close::PING_TIMEOUT, "ping timeout", End::PingTimeout).await)
                    } else {
                        self.send(Message::Ping(Default::default())).await.err()
                    }
                }
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    fn subscriber(&self) -> Subscriber {
        Subscriber {
            conn: self.id,
            user: self.user,
            queue: self.queue.clone(),
            evict: self.evict.clone(),
        }
    }

    async fn on_text(&mut self, text: &str) -> Result<(), End> {
        let frame = match ClientFrame::parse(text) {
            Ok(frame) => frame,
            Err(why) => {
                // JSON of another shape is a client bug worth an answer; anything else
                // is not this protocol.
                if serde_json::from_str::<serde::de::IgnoredAny>(text).is_ok() {
                    return self.error(frame_id(text), "bad_frame", &why).await;
                }
                return Err(self
                    .close(
                        close::PROTOCOL_VIOLATION,
                        "frames are JSON text",
                        End::ProtocolViolation,
                    )
                    .await);
            }
        };
        match frame {
            ClientFrame::Subscribe { id, channel, since } => {
                self.subscribe(id, &channel, since).await
            }
            ClientFrame::Unsubscribe { id, channel } => self.unsubscribe(id, &channel).await,
            ClientFrame::Publish { id, channel, data } => self.publish(id, &channel, &data).await,
        }
    }

    async fn subscribe(
        &mut self,
        id: Option<u64>,
        name: &str,
        since: Option<i64>,
    ) -> Result<(), End> {
        let Ok(channel) = name.parse::<Channel>() else {
            return self
                .error(
                    id,
                    "invalid_channel",
                    "a channel is conversation:<uuid> or user:<uuid>",
                )
                .await;
        };
        if let Channel::User(user) = channel {
            if user != self.user {
                return self
                    .error(id, "forbidden", "only your own user channel")
                    .await;
            }
            // Subscribed since the connection opened.
            let frame = ServerFrame::Subscribed {
                id,
                channel: name,
                offset: None,
                recovered: false,
            };
            return self.send_text(frame.to_text()).await;
        }
        let Channel::Conversation(conversation) = channel else {
            return Ok(());
        };
        if self.subs.contains_key(&channel) {
            return self
                .error(
                    id,
                    "already_subscribed",
                    "unsubscribe first to subscribe again",
                )
                .await;
        }
        if self.subs.len() >= self.ctx.settings.max_channels {
            return self
                .error(
                    id,
                    "too_many_channels",
                    "this connection has the most channels allowed",
                )
                .await;
        }
        let user = self.user;
        match conversations::member_last_seq(&self.ctx.db, user, conversation).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return self
                    .error(id, "forbidden", "not a member of this conversation")
                    .await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "membership check failed");
                return self.error(id, "unavailable", "try again shortly").await;
            }
        }

        // Subscribe first, then read: whatever is published from here on is queued.
        self.ctx.hub.subscribe(channel, self.subscriber()).await;
        let latest = match conversations::member_last_seq(&self.ctx.db, user, conversation).await {
            Ok(Some(latest)) => latest,
            other => {
                if let Err(e) = other {
                    tracing::warn!(error = %e, "reading the latest offset failed");
                }
                self.ctx.hub.unsubscribe(channel, self.id).await;
                return self.error(id, "unavailable", "try again shortly").await;
            }
        };
        let (recovered, missed) = match since {
            None => (false, Vec::new()),
            Some(since) if since >= latest => {
                self.count_recovery("recovered");
                (true, Vec::new())
            }
            Some(since) if latest - since > self.ctx.settings.recovery_limit => {
                self.count_recovery("too_far_behind");
                (false, Vec::new())
            }
            Some(since) => {
                match backfill::read(&self.ctx.db, channel, since.max(0) + 1..=latest).await {
                    Ok(missed) => {
                        self.count_recovery("recovered");
                        (true, missed)
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "recovery read failed");
                        self.count_recovery("failed");
                        (false, Vec::new())
                    }
                }
            }
        };
        self.subs
            .insert(channel, Sub::Conversation { next: latest + 1 });
        let frame = ServerFrame::Subscribed {
            id,
            channel: name,
            offset: Some(latest),
            recovered,
        };
        self.feed(Message::Text(Utf8Bytes::from(frame.to_text())))
            .await?;
        for delivery in missed {
            self.feed(Message::Text(delivery.frame.clone())).await?;
        }
        self.flush().await?;
        self.ctx.hub.recovered(channel, self.id, latest);
        Ok(())
    }

    fn count_recovery(&self, outcome: &'static str) {
        self.ctx
            .metrics
            .recoveries
            .get_or_create(&OutcomeLabel { outcome })
            .inc();
    }

    async fn unsubscribe(&mut self, id: Option<u64>, name: &str) -> Result<(), End> {
        let Ok(channel) = name.parse::<Channel>() else {
            return self
                .error(
                    id,
                    "invalid_channel",
                    "a channel is conversation:<uuid> or user:<uuid>",
                )
                .await;
        };
        if self.subs.remove(&channel).is_none() {
            return self
                .error(
                    id,
                    "not_subscribed",
                    "this connection is not subscribed to that channel",
                )
                .await;
        }
        self.ctx.hub.unsubscribe(channel, self.id).await;
        self.send_text(ServerFrame::Unsubscribed { id, channel: name }.to_text())
            .await
    }

    async fn publish(&mut self, id: Option<u64>, name: &str, data: &RawValue) -> Result<(), End> {
        let channel = match name.parse::<Channel>() {
            Ok(channel @ Channel::Conversation(_)) if self.subs.contains_key(&channel) => channel,
            Ok(Channel::Conversation(_)) => {
                return self
                    .error(
                        id,
                        "not_subscribed",
                        "subscribe to a conversation before publishing to it",
                    )
                    .await;
            }
            Ok(Channel::User(_)) => {
                return self
                    .error(id, "forbidden", "publish to conversations only")
                    .await;
            }
            Err(_) => {
                return self
                    .error(
                        id,
                        "invalid_channel",
                        "a channel is conversation:<uuid> or user:<uuid>",
                    )
                    .await;
            }
        };
        if !self.take_publish_token() {
            return self
                .error(id, "rate_limited", "too many ephemeral events; slow down")
                .await;
        }
        let frame = mobile_events::ephemeral(channel, self.user, data);
        match mobile_events::publish(&self.ctx.redis, &[(channel, frame)]).await {
            Ok(()) => {
                self.send_text(ServerFrame::Published { id, channel: name }.to_text())
                    .await
            }
            Err(e) => {
                tracing::warn!(error = %e, "ephemeral publish failed");
                self.error(id, "unavailable", "try again shortly").await
            }
        }
    }

    fn take_publish_token(&mut self) -> bool {
        let rate = f64::from(self.ctx.settings.publish_per_second);
        let elapsed = self.publish_refilled.elapsed().as_secs_f64();
        self.publish_refilled = Instant::now();
        self.publish_tokens = (self.publish_tokens + elapsed * rate).min(rate);
        if self.publish_tokens >= 1.0 {
            self.publish_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Writes `first` and whatever else is already queued behind it, then flushes
    /// once. An idle client's delivery leaves at once, as before; a busy one's
    /// backlog leaves in one socket write instead of one write per frame, which is
    /// most of what a delivery costs.
    async fn deliver_queued(&mut self, first: Arc<Delivery>) -> Result<(), End> {
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(delivery) = next {
            self.deliver(delivery).await?;
            taken += 1;
            next = if taken < MAX_BATCH {
                self.deliveries.try_recv().ok()
            } else {
                None
            };
        }
        self.flush().await
    }

    /// Buffers a delivery if it is the next one the client should see; drops one it
    /// has. Nothing reaches the socket before [`Self::flush`].
    async fn deliver(&mut self, delivery: Arc<Delivery>) -> Result<(), End> {
        let Some(sub) = self.subs.get(&delivery.channel).copied() else {
            return Ok(());
        };
        let (Sub::Conversation { next }, Some(offset)) = (sub, delivery.offset) else {
            return self.feed(Message::Text(delivery.frame.clone())).await;
        };
        if offset < next {
            // Recovered from PostgreSQL already.
            return Ok(());
        }
        if offset > next {
            tracing::error!(channel = %delivery.channel, next, offset, "the hub skipped offsets; the client resubscribes");
            return Err(self.evicted(Eviction::Resync).await);
        }
        self.subs
            .insert(delivery.channel, Sub::Conversation { next: offset + 1 });
        self.feed(Message::Text(delivery.frame.clone())).await
    }

    async fn error(&mut self, id: Option<u64>, code: &str, message: &str) -> Result<(), End> {
        self.send_text(ServerFrame::Error { id, code, message }.to_text())
            .await
    }

    async fn send_text(&mut self, text: String) -> Result<(), End> {
        self.send(Message::Text(Utf8Bytes::from(text))).await
    }

    /// Writes one frame and flushes it.
    async fn send(&mut self, message: Message) -> Result<(), End> {
        self.feed(message).await?;
        self.flush().await
    }

    /// Hands a frame to the socket's write buffer; it goes out with the next flush (or
    /// once the buffer is full).
    async fn feed(&mut self, message: Message) -> Result<(), End> {
        let counts = matches!(message, Message::Text(_));
        self.guarded(Write::Feed(message)).await?;
        if counts {
            self.unflushed += 1;
        }
        Ok(())
    }

    /// Writes out what was fed, and counts its frames as sent (once per batch, not
    /// once per frame).
    async fn flush(&mut self) -> Result<(), End> {
        self.guarded(Write::Flush).await?;
        self.ctx
            .metrics
            .messages_sent
            .inc_by(std::mem::take(&mut self.unflushed));
        Ok(())
    }

    /// Runs one write. A client that does not take it within two ping intervals is
    /// gone. If the client is evicted meanwhile (its queue overflowed), it gets a
    /// short grace to take this write, and then the close.
    async fn guarded(&mut self, write: Write) -> Result<(), End> {
        enum Outcome {
            Done,
            Failed,
            Evicted(Eviction),
        }
        let limit = self.ctx.settings.ping_interval * 2;
        let outcome = {
            let io = async {
                match write {
                    Write::Feed(message) => self.socket.feed(message).await,
                    Write::Flush => self.socket.flush().await,
                }
            };
            tokio::pin!(io);
            tokio::select! {
                written = tokio::time::timeout(limit, &mut io) => {
                    if matches!(written, Ok(Ok(()))) { Outcome::Done } else { Outcome::Failed }
                }
                reason = self.evict.evicted() => {
                    match tokio::time::timeout(EVICTION_GRACE, &mut io).await {
                        Ok(Ok(())) => Outcome::Evicted(reason),
                        _ => Outcome::Failed,
                    }
                }
            }
        };
        match outcome {
            Outcome::Done => Ok(()),
            Outcome::Failed => Err(End::Gone),
            Outcome::Evicted(reason) => Err(self.evicted(reason).await),
        }
    }

    /// Closes for a reason thrown from outside the connection.
    async fn evicted(&mut self, reason: Eviction) -> End {
        match reason {
            Eviction::SlowConsumer => {
                self.close(close::SLOW_CONSUMER, "slow consumer", End::SlowConsumer)
                    .await
            }
            Eviction::Resync => {
                self.close(
                    close::SERVICE_RESTART,
                    "temporarily unable to deliver in order; resubscribe with since",
                    End::Resync,
                )
                .await
            }
        }
    }

    /// Sends a close frame (best effort, briefly) and reports `end`.
    async fn close(&mut self, code: u16, reason: &'static str, end: End) -> End {
        let frame = CloseFrame {
            code,
            reason: Utf8Bytes::from_static(reason),
        };
        let _ = tokio::time::timeout(
            EVICTION_GRACE,
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
        end
    }

    /// Shutdown: tell the client when to come back, then close with 1012.
    async fn restart(&mut self) -> End {
        let after_ms = rand::thread_rng().gen_range(0..=1_000);
        let _ = self
            .send_text(ServerFrame::Reconnect { after_ms }.to_text())
            .await;
        self.close(close::SERVICE_RESTART, "service restart", End::Shutdown)
            .await
    }

    async fn on_read_error(&mut self, error: axum::Error) -> End {
        let too_big = error
            .into_inner()
            .downcast_ref::<tokio_tungstenite::tungstenite::Error>()
            .is_some_and(|e| matches!(e, tokio_tungstenite::tungstenite::Error::Capacity(_)));
        if too_big {
            self.close(close::TOO_BIG, "frame too large", End::TooBig)
                .await
        } else {
            End::Gone
        }
    }

    async fn cleanup(&mut self) {
        for channel in std::mem::take(&mut self.subs).into_keys() {
            self.ctx.hub.unsubscribe(channel, self.id).await;
        }
        self.ctx
            .presence
            .disconnected(self.user, &self.public_id)
            .await;
    }
}
