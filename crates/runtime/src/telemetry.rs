//! Logging through `tracing`: one function builds the subscriber.

use tracing_subscriber::{EnvFilter, fmt, prelude::*};

use crate::LogFormat;

/// Installs the global subscriber: `RUST_LOG` filters (default `info`), `format` picks
/// JSON lines or pretty text. Safe to call more than once (tests do): later calls are
/// no-ops.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let registry = tracing_subscriber::registry().with(filter);
    let result = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Pretty => registry.with(fmt::layer().pretty()).try_init(),
    };
    // An error means a subscriber is already installed; keep that one.
    let _ = result;
}

/// For tests: logs only when `TEST_LOG` is set, so a passing run stays quiet.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(LogFormat::Pretty);
    }
}
