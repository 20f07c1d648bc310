//! `mobile-worker` runs the durable jobs: images and pushes.

use std::process::ExitCode;

use mobile_runtime::{CommonSettings, Env, telemetry};
use mobile_worker::WorkerSettings;

#[tokio::main]
async fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--version" | "-V") => {
            println!("mobile-worker {}", mobile_worker::VERSION);
            return ExitCode::SUCCESS;
        }
        Some("health") => {
            // For container health checks: is the service on LISTEN_ADDR ready?
            let env = Env::process();
            return match CommonSettings::from_env(
                &env,
                WorkerSettings::DEFAULT_LISTEN_ADDR,
                WorkerSettings::DEFAULT_METRICS_ADDR,
            ) {
                Ok(common) => mobile_runtime::probe::ready(common.listen_addr),
                Err(e) => {
                    eprintln!("mobile-worker: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(_) => {
            eprintln!(
                "usage: mobile-worker [health]   (settings from the environment; see README)"
            );
            return ExitCode::from(2);
        }
    }
    let result = match WorkerSettings::from_env(&Env::process()) {
        Ok(settings) => {
            telemetry::init(settings.common.log_format);
            mobile_worker::run(settings).await
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            eprintln!("mobile-worker: {e:#}");
            ExitCode::FAILURE
        }
    }
}
