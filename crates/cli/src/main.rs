//! `pgquorum`: one binary for every role — monitor member, keeper, local cluster and
//! the operator's commands. This crate parses arguments, sets up logging and calls
//! into the library crates; logic that anything else needs lives there, not here.

mod keeper_cmd;
mod monitor_cmd;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pgquorum",
    version,
    about = "PostgreSQL high availability with a Raft-replicated monitor group"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run or inspect a member of the monitor group.
    Monitor(monitor_cmd::MonitorArgs),
    /// Run the keeper beside one PostgreSQL server.
    Keeper(keeper_cmd::KeeperArgs),
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGQUORUM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let result = match cli.command {
        Command::Monitor(args) => monitor_cmd::run(args),
        Command::Keeper(args) => keeper_cmd::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
