//! The `keygate` binary: parse the command line, set up logging, hand over to [`keygate::cli`].

// The library's lints, for the same reason: one process serves every client, so a panic is
// at best a lost connection and at worst a lost listener (README, "No panic reachable from input").
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::unreachable,
        clippy::todo,
        clippy::unimplemented,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_possible_wrap
    )
)]

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

/// mimalloc: fewer instructions per allocation than glibc's malloc on the request path
/// (PERFORMANCE.md has the figures).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match keygate::cli::Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One short line for a usage mistake, and exit 1 as the contract says.
            let first = e.to_string();
            let line = first.lines().next().unwrap_or("invalid arguments");
            eprintln!("keygate: {}", line.trim_start_matches("error: "));
            eprintln!("Run `keygate --help` for usage.");
            return ExitCode::from(1);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("KEYGATE_LOG").unwrap_or_else(|_| "info".into())
    };
    // `KEYGATE_LOG_FORMAT=json`: one JSON object a line, for a log pipeline (Loki, ELK,
    // Cloud Logging); `text` (the default) for people.
    match std::env::var("KEYGATE_LOG_FORMAT").as_deref() {
        Ok("json") => tracing_subscriber::fmt()
            .json()
            .with_writer(std::io::stderr)
            .with_env_filter(filter())
            .init(),
        Ok("text") | Ok("") | Err(std::env::VarError::NotPresent) => tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_env_filter(filter())
            .init(),
        Ok(other) => {
            eprintln!("keygate: error: KEYGATE_LOG_FORMAT is `{other}`: json or text");
            return ExitCode::from(1);
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            eprintln!("keygate: error: KEYGATE_LOG_FORMAT is not text: json or text");
            return ExitCode::from(1);
        }
    }
    // The release build unwinds: a panic costs the one task it happens in (a connection, a
    // reload), and is logged here, with where it happened, like every other error.
    std::panic::set_hook(Box::new(|info| {
        let location = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_default();
        tracing::error!(%location, %message, "panic: the task it happened in is stopped");
    }));
    keygate::cli::run(cli)
}
