//! `mobile-api` serves the REST API; `mobile-api migrate` applies database migrations.

use std::process::ExitCode;

use mobile_api::ApiSettings;
use mobile_runtime::{CommonSettings, Env, telemetry};
use secrecy::ExposeSecret;

const USAGE: &str = "usage: mobile-api [migrate | health]\n\n\
    mobile-api           serve the REST API (settings from the environment; see README)\n\
    mobile-api migrate   create the database if missing and apply migrations, then exit\n\
    mobile-api health    exit 0 if the API on LISTEN_ADDR is ready (container health checks)";

/// mimalloc: a request allocates and frees dozens of small buffers across the runtime's
/// worker threads; measured against glibc's allocator in BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let env = Env::process();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        [] => match ApiSettings::from_env(&env) {
            Ok(settings) => {
                telemetry::init(settings.common.log_format);
                mobile_api::run(settings).await
            }
            Err(e) => Err(e.into()),
        },
        ["health"] => {
            return match CommonSettings::from_env(
                &env,
                ApiSettings::DEFAULT_LISTEN_ADDR,
                ApiSettings::DEFAULT_METRICS_ADDR,
            ) {
                Ok(settings) => mobile_runtime::probe::ready(settings.listen_addr),
                Err(e) => {
                    eprintln!("mobile-api: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        ["migrate"] => match CommonSettings::from_env(
            &env,
            ApiSettings::DEFAULT_LISTEN_ADDR,
            ApiSettings::DEFAULT_METRICS_ADDR,
        ) {
            Ok(settings) => {
                telemetry::init(settings.log_format);
                mobile_api::migrate(settings.database_url.expose_secret()).await
            }
            Err(e) => Err(e.into()),
        },
        ["--version" | "-V"] => {
            println!("mobile-api {}", mobile_api::VERSION);
            return ExitCode::SUCCESS;
        }
        ["--help" | "-h"] => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Also to stderr: the logger may not be up when settings are the problem.
            tracing::error!(error = format!("{e:#}"), "exiting");
            eprintln!("mobile-api: {e:#}");
            ExitCode::FAILURE
        }
    }
}
