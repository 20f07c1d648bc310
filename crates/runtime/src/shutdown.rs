//! The shutdown signal, shared by every part of a process.
//!
//! The first SIGTERM or SIGINT cancels one [`CancellationToken`]: readiness turns 503
//! at once, listeners close (after `SHUTDOWN_DELAY_SECONDS`), in-flight work drains.
//! A second signal means "now": the process exits at once with status 130.

use tokio_util::sync::CancellationToken;

/// A cheap-to-clone handle on the process's shutdown state.
#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    token: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts shutting down, as the first signal would.
    pub fn trigger(&self) {
        self.token.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.token.is_cancelled()
    }

    /// Completes when shutdown starts.
    pub async fn triggered(&self) {
        self.token.cancelled().await;
    }

    /// Listens for SIGTERM and SIGINT in a task of its own: the first triggers shutdown,
    /// the second exits the process immediately.
    pub fn listen_for_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{SignalKind, signal};
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let shutdown = self.clone();
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutdown requested: unready, draining");
            shutdown.trigger();
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::warn!(signal = name, "second signal: exiting without draining");
            std::process::exit(130);
        });
        Ok(())
    }
}
