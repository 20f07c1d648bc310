//! A service binary's `main`: the arguments it takes, the same for all three.
//!
//! ```text
//! <binary>             serve (settings from the environment)
//! <binary> health      exit 0 if the service on LISTEN_ADDR is ready (container health checks)
//! <binary> <command>   one of the service's own (mobile-api migrate)
//! <binary> --version   <binary> --help
//! ```

use std::process::ExitCode;

use crate::{
    Env,
    service::{self, Service},
    telemetry,
};

/// Parses the arguments and does what they say; the process exits with the result.
pub fn main<S: Service>() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let env = match Env::process().with_secret_files() {
        Ok(env) => env,
        Err(e) => return fail::<S>(&e.into()),
    };
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--version" | "-V"] => {
            println!("{} {}", S::NAME, S::VERSION);
            ExitCode::SUCCESS
        }
        ["--help" | "-h"] => {
            println!("{}", usage::<S>());
            ExitCode::SUCCESS
        }
        ["health"] => match S::common_settings(&env) {
            Ok(common) => crate::probe::ready(common.listen_addr),
            Err(e) => fail::<S>(&e.into()),
        },
        [] => outcome::<S>(block_on(async {
            let settings = S::settings(&env)?;
            telemetry::init(S::common(&settings).log_format);
            service::run::<S>(settings).await
        })),
        [command] if S::COMMANDS.iter().any(|(name, _)| name == command) => {
            outcome::<S>(block_on(async {
                let common = S::common_settings(&env)?;
                telemetry::init(common.log_format);
                S::command(command, &env).await
            }))
        }
        _ => {
            eprintln!("{}", usage::<S>());
            ExitCode::from(2)
        }
    }
}

/// The usage text: serving, `health`, and the service's own commands.
pub fn usage<S: Service>() -> String {
    let name = S::NAME;
    let mut lines = vec![
        format!("usage: {name} [health | --version | --help]"),
        String::new(),
        format!(
            "  {name:<18} {} (settings from the environment; see README)",
            S::ABOUT
        ),
        format!(
            "  {:<18} exit 0 if the service on LISTEN_ADDR is ready (container health checks)",
            format!("{name} health")
        ),
    ];
    for (command, what) in S::COMMANDS {
        lines[0] = lines[0].replacen("[health", &format!("[{command} | health"), 1);
        lines.push(format!("  {:<18} {what}", format!("{name} {command}")));
    }
    lines.join("\n")
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(future: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(anyhow::Error::from)?
        .block_on(future)
}

fn outcome<S: Service>(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => fail::<S>(&error),
    }
}

fn fail<S: Service>(error: &anyhow::Error) -> ExitCode {
    // Also to stderr: the logger may not be up when settings are the problem.
    tracing::error!(error = format!("{error:#}"), "exiting");
    eprintln!("{}: {error:#}", S::NAME);
    ExitCode::FAILURE
}
