//! The `vmbackup` binary: parse the command line, call the library, print, and map errors to
//! the exit codes of the contract.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use vmbackup::error::exit;

fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("VMBACKUP_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

fn run(cli: cli::Cli) -> Result<i32, anyhow::Error> {
    let _ = &cli.global;
    Err(vmbackup::Error::NotImplemented(cli.command.name()).into())
}

fn main() -> ExitCode {
    let cli = match cli::Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let code = if e.use_stderr() {
                exit::BAD_INPUT
            } else {
                exit::OK
            };
            let _ = e.print();
            return ExitCode::from(code as u8);
        }
    };
    init_logging();
    let json = cli.global.json;
    match run(cli) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            let code = e
                .downcast_ref::<vmbackup::Error>()
                .map(vmbackup::Error::exit_code)
                .unwrap_or(exit::FAILED);
            if json {
                let doc =
                    serde_json::json!({"ok": false, "exit_code": code, "error": format!("{e:#}")});
                println!("{doc}");
            }
            eprintln!("error: {e:#}");
            ExitCode::from(code as u8)
        }
    }
}
