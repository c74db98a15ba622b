//! `janus`: image understanding and text-to-image generation with Janus and Janus-Pro models
//! from the command line.

mod args;
mod commands;
mod error;
mod formats;
mod progress;

use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Usage errors exit with status 2 here; --help and --version with 0.
    let cli = args::Cli::parse();
    // A panic is a bug, never the user's fault: report it as one line like any other error.
    std::panic::set_hook(Box::new(|_| {}));
    let outcome = catch_unwind(AssertUnwindSafe(|| commands::run(cli.command)));
    let message = match outcome {
        Ok(Ok(())) => return ExitCode::SUCCESS,
        Ok(Err(error::CliError::Interrupted(message))) => {
            let _ = writeln!(std::io::stderr(), "{message}");
            return ExitCode::from(130);
        }
        Ok(Err(e)) => e.to_string(),
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            format!("internal error: {what}")
        }
    };
    let line = message.split_whitespace().collect::<Vec<_>>().join(" ");
    // Nothing more can be done when stderr itself is closed.
    let _ = writeln!(std::io::stderr(), "error: {line}");
    ExitCode::FAILURE
}
