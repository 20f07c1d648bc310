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
//!
//! The socket lives as long as its token: at the token's expiry it closes with 4001
//! `token_expired`, unless the client sent a fresh token of the same user first
//! (`refresh`). A revoked session closes it at once (4001 `session_revoked`, thrown
//! through its [`Evict`] switch by [`crate::sessions`]). Subscribes are rate limited,
//! and so are the events a connection may have replayed from PostgreSQL, so one socket
//! cannot turn the gateway into a database firehose. Every close is a close handshake:
//! the client's Close is answered, and after the gateway's own it waits briefly for the
//! client's answer, so neither side sees a reset instead of a close code.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures_util::{FutureExt, future::Either};
use mobile_auth::{AccessClaims, TokenError};
use mobile_db::{conversations, user_events};
use mobile_domain::{SessionId, UserId};
use mobile_events::Channel;
use rand::Rng;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::{sync::OwnedSemaphorePermit, time::Instant};
use tokio_tungstenite::tungstenite::{
    self, Message, Utf8Bytes,
    protocol::{CloseFrame, frame::coding::CloseCode},
};
use uuid::Uuid;

use crate::{
    Context, backfill,
    bucket::Bucket,
    hub::{ConnId, Delivery, Evict, Eviction, Subscriber},
    inbox::{self, Inbox, inbox},
    metrics::OutcomeLabel,
    protocol::{ClientFrame, ServerFrame, close, frame_id},
    sessions::{AddressTicket, Ticket},
    socket::Socket,
};

/// How long a close frame may take to write, and then the client's answering Close to
/// arrive, before the socket is dropped anyway.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// `refresh` frames a connection may send at once; then one a minute.
const REFRESH_BURST: u32 = 5;

/// Clock skew allowed on a token's expiry, as the verifier allows it.
const EXPIRY_LEEWAY_SECONDS: i64 = 5;

/// The own channel's live events held back, until when, and whether any came.
///
/// A new connection holds them back for `WS_USER_CHANNEL_HOLD_MS`, waiting for the
/// client to resubscribe the channel with `since` (the recipe's first frame): the
/// replay then comes first and the held events after it, in offset order. The client's
/// first frame of any other kind, or the time passing, ends the hold, and what it held
/// follows.
#[derive(Debug, Clone, Copy)]
struct Hold {
    until: Instant,
    missed: bool,
}

/// Queued deliveries written per flush, at most: enough to turn a burst into a few
/// socket writes, few enough that pings and the client's own frames are not kept
/// waiting behind a long backlog.
pub(crate) const MAX_BATCH: usize = 64;

/// Bytes a batch stops taking deliveries at, so that a socket's send buffer holds about
/// this much of a burst while its client is slow to take the write (what the client is
/// owed for its own frames is bounded apart: `socket::MAX_OWED_BYTES`). Chat-sized
/// events fill a batch by count long before; large ones (up to `MAX_BODY_BYTES` each)
/// by this.
pub(crate) const MAX_BATCH_BYTES: usize = 64 * 1024;

/// Whether a batch of `taken` deliveries, `buffered` bytes so far, takes no more.
pub(crate) const fn batch_full(taken: usize, buffered: usize) -> bool {
    taken >= MAX_BATCH || buffered >= MAX_BATCH_BYTES
}

/// Frames a connection must find waiting to count as behind, and wait
/// `WS_WRITE_COALESCE_MS` for more before it writes (see [`Connection::deliver_queued`]).
/// One frame is the usual case of a connection keeping up, and two or three the usual
/// case of one that was briefly not scheduled: those are written at once, or that
/// moment's lateness would grow by the wait (at 2, a third of the `ws` scenario's
/// latency runs showed a p99 of 13 ms instead of 3 to 5).
pub(crate) const BEHIND_FROM: usize = 4;

/// Whether a connection with `fed` frames to write waits for more before writing
/// them: only when it is behind, and not once its batch is full.
pub(crate) fn coalesces(fed: usize, wait: Duration) -> bool {
    !wait.is_zero() && (BEHIND_FROM..MAX_BATCH).contains(&fed)
}

/// One operation on the socket's sending side.
enum Write {
    Feed(Message),
    Flush,
}

static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// A process-unique number for a new connection.
pub fn next_conn_id() -> ConnId {
    NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed)
}

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
    /// The session was revoked (logout, refresh-token reuse, ...).
    SessionRevoked,
    /// The access token expired without a `refresh`.
    TokenExpired,
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
            Self::SessionRevoked => "session_revoked",
            Self::TokenExpired => "token_expired",
            Self::Gone => "gone",
        }
    }
}

/// What a connection knows about one of its channels: the next offset the client
/// should get (conversation and `user:` channels alike have offsets).
#[derive(Debug, Clone, Copy)]
struct Sub {
    next: i64,
}

/// A socket admitted under its user's cap, with the switch that closes it from outside.
#[derive(Debug)]
pub struct Admitted {
    pub conn: ConnId,
    pub claims: AccessClaims,
    pub evict: Evict,
    pub ticket: Ticket,
}

/// What a socket holds from its admission until it ends: the outcome of the token
/// check done before the upgrade (a bad token is answered with close 4001), and its
/// places under the caps, freed when the connection is dropped (after its close
/// handshake).
#[derive(Debug)]
pub struct Admission {
    pub auth: Result<Admitted, TokenError>,
    pub slots: Slots,
}

/// This process's connection slot, and the count against the client's address.
pub type Slots = (OwnedSemaphorePermit, AddressTicket);

/// Serves one upgraded socket.
///
/// Not an `async fn`: the future of one keeps its arguments for as long as it runs,
/// beside whatever they were moved into, and this future is what every open socket
/// costs for as long as it is open. The connection is built here, before the first
/// poll, and the future holds each part of it once.
pub fn serve(
    socket: Socket,
    admission: Admission,
    ctx: Arc<Context>,
) -> impl Future<Output = ()> + Send + 'static {
    let Admission { auth, slots } = admission;
    match auth {
        Ok(admitted) => Either::Left(Connection::new(socket, admitted, slots, ctx).serve()),
        Err(error) => Either::Right(refuse(socket, error, ctx, slots)),
    }
}

/// A socket whose token did not pass: close 4001, saying why.
async fn refuse(mut socket: Socket, error: TokenError, ctx: Arc<Context>, slots: Slots) {
    let reason = match error {
        TokenError::Expired => "token_expired",
        TokenError::UnknownKey | TokenError::Invalid => "invalid_token",
    };
    ctx.metrics.disconnect("bad_token");
    close_socket(&mut socket, close::BAD_TOKEN, reason, CLOSE_GRACE).await;
    drop(slots);
}

/// When a token with this `exp` stops counting, as an instant of this process's clock:
/// its expiry plus the leeway the verifier allows.
fn expiry(exp: i64) -> Instant {
    let left = exp
        .saturating_add(EXPIRY_LEEWAY_SECONDS)
        .saturating_sub(OffsetDateTime::now_utc().unix_timestamp());
    Instant::now() + Duration::from_secs(u64::try_from(left).unwrap_or(0))
}

/// Whether PostgreSQL has `session` live. If it cannot say, yes: the periodic check
/// asks again.
async fn session_is_live(db: &mobile_db::Db, session: SessionId) -> bool {
    match mobile_db::sessions::live_sessions(db, &[session]).await {
        Ok(live) => !live.is_empty(),
        Err(error) => {
            tracing::warn!(%error, "cannot check the session; the periodic check will");
            true
        }
    }
}

/// Why a connection ended, for a reason thrown from outside it.
fn ended_by(reason: Eviction) -> End {
    match reason {
        Eviction::SlowConsumer => End::SlowConsumer,
        Eviction::Resync => End::Resync,
        Eviction::SessionRevoked => End::SessionRevoked,
    }
}

/// The close handshake, from the gateway's side: the close frame within `grace`, then
/// the client's answer within [`CLOSE_GRACE`]. Reading the answer matters: dropping a
/// socket with unread bytes makes the kernel send a reset, which can destroy the close
/// frame before the client reads it. Where the protocol can no longer be read (after a
/// frame too large), the gateway ends its side and reads the rest to its end instead
/// ([`Socket::finish`]).
async fn close_socket(socket: &mut Socket, code: u16, reason: &'static str, grace: Duration) {
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: Utf8Bytes::from_static(reason),
    };
    if tokio::time::timeout(grace, socket.send(Message::Close(Some(frame))))
        .await
        .is_ok_and(|sent| sent.is_ok())
    {
        let _ = tokio::time::timeout(CLOSE_GRACE, async {
            loop {
                match socket.recv().await {
                    Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => {}
                    // The stream ended before the client's answer: tungstenite stopped
                    // reading (a frame too large) or the client went away. Either way
                    // what the client may still send is read to its end.
                    Some(Err(_)) | None => break,
                }
            }
            socket.finish().await;
        })
        .await;
    }
}

struct Connection {
    id: ConnId,
    /// The id the client sees in `welcome`, and presence records.
    public_id: Uuid,
    user: UserId,
    /// The session of the token the socket lives on.
    session: SessionId,
    /// When that token stops counting (its `exp`, plus the leeway).
    expires_at: Instant,
    /// The socket's place in the sessions table (revocation, the per-user cap).
    ticket: Ticket,
    socket: Socket,
    /// The sending half, cloned into each hub subscription.
    queue: inbox::Sender<Arc<Delivery>>,
    deliveries: Inbox<Arc<Delivery>>,
    /// Thrown from outside: `deliveries` overflowed, a channel lost continuity, the
    /// session was revoked.
    evict: Evict,
    /// Looked up once per delivery, so hashed with foldhash, not SipHash (SipHash and
    /// a second lookup to store the next offset were about 4 % of the gateway's CPU in
    /// fan-out profiles). The keys are channels this client was allowed to
    /// subscribe, at most `WS_MAX_CHANNELS`: nothing for a client to flood.
    subs: HashMap<Channel, Sub, foldhash::fast::RandomState>,
    /// The user's own channel's live events are held back (see [`Hold`]).
    hold: Option<Hold>,
    last_pong: Instant,
    /// Text frames fed since the last flush: counted as sent once they are written.
    unflushed: u64,
    /// Ephemeral publishes and token refreshes (subscribes and replays are budgeted
    /// per user, in `ctx.sessions`).
    publishes: Bucket,
    refreshes: Bucket,
    /// The close frame to send once the connection has left the hub: code and reason
    /// (the grace for writing it follows from how the connection ended). Every field
    /// here is in every connection's memory for as long as it lives.
    closing: Option<(u16, &'static str)>,
    /// Held, not used: freed when the connection is dropped.
    _slots: Slots,
    ctx: Arc<Context>,
}

impl Connection {
    fn new(socket: Socket, admitted: Admitted, slots: Slots, ctx: Arc<Context>) -> Self {
        let Admitted {
            conn,
            claims,
            evict,
            ticket,
        } = admitted;
        ctx.metrics.connections_active.inc();
        let (queue, deliveries) = inbox(ctx.settings.outbound_queue);
        let settings = &ctx.settings;
        Self {
            id: conn,
            public_id: Uuid::new_v4(),
            // What the connection keeps of its token (the rest of the claims go now).
            user: claims.sub,
            session: claims.sid,
            expires_at: expiry(claims.exp),
            ticket,
            socket,
            queue,
            deliveries,
            evict,
            subs: HashMap::default(),
            hold: None,
            last_pong: Instant::now(),
            unflushed: 0,
            publishes: Bucket::new(
                settings.publish_per_second,
                f64::from(settings.publish_per_second),
            ),
            // Each costs an Ed25519 check: a few, then one a minute.
            refreshes: Bucket::new(REFRESH_BURST, 1.0 / 60.0),
            closing: None,
            _slots: slots,
            ctx,
        }
    }

    /// The connection's whole life: served until it ends, out of the hub and presence,
    /// then the close handshake. (An async block, not an `async fn`: that would hold
    /// `self` twice, as its argument and as the binding it is moved into.)
    #[expect(
        clippy::manual_async_fn,
        reason = "an async fn would keep its argument beside the binding it moves into"
    )]
    fn serve(mut self) -> impl Future<Output = ()> + Send + 'static {
        async move {
            let end = self.run().await;
            // Counted, and out of the hub and presence, before the close handshake,
            // which can take a while with a slow client.
            self.ctx.metrics.disconnect(end.reason());
            self.cleanup().await;
            if let Some((code, reason)) = self.closing.take() {
                // A slow consumer's close waits behind what its socket already holds,
                // so it gets the longer grace.
                let grace = if end == End::SlowConsumer {
                    self.ctx.settings.slow_consumer_grace
                } else {
                    CLOSE_GRACE
                };
                close_socket(&mut self.socket, code, reason, grace).await;
            }
            self.ctx.metrics.connections_active.dec();
            tracing::debug!(user_id = %self.user, reason = end.reason(), "connection closed");
        }
    }

    async fn run(&mut self) -> End {
        // Everything awaited once or rarely is boxed, here and in the loop: kept inline,
        // the largest state of any await would size the future every idle connection
        // parks in, for good.
        if let Err(end) = Box::pin(self.start()).await {
            return end;
        }
        let interval = self.ctx.settings.ping_interval;

        // One timer for everything timed (the next ping, the token's expiry, the
        // shutdown's moment to leave), re-armed only when one of those moves: a timer
        // created per loop turn would cost every delivery a timer-wheel entry.
        let mut next_ping = Instant::now() + interval;
        let mut close_at: Option<Instant> = None;
        let timer = tokio::time::sleep_until(next_ping.min(self.expires_at));
        tokio::pin!(timer);
        let shutdown = self.ctx.shutdown.clone();
        loop {
            let end = tokio::select! {
                biased;
                reason = self.evict.evicted() => Some(self.evicted(reason)),
                _ = shutdown.triggered(), if close_at.is_none() => {
                    close_at = Some(Instant::now() + self.ctx.drain_offset());
                    None
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= self.expires_at {
                        Some(self.close(close::BAD_TOKEN, "token_expired", End::TokenExpired))
                    } else if close_at.is_some_and(|at| now >= at) {
                        Some(Box::pin(self.restart()).await)
                    } else if now >= next_ping {
                        next_ping = now + interval;
                        // Two intervals without a pong: two pings went unanswered.
                        if self.last_pong.elapsed() > interval * 2 + Duration::from_secs(1) {
                            Some(self.close(close::PING_TIMEOUT, "ping timeout", End::PingTimeout))
                        } else {
                            Box::pin(self.send(Message::Ping(Default::default())))
                                .await
                                .err()
                        }
                    } else if self.hold.is_some_and(|hold| now >= hold.until) {
                        Box::pin(self.release_own()).await.err()
                    } else {
                        None
                    }
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
                    // (Tungstenite never reads a raw `Frame`: it assembles messages.)
                    Some(Ok(Message::Binary(_) | Message::Frame(_))) => Some(
                        self.close(close::PROTOCOL_VIOLATION, "binary frames are not part of the protocol", End::ProtocolViolation),
                    ),
                    Some(Ok(Message::Close(_))) => {
                        // The WebSocket layer queued the answering Close; send it.
                        let _ = tokio::time::timeout(CLOSE_GRACE, self.socket.flush()).await;
                        Some(End::ClientClosed)
                    }
                    Some(Err(error)) => Some(self.on_read_error(&error)),
                    None => Some(End::ClientClosed),
                },
                delivery = self.deliveries.recv() => Box::pin(self.deliver_queued(delivery)).await.err(),
            };
            if let Some(end) = end {
                return end;
            }
            let wake = [
                Some(next_ping),
                Some(self.expires_at),
                close_at,
                self.hold.map(|hold| hold.until),
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(next_ping);
            if timer.deadline() != wake {
                timer.as_mut().reset(wake);
            }
        }
    }

    /// Online, subscribed to its own channel, the session checked, the welcome sent.
    async fn start(&mut self) -> Result<(), End> {
        // Online and subscribed to its own channel before the welcome: a client that
        // has its welcome gets every `user:` event from then on, and is not sent a
        // push for a message it can see live.
        self.ctx.presence.connected(self.user, self.public_id).await;
        let own = Channel::User(self.user);
        self.ctx.hub.subscribe(own, self.subscriber()).await;
        // In `subs` at once, so every way out (a revoked session, an unreadable offset)
        // leaves the hub through `cleanup` and never leaves the channel waiting for this
        // subscriber's reading.
        self.subs.insert(own, Sub { next: 1 });
        // Revocations committed from now on reach this socket through its own channel,
        // which is subscribed; one committed before is in PostgreSQL. So are the
        // channel's events: it starts after the newest offset read now.
        let (live, start) = tokio::join!(
            session_is_live(&self.ctx.db, self.session),
            user_events::last_seq(&self.ctx.db, self.user)
        );
        if !live {
            return Err(self.close(close::BAD_TOKEN, "session_revoked", End::SessionRevoked));
        }
        let Ok(start) = start.inspect_err(|error| {
            tracing::warn!(%error, "cannot read the user channel's offset; the client reconnects");
        }) else {
            return Err(self.evicted(Eviction::Resync));
        };
        self.subs.insert(own, Sub { next: start + 1 });
        self.ctx.hub.recovered(own, self.id, start);
        let hold = self.ctx.settings.user_channel_hold;
        self.hold = (!hold.is_zero()).then(|| Hold {
            until: Instant::now() + hold,
            missed: false,
        });
        let welcome = ServerFrame::Welcome {
            connection_id: &self.public_id.to_string(),
            ping_interval_s: self.ctx.settings.ping_interval.as_secs(),
        }
        .to_text();
        self.send_text(welcome).await
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
                return Err(self.close(
                    close::PROTOCOL_VIOLATION,
                    "frames are JSON text",
                    End::ProtocolViolation,
                ));
            }
        };
        // Anything but the own channel's resubscribe ends the hold first.
        let resubscribing_own = matches!(&frame, ClientFrame::Subscribe { channel, .. }
            if matches!(channel.parse(), Ok(Channel::User(user)) if user == self.user));
        if self.hold.is_some() && !resubscribing_own {
            self.release_own().await?;
        }
        match frame {
            ClientFrame::Subscribe { id, channel, since } => {
                self.subscribe(id, &channel, since).await
            }
            ClientFrame::Unsubscribe { id, channel } => self.unsubscribe(id, &channel).await,
            ClientFrame::Publish { id, channel, data } => self.publish(id, &channel, &data).await,
            ClientFrame::Refresh { id, token } => self.refresh(id, &token).await,
        }
    }

    /// Moves the socket onto a fresh token of the same user; an error frame (and the
    /// old expiry standing) for any other.
    async fn refresh(&mut self, id: Option<u64>, token: &str) -> Result<(), End> {
        if self.refreshes.take(1).is_err() {
            return self
                .error(id, "rate_limited", "too many refreshes; one a minute")
                .await;
        }
        let claims = match self.ctx.tokens.verify(token.trim()) {
            Ok(claims) => claims,
            Err(TokenError::Expired) => {
                return self
                    .error(id, "token_expired", "that token has expired")
                    .await;
            }
            Err(TokenError::UnknownKey | TokenError::Invalid) => {
                return self
                    .error(id, "invalid_token", "that token is not valid")
                    .await;
            }
        };
        if claims.sub != self.user {
            return self
                .error(id, "forbidden", "that token is another user's")
                .await;
        }
        if claims.sid != self.session {
            self.session = claims.sid;
            self.ticket.set_session(claims.sid);
            // A revocation of the new session processed before the line above missed
            // this socket; PostgreSQL has it.
            if !session_is_live(&self.ctx.db, self.session).await {
                return Err(self.close(close::BAD_TOKEN, "session_revoked", End::SessionRevoked));
            }
        }
        self.expires_at = expiry(claims.exp);
        let expires_at = OffsetDateTime::from_unix_timestamp(claims.exp)
            .ok()
            .and_then(|at| {
                at.format(&time::format_description::well_known::Rfc3339)
                    .ok()
            })
            .unwrap_or_default();
        let expires_in = claims
            .exp
            .saturating_sub(OffsetDateTime::now_utc().unix_timestamp())
            .max(0);
        self.send_text(
            ServerFrame::Refreshed {
                id,
                expires_at: &expires_at,
                expires_in,
            }
            .to_text(),
        )
        .await
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
            return self.resubscribe_own(id, name, since).await;
        }
        let Channel::Conversation(conversation) = channel else {
            return Ok(());
        };
        if since.is_some_and(|since| since < 0) {
            return self
                .error(id, "invalid_since", "since is an offset: 0 or more")
                .await;
        }
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
        // Each subscribe from here costs PostgreSQL a query or two: a burst (an app
        // starting), then a steady rate.
        if self.ctx.sessions.take_subscribe(self.user).is_err() {
            return self
                .error(id, "rate_limited", "too many subscribes; slow down")
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
        let Some((recovered, missed)) = self.replay(channel, since, latest).await else {
            self.ctx.hub.unsubscribe(channel, self.id).await;
            return self.recovery_limited(id).await;
        };
        self.subs.insert(channel, Sub { next: latest + 1 });
        let frame = ServerFrame::Subscribed {
            id,
            channel: name,
            offset: Some(latest),
            recovered,
        };
        self.feed(Message::Text(Utf8Bytes::from(frame.to_text())))
            .await?;
        self.push_replayed(missed).await?;
        self.ctx.hub.recovered(channel, self.id, latest);
        Ok(())
    }

    /// The user's own channel again, with `since`: the events after `since` are
    /// replayed, up to the newest now, and live ones follow, as a conversation's
    /// subscribe does. Sent while the connection still holds the channel's live events
    /// back (its first frame, as the recipe has it), this is gap-free and in order with
    /// what the connection delivers next; sent later, it restarts the channel's stream
    /// at `since`. Without `since`, the stream goes on from what was delivered.
    async fn resubscribe_own(
        &mut self,
        id: Option<u64>,
        name: &str,
        since: Option<i64>,
    ) -> Result<(), End> {
        if since.is_some_and(|since| since < 0) {
            return self
                .error(id, "invalid_since", "since is an offset: 0 or more")
                .await;
        }
        let own = Channel::User(self.user);
        let delivered = self.subs.get(&own).map(|sub| sub.next - 1);
        if delivered.is_none() {
            // Unsubscribed earlier: back in the hub before the newest is read.
            self.ctx.hub.subscribe(own, self.subscriber()).await;
        }
        let newest = user_events::last_seq(&self.ctx.db, self.user)
            .await
            .inspect_err(
                |e| tracing::warn!(error = %e, "reading the user channel's offset failed"),
            );
        // Without `since`, a subscription that stayed goes on from what it delivered,
        // and one that did not starts live.
        let from = since.or(delivered);
        let replayed = match newest {
            Ok(newest) => self
                .replay(own, from, newest)
                .await
                .map(|replay| (newest, replay)),
            Err(_) => None,
        };
        let Some((newest, (recovered, missed))) = replayed else {
            // Nothing changed: a channel that was not subscribed leaves the hub again.
            if delivered.is_none() {
                self.ctx.hub.unsubscribe(own, self.id).await;
            }
            return match newest {
                Ok(_) => self.recovery_limited(id).await,
                Err(_) => self.error(id, "unavailable", "try again shortly").await,
            };
        };
        self.hold = None;
        self.subs.insert(own, Sub { next: newest + 1 });
        let frame = ServerFrame::Subscribed {
            id,
            channel: name,
            offset: Some(newest),
            recovered: recovered && since.is_some(),
        };
        self.feed(Message::Text(Utf8Bytes::from(frame.to_text())))
            .await?;
        self.push_replayed(missed).await?;
        self.ctx.hub.recovered(own, self.id, newest);
        Ok(())
    }

    /// Ends the hold on the own channel's live events: what it held back (if anything
    /// came) is read from PostgreSQL and delivered, in order. A connection that cannot
    /// read it is closed with 1012 (reconnect and resubscribe), rather than skip it.
    async fn release_own(&mut self) -> Result<(), End> {
        let Some(hold) = self.hold.take() else {
            return Ok(());
        };
        let own = Channel::User(self.user);
        let Some(next) = self.subs.get(&own).map(|sub| sub.next) else {
            return Ok(());
        };
        if !hold.missed {
            return Ok(());
        }
        let read = async {
            let newest = user_events::last_seq(&self.ctx.db, self.user).await?;
            let held = backfill::read(&self.ctx.db, own, next..=newest).await?;
            Ok::<_, sqlx::Error>((newest, held))
        };
        let (newest, held) = match read.await {
            Ok(read) => read,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the held user events; the client reconnects");
                return Err(self.evicted(Eviction::Resync));
            }
        };
        self.subs.insert(own, Sub { next: newest + 1 });
        self.push_replayed(held).await
    }

    /// What a subscribe with `since` replays: the events after `since` up to `upto`
    /// (the newest the subscription starts after), and whether that is all of them
    /// (not without `since`, not beyond `WS_RECOVERY_LIMIT`, not what the log no longer
    /// keeps, not when the read failed). `None`: over the user's replay budget.
    async fn replay(
        &mut self,
        channel: Channel,
        since: Option<i64>,
        upto: i64,
    ) -> Option<(bool, Vec<Arc<Delivery>>)> {
        let outcome = match since {
            None => return Some((false, Vec::new())),
            Some(since) if since >= upto => ("recovered", true, Vec::new()),
            // `since` is 0 or more and below `upto`: no overflow.
            Some(since) if upto - since > self.ctx.settings.recovery_limit => {
                ("too_far_behind", false, Vec::new())
            }
            Some(since) => {
                let events = u32::try_from(upto - since).unwrap_or(u32::MAX);
                if self.ctx.sessions.take_recovery(self.user, events).is_err() {
                    self.count_recovery("over_budget");
                    return None;
                }
                match backfill::read(&self.ctx.db, channel, since + 1..=upto).await {
                    Ok(missed) if missed.first().and_then(|d| d.offset) == Some(since + 1) => {
                        ("recovered", true, missed)
                    }
                    // The oldest were pruned: what is left follows, but not everything.
                    Ok(missed) => ("too_far_behind", false, missed),
                    Err(e) => {
                        tracing::warn!(error = %e, "recovery read failed");
                        ("failed", false, Vec::new())
                    }
                }
            }
        };
        let (label, recovered, missed) = outcome;
        self.count_recovery(label);
        Some((recovered, missed))
    }

    async fn recovery_limited(&mut self, id: Option<u64>) -> Result<(), End> {
        self.error(
            id,
            "recovery_limited",
            "too many events were replayed for you lately; retry this subscribe in a minute",
        )
        .await
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
        let frame = ServerFrame::Unsubscribed {
            id,
            channel: name,
            reason: None,
        };
        self.send_text(frame.to_text()).await
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
        if self.publishes.take(1).is_err() {
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

    /// Writes `first` and whatever else is already queued behind it, then flushes
    /// once. An idle client's delivery leaves at once; a busy one's backlog leaves in
    /// one socket write instead of one write per frame.
    ///
    /// A connection that finds frames waiting ([`BEHIND_FROM`] or more) is behind a
    /// burst, and more are on their way: it waits `WS_WRITE_COALESCE_MS` once, takes
    /// what came meanwhile, and writes it all together. Over loopback and real networks
    /// alike, a write costs the kernel about the same whatever its size (its half of
    /// the gateway's CPU in fan-out, mostly the TCP stack's work per segment), so fewer,
    /// larger writes are most of what a burst's deliveries cost. The wait is added only
    /// to a batch that was already four frames deep; a connection that finds fewer
    /// writes at once. What arrives meanwhile must fit in `WS_OUTBOUND_QUEUE`, as any
    /// backlog must.
    async fn deliver_queued(&mut self, first: Arc<Delivery>) -> Result<(), End> {
        let wait = self.ctx.settings.write_coalesce;
        // What counts for being behind is frames to write: duplicates and held events
        // are taken but not written.
        let fed_before = self.unflushed;
        let mut next = Some(first);
        let mut taken = 0;
        let mut waited = false;
        loop {
            while let Some(delivery) = next {
                self.deliver(delivery).await?;
                taken += 1;
                next = if batch_full(taken, self.socket.buffered()) {
                    None
                } else {
                    self.deliveries.try_recv()
                };
            }
            let fed = usize::try_from(self.unflushed - fed_before).unwrap_or(usize::MAX);
            if waited || batch_full(taken, self.socket.buffered()) || !coalesces(fed, wait) {
                return self.flush().await;
            }
            waited = true;
            // A revocation or an overflow does not wait: the close goes after what was
            // fed (the close handshake flushes it first).
            tokio::select! {
                biased;
                reason = self.evict.evicted() => return Err(self.evicted(reason)),
                () = tokio::time::sleep(wait) => {}
            }
            next = self.deliveries.try_recv();
        }
    }

    /// Buffers a delivery if it is the next one the client should see; drops one it
    /// has. Nothing reaches the socket before [`Self::flush`].
    async fn deliver(&mut self, delivery: Arc<Delivery>) -> Result<(), End> {
        let Some(sub) = self.subs.get_mut(&delivery.channel) else {
            return Ok(());
        };
        let Some(offset) = delivery.offset else {
            self.push(&delivery);
            return Ok(());
        };
        let next = sub.next;
        if offset < next {
            // Recovered from PostgreSQL already.
            return Ok(());
        }
        if let Some(hold) = &mut self.hold
            && delivery.channel == Channel::User(self.user)
        {
            // Read back in order when the hold ends.
            hold.missed = true;
            return Ok(());
        }
        if offset > next {
            tracing::error!(channel = %delivery.channel, next, offset, "the hub skipped offsets; the client resubscribes");
            return Err(self.evicted(Eviction::Resync));
        }
        sub.next = offset + 1;
        self.push(&delivery);
        match delivery.removes {
            // No longer a member: the subscription ends here, and nothing after this
            // event reaches the client.
            Some((user, reason)) if user == self.user => {
                self.subs.remove(&delivery.channel);
                self.ctx.hub.unsubscribe(delivery.channel, self.id).await;
                let name = delivery.channel.to_string();
                let frame = ServerFrame::Unsubscribed {
                    id: None,
                    channel: &name,
                    reason: Some(reason.as_str()),
                };
                self.feed(Message::Text(Utf8Bytes::from(frame.to_text())))
                    .await
            }
            _ => Ok(()),
        }
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

    /// Adds an event to the socket's buffer, as the frame the hub encoded once for
    /// every subscriber; it goes out with the next flush.
    fn push(&mut self, delivery: &Delivery) {
        self.socket.push_frame(&delivery.frame);
        self.unflushed += 1;
    }

    /// Writes events read from PostgreSQL (up to `WS_RECOVERY_LIMIT` of them), and what
    /// was fed before them: a batch's worth of bytes at a time, so the socket's buffer
    /// holds no more of a long replay than of a burst.
    async fn push_replayed(&mut self, replayed: Vec<Arc<Delivery>>) -> Result<(), End> {
        for delivery in replayed {
            self.push(&delivery);
            if self.socket.buffered() >= MAX_BATCH_BYTES {
                self.flush().await?;
            }
        }
        self.flush().await
    }

    /// Hands a frame to the socket's buffer; it goes out with the next flush.
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
    /// gone. If the client is evicted meanwhile (its queue overflowed while this write
    /// was stuck, say), it gets `WS_SLOW_CONSUMER_GRACE_SECONDS` to take this write and
    /// then the close; a client that takes nothing even then is dropped, and counted
    /// for the eviction's reason all the same.
    async fn guarded(&mut self, write: Write) -> Result<(), End> {
        enum Outcome {
            Done,
            Failed,
            Evicted(Eviction),
            Stuck(Eviction),
        }
        let limit = self.ctx.settings.ping_interval * 2;
        let grace = self.ctx.settings.slow_consumer_grace;
        let outcome = {
            let io = async {
                match write {
                    Write::Feed(message) => self.socket.feed(message).await,
                    Write::Flush => self.socket.flush().await,
                }
            };
            tokio::pin!(io);
            // Nearly every write completes at once (a frame into the buffer, a flush the
            // kernel takes whole): no timer and no race with the eviction for those.
            if let Some(written) = (&mut io).now_or_never() {
                return if written.is_ok() {
                    Ok(())
                } else {
                    Err(End::Gone)
                };
            }
            tokio::select! {
                written = tokio::time::timeout(limit, &mut io) => {
                    if matches!(written, Ok(Ok(()))) { Outcome::Done } else { Outcome::Failed }
                }
                reason = self.evict.evicted() => {
                    match tokio::time::timeout(grace, &mut io).await {
                        Ok(Ok(())) => Outcome::Evicted(reason),
                        _ => Outcome::Stuck(reason),
                    }
                }
            }
        };
        match outcome {
            Outcome::Done => Ok(()),
            Outcome::Failed => Err(End::Gone),
            Outcome::Evicted(reason) => Err(self.evicted(reason)),
            Outcome::Stuck(reason) => Err(ended_by(reason)),
        }
    }

    /// Closes for a reason thrown from outside the connection.
    fn evicted(&mut self, reason: Eviction) -> End {
        let (code, text) = match reason {
            Eviction::SlowConsumer => (close::SLOW_CONSUMER, "slow consumer"),
            Eviction::Resync => (
                close::SERVICE_RESTART,
                "temporarily unable to deliver in order; resubscribe with since",
            ),
            Eviction::SessionRevoked => (close::BAD_TOKEN, "session_revoked"),
        };
        self.close(code, text, ended_by(reason))
    }

    /// Ends the connection with a close handshake ([`close_socket`], done by
    /// [`serve`] once the connection has left the hub).
    fn close(&mut self, code: u16, reason: &'static str, end: End) -> End {
        self.closing = Some((code, reason));
        end
    }

    /// Shutdown: tell the client when to come back, then close with 1012.
    async fn restart(&mut self) -> End {
        let after_ms = rand::thread_rng().gen_range(0..=1_000);
        let _ = self
            .send_text(ServerFrame::Reconnect { after_ms }.to_text())
            .await;
        self.close(close::SERVICE_RESTART, "service restart", End::Shutdown)
    }

    fn on_read_error(&mut self, error: &tungstenite::Error) -> End {
        if matches!(error, tungstenite::Error::Capacity(_)) {
            self.close(close::TOO_BIG, "frame too large", End::TooBig)
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
            .disconnected(self.user, self.public_id)
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_connection_behind_waits_and_only_until_its_batch_is_full() {
        let wait = Duration::from_millis(10);
        assert!(!coalesces(1, wait), "keeping up: written at once");
        assert!(
            !coalesces(BEHIND_FROM - 1, wait),
            "a moment late: written at once"
        );
        assert!(coalesces(BEHIND_FROM, wait));
        assert!(coalesces(MAX_BATCH - 1, wait));
        assert!(
            !coalesces(MAX_BATCH, wait),
            "a full batch is written at once"
        );
        assert!(!coalesces(BEHIND_FROM, Duration::ZERO), "off");
    }

    #[test]
    fn a_batch_is_full_at_its_count_or_its_bytes() {
        assert!(!batch_full(1, 200));
        assert!(!batch_full(MAX_BATCH - 1, MAX_BATCH_BYTES - 1));
        assert!(batch_full(MAX_BATCH, 64 * 200), "64 chat-sized events");
        assert!(batch_full(2, 2 * 60_000), "two large ones");
    }
}
