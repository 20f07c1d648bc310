//! Prometheus metrics: what every binary exports, and the `/metrics` endpoint.
//!
//! Each binary owns a `Registry`, registers its own metric families on it at start-up,
//! then freezes it in an `Arc` for the endpoint. Nothing is global, so two apps in one
//! test process do not share counters. Names follow the brief; label values are always
//! from small fixed sets (route templates, status codes), never raw paths or ids.

use std::{fmt::Write as _, sync::Arc};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric, text::encode},
    metrics::{counter::ConstCounter, gauge::ConstGauge, info::Info},
    registry::Registry,
};

/// Buckets for request and job durations, in seconds: 1 ms to 10 s, dense where the
/// p50 and p99 of a healthy service fall.
pub const DURATION_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

/// Registers `build_info{version}` and the `process_*` metrics.
pub fn register_common(registry: &mut Registry, version: &str) {
    registry.register(
        "build",
        "The version of the running binary",
        Info::new(VersionLabel {
            version: version.to_owned(),
        }),
    );
    registry.register_collector(Box::new(ProcessCollector));
}

/// Serves the registry at `GET /metrics`.
pub fn router(registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/metrics", get(render))
        .with_state(registry)
}

async fn render(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::with_capacity(16 * 1024);
    if let Err(e) = encode(&mut body, &registry) {
        tracing::error!(error = %e, "cannot encode metrics");
        return (axum::http::StatusCode::INTERNAL_SERVER_ERROR, String::new()).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

/// `db_pool_connections{state="active"|"idle"|"max"}`, read from the pool at scrape.
#[derive(Debug)]
pub struct PoolCollector {
    pool: sqlx::PgPool,
}

impl PoolCollector {
    pub fn new(db: &mobile_db::Db) -> Self {
        Self {
            pool: db.pool().clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

impl Collector for PoolCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let size = i64::from(self.pool.size());
        let idle = i64::try_from(self.pool.num_idle()).unwrap_or(i64::MAX);
        let max = i64::from(self.pool.options().get_max_connections());
        let mut family = encoder.encode_descriptor(
            "db_pool_connections",
            "PostgreSQL pool connections by state",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (state, value) in [("active", size - idle), ("idle", idle), ("max", max)] {
            let label = StateLabel { state };
            ConstGauge::new(value).encode(family.encode_family(&label)?)?;
        }
        Ok(())
    }
}

/// The standard `process_*` metrics, read from `/proc/self` at scrape (Linux only;
/// elsewhere they are simply absent).
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(process) = ProcessStats::read() else {
            return Ok(());
        };
        let mut gauge = |name: &str, help: &str, value: f64| -> Result<(), std::fmt::Error> {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
        };
        gauge(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            process.resident_bytes,
        )?;
        gauge(
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes",
            process.virtual_bytes,
        )?;
        gauge(
            "process_open_fds",
            "Open file descriptors",
            process.open_fds,
        )?;
        gauge(
            "process_max_fds",
            "Maximum open file descriptors",
            process.max_fds,
        )?;
        gauge("process_threads", "OS threads", process.threads)?;
        gauge(
            "process_start_time_seconds",
            "Start time since the Unix epoch in seconds",
            process.start_time_seconds,
        )?;
        let cpu = ConstCounter::new(process.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "User and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)
    }
}

#[derive(Debug, Default)]
struct ProcessStats {
    resident_bytes: f64,
    virtual_bytes: f64,
    open_fds: f64,
    max_fds: f64,
    threads: f64,
    cpu_seconds: f64,
    start_time_seconds: f64,
}

impl ProcessStats {
    /// Linux reports CPU times in USER_HZ, which is 100 on every architecture's ABI.
    const TICKS_PER_SECOND: f64 = 100.0;

    fn read() -> Option<Self> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let kib = |key: &str| -> f64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|n| n.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        let field = |n: usize| {
            fields
                .get(n)
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // `fields[0]` is field 3 of proc(5): utime is 14, stime 15, starttime 22.
        let (utime, stime, start_ticks) = (field(11), field(12), field(19));
        let boot_time = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        let max_fds = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Max open files"))
                    .and_then(|l| l.split_whitespace().nth(3)?.parse::<f64>().ok())
            })
            .unwrap_or(0.0);
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .map(|d| d.count())
            .unwrap_or(0);
        Some(Self {
            resident_bytes: kib("VmRSS:") * 1024.0,
            virtual_bytes: kib("VmSize:") * 1024.0,
            threads: kib("Threads:"),
            open_fds: open_fds as f64,
            max_fds,
            cpu_seconds: (utime + stime) / Self::TICKS_PER_SECOND,
            start_time_seconds: boot_time + start_ticks / Self::TICKS_PER_SECOND,
        })
    }
}

/// Renders a registry to text; for tests and for debugging.
pub fn render_text(registry: &Registry) -> String {
    let mut body = String::new();
    if encode(&mut body, registry).is_err() {
        let _ = write!(body, "# encoding failed");
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_metrics_render() {
        let mut registry = Registry::default();
        register_common(&mut registry, "1.2.3");
        let text = render_text(&registry);
        assert!(text.contains("build_info{version=\"1.2.3\"} 1"), "{text}");
        let rss_line = text
            .lines()
            .find(|l| l.starts_with("process_resident_memory_bytes "))
            .expect("rss is exported");
        let rss: f64 = rss_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(
            rss > 1_000_000.0,
            "a test binary uses more than 1 MB: {rss_line}"
        );
        assert!(text.contains("process_cpu_seconds_total "));
        assert!(text.contains("process_open_fds "));
    }
}
