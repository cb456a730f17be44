//! `pgquorum`: one binary for every role — monitor member, keeper, local cluster and
//! the operator's commands. This crate parses arguments, sets up logging and calls
//! into the library crates; logic that anything else needs lives there, not here.

// Every line printed goes through `output`, which ends the command quietly when the
// reader of stdout has gone (`| head`) instead of panicking. Defined before the modules
// so that theirs are these too.
macro_rules! println {
    () => {
        $crate::output::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::line(format_args!($($arg)*))
    };
}
#[allow(unused_macros)]
macro_rules! print {
    ($($arg:tt)*) => {
        $crate::output::text(format_args!($($arg)*))
    };
}
macro_rules! eprintln {
    () => {
        $crate::output::err_line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::output::err_line(format_args!($($arg)*))
    };
}

mod cert_cmd;
mod cli;
mod docs_cmd;
mod exit;
mod keeper_cmd;
mod local_cmd;
mod monitor_cmd;
mod ops_cmd;
mod output;
mod perform;
mod trust_args;

use clap::Parser;
use cli::{Cli, Command};

fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("PGQUORUM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        // `monitor run --json`, `keeper run --json`: one JSON object per log line.
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
}

fn private_umask() {
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
}

fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            let json = std::env::args_os().any(|a| a == "--json");
            if json
                && !matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion)
                && e.kind() != ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            {
                let rendered = e.to_string();
                let text = rendered.trim().trim_start_matches("error: ");
                exit::print_error(exit::Kind::Usage, text, true);
                return std::process::ExitCode::from(exit::Kind::Usage.exit_code());
            }
            // clap prints help (exit 0) or the usage error (exit 2, our Kind::Usage).
            e.exit();
        }
    };
    let json = cli.output.json;
    init_logging(json);
    let t = cli.trust;
    let result = match cli.command {
        Command::Cert(mut args) => {
            args.json = json;
            cert_cmd::run(args, &t)
        }
        // Whatever a member or a keeper creates (data, state, logs, password file) is
        // for its own user alone; explicit modes on the files that matter say so too.
        Command::Monitor(args) => {
            private_umask();
            monitor_cmd::run(args, &t, json)
        }
        Command::Keeper(args) => {
            private_umask();
            keeper_cmd::run(args, &t)
        }
        Command::Local(args) => local_cmd::run(args, &t, json),
        Command::Show { mut target, what } => {
            target.json = json;
            block_on(ops_cmd::show(target, what, &t))
        }
        Command::Perform { mut target, what } => {
            target.json = json;
            block_on(ops_cmd::perform(target, what, &t))
        }
        Command::Enable { mut target, what } => {
            target.json = json;
            block_on(ops_cmd::maintenance(target, what, true, &t))
        }
        Command::Disable { mut target, what } => {
            target.json = json;
            block_on(ops_cmd::maintenance(target, what, false, &t))
        }
        Command::Set { mut target, what } => {
            target.json = json;
            block_on(ops_cmd::set(target, what, &t))
        }
        Command::Drop { mut target, what } => {
            target.json = json;
            block_on(ops_cmd::drop_node(target, what, &t))
        }
        Command::Completions { shell } => docs_cmd::completions(shell),
        Command::Man { out } => docs_cmd::man(&out, json),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => std::process::ExitCode::from(exit::report(&e, json)),
    }
}
