//! `mobile-gateway` serves WebSocket clients at `/v1/ws`.

use std::process::ExitCode;

use mobile_gateway::GatewaySettings;
use mobile_runtime::{CommonSettings, Env, telemetry};

#[tokio::main]
async fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        None => {}
        Some("--version" | "-V") => {
            println!("mobile-gateway {}", mobile_gateway::VERSION);
            return ExitCode::SUCCESS;
        }
        Some("health") => {
            // For container health checks: is the service on LISTEN_ADDR ready?
            let env = Env::process();
            return match CommonSettings::from_env(
                &env,
                GatewaySettings::DEFAULT_LISTEN_ADDR,
                GatewaySettings::DEFAULT_METRICS_ADDR,
            ) {
                Ok(common) => mobile_runtime::probe::ready(common.listen_addr),
                Err(e) => {
                    eprintln!("mobile-gateway: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(_) => {
            eprintln!(
                "usage: mobile-gateway [health]   (settings from the environment; see README)"
            );
            return ExitCode::from(2);
        }
    }
    let result = match GatewaySettings::from_env(&Env::process()) {
        Ok(settings) => {
            telemetry::init(settings.common.log_format);
            mobile_gateway::run(settings).await
        }
        Err(e) => Err(e.into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "exiting");
            eprintln!("mobile-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}
