//! `mobile-loadtest`: benchmarks of mobile-backend, run on one machine, loopback only,
//! bounded in count and time.
//!
//! ```text
//! mobile-loadtest ws [--idle N] [--subscribers N] [--messages N] [--rate R] [--seconds S] [--peer socketio|none]
//! mobile-loadtest rest [--rate R] [--seconds S] [--users N]
//! mobile-loadtest me [--rates R,R,...] [--seconds S] [--p99-ms MS]   (needs loadtest/peers/install.sh)
//! mobile-loadtest me --baseline PATH [--baseline-database-url URL] [--rates R,R,...] [--seconds S] [--rounds N]
//! mobile-loadtest diurnal [--peak R] [--trough R] [--seconds S] [--users N]
//! mobile-loadtest rollout [--rate R] [--clients N] [--posts R] [--seconds S]   (needs nginx)
//! mobile-loadtest rooms [--users N] [--rate R] [--seconds S]
//! mobile-loadtest images [--rounds N]
//! mobile-loadtest push [--pushes N] [--concurrency C]
//! mobile-loadtest jobs [--jobs N]
//! mobile-loadtest chart --result loadtest/results/rollout.json   (draws the SVG of a committed result again)
//! ```
//!
//! Each scenario starts the services it measures as child processes (release builds
//! next to this binary), on a fresh database and a private Redis key prefix, and prints
//! a summary plus a JSON result (`--out DIR`, default `loadtest/results`).

mod ceilings;
mod chart;
mod me;
mod open_loop;
mod procs;
mod rest;
mod rollout;
mod rooms;
mod worker;
mod ws;

use std::{collections::HashMap, path::PathBuf};

use anyhow::{Context as _, bail};

const USAGE: &str = "usage: mobile-loadtest ws [--idle N] [--subscribers N] [--messages N] [--rate R] [--seconds S] [--peer socketio|none] [--out DIR]
       mobile-loadtest me [--rates R,R,...] [--seconds S] [--p99-ms MS] [--out DIR]
       mobile-loadtest me --baseline PATH [--baseline-database-url URL] [--rates R,R,...] [--seconds S] [--rounds N] [--out DIR]
       mobile-loadtest rest [--rate R] [--seconds S] [--users N] [--out DIR]
       mobile-loadtest diurnal [--peak R] [--trough R] [--seconds S] [--users N] [--out DIR]
       mobile-loadtest rollout [--rate R] [--clients N] [--posts R] [--seconds S] [--out DIR]
       mobile-loadtest images [--rounds N] [--out DIR]
       mobile-loadtest push [--pushes N] [--concurrency C] [--out DIR]
       mobile-loadtest jobs [--jobs N] [--out DIR]
       mobile-loadtest rooms [--users N] [--rate R] [--seconds S] [--out DIR]
       mobile-loadtest chart --result FILE.json";

/// `--name value` flags.
#[derive(Debug, Default)]
pub struct Flags(HashMap<String, String>);

impl Flags {
    fn parse(args: &[String]) -> anyhow::Result<Self> {
        let mut flags = HashMap::new();
        let mut args = args.iter();
        while let Some(name) = args.next() {
            let Some(name) = name.strip_prefix("--") else {
                bail!("unexpected argument {name:?}\n{USAGE}");
            };
            let value = args
                .next()
                .with_context(|| format!("--{name} needs a value"))?;
            flags.insert(name.to_owned(), value.clone());
        }
        Ok(Self(flags))
    }

    pub fn number(&self, name: &str, default: u64) -> anyhow::Result<u64> {
        self.0.get(name).map_or(Ok(default), |v| {
            v.parse()
                .with_context(|| format!("--{name} takes a number"))
        })
    }

    pub fn text(&self, name: &str, default: &str) -> String {
        self.0
            .get(name)
            .map_or_else(|| default.to_owned(), Clone::clone)
    }

    pub fn out_dir(&self) -> PathBuf {
        self.0
            .get("out")
            .map_or_else(|| PathBuf::from("loadtest/results"), PathBuf::from)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((scenario, rest)) = args.split_first() else {
        bail!("{USAGE}");
    };
    if matches!(scenario.as_str(), "--help" | "-h" | "help") {
        println!("{USAGE}");
        return Ok(());
    }
    let flags = Flags::parse(rest)?;
    match scenario.as_str() {
        "ws" => ws::run(&flags).await,
        "rest" => rest::rest(&flags).await,
        "me" => me::run(&flags).await,
        "rollout" => rollout::run(&flags).await,
        "rooms" => rooms::run(&flags).await,
        "diurnal" => rest::diurnal(&flags).await,
        "chart" => chart::redraw(&flags),
        "images" => worker::images(&flags).await,
        "push" => worker::push(&flags).await,
        "jobs" => worker::jobs(&flags).await,
        // The fake APNs, as a child process of `push`.
        "fake-apns" => worker::fake_apns().await,
        // The bare hyper server, as a child process of `me`.
        "http-ceiling" => ceilings::serve_http(flags.number("port", 0)?.try_into()?).await,
        other => bail!("unknown scenario {other:?}\n{USAGE}"),
    }
}
