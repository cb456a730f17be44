//! `pgquorum`: one binary for every role — monitor member, keeper, local cluster and
//! the operator's commands. This crate parses arguments, sets up logging and calls
//! into the library crates; logic that anything else needs lives there, not here.

mod cert_cmd;
mod keeper_cmd;
mod local_cmd;
mod monitor_cmd;
mod ops_cmd;
mod trust_args;

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
    #[command(flatten)]
    trust: trust_args::TrustArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Certificates: `cert create-ca|create-member|create-keeper|create-client|list|revoke`.
    Cert(cert_cmd::CertArgs),
    /// Run or inspect a member of the monitor group.
    Monitor(monitor_cmd::MonitorArgs),
    /// Run the keeper beside one PostgreSQL server.
    Keeper(keeper_cmd::KeeperArgs),
    /// A whole HA cluster on loopback: `local up`, `local down`.
    Local(local_cmd::LocalArgs),
    /// Show the cluster: `show state|events|uri|settings`.
    Show {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::ShowWhat,
    },
    /// `perform switchover [--candidate NAME]`, `perform failover`.
    Perform {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::PerformWhat,
    },
    /// `enable maintenance --node NAME`.
    Enable {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::ToggleWhat,
    },
    /// `disable maintenance --node NAME`.
    Disable {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::ToggleWhat,
    },
    /// `set node NAME SETTING VALUE`, `set formation SETTING VALUE`.
    Set {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::SetWhat,
    },
    /// `drop node NAME`.
    Drop {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::DropWhat,
    },
}

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
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

fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging();
    let t = cli.trust;
    let result = match cli.command {
        Command::Cert(args) => cert_cmd::run(args, &t),
        // Whatever a member or a keeper creates (data, state, logs, password file) is
        // for its own user alone; explicit modes on the files that matter say so too.
        Command::Monitor(args) => {
            private_umask();
            monitor_cmd::run(args, &t)
        }
        Command::Keeper(args) => {
            private_umask();
            keeper_cmd::run(args, &t)
        }
        Command::Local(args) => local_cmd::run(args, &t),
        Command::Show { target, what } => block_on(ops_cmd::show(target, what, &t)),
        Command::Perform { target, what } => block_on(ops_cmd::perform(target, what, &t)),
        Command::Enable { target, what } => block_on(ops_cmd::maintenance(target, what, true, &t)),
        Command::Disable { target, what } => {
            block_on(ops_cmd::maintenance(target, what, false, &t))
        }
        Command::Set { target, what } => block_on(ops_cmd::set(target, what, &t)),
        Command::Drop { target, what } => block_on(ops_cmd::drop_node(target, what, &t)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
