//! `pgquorum keeper ...`: run the keeper beside one PostgreSQL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use anyhow::{anyhow, bail, Context};
use pgquorum_core::{Assignment, NodeState, PeerNode};
use pgquorum_keeper::{Settings, Source};

use crate::trust_args::{TrustArgs, Who};

#[derive(clap::Args)]
pub struct KeeperArgs {
    // Boxed: the options are large next to the other subcommands' arguments.
    #[command(subcommand)]
    command: Box<KeeperCommand>,
}

#[derive(clap::Subcommand)]
enum KeeperCommand {
    /// Run the keeper: register with the monitor group and drive postgres to the
    /// assigned goal state.
    Run(NodeArgs),
    /// Drive postgres to one goal state without a monitor, then keep supervising it
    /// (standalone use and tests; no lease: never for a production primary).
    Apply(ApplyArgs),
    /// Internal: the fence guard the keeper starts beside itself (reads lease deadlines
    /// on stdin, stops postgres when one passes).
    #[command(hide = true)]
    Guard {
        /// The data directory of the postgres to stop.
        #[arg(long)]
        pgdata: PathBuf,
    },
}

/// Every setting can also come from `--config FILE` (`name = value` lines, the names of
/// the long options; `pg-param` may repeat). The command line wins over the file.
#[derive(clap::Args, Default)]
struct NodeArgs {
    /// Config file with the same settings as the options.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Node name, unique in the formation (also the standby's application_name).
    #[arg(long)]
    name: Option<String>,
    /// PostgreSQL data directory.
    #[arg(long)]
    pgdata: Option<PathBuf>,
    /// The port this postgres listens on (required).
    #[arg(long)]
    pg_port: Option<u16>,
    /// Host name or address other nodes use to reach this postgres (default localhost,
    /// which is right only when every node is on one machine: give the real address).
    #[arg(long)]
    pg_host: Option<String>,
    /// postgresql.conf listen_addresses (default '*').
    #[arg(long)]
    listen_addresses: Option<String>,
    /// Unix socket directory of this postgres (default /tmp).
    #[arg(long)]
    socket_dir: Option<PathBuf>,
    /// Monitor group members, HOST:PORT,HOST:PORT,...
    #[arg(long, env = "PGQUORUM_MONITOR")]
    monitor: Option<String>,
    /// Address of the health/metrics HTTP endpoint, e.g. 0.0.0.0:8008.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Serve --http over HTTPS with this keeper's certificate (from --certs-dir); no
    /// client certificate is asked for. Default: plain HTTP, as HAProxy checks expect.
    #[arg(long)]
    http_tls: bool,
    /// 0 = never promote; 1-100 (default 50).
    #[arg(long)]
    candidate_priority: Option<u8>,
    /// Count this node toward synchronous commit (default true).
    #[arg(long)]
    replication_quorum: Option<bool>,
    /// Directory of postgres, initdb, ... (default: `pg_config --bindir`, then PATH).
    #[arg(long)]
    pg_bindir: Option<PathBuf>,
    /// Formation name (default "default").
    #[arg(long)]
    formation: Option<String>,
    /// Superuser the keeper connects as over the Unix socket (default postgres).
    #[arg(long)]
    superuser: Option<String>,
    /// Replication role (default pgquorum_replicator).
    #[arg(long)]
    replication_user: Option<String>,
    /// Password of the replication role (same on every node).
    #[arg(long, env = "PGQUORUM_REPLICATION_PASSWORD", hide_env_values = true)]
    replication_password: Option<String>,
    /// A PostgreSQL parameter NAME=VALUE to pass through (repeatable).
    #[arg(long = "pg-param")]
    pg_param: Vec<String>,
    /// An extra pg_hba.conf line for clients, e.g. "host all all 10.0.0.0/8 scram-sha-256"
    /// (repeatable; kept in pgquorum's block of pg_hba.conf on every node).
    #[arg(long = "pg-hba")]
    pg_hba: Vec<String>,
    /// The keeper's state file (default: <pgdata>.pgquorum-state.json).
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// postgres' log file (default: <pgdata>.postgres.log).
    #[arg(long)]
    log_file: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ApplyArgs {
    #[command(flatten)]
    node: NodeArgs,
    /// Goal state, e.g. single, secondary, demoted.
    #[arg(long)]
    goal: String,
    /// The node to stream from / rewind against: NAME=HOST:PORT.
    #[arg(long)]
    primary: Option<String>,
    /// Another node of the group (pg_hba entries, slots): NAME=HOST:PORT (repeatable).
    #[arg(long)]
    peer: Vec<String>,
    /// synchronous_standby_names on a primary.
    #[arg(long, default_value = "")]
    synchronous_standby_names: String,
}

pub fn run(args: KeeperArgs, trust: &TrustArgs) -> anyhow::Result<()> {
    // Checked before anything else: nothing is touched as root.
    if nix::unistd::geteuid().is_root() {
        return Err(pgquorum_keeper::KeeperError::RunAsRoot.into());
    }
    let (node, source) = match *args.command {
        KeeperCommand::Guard { pgdata } => {
            return pgquorum_keeper::guard::run(&pgdata).map_err(Into::into);
        }
        KeeperCommand::Run(n) => {
            let s = settings(&n)?;
            if s.monitors.is_empty() {
                bail!("--monitor HOST:PORT,... is required (or PGQUORUM_MONITOR)");
            }
            let m = s.monitors.clone();
            // The keeper acts as the node its certificate names, and only as that one.
            let security = trust.security(Who::Keeper(s.name.clone()))?;
            let mut s = s;
            if let pgquorum_trust::Security::Tls(t) = &security {
                with_pg_tls(&mut s, t.dir())?;
            }
            if n.http_tls {
                match &security {
                    pgquorum_trust::Security::Tls(t) => s.http_tls = Some(t.clone()),
                    pgquorum_trust::Security::Insecure => {
                        bail!("--http-tls needs the keeper's certificate: give --certs-dir")
                    }
                }
            }
            (s, Source::Monitor(m, security))
        }
        KeeperCommand::Apply(a) => {
            let mut s = settings(&a.node)?;
            // No monitor to talk to; the certificates serve postgres' TLS only.
            if let Some(dir) = &trust.certs_dir {
                with_pg_tls(&mut s, dir)?;
            }
            let goal = NodeState::parse(&a.goal)
                .ok_or_else(|| anyhow!("unknown goal state {:?}", a.goal))?;
            let assignment = Assignment {
                goal_state: goal,
                primary: a.primary.as_deref().map(peer).transpose()?,
                synchronous_standby_names: a.synchronous_standby_names.clone(),
                peers: a
                    .peer
                    .iter()
                    .map(|p| peer(p))
                    .collect::<anyhow::Result<_>>()?,
                lease_ms: 1500,
                heartbeat_interval_ms: 200,
                on_quorum_loss: "block".into(),
                reinit: 0,
            };
            (s, Source::Static(assignment))
        }
    };
    // One thread: the keeper is mostly waiting, and a small footprint matters beside
    // every postgres.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(t) => t,
                    Err(_) => return std::future::pending().await,
                };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {},
                _ = term.recv() => {},
            }
            tracing::info!("shutting down: stopping postgres");
        };
        pgquorum_keeper::run(node, source, shutdown).await
    })?;
    Ok(())
}

/// PostgreSQL over TLS with the keeper's certificate from `certs_dir`; replication then
/// authenticates by certificate, and a replication password is not used.
fn with_pg_tls(s: &mut Settings, certs_dir: &std::path::Path) -> anyhow::Result<()> {
    let t = pgquorum_keeper::settings::PgTls::from_certs_dir(certs_dir, &s.name, &s.pgdata);
    for f in [&t.cert, &t.key, &t.ca] {
        if !f.is_file() {
            bail!(
                "{} is missing: the keeper runs postgres' TLS with its own certificate (`pgquorum cert create-keeper --name {} --host HOST`)",
                f.display(),
                s.name
            );
        }
    }
    if s.replication_password.take().is_some() {
        tracing::warn!(
            "--replication-password is not used with --certs-dir: standbys authenticate with the node's certificate"
        );
    }
    s.pg_tls = Some(t);
    s.validate()?;
    Ok(())
}

/// NAME=HOST:PORT
fn peer(spec: &str) -> anyhow::Result<PeerNode> {
    let (name, addr) = spec
        .split_once('=')
        .ok_or_else(|| anyhow!("{spec:?}: expected NAME=HOST:PORT"))?;
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| anyhow!("{spec:?}: expected NAME=HOST:PORT"))?;
    Ok(PeerNode {
        node_id: 0,
        name: name.to_string(),
        host: host
            .parse()
            .map_err(|e| anyhow!("{}: {e}", pgquorum_core::quote_prefix(spec)))?,
        port: port
            .parse()
            .with_context(|| format!("{spec:?}: port {port:?} is not a port number"))?,
        // Given by hand: the primary keeps a slot for it.
        streamed: true,
    })
}

/// `name = value` lines; '#' starts a comment; values may be quoted.
fn read_config(path: &PathBuf) -> anyhow::Result<HashMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    let mut map: HashMap<String, Vec<String>> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (k, v) = line
            .split_once('=')
            .ok_or_else(|| anyhow!("{}:{}: expected `name = value`", path.display(), i + 1))?;
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
            .unwrap_or(v);
        map.entry(k.trim().to_string())
            .or_default()
            .push(v.to_string());
    }
    const KNOWN: [&str; 20] = [
        "name",
        "pgdata",
        "pg-port",
        "pg-host",
        "listen-addresses",
        "socket-dir",
        "monitor",
        "http",
        "candidate-priority",
        "replication-quorum",
        "pg-bindir",
        "formation",
        "superuser",
        "replication-user",
        "replication-password",
        "pg-param",
        "pg-hba",
        "state-file",
        "log-file",
        "config",
    ];
    if let Some(k) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        bail!("{}: unknown setting {k:?}", path.display());
    }
    Ok(map)
}

fn settings(n: &NodeArgs) -> anyhow::Result<Settings> {
    let file = match &n.config {
        Some(p) => read_config(p)?,
        None => HashMap::new(),
    };
    fn pick<T: FromStr>(
        cli: Option<T>,
        file: &HashMap<String, Vec<String>>,
        key: &str,
    ) -> anyhow::Result<Option<T>>
    where
        T::Err: std::fmt::Display,
    {
        if cli.is_some() {
            return Ok(cli);
        }
        match file.get(key).and_then(|v| v.last()) {
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| anyhow!("config setting {key} = {v:?}: {e}")),
            None => Ok(None),
        }
    }
    let name: String =
        pick(n.name.clone(), &file, "name")?.ok_or_else(|| anyhow!("--name is required"))?;
    let pgdata: PathBuf =
        pick(n.pgdata.clone(), &file, "pgdata")?.ok_or_else(|| anyhow!("--pgdata is required"))?;
    // The keeper derives sibling paths (state file, clone target) from it.
    let pgdata = if pgdata.is_relative() {
        std::env::current_dir()
            .context("reading the current directory")?
            .join(pgdata)
    } else {
        pgdata
    };
    let port: u16 =
        pick(n.pg_port, &file, "pg-port")?.ok_or_else(|| anyhow!("--pg-port is required"))?;
    let mut s = Settings::new(name, pgdata, port);
    if let Some(v) = pick(n.pg_host.clone(), &file, "pg-host")? {
        s.pg_host = v;
    }
    if let Some(v) = pick(n.listen_addresses.clone(), &file, "listen-addresses")? {
        s.listen_addresses = v;
    }
    if let Some(v) = pick(n.socket_dir.clone(), &file, "socket-dir")? {
        s.socket_dir = v;
    }
    if let Some(v) = pick::<String>(n.monitor.clone(), &file, "monitor")? {
        s.monitors = v
            .split(',')
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect();
    }
    s.http = pick(n.http, &file, "http")?;
    if let Some(v) = pick(n.candidate_priority, &file, "candidate-priority")? {
        s.candidate_priority = v;
    }
    if let Some(v) = pick(n.replication_quorum, &file, "replication-quorum")? {
        s.replication_quorum = v;
    }
    s.bindir = pick(n.pg_bindir.clone(), &file, "pg-bindir")?;
    if let Some(v) = pick(n.formation.clone(), &file, "formation")? {
        s.formation = v;
    }
    if let Some(v) = pick(n.superuser.clone(), &file, "superuser")? {
        s.superuser = v;
    }
    if let Some(v) = pick(n.replication_user.clone(), &file, "replication-user")? {
        s.replication_user = v;
    }
    s.replication_password = pick(
        n.replication_password.clone(),
        &file,
        "replication-password",
    )?;
    let params: Vec<String> = if n.pg_param.is_empty() {
        file.get("pg-param").cloned().unwrap_or_default()
    } else {
        n.pg_param.clone()
    };
    for p in params {
        let (k, v) = p
            .split_once('=')
            .ok_or_else(|| anyhow!("--pg-param {p:?}: expected NAME=VALUE"))?;
        s.pg_params
            .push((k.trim().to_string(), v.trim().to_string()));
    }
    let hba: Vec<String> = if n.pg_hba.is_empty() {
        file.get("pg-hba").cloned().unwrap_or_default()
    } else {
        n.pg_hba.clone()
    };
    for line in hba {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if line.contains('\n')
            || fields.len() < 3
            || !["local", "host", "hostssl", "hostnossl"].contains(&fields[0])
        {
            bail!("--pg-hba {line:?}: expected one pg_hba.conf line, e.g. \"host all all 127.0.0.1/32 scram-sha-256\"");
        }
        s.hba_lines.push(fields.join(" "));
    }
    if let Some(v) = pick(n.state_file.clone(), &file, "state-file")? {
        s.state_file = v;
    }
    if let Some(v) = pick(n.log_file.clone(), &file, "log-file")? {
        s.log_file = v;
    }
    s.validate()?;
    Ok(s)
}
