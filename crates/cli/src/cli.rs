//! The command line: the top-level commands and the flags every command takes. The
//! subcommands' own arguments live beside the code that runs them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::{cert_cmd, keeper_cmd, local_cmd, monitor_cmd, ops_cmd, trust_args};

#[derive(Parser)]
#[command(
    name = "pgquorum",
    version,
    about = "PostgreSQL high availability with a Raft-replicated monitor group",
    long_about = "PostgreSQL high availability with a Raft-replicated monitor group.\n\n\
        One binary for every role: `monitor run` (a member of the monitor group), \
        `keeper run` (beside each PostgreSQL), `local up` (a whole cluster on loopback), \
        and the operator's commands (`show`, `perform`, `enable`/`disable`, `set`, `drop`).",
    after_help = "Examples:\n  \
        pgquorum local up                       # a 3-node cluster on loopback, to try it\n  \
        pgquorum show state                     # every node: state, role, LSN, health\n  \
        pgquorum --json show events | jq .      # any command, JSON for scripts\n  \
        pgquorum perform switchover             # planned handover to a standby\n\n\
        Exit codes: 0 ok, 1 other error, 2 usage, 3 invalid request, 4 not allowed now, \
        5 timed out, 6 unreachable or no quorum, 7 not authorised (docs/cli.md)."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub trust: trust_args::TrustArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// Flags every command takes, before or after the subcommand.
#[derive(clap::Args, Clone, Copy, Debug, Default)]
pub struct OutputArgs {
    /// Print JSON for scripts instead of text; errors then come as
    /// {"error": {"kind", "message", "exit_code"}} on stdout. `monitor run` and
    /// `keeper run` log JSON lines.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum Command {
    /// Certificates: `cert create-ca|create-member|create-keeper|create-client|list|revoke`.
    #[command(after_help = "Examples:\n  \
        pgquorum cert create-ca --certs-dir certs\n  \
        pgquorum cert create-member --id 1 --host 10.0.0.1 --certs-dir certs\n  \
        pgquorum cert create-client --name alice --role operator --certs-dir certs\n  \
        pgquorum cert create-keeper --name pg1 --host 10.0.0.21 --certs-dir certs\n  \
        pgquorum cert list --certs-dir certs\n  \
        pgquorum cert revoke client.alice --certs-dir certs")]
    Cert(cert_cmd::CertArgs),
    /// Run or inspect a member of the monitor group.
    #[command(after_help = "Examples:\n  \
        pgquorum monitor run --node-id 1 --listen 10.0.0.1:7000 --data-dir /var/lib/pgquorum/monitor \\\n      \
        --peer 1=10.0.0.1:7000 --peer 2=10.0.0.2:7000 --peer 3=10.0.0.3:7000 --certs-dir /etc/pgquorum/certs\n  \
        pgquorum monitor status --monitor 10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000\n  \
        pgquorum monitor add-member 4=10.0.0.4:7000     # started with `monitor run --join`\n  \
        pgquorum monitor remove-member 4")]
    Monitor(monitor_cmd::MonitorArgs),
    /// Run the keeper beside one PostgreSQL server.
    #[command(
        after_help = "Example (as the postgres user; the replication password from the environment):\n  \
        PGQUORUM_REPLICATION_PASSWORD=... pgquorum keeper run --name pg1 --pgdata /var/lib/postgresql/15/pgquorum \\\n      \
        --pg-host 10.0.0.11 --pg-port 5432 --http 0.0.0.0:8008 \\\n      \
        --monitor 10.0.0.1:7000,10.0.0.2:7000,10.0.0.3:7000 --certs-dir /etc/pgquorum/certs\n\n\
        Without a monitor (standalone use and tests):\n  \
        pgquorum keeper apply --name pg1 --pgdata /tmp/pg1 --pg-port 5432 --goal single --insecure"
    )]
    Keeper(keeper_cmd::KeeperArgs),
    /// A whole HA cluster on loopback: `local up`, `local status`, `local kill`, `local down`.
    #[command(after_help = "Examples:\n  \
        pgquorum local up                        # start; Ctrl-C stops everything\n  \
        pgquorum local status                    # processes and their PIDs\n  \
        pgquorum local kill node1                # SIGKILL node1's keeper and PostgreSQL: watch the failover\n  \
        pgquorum local down                      # stop a cluster left behind")]
    Local(local_cmd::LocalArgs),
    /// Show the cluster: `show state|events|history|uri|settings`.
    #[command(after_help = "Examples:\n  \
        pgquorum show state\n  \
        pgquorum show state --watch 1            # refresh in place every second\n  \
        pgquorum show events --limit 20 --follow\n  \
        pgquorum show history                    # failovers and switchovers, with write pauses\n  \
        pgquorum show uri --role rw              # the bare read-write URI, for psql \"$(...)\"\n  \
        pgquorum show settings --json")]
    Show {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::ShowWhat,
    },
    /// `perform switchover [--candidate NAME]`, `perform failover`, `perform reinit --node NAME`.
    #[command(after_help = "Examples:\n  \
        pgquorum perform switchover\n  \
        pgquorum perform switchover --candidate node2 --timeout 30\n  \
        pgquorum perform failover\n  \
        pgquorum perform reinit --node node3       # rebuild a standby from the primary")]
    Perform {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::PerformWhat,
    },
    /// `enable maintenance --node NAME`.
    #[command(after_help = "Example:\n  pgquorum enable maintenance --node node3")]
    Enable {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::ToggleWhat,
    },
    /// `disable maintenance --node NAME`.
    #[command(after_help = "Example:\n  pgquorum disable maintenance --node node3")]
    Disable {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::ToggleWhat,
    },
    /// `set node NAME SETTING VALUE`, `set formation SETTING VALUE`.
    #[command(after_help = "Examples:\n  \
        pgquorum set node node3 candidate-priority 0\n  \
        pgquorum set formation number-sync-standbys 1")]
    Set {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::SetWhat,
    },
    /// `drop node NAME`.
    #[command(after_help = "Example:\n  pgquorum drop node node3")]
    Drop {
        #[command(flatten)]
        target: ops_cmd::Target,
        #[command(subcommand)]
        what: ops_cmd::DropWhat,
    },
    /// Print a shell completion script: `completions bash|zsh|fish`.
    #[command(after_help = "Examples:\n  \
        pgquorum completions bash > /etc/bash_completion.d/pgquorum\n  \
        pgquorum completions zsh > \"${fpath[1]}/_pgquorum\"\n  \
        pgquorum completions fish > ~/.config/fish/completions/pgquorum.fish")]
    Completions {
        /// The shell to complete for.
        shell: clap_complete::Shell,
    },
    /// Write man pages (pgquorum.1, pgquorum-show.1, ...) into a directory.
    #[command(after_help = "Example:\n  \
        pgquorum man --out /usr/local/share/man/man1 && man pgquorum-local")]
    Man {
        /// Directory to write the pages into (created if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `show uri --role`: which of the two URIs to print.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum UriRole {
    /// The read-write URI (target_session_attrs=read-write: the primary).
    #[value(alias = "read-write")]
    Rw,
    /// The read-only URI (prefers a standby, falls back to the primary).
    #[value(alias = "read-only")]
    Ro,
}

impl UriRole {
    pub fn pick<'a>(self, rw: &'a str, ro: &'a str) -> &'a str {
        match self {
            UriRole::Rw => rw,
            UriRole::Ro => ro,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
        for arg in cmd.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" || arg.is_hide_set() {
                continue;
            }
            if arg.get_help().is_none() && arg.get_long_help().is_none() {
                missing.push(format!("{path} --{id}"));
            }
        }
        for sub in cmd.get_subcommands() {
            if sub.is_hide_set() {
                continue;
            }
            let p = format!("{path} {}", sub.get_name());
            if sub.get_about().is_none() && sub.get_long_about().is_none() {
                missing.push(format!("{p} (no description)"));
            }
            walk(sub, &p, missing);
        }
    }

    #[test]
    fn the_command_line_is_well_formed_and_every_flag_says_what_it_does() {
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        let mut missing = Vec::new();
        walk(&cmd, "pgquorum", &mut missing);
        assert!(missing.is_empty(), "no help text: {missing:#?}");
        let mut no_example = Vec::new();
        leaves_without_example(&cmd, "pgquorum", "", &mut no_example);
        assert!(no_example.is_empty(), "no example: {no_example:#?}");
    }

    /// Every command that runs something (a leaf) shows an example of itself in its own
    /// help or in its parent's (`pgquorum show --help` lists `pgquorum show state`, ...).
    fn leaves_without_example(
        cmd: &clap::Command,
        path: &str,
        inherited: &str,
        missing: &mut Vec<String>,
    ) {
        let own = cmd
            .get_after_help()
            .map(|h| h.to_string())
            .unwrap_or_default();
        let examples = format!("{inherited}\n{own}");
        let subs: Vec<&clap::Command> = cmd
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .collect();
        if subs.is_empty() {
            if !examples.contains(&format!("{path} ")) && !examples.contains(&format!("{path}\n")) {
                missing.push(path.to_owned());
            }
            return;
        }
        for sub in subs {
            leaves_without_example(sub, &format!("{path} {}", sub.get_name()), &own, missing);
        }
    }

    #[test]
    fn json_is_accepted_before_and_after_any_command() {
        for args in [
            &["pgquorum", "--json", "local", "down"][..],
            &["pgquorum", "local", "down", "--json"],
            &["pgquorum", "monitor", "add-member", "4=h:1", "--json"],
            &["pgquorum", "--json", "monitor", "remove-member", "4"],
            &["pgquorum", "show", "--json", "state"],
            &["pgquorum", "--json", "cert", "list"],
        ] {
            let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(cli.output.json, "{args:?}");
        }
    }
}
