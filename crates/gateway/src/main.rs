//! `mobile-gateway` serves WebSocket clients at `/v1/ws`.

use std::process::ExitCode;

fn main() -> ExitCode {
    mobile_runtime::cli::main::<mobile_gateway::Gateway>()
}
