//! Listen, serve, and drain: the sequence every HTTP-serving binary runs, with every
//! connection bounded in time and number.
//!
//! ```text
//! start ──► serve ──SIGTERM──► unready (503) ──delay──► stop accepting ──► drain ──► exit 0
//!                              │◄──────────── SHUTDOWN_TIMEOUT_SECONDS ────────────►│
//! ```
//!
//! Each accepted connection is held to [`ConnectionLimits`]:
//!
//! - at most `max_connections` open at once: beyond, a connection gets a 503 problem
//!   and is closed at once, never queued (`http_connections_refused_total`);
//! - a request's head must arrive within `header_read_timeout` of its first byte, the
//!   first one within that of the accept (slowloris); a connection with no request in
//!   flight is closed after `idle_timeout` without progress (longer than the load
//!   balancers', which reuse it), and so is one whose requests stop moving (a peer
//!   that stopped reading); on HTTP/2 only requests and response frames are
//!   progress, not pings ([`ConnectionState`] has the rules);
//! - HTTP/2: a cap on concurrent streams and on the header list, and keep-alive pings;
//! - every response says `X-Content-Type-Options: nosniff`.
//!
//! A WebSocket, once upgraded, is its binary's business (the gateway pings it). Bodies
//! are bounded by the API, which knows which routes take long ones.
//!
//! In-flight requests finish on shutdown; idle keep-alive connections are closed; tasks
//! that outlive their HTTP request (WebSocket connections, tracked by the caller's
//! `TaskTracker`) finish too; the metrics port stays up until all that has drained, so
//! the drain itself is observable. If draining outlasts the timeout, what is left is
//! abandoned and `serve` returns an error, so the exit status says the drain was cut
//! short.

use std::{
    future::Future,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use anyhow::Context as _;
use axum::{
    Router,
    extract::ConnectInfo,
    http::{HeaderValue, Request, StatusCode, header},
};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::{conn::auto, graceful::GracefulShutdown},
};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::Semaphore,
    time::{Instant, Sleep},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt as _;

use crate::{Env, SettingsError, Shutdown, service::Listeners};

/// When to stop accepting and how long to drain.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// Keep accepting (while unready) this long after the signal.
    pub delay: Duration,
    /// From the signal to exit, at most.
    pub timeout: Duration,
}

/// What any one client may hold of a server: the same rules for all three binaries.
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// `MAX_CONNECTIONS`: connections open at once per port; beyond, 503 and closed.
    pub max_connections: usize,
    /// `HTTP_HEADER_READ_TIMEOUT_SECONDS` (10): from a request's first byte to its last
    /// header.
    pub header_read_timeout: Duration,
    /// `HTTP_IDLE_TIMEOUT_SECONDS` (620): a connection with no request in flight and
    /// nothing sent either way this long is closed. Longer than the load balancers'
    /// own idle timeouts (GCP's 600 s, an ALB's 60 s by default), so a balancer never
    /// reuses a connection the server is closing.
    pub idle_timeout: Duration,
    /// `HTTP_MAX_HEADER_BYTES` (32768): the largest request head (HTTP/1 buffer, HTTP/2
    /// header list).
    pub max_header_bytes: usize,
    /// `HTTP2_MAX_CONCURRENT_STREAMS` (100): streams one HTTP/2 connection may open.
    pub h2_max_concurrent_streams: u32,
    /// `HTTP2_KEEPALIVE_SECONDS` (30): pings on an HTTP/2 connection; one unanswered
    /// within `HTTP2_KEEPALIVE_TIMEOUT_SECONDS` (10) closes it.
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
}

impl ConnectionLimits {
    pub fn from_env(env: &Env, default_max_connections: usize) -> Result<Self, SettingsError> {
        let limits = Self {
            max_connections: env.parse("MAX_CONNECTIONS", default_max_connections)?,
            header_read_timeout: env.seconds("HTTP_HEADER_READ_TIMEOUT_SECONDS", 10)?,
            idle_timeout: env.seconds("HTTP_IDLE_TIMEOUT_SECONDS", 620)?,
            max_header_bytes: env.parse("HTTP_MAX_HEADER_BYTES", 32 * 1024)?,
            h2_max_concurrent_streams: env.parse("HTTP2_MAX_CONCURRENT_STREAMS", 100)?,
            h2_keepalive_interval: env.seconds("HTTP2_KEEPALIVE_SECONDS", 30)?,
            h2_keepalive_timeout: env.seconds("HTTP2_KEEPALIVE_TIMEOUT_SECONDS", 10)?,
        };
        for (name, value) in [
            ("MAX_CONNECTIONS", limits.max_connections as u64),
            (
                "HTTP_HEADER_READ_TIMEOUT_SECONDS",
                limits.header_read_timeout.as_secs(),
            ),
            ("HTTP_IDLE_TIMEOUT_SECONDS", limits.idle_timeout.as_secs()),
            (
                "HTTP2_MAX_CONCURRENT_STREAMS",
                u64::from(limits.h2_max_concurrent_streams),
            ),
            (
                "HTTP2_KEEPALIVE_SECONDS",
                limits.h2_keepalive_interval.as_secs(),
            ),
            (
                "HTTP2_KEEPALIVE_TIMEOUT_SECONDS",
                limits.h2_keepalive_timeout.as_secs(),
            ),
        ] {
            if value == 0 {
                return Err(SettingsError::new(name, "must be at least 1"));
            }
        }
        if !(8 * 1024..=1024 * 1024).contains(&limits.max_header_bytes) {
            return Err(SettingsError::new(
                "HTTP_MAX_HEADER_BYTES",
                "must be 8192 to 1048576",
            ));
        }
        Ok(limits)
    }
}

/// The servers' connection metrics, registered once per process.
#[derive(Debug, Clone, Default)]
pub struct ConnectionMetrics {
    /// `http_connections_open`.
    pub open: Gauge,
    /// `http_connections_refused_total`: over `MAX_CONNECTIONS`.
    pub refused: Counter,
    /// `http_connections_closed_total{reason}`: `header_timeout`, `idle`, `stalled`.
    pub closed: Family<ReasonLabel, Counter>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

impl ConnectionMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self::default();
        registry.register(
            "http_connections_open",
            "Connections open, both ports",
            metrics.open.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Connections refused over MAX_CONNECTIONS",
            metrics.refused.clone(),
        );
        registry.register(
            "http_connections_closed",
            "Connections the server closed for a limit, by reason",
            metrics.closed.clone(),
        );
        metrics
    }
}

/// How the servers of one process run: their limits and metrics.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub limits: Arc<ConnectionLimits>,
    pub metrics: ConnectionMetrics,
}

/// Binds a listener, naming the address in the error.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))
}

/// Serves `app` on the public listener and `metrics` on the metrics one until
/// `shutdown` triggers, then drains as the module documentation describes. `detached`
/// holds the tasks that outlive their request (pass an empty tracker if there are
/// none); they are expected to end by themselves once shutdown triggers.
pub async fn serve(
    listeners: Listeners,
    app: Router,
    metrics: Router,
    shutdown: Shutdown,
    drain: Drain,
    detached: TaskTracker,
    options: ServeOptions,
) -> anyhow::Result<()> {
    let Listeners {
        public: listener,
        metrics: metrics_listener,
    } = listeners;
    tracing::info!(
        addr = %listener.local_addr()?,
        metrics_addr = %metrics_listener.local_addr()?,
        max_connections = options.limits.max_connections,
        "listening"
    );
    let stop_accepting = CancellationToken::new();
    let stop_metrics = CancellationToken::new();
    let public = tokio::spawn(accept_loop(
        listener,
        app,
        options.clone(),
        stop_accepting.clone(),
    ));
    let metrics = tokio::spawn(accept_loop(
        metrics_listener,
        metrics,
        options,
        stop_metrics.clone(),
    ));

    let mut public = public;
    tokio::select! {
        _ = shutdown.triggered() => {}
        // The server stopped by itself: only a failing listener does that.
        result = &mut public => {
            stop_metrics.cancel();
            return result.context("server task panicked")?.context("server failed");
        }
    }

    let started = Instant::now();
    if !drain.delay.is_zero() {
        tracing::info!(delay = ?drain.delay, "unready; still accepting while load balancers catch up");
        tokio::time::sleep(drain.delay).await;
    }
    tracing::info!("no longer accepting connections; draining in-flight requests");
    stop_accepting.cancel();

    let remaining = drain.timeout.saturating_sub(started.elapsed());
    let drained = tokio::time::timeout(remaining, async {
        let served = public.await;
        detached.close();
        detached.wait().await;
        served
    })
    .await;
    stop_metrics.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(1), metrics).await;
    match drained {
        Ok(result) => {
            result
                .context("server task panicked")?
                .context("server failed")?;
            tracing::info!(elapsed = ?started.elapsed(), "drained; exiting");
            Ok(())
        }
        Err(_) => anyhow::bail!(
            "drain did not finish within {:?}; abandoning in-flight requests",
            drain.timeout
        ),
    }
}

/// The body of the answer to a connection over the cap (the API's problem shape).
const REFUSAL_BODY: &str = r#"{"type":"urn:mobile-backend:problem:overloaded","title":"Service Unavailable","status":503,"code":"overloaded","detail":"too many open connections; retry shortly"}"#;

/// The whole answer to a connection over the cap: written if the socket takes it at
/// once, never waited for.
fn refusal() -> Vec<u8> {
    format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/problem+json\r\n\
         retry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{REFUSAL_BODY}",
        REFUSAL_BODY.len()
    )
    .into_bytes()
}

/// Accepts until `stop`, serving each connection under the limits; then lets the open
/// ones finish (HTTP/1 closes idle keep-alives, HTTP/2 sends GOAWAY).
async fn accept_loop(
    listener: TcpListener,
    app: Router,
    options: ServeOptions,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let ServeOptions { limits, metrics } = options;
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusal = refusal();
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // The head's deadline is kept by `Guarded` (from the first byte, not from the
        // end of the previous response, which would cut idle keep-alives short).
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.h2_keepalive_interval)
        .keep_alive_timeout(limits.h2_keepalive_timeout);
    loop {
        let (stream, peer) = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, most likely: the cap should prevent it;
                    // do not spin while it lasts.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics.refused.inc();
            let _ = stream.try_write(&refusal);
            continue;
        };
        // Responses and WebSocket batches are written whole, so Nagle's algorithm
        // would only hold back the last segment of one until the peer's delayed ACK.
        if let Err(error) = stream.set_nodelay(true) {
            tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
        }
        let state = Arc::new(ConnectionState::default());
        let io = TokioIo::new(Guarded::new(
            stream,
            state.clone(),
            limits.clone(),
            metrics.clone(),
        ));
        let service = {
            let app = app.clone();
            hyper::service::service_fn(move |mut request: Request<Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                // In flight until its response body is done (or the request is
                // dropped: a reset stream, a client gone).
                let in_flight = InFlight::start(state.clone());
                let response = app.clone().oneshot(request);
                async move {
                    let mut response = response.await?;
                    response.headers_mut().insert(
                        header::X_CONTENT_TYPE_OPTIONS,
                        HeaderValue::from_static("nosniff"),
                    );
                    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                        in_flight.0.upgraded.store(true, Ordering::Release);
                    }
                    let response =
                        response.map(|inner| axum::body::Body::new(Finishing { inner, in_flight }));
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let connection = graceful.watch(
            builder
                .serve_connection_with_upgrades(io, service)
                .into_owned(),
        );
        metrics.open.inc();
        let open = metrics.open.clone();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "connection ended with an error");
            }
            open.dec();
            drop(permit);
        });
    }
    // Closed now, so new connections are refused by the kernel rather than queued
    // for a server that will never accept them.
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}

/// What the server knows of one connection, shared by its IO (which keeps the
/// deadlines) and its service (which sees requests begin and end, [`InFlight`]).
///
/// The deadline in force is one of three:
///
/// - **header**: no request in flight and a head begun (or nothing received yet since
///   the connection was accepted): the head must be complete `header_read_timeout`
///   after its first byte (after the accept, for the first request);
/// - **idle**: no request in flight: closed `idle_timeout` after the last progress;
/// - **stalled**: requests in flight that make no progress (no byte either way on
///   HTTP/1, no response frame on HTTP/2) for `idle_timeout`: a peer that stopped
///   reading, or HTTP/2 streams it never opens its window for.
///
/// None once the connection is a WebSocket (its binary pings it).
#[derive(Debug)]
struct ConnectionState {
    born: std::time::Instant,
    in_flight: AtomicUsize,
    upgraded: AtomicBool,
    /// Milliseconds since `born` of the last progress: a request begun or finished, a
    /// response frame handed over, and on HTTP/1 a byte either way.
    last_progress: AtomicU64,
    /// Milliseconds since `born` of the first byte of a head not yet complete.
    head_since: AtomicU64,
}

const NONE: u64 = u64::MAX;

impl Default for ConnectionState {
    fn default() -> Self {
        Self {
            born: std::time::Instant::now(),
            in_flight: AtomicUsize::new(0),
            upgraded: AtomicBool::new(false),
            last_progress: AtomicU64::new(0),
            // A connection that sends nothing is a head that does not arrive.
            head_since: AtomicU64::new(0),
        }
    }
}

impl ConnectionState {
    fn now(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(NONE - 1)
    }

    fn progressed(&self) {
        self.last_progress.store(self.now(), Ordering::Release);
    }
}

/// A request in flight on its connection, from its head to the end of its response
/// body; dropping it (the body done, or the request abandoned: a reset stream, a
/// client gone) ends it.
struct InFlight(Arc<ConnectionState>);

impl InFlight {
    fn start(state: Arc<ConnectionState>) -> Self {
        state.in_flight.fetch_add(1, Ordering::AcqRel);
        state.head_since.store(NONE, Ordering::Release);
        state.progressed();
        Self(state)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.0.progressed();
    }
}

/// A response body that holds its request's [`InFlight`] until it is done, and counts
/// each frame it hands over as progress.
struct Finishing {
    inner: axum::body::Body,
    in_flight: InFlight,
}

impl hyper::body::Body for Finishing {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<axum::body::Bytes>, axum::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &frame {
            self.in_flight.0.progressed();
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// A TCP stream that keeps a connection's deadlines ([`ConnectionState`]), on reads
/// and writes alike: hyper may wait on either.
struct Guarded {
    inner: TcpStream,
    state: Arc<ConnectionState>,
    limits: Arc<ConnectionLimits>,
    metrics: ConnectionMetrics,
    /// Allocated when first needed; dropped when no deadline applies any more (a
    /// WebSocket): a registered timer holds the waker of the task that last polled
    /// it, and after an upgrade that is the finished HTTP connection's task, whose
    /// memory would stay allocated until the timer fired.
    timer: Option<Pin<Box<Sleep>>>,
    /// The deadline (milliseconds since the connection's birth) `timer` is set for.
    armed: u64,
    /// What the first bytes say: HTTP/2 (the whole preface matched), HTTP/1 (a byte
    /// that does not match), or not yet known (a head, as far as deadlines go).
    protocol: Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// This many bytes of the HTTP/2 preface matched so far.
    Undecided(usize),
    Http1,
    Http2,
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

impl Guarded {
    fn new(
        inner: TcpStream,
        state: Arc<ConnectionState>,
        limits: Arc<ConnectionLimits>,
        metrics: ConnectionMetrics,
    ) -> Self {
        Self {
            inner,
            state,
            limits,
            metrics,
            timer: None,
            armed: NONE,
            protocol: Protocol::Undecided(0),
        }
    }

    fn saw_read(&mut self, read: &[u8]) {
        if self.state.upgraded.load(Ordering::Relaxed) {
            // A WebSocket's traffic is its binary's business, not progress to keep.
            return;
        }
        if let Protocol::Undecided(matched) = self.protocol {
            let expected = &H2_PREFACE[matched..];
            let n = read.len().min(expected.len());
            self.protocol = if read[..n] != expected[..n] {
                Protocol::Http1
            } else if matched + n == H2_PREFACE.len() {
                // No heads on HTTP/2: its requests are streams.
                self.state.head_since.store(NONE, Ordering::Release);
                self.state.progressed();
                Protocol::Http2
            } else {
                Protocol::Undecided(matched + n)
            };
        }
        if self.protocol == Protocol::Http2 {
            // Frames flow between requests (pings, settings, window updates): only
            // requests and response frames count as progress, so a peer that answers
            // pings but asks nothing is still idle.
            return;
        }
        let now = self.state.now();
        self.state.last_progress.store(now, Ordering::Release);
        if self.state.in_flight.load(Ordering::Acquire) == 0 {
            let _ = self.state.head_since.compare_exchange(
                NONE,
                now,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
        }
    }

    fn saw_write(&self, written: usize) {
        // As for reads: on HTTP/2 a keep-alive ping is a write, not progress.
        if written > 0
            && self.protocol != Protocol::Http2
            && !self.state.upgraded.load(Ordering::Relaxed)
        {
            self.state.progressed();
        }
    }

    /// The deadline now in force, and what passing it means.
    fn deadline(&self) -> Option<(u64, &'static str)> {
        if self.state.upgraded.load(Ordering::Acquire) {
            return None;
        }
        let millis = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(NONE / 2);
        let progress = self.state.last_progress.load(Ordering::Acquire);
        if self.state.in_flight.load(Ordering::Acquire) > 0 {
            return Some((progress + millis(self.limits.idle_timeout), "stalled"));
        }
        match self.state.head_since.load(Ordering::Acquire) {
            NONE => Some((progress + millis(self.limits.idle_timeout), "idle")),
            since => Some((
                since + millis(self.limits.header_read_timeout),
                "header_timeout",
            )),
        }
    }

    /// `Pending` until the deadline in force passes; then the reason.
    fn poll_deadline(&mut self, cx: &mut Context<'_>) -> Poll<&'static str> {
        let Some((deadline, reason)) = self.deadline() else {
            self.timer = None;
            self.armed = NONE;
            return Poll::Pending;
        };
        let now = self.state.now();
        if deadline <= now {
            return Poll::Ready(reason);
        }
        let wake = Instant::now() + Duration::from_millis(deadline - now);
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(wake)));
        if self.armed != deadline {
            self.armed = deadline;
            timer.as_mut().reset(wake);
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(reason),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Waiting on the socket: fine until the deadline in force passes.
    fn pending<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match self.poll_deadline(cx) {
            Poll::Ready(reason) => {
                self.metrics
                    .closed
                    .get_or_create(&ReasonLabel { reason })
                    .inc();
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, reason)))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if !read.is_empty() {
                    self.saw_read(read);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => self.pending(cx),
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write(cx, buf) {
            Poll::Ready(Ok(n)) => {
                self.saw_write(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => self.pending(cx),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match Pin::new(&mut self.inner).poll_write_vectored(cx, bufs) {
            Poll::Ready(Ok(n)) => {
                self.saw_write(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(error)) => Poll::Ready(Err(error)),
            Poll::Pending => self.pending(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
