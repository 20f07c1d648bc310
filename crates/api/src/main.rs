//! `mobile-api` serves the REST API; `mobile-api migrate` applies database migrations.

use std::process::ExitCode;

/// mimalloc: a request allocates and frees dozens of small buffers across the runtime's
/// worker threads; measured against glibc's allocator in BENCHMARKS.md.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    mobile_runtime::cli::main::<mobile_api::Api>()
}
