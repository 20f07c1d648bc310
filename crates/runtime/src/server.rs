//! Listen, serve, and drain: the sequence every HTTP-serving binary runs.
//!
//! ```text
//! start ──► serve ──SIGTERM──► unready (503) ──delay──► stop accepting ──► drain ──► exit 0
//!                              │◄──────────── SHUTDOWN_TIMEOUT_SECONDS ────────────►│
//! ```
//!
//! In-flight requests finish; idle keep-alive connections are closed; tasks that
//! outlive their HTTP request (WebSocket connections, tracked by the caller's
//! `TaskTracker`) finish too; the metrics port stays up until all that has drained, so
//! the drain itself is observable.
//! If draining outlasts the timeout, what is left is abandoned and `serve` returns an
//! error, so the exit status says the drain was cut short.

use std::{net::SocketAddr, time::Duration};

use anyhow::Context as _;
use axum::{Router, serve::ListenerExt};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{Shutdown, service::Listeners};

/// When to stop accepting and how long to drain.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// Keep accepting (while unready) this long after the signal.
    pub delay: Duration,
    /// From the signal to exit, at most.
    pub timeout: Duration,
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
) -> anyhow::Result<()> {
    let Listeners {
        public: listener,
        metrics: metrics_listener,
    } = listeners;
    tracing::info!(
        addr = %listener.local_addr()?,
        metrics_addr = %metrics_listener.local_addr()?,
        "listening"
    );
    let stop_accepting = CancellationToken::new();
    let stop_metrics = CancellationToken::new();

    let public = tokio::spawn({
        let stop = stop_accepting.clone();
        let app = app.into_make_service_with_connect_info::<SocketAddr>();
        // Responses and WebSocket batches are written whole, so Nagle's algorithm
        // would only hold back the last segment of one until the peer's delayed ACK
        // (up to 40 ms) for nothing.
        let listener = listener.tap_io(|stream| {
            if let Err(error) = stream.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY on an accepted connection");
            }
        });
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });
    let metrics = tokio::spawn({
        let stop = stop_metrics.clone();
        async move {
            axum::serve(metrics_listener, metrics)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });

    let mut public = public;
    tokio::select! {
        _ = shutdown.triggered() => {}
        // The server stopped by itself: only an accept error does that.
        result = &mut public => {
            stop_metrics.cancel();
            return result.context("server task panicked")?.context("server failed");
        }
    }

    let started = tokio::time::Instant::now();
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
