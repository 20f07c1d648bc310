//! An open-loop load generator: requests start on a schedule (a rate that may change
//! over time), not when earlier ones finish, so a slow server cannot slow the load
//! down and hide its own latency. Each request's latency is measured from the moment
//! it was *due*, which also counts any delay in starting it (no coordinated
//! omission). Results are HDR histograms, overall and per second, plus a progress line
//! while it runs and an SVG chart afterwards.

use std::{
    future::Future,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use crate::chart::{Axis, Chart, Mark, Series};
use serde_json::json;
use tokio::sync::Semaphore;

/// Requests per second at `t` seconds into the run.
pub type Rate = Box<dyn Fn(f64) -> f64 + Send + Sync>;

/// What one second of the run saw.
#[derive(Debug, Clone)]
pub struct Second {
    pub due: u64,
    pub ok: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
}

#[derive(Debug)]
pub struct Report {
    pub seconds: Vec<Second>,
    pub latency: Histogram<u64>,
    pub ok: u64,
    pub errors: u64,
    /// Requests that could not even start because `max_in_flight` were outstanding.
    pub shed: u64,
    pub first_errors: Vec<String>,
    pub wall: Duration,
}

fn histogram() -> Histogram<u64> {
    // Microseconds, 1 µs to 60 s, 3 significant digits: constant, valid bounds.
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

/// Runs `op` on schedule for `duration`. `op(n)` gets the request's sequence number.
pub async fn run<F, Fut>(rate: Rate, duration: Duration, max_in_flight: usize, op: F) -> Report
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let op = Arc::new(op);
    let slots = (duration.as_secs() + 2) as usize;
    let seconds: Arc<Vec<Mutex<Second>>> = Arc::new(
        (0..slots)
            .map(|_| {
                Mutex::new(Second {
                    due: 0,
                    ok: 0,
                    errors: 0,
                    latency: histogram(),
                })
            })
            .collect(),
    );
    let first_errors = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
    let shed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut scheduled = 0.0f64;
    let mut sent = 0u64;
    let mut last_progress = 0;
    let tasks = tokio_util::task::TaskTracker::new();
    loop {
        tick.tick().await;
        let now = started.elapsed();
        if now >= duration {
            break;
        }
        // Requests due by now, at the rate of this moment.
        let t = now.as_secs_f64();
        scheduled += rate(t) / 1000.0;
        while (sent as f64) < scheduled.floor() {
            let n = sent;
            sent += 1;
            let due = Instant::now();
            let slot = (now.as_secs() as usize).min(slots - 1);
            lock(&seconds[slot]).due += 1;
            let Ok(permit) = in_flight.clone().try_acquire_owned() else {
                shed.fetch_add(1, Ordering::Relaxed);
                lock(&seconds[slot]).errors += 1;
                continue;
            };
            let (op, seconds, first_errors) = (op.clone(), seconds.clone(), first_errors.clone());
            tasks.spawn(async move {
                let result = op(n).await;
                let micros = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
                let mut second = lock(&seconds[slot]);
                match result {
                    Ok(()) => {
                        second.ok += 1;
                        let _ = second.latency.record(micros.max(1));
                    }
                    Err(error) => {
                        second.errors += 1;
                        let mut errors = lock(&first_errors);
                        if errors.len() < 10 {
                            errors.push(error);
                        }
                    }
                }
                drop(permit);
            });
        }
        let whole = now.as_secs();
        if whole > last_progress {
            last_progress = whole;
            progress(
                &seconds[(whole as usize - 1).min(slots - 1)],
                whole,
                duration.as_secs(),
                rate(t),
            );
        }
    }
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(30), tasks.wait()).await;
    eprintln!();
    let seconds: Vec<Second> = seconds.iter().map(|s| lock(s).clone()).collect();
    let mut latency = histogram();
    let (mut ok, mut errors) = (0, 0);
    for second in &seconds {
        let _ = latency.add(&second.latency);
        ok += second.ok;
        errors += second.errors;
    }
    let first_errors = lock(&first_errors).clone();
    Report {
        seconds: seconds
            .into_iter()
            .take(duration.as_secs() as usize)
            .collect(),
        latency,
        ok,
        errors,
        shed: shed.load(Ordering::Relaxed),
        first_errors,
        wall: started.elapsed(),
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `[=====>      ] 12/60 s  2000/s  ok 1998  err 0  p99 3.1 ms` on one line of stderr.
fn progress(last: &Mutex<Second>, done: u64, total: u64, rate: f64) {
    let second = lock(last);
    let width = 30;
    let filled = (done * width / total.max(1)).min(width) as usize;
    let bar = format!(
        "{}>{}",
        "=".repeat(filled),
        " ".repeat(width as usize - filled)
    );
    eprint!(
        "\r[{bar}] {done:>4}/{total} s  {rate:>7.0}/s  ok {:>6}  err {:>4}  p99 {:>7.1} ms ",
        second.ok,
        second.errors,
        second.latency.value_at_quantile(0.99) as f64 / 1000.0
    );
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

impl Report {
    /// Summary and per-second series, for the JSON result.
    pub fn to_json(&self) -> serde_json::Value {
        let total = self.ok + self.errors;
        json!({
            "requests": total,
            "ok": self.ok,
            "errors": self.errors,
            "shed": self.shed,
            "error_rate": if total == 0 { 0.0 } else { self.errors as f64 / total as f64 },
            "throughput_per_second": self.ok as f64 / self.wall.as_secs_f64(),
            "latency_ms": {
                "p50": ms(self.latency.value_at_quantile(0.50)),
                "p90": ms(self.latency.value_at_quantile(0.90)),
                "p99": ms(self.latency.value_at_quantile(0.99)),
                "p999": ms(self.latency.value_at_quantile(0.999)),
                "max": ms(self.latency.max()),
            },
            "first_errors": self.first_errors,
            "per_second": self.seconds.iter().enumerate().map(|(t, s)| json!({
                "t": t,
                "due": s.due,
                "ok": s.ok,
                "errors": s.errors,
                "p50_ms": ms(s.latency.value_at_quantile(0.50)),
                "p99_ms": ms(s.latency.value_at_quantile(0.99)),
            })).collect::<Vec<_>>(),
        })
    }

    /// An SVG chart: requests per second (left axis) and p50/p99 latency (right axis,
    /// milliseconds) over time, with `marks` (a restart) as dashed lines.
    pub fn svg(&self, title: &str, marks: Vec<Mark>) -> String {
        svg(&self.to_json(), title, marks)
    }
}

/// The chart of a result [`Report::to_json`] wrote (its `per_second` series), so a
/// committed result can be drawn again without running it again.
pub fn svg(result: &serde_json::Value, title: &str, marks: Vec<Mark>) -> String {
    let seconds = result["per_second"].as_array().cloned().unwrap_or_default();
    let series = |key: &str| -> Vec<f64> {
        seconds
            .iter()
            .map(|s| s[key].as_f64().unwrap_or(0.0))
            .collect()
    };
    Chart {
        title,
        left_unit: "requests/s",
        right_unit: "ms",
        series: vec![
            Series {
                label: "ok".into(),
                color: "#1f77b4",
                axis: Axis::Left,
                values: series("ok"),
            },
            Series {
                label: "errors".into(),
                color: "#d62728",
                axis: Axis::Left,
                values: series("errors"),
            },
            Series {
                label: "p50".into(),
                color: "#2ca02c",
                axis: Axis::Right,
                values: series("p50_ms"),
            },
            Series {
                label: "p99".into(),
                color: "#ff7f0e",
                axis: Axis::Right,
                values: series("p99_ms"),
            },
        ],
        marks,
    }
    .render()
}

/// The open-loop counter of a request mix: which operation request `n` is.
pub fn pick<T>(mix: &[(u32, T)], n: u64) -> &T {
    let total: u32 = mix.iter().map(|(w, _)| w).sum();
    // A multiplicative hash spreads consecutive numbers over the mix.
    let mut slot = (n.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as u32 % total.max(1);
    for (weight, item) in mix {
        if slot < *weight {
            return item;
        }
        slot -= weight;
    }
    &mix[mix.len() - 1].1
}
