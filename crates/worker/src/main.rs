//! `mobile-worker` runs the durable jobs: images and pushes.

use std::process::ExitCode;

fn main() -> ExitCode {
    mobile_runtime::cli::main::<mobile_worker::Worker>()
}
