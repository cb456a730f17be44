//! `pgquorum local up|status|kill|down`: a whole HA cluster on loopback in one
//! directory — the monitor group and N keepers, each with its PostgreSQL — for trying
//! pgquorum out and for development. Processes are ordinary `pgquorum` children of this
//! command; their PIDs are written to `DIR/local.json` so `local status`, `local kill`
//! and `local down` find them.
//!
//! `local up` is a supervisor, not a tripwire: a child that exits is reported (which,
//! how, when) and the rest runs on, because watching the cluster survive a dead process
//! is the point of a local cluster. With `--restart on-failure` a child that died is
//! started again after `--restart-delay`; by default it is left dead.

use std::ffi::OsString;
use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::trust_args::TrustArgs;
use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{Pid, User};
use pgquorum_api::pb::monitor::{monitor_client::MonitorClient, GetStateRequest, NodeStatus};
use pgquorum_trust::{CertsDir, Dial, Identity, Security, Tls, Validity, INSECURE_WARNING};
use serde::{Deserialize, Serialize};

#[derive(clap::Args)]
pub struct LocalArgs {
    #[command(subcommand)]
    command: LocalCommand,
}

#[derive(clap::Subcommand)]
enum LocalCommand {
    /// Start a monitor group and PostgreSQL nodes on loopback; Ctrl-C stops everything.
    #[command(after_help = "Examples:\n  \
        pgquorum local up\n  \
        pgquorum local up --dir /tmp/pgq --base-port 23000 --restart on-failure")]
    Up(UpArgs),
    /// The processes of a running local cluster: name, role, PID, alive, ports.
    #[command(after_help = "Example:\n  pgquorum local status")]
    Status(DirArgs),
    /// Kill one process of a running local cluster, to watch the cluster survive it: a
    /// node (its keeper, then its PostgreSQL) or a monitor member.
    #[command(after_help = "Examples:\n  \
        pgquorum local kill node1                 # the node dies: keeper and PostgreSQL, SIGKILL\n  \
        pgquorum local kill monitor2 --signal TERM\n  \
        pgquorum local kill node2 --only postgres  # the postmaster alone: the keeper restarts it")]
    Kill(KillArgs),
    /// Stop a local cluster left running (for example after its terminal was closed).
    #[command(after_help = "Example:\n  pgquorum local down --dir pgquorum-local")]
    Down(DirArgs),
}

/// What `local up` does when one of its processes exits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Restart {
    /// Report it and leave it dead (to watch a failover).
    Never,
    /// Start it again after --restart-delay when it was killed or failed (not after a
    /// clean exit 0, e.g. a keeper whose node was dropped).
    OnFailure,
}

#[derive(clap::Args)]
struct UpArgs {
    /// Directory holding every data directory, log and the PID file.
    #[arg(long, default_value = "pgquorum-local")]
    dir: PathBuf,
    /// Number of monitor members (3 or 5 for a fault-tolerant group).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=7))]
    monitors: u16,
    /// Number of PostgreSQL nodes.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=9))]
    nodes: u16,
    /// Ports used: monitors BASE+1.., PostgreSQL BASE+11.., keeper HTTP BASE+21..,
    /// monitor /metrics BASE+31...
    #[arg(long, default_value_t = 6400)]
    base_port: u16,
    /// Where the PostgreSQL binaries are (default: `pg_config --bindir`, then PATH).
    #[arg(long)]
    pg_bindir: Option<PathBuf>,
    /// Give up waiting for a primary with streaming standbys after this many seconds.
    #[arg(long, default_value_t = 180)]
    timeout: u64,
    /// What to do when a process of the cluster exits: never (report it, leave it dead,
    /// the rest runs on) or on-failure (start it again after --restart-delay).
    #[arg(long, value_enum, default_value_t = Restart::Never)]
    restart: Restart,
    /// Seconds to wait before restarting a process (with --restart on-failure).
    #[arg(long, default_value_t = 5)]
    restart_delay: u64,
}

#[derive(clap::Args)]
struct DirArgs {
    /// The local cluster's directory (as given to `local up --dir`).
    #[arg(long, default_value = "pgquorum-local")]
    dir: PathBuf,
}

#[derive(clap::Args)]
struct KillArgs {
    /// A node (node1, ...) or a monitor member (monitor1, ...), as `local status` lists.
    name: String,
    /// The signal: KILL (a crash), TERM (a clean stop), STOP (a pause; CONT resumes).
    #[arg(long, default_value = "KILL")]
    signal: String,
    /// For a node: only its keeper, or only its PostgreSQL (default: both, keeper first).
    #[arg(long, value_enum)]
    only: Option<NodePart>,
    #[command(flatten)]
    dir: DirArgs,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum NodePart {
    /// The keeper process.
    Keeper,
    /// The PostgreSQL postmaster (its PID from postmaster.pid).
    Postgres,
}

#[derive(Serialize, Deserialize)]
struct PidFile {
    processes: Vec<PidEntry>,
}

#[derive(Serialize, Deserialize, Clone)]
struct PidEntry {
    role: String,
    name: String,
    pid: i32,
    /// The monitor's gRPC port, or the node's PostgreSQL port.
    #[serde(default)]
    port: Option<u16>,
    /// A keeper's HTTP port.
    #[serde(default)]
    http_port: Option<u16>,
    /// A keeper's PostgreSQL data directory.
    #[serde(default)]
    pgdata: Option<PathBuf>,
    /// Set by `local up` when the process exited and was left dead: how it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exited: Option<String>,
}

pub fn run(args: LocalArgs, trust: &TrustArgs, json: bool) -> Result<()> {
    match args.command {
        LocalCommand::Up(up) => local_up(up, trust, json),
        LocalCommand::Status(d) => local_status(&d.dir, json),
        LocalCommand::Kill(k) => local_kill(&k, json),
        LocalCommand::Down(down) => local_down(&down.dir, json),
    }
}

/// How a process is started, kept so that it can be started again.
struct Spec {
    program: PathBuf,
    args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    run_as: Option<(u32, u32)>,
}

impl Spec {
    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args);
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }
}

/// One supervised process.
struct Proc {
    name: String,
    entry: PidEntry,
    spec: Spec,
    child: Option<Child>,
    /// When it exited, and when it is to be started again (--restart on-failure).
    down_since: Option<Instant>,
    restart_at: Option<Instant>,
    restarts: u32,
}

/// "was killed by SIGKILL", "exited with status 1", "exited cleanly".
fn how(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = Signal::try_from(sig)
            .map(|s| s.as_str().to_owned())
            .unwrap_or_else(|_| format!("signal {sig}"));
        return format!("was killed by {name}");
    }
    match status.code() {
        Some(0) => "exited cleanly (status 0)".into(),
        Some(c) => format!("exited with status {c}"),
        None => format!("ended ({status})"),
    }
}

fn failed(status: ExitStatus) -> bool {
    !status.success()
}

fn clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    format!(
        "{:02}:{:02}:{:02}Z",
        (now / 3600) % 24,
        (now / 60) % 60,
        now % 60
    )
}

/// A line for the reader: text, or one JSON object per line with --json.
fn say(json: bool, text: &str, value: serde_json::Value) {
    if json {
        println!("{value}");
    } else {
        println!("{text}");
    }
}

struct Layout {
    monitors: Vec<(u16, u16, u16)>, // (id, port, metrics port)
    nodes: Vec<(String, u16, u16)>, // (name, pg port, http port)
}

fn layout(args: &UpArgs) -> Result<Layout> {
    let base = args.base_port;
    if base.checked_add(40).is_none() || base < 1024 {
        bail!("--base-port {base} leaves no room: choose a port between 1024 and 65490");
    }
    let monitors = (1..=args.monitors)
        .map(|i| (i, base + i, base + 30 + i))
        .collect();
    let nodes = (1..=args.nodes)
        .map(|j| (format!("node{j}"), base + 10 + j, base + 20 + j))
        .collect();
    Ok(Layout { monitors, nodes })
}

fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Children that are stopped (keepers first, so each stops its PostgreSQL while the
/// monitor group still runs) when this guard goes away, whatever the reason.
struct Cluster {
    keepers: Vec<Proc>,
    monitors: Vec<Proc>,
}

impl Cluster {
    fn stop(&mut self) {
        stop_children(&mut self.keepers, Duration::from_secs(30));
        stop_children(&mut self.monitors, Duration::from_secs(10));
    }

    fn pid_file(&self) -> PidFile {
        PidFile {
            processes: self
                .monitors
                .iter()
                .chain(self.keepers.iter())
                .map(|p| p.entry.clone())
                .collect(),
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop_children(children: &mut Vec<Proc>, grace: Duration) {
    for p in children.iter() {
        if let Some(child) = &p.child {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
            }
        }
    }
    let deadline = Instant::now() + grace;
    for p in children.iter_mut() {
        let name = &p.name;
        let Some(child) = p.child.as_mut() else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!("{name} did not stop within {grace:?}; killing it");
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }
    children.clear();
}

/// The certificates of a local cluster: `DIR/certs` holds the CA, the members' and the
/// clients' certificates (its owner's); each keeper gets `DIR/NODE/certs` with the CA
/// certificate and its own certificate and key only, owned by the user it runs as (a
/// keeper never sees another identity's key, as on separate machines). Made once and
/// reused by later `local up` runs.
fn local_certs(dir: &Path, layout: &Layout, run_as: Option<&User>) -> Result<PathBuf> {
    let certs = CertsDir::new(dir.join("certs"));
    let long = Validity::days(3650);
    if !certs.ca_cert_path().exists() {
        certs.create_ca(long, false)?;
    }
    let hosts = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    let mut ids: Vec<(Identity, Vec<String>)> = layout
        .monitors
        .iter()
        .map(|(id, _, _)| (Identity::Member(u64::from(*id)), hosts.clone()))
        .collect();
    ids.push((Identity::Operator("admin".into()), Vec::new()));
    ids.push((Identity::Viewer("viewer".into()), Vec::new()));
    for (name, _, _) in &layout.nodes {
        ids.push((Identity::keeper(name)?, hosts.clone()));
    }
    for (id, h) in &ids {
        if !certs.cert_path(id).exists() {
            certs.create(id, h, long, false)?;
        }
    }
    for (name, _, _) in &layout.nodes {
        let id = Identity::keeper(name)?;
        let own = dir.join(name).join("certs");
        fs::create_dir_all(&own)?;
        fs::set_permissions(&own, fs::Permissions::from_mode(0o700))?;
        for (from, mode) in [
            (certs.ca_cert_path(), 0o644),
            (certs.cert_path(&id), 0o644),
            (certs.key_path(&id), 0o600),
        ] {
            let Some(file) = from.file_name() else {
                continue;
            };
            let to = own.join(file);
            fs::copy(&from, &to)
                .with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))?;
            fs::set_permissions(&to, fs::Permissions::from_mode(mode))?;
            if let Some(user) = run_as {
                nix::unistd::chown(&to, Some(user.uid), Some(user.gid))?;
            }
        }
        if let Some(user) = run_as {
            nix::unistd::chown(&own, Some(user.uid), Some(user.gid))?;
        }
    }
    Ok(certs.path)
}

fn local_up(args: UpArgs, trust: &TrustArgs, json: bool) -> Result<()> {
    // Its children must be stopped in order even when its reader has gone away.
    crate::output::keep_running_on_closed_stdout();
    if trust.certs_dir.is_some() {
        bail!("local up makes its own certificates under --dir; do not give --certs-dir (or unset PGQUORUM_CERTS_DIR)");
    }
    let layout = layout(&args)?;
    for port in layout
        .monitors
        .iter()
        .map(|m| m.1)
        .chain(layout.monitors.iter().map(|m| m.2))
        .chain(layout.nodes.iter().flat_map(|n| [n.1, n.2]))
    {
        if !port_free(port) {
            bail!(
                "port {port} on 127.0.0.1 is in use; pick other ports with --base-port, \
                 or stop what uses it (a cluster left behind: pgquorum local down --dir DIR)"
            );
        }
    }
    let pg_bindir = match &args.pg_bindir {
        Some(d) => d.clone(),
        None => find_pg_bindir()?,
    };
    if !pg_bindir.join("postgres").is_file() {
        bail!(
            "no postgres binary in {}; give --pg-bindir",
            pg_bindir.display()
        );
    }

    fs::create_dir_all(args.dir.join("logs"))
        .with_context(|| format!("cannot create {}", args.dir.display()))?;
    let dir = fs::canonicalize(&args.dir)?;
    if dir.join("local.json").exists() {
        let stale = read_pid_file(&dir)?;
        if stale.processes.iter().any(|p| pid_is_ours(p.pid)) {
            bail!(
                "a local cluster is already running in {}; stop it with: pgquorum local down --dir {}",
                dir.display(),
                dir.display()
            );
        }
    }

    // PostgreSQL refuses to run as root: as root, keepers run as `postgres`, from a copy of
    // this binary that user can read (ours may sit under /root).
    let run_as = if nix::unistd::geteuid().is_root() {
        let user = User::from_name("postgres")?.context(
            "running as root, but there is no 'postgres' user to run PostgreSQL as; \
             create it or run pgquorum local up as an ordinary user",
        )?;
        Some(user)
    } else {
        None
    };
    let exe = std::env::current_exe().context("cannot find the pgquorum binary")?;
    let bin = if run_as.is_some() {
        let bin_dir = dir.join("bin");
        fs::create_dir_all(&bin_dir)?;
        let copy = bin_dir.join("pgquorum");
        fs::copy(&exe, &copy).with_context(|| format!("cannot copy {}", exe.display()))?;
        fs::set_permissions(&copy, fs::Permissions::from_mode(0o755))?;
        copy
    } else {
        exe
    };

    let monitor_list: Vec<String> = layout
        .monitors
        .iter()
        .map(|(_, p, _)| format!("127.0.0.1:{p}"))
        .collect();
    let peers: Vec<String> = layout
        .monitors
        .iter()
        .map(|(id, p, _)| format!("{id}=127.0.0.1:{p}"))
        .collect();
    for (name, _, _) in &layout.nodes {
        fs::create_dir_all(dir.join(name))?;
    }
    // TLS everywhere unless --insecure: the same setup as a real deployment.
    let certs_dir = if trust.insecure {
        println!("WARNING: {INSECURE_WARNING}");
        None
    } else {
        Some(local_certs(&dir, &layout, run_as.as_ref())?)
    };
    let watch_security = match &certs_dir {
        Some(d) => Security::Tls(Tls::load(d.clone(), Identity::Viewer("viewer".into()))?),
        None => Security::Insecure,
    };

    let replication_password = local_password(&dir)?;
    let mut cluster = Cluster {
        keepers: Vec::new(),
        monitors: Vec::new(),
    };
    say(
        json,
        &format!(
            "Starting {} monitor members and {} nodes in {}",
            args.monitors,
            args.nodes,
            dir.display()
        ),
        serde_json::json!({"event": "starting", "monitors": args.monitors, "nodes": args.nodes,
            "dir": dir}),
    );
    for (id, port, metrics_port) in &layout.monitors {
        let name = format!("monitor{id}");
        let mut a: Vec<OsString> = vec![
            "monitor".into(),
            "run".into(),
            "--node-id".into(),
            id.to_string().into(),
            "--listen".into(),
            format!("127.0.0.1:{port}").into(),
            "--metrics-listen".into(),
            format!("127.0.0.1:{metrics_port}").into(),
            "--data-dir".into(),
            dir.join(&name).into(),
        ];
        match &certs_dir {
            Some(d) => a.extend(["--certs-dir".into(), d.clone().into()]),
            None => a.push("--insecure".into()),
        }
        for p in &peers {
            a.extend(["--peer".into(), p.into()]);
        }
        let spec = Spec {
            program: bin.clone(),
            args: a,
            env: Vec::new(),
            run_as: None,
        };
        let child = spawn_logged(spec.command(), &dir, &name)?;
        cluster.monitors.push(Proc {
            entry: PidEntry {
                role: "monitor".into(),
                name: name.clone(),
                pid: child.id() as i32,
                port: Some(*port),
                http_port: None,
                pgdata: None,
                exited: None,
            },
            name,
            spec,
            child: Some(child),
            down_since: None,
            restart_at: None,
            restarts: 0,
        });
    }
    for (name, pg_port, http_port) in &layout.nodes {
        let node_dir = dir.join(name);
        fs::create_dir_all(&node_dir)?;
        if let Some(user) = &run_as {
            nix::unistd::chown(&node_dir, Some(user.uid), Some(user.gid))?;
            nix::unistd::chown(&dir.join("logs"), Some(user.uid), Some(user.gid))?;
        }
        let mut a: Vec<OsString> = vec![
            "keeper".into(),
            "run".into(),
            "--name".into(),
            name.into(),
            "--pgdata".into(),
            node_dir.join("pgdata").into(),
            "--pg-host".into(),
            "127.0.0.1".into(),
            "--pg-port".into(),
            pg_port.to_string().into(),
            "--monitor".into(),
            monitor_list.join(",").into(),
            "--http".into(),
            format!("127.0.0.1:{http_port}").into(),
            "--pg-bindir".into(),
            pg_bindir.clone().into(),
            "--socket-dir".into(),
            node_dir.clone().into(),
            // A development cluster on loopback: clients on this machine need no password.
            "--pg-hba".into(),
            "host all all 127.0.0.1/32 trust".into(),
        ];
        match &certs_dir {
            Some(_) => a.extend(["--certs-dir".into(), node_dir.join("certs").into()]),
            None => a.push("--insecure".into()),
        }
        // The password goes by environment, never by argument (argv is world-readable);
        // with certificates the standbys authenticate by certificate: no password at all.
        let mut env: Vec<(OsString, OsString)> = Vec::new();
        if certs_dir.is_none() {
            env.push((
                "PGQUORUM_REPLICATION_PASSWORD".into(),
                replication_password.clone().into(),
            ));
        }
        if run_as.is_some() {
            env.push(("HOME".into(), node_dir.clone().into()));
            env.push(("USER".into(), "postgres".into()));
        }
        let spec = Spec {
            program: bin.clone(),
            args: a,
            env,
            run_as: run_as.as_ref().map(|u| (u.uid.as_raw(), u.gid.as_raw())),
        };
        let child = spawn_logged(spec.command(), &dir, name)?;
        cluster.keepers.push(Proc {
            entry: PidEntry {
                role: "keeper".into(),
                name: name.clone(),
                pid: child.id() as i32,
                port: Some(*pg_port),
                http_port: Some(*http_port),
                pgdata: Some(node_dir.join("pgdata")),
                exited: None,
            },
            name: name.clone(),
            spec,
            child: Some(child),
            down_since: None,
            restart_at: None,
            restarts: 0,
        });
        // Let the first node bootstrap as primary before the others ask to join.
        if cluster.keepers.len() == 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    write_pid_file(&dir, &cluster.pid_file())?;
    say(
        json,
        &format!("Logs: {}/logs/*.log", dir.display()),
        serde_json::json!({"event": "started", "logs": dir.join("logs"), "pid_file": dir.join("local.json")}),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(watch(
        &layout,
        &monitor_list,
        &watch_security,
        certs_dir.as_deref(),
        &mut cluster,
        &Supervise {
            dir: &dir,
            timeout_s: args.timeout,
            restart: args.restart,
            restart_delay: Duration::from_secs(args.restart_delay),
            json,
        },
    ));
    say(
        json,
        "Stopping the cluster...",
        serde_json::json!({"event": "stopping"}),
    );
    cluster.stop();
    let _ = fs::remove_file(dir.join("local.json"));
    say(
        json,
        &format!("Stopped. Data and logs stay in {}", dir.display()),
        serde_json::json!({"event": "stopped", "dir": dir}),
    );
    outcome
}

fn spawn_logged(mut cmd: Command, dir: &Path, name: &str) -> Result<Child> {
    let log_path = dir.join("logs").join(format!("{name}.log"));
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let log2 = log.try_clone()?;
    // Own process group: Ctrl-C reaches only this command, which then stops the
    // children in order (keepers before monitors).
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    cmd.spawn().with_context(|| format!("cannot start {name}"))
}

async fn fetch_state(endpoints: &[String], security: &Security) -> Option<Vec<NodeStatus>> {
    for ep in endpoints {
        let Ok(channel) = pgquorum_trust::channel(
            ep,
            security,
            &Dial {
                connect_timeout: Duration::from_millis(300),
                request_timeout: Some(Duration::from_secs(2)),
                keep_alive: None,
                expect: None,
            },
        ) else {
            continue;
        };
        let mut client = MonitorClient::new(channel);
        if let Ok(reply) = client
            .get_state(GetStateRequest {
                formation: String::new(),
                linearizable: false,
            })
            .await
        {
            return Some(reply.into_inner().nodes);
        }
    }
    None
}

fn describe(nodes: &[NodeStatus]) -> Vec<String> {
    nodes
        .iter()
        .map(|n| {
            format!(
                "{:<8} {:>15}:{:<5} reported {:<18} goal {:<18} {}",
                n.name, n.host, n.port, n.reported_state, n.goal_state, n.health
            )
        })
        .collect()
}

/// A primary and `expected - 1` secondaries, each heard by the current leader with its
/// PostgreSQL running: after a restart the group remembers the states it last saw, which
/// say nothing about whether the servers are up yet.
fn ready(nodes: &[NodeStatus], expected: usize) -> bool {
    nodes.len() == expected
        && nodes.iter().all(|n| n.health == "healthy" && n.pg_running)
        && nodes
            .iter()
            .filter(|n| n.reported_state == "primary" && n.goal_state == "primary")
            .count()
            == 1
        && nodes
            .iter()
            .filter(|n| n.reported_state == "secondary" && n.goal_state == "secondary")
            .count()
            == expected - 1
}

struct Supervise<'a> {
    dir: &'a Path,
    timeout_s: u64,
    restart: Restart,
    restart_delay: Duration,
    json: bool,
}

/// Reports children that exited and restarts them when the policy says so; rewrites
/// local.json when a PID changed.
fn supervise(cluster: &mut Cluster, sup: &Supervise<'_>) {
    let mut changed = false;
    for p in cluster
        .monitors
        .iter_mut()
        .chain(cluster.keepers.iter_mut())
    {
        if let Some(child) = p.child.as_mut() {
            let Ok(Some(status)) = child.try_wait() else {
                continue;
            };
            let what = how(status);
            let restart = sup.restart == Restart::OnFailure && failed(status);
            let then = if restart {
                format!(
                    "restarting it in {} s (--restart on-failure)",
                    sup.restart_delay.as_secs()
                )
            } else {
                "left stopped; the rest runs on (`--restart on-failure` restarts it)".to_owned()
            };
            say(
                sup.json,
                &format!(
                    "[{}] {} ({}, pid {}) {what}; {then}. Its log: {}/logs/{}.log",
                    clock(),
                    p.name,
                    p.entry.role,
                    p.entry.pid,
                    sup.dir.display(),
                    p.name
                ),
                serde_json::json!({"event": "exited", "name": p.name, "role": p.entry.role,
                    "pid": p.entry.pid, "how": what, "restart": restart}),
            );
            p.child = None;
            p.down_since = Some(Instant::now());
            p.restart_at = restart.then(|| Instant::now() + sup.restart_delay);
            p.entry.exited = Some(what);
            changed = true;
        } else if p.restart_at.is_some_and(|t| Instant::now() >= t) {
            p.restart_at = None;
            match spawn_logged(p.spec.command(), sup.dir, &p.name) {
                Ok(child) => {
                    p.restarts += 1;
                    p.entry.pid = child.id() as i32;
                    p.entry.exited = None;
                    p.child = Some(child);
                    p.down_since = None;
                    say(
                        sup.json,
                        &format!(
                            "[{}] {} restarted (pid {}, restart {})",
                            clock(),
                            p.name,
                            p.entry.pid,
                            p.restarts
                        ),
                        serde_json::json!({"event": "restarted", "name": p.name,
                            "pid": p.entry.pid, "restarts": p.restarts}),
                    );
                }
                Err(e) => {
                    say(
                        sup.json,
                        &format!(
                            "[{}] cannot restart {}: {e:#}; left stopped",
                            clock(),
                            p.name
                        ),
                        serde_json::json!({"event": "restart_failed", "name": p.name,
                            "error": format!("{e:#}")}),
                    );
                }
            }
            changed = true;
        }
    }
    if changed {
        if let Err(e) = write_pid_file(sup.dir, &cluster.pid_file()) {
            eprintln!("cannot update local.json: {e:#}");
        }
    }
}

fn primary_name(nodes: &[NodeStatus]) -> Option<&str> {
    let mut p = nodes
        .iter()
        .filter(|n| n.reported_state == "primary" && n.goal_state == "primary");
    match (p.next(), p.next()) {
        (Some(n), None) => Some(n.name.as_str()),
        _ => None,
    }
}

async fn watch(
    layout: &Layout,
    monitors: &[String],
    security: &Security,
    certs_dir: Option<&Path>,
    cluster: &mut Cluster,
    sup: &Supervise<'_>,
) -> Result<()> {
    let start = Instant::now();
    let timeout_s = sup.timeout_s;
    let json = sup.json;
    let mut last: Vec<String> = Vec::new();
    let mut last_primary: Option<String> = None;
    let mut announced = false;
    let mut interval = tokio::time::interval(Duration::from_millis(500));
    // Ctrl-C, a closed terminal and a plain `kill` all stop the cluster cleanly: the
    // children run in their own process groups and would otherwise outlive us.
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            _ = term.recv() => return Ok(()),
            _ = hup.recv() => return Ok(()),
            _ = interval.tick() => {}
        }
        supervise(cluster, sup);
        let Some(nodes) = fetch_state(monitors, security).await else {
            if !announced && start.elapsed() > Duration::from_secs(timeout_s) {
                bail!("the monitor group did not answer within {timeout_s} s");
            }
            continue;
        };
        let lines = describe(&nodes);
        if lines != last {
            if json {
                let ns: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        serde_json::json!({"name": n.name, "reported_state": n.reported_state,
                        "goal_state": n.goal_state, "health": n.health, "pg_running": n.pg_running})
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"event": "state", "at_s": start.elapsed().as_secs_f64(), "nodes": ns})
                );
            } else {
                println!("[{:>6.1}s {}]", start.elapsed().as_secs_f64(), clock());
                for l in &lines {
                    println!("  {l}");
                }
            }
            last = lines;
        }
        let primary = primary_name(&nodes).map(str::to_owned);
        if announced && primary.is_some() && primary != last_primary {
            let was = last_primary.as_deref().unwrap_or("none");
            say(
                json,
                &format!(
                    "[{}] the primary is now {} (was {was})",
                    clock(),
                    primary.as_deref().unwrap_or_default()
                ),
                serde_json::json!({"event": "primary", "name": primary, "was": last_primary}),
            );
        }
        if primary.is_some() {
            last_primary = primary;
        }
        if !announced && ready(&nodes, layout.nodes.len()) {
            announced = true;
            let hosts: Vec<String> = layout
                .nodes
                .iter()
                .map(|(_, p, _)| format!("127.0.0.1:{p}"))
                .collect();
            let rw = format!(
                "postgresql://postgres@{}/postgres?target_session_attrs=read-write&connect_timeout=2",
                hosts.join(",")
            );
            let ro = format!(
                "postgresql://postgres@{}/postgres?target_session_attrs=prefer-standby&connect_timeout=2",
                hosts.join(",")
            );
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event": "up", "after_s": start.elapsed().as_secs_f64(),
                        "read_write": rw, "read_only": ro, "monitor": monitors.join(","),
                        "certs_dir": certs_dir, "dir": sup.dir})
                );
                continue;
            }
            println!();
            println!(
                "The cluster is up after {:.1} s.",
                start.elapsed().as_secs_f64()
            );
            println!("  read-write: {rw}");
            println!("  read-only:  {ro}");
            println!();
            println!("For the pgquorum commands, in another shell:");
            println!("  export PGQUORUM_MONITOR={}", monitors.join(","));
            match certs_dir {
                Some(d) => println!(
                    "  export PGQUORUM_CERTS_DIR={}   # client.admin (operator); --client viewer to only read",
                    d.display()
                ),
                None => println!("  (started with --insecure: add --insecure to every command)"),
            }
            println!(
                "To watch a failover: pgquorum local kill {} --dir {}   (then: pgquorum show state)",
                last_primary.as_deref().unwrap_or("node1"),
                sup.dir.display()
            );
            println!("Showing state changes; press Ctrl-C to stop everything.");
        } else if !announced && start.elapsed() > Duration::from_secs(timeout_s) {
            bail!(
                "no primary with {} streaming standbys after {timeout_s} s; see the logs",
                layout.nodes.len() - 1
            );
        }
    }
}

/// The replication password of this local cluster: made once, kept in the directory
/// (readable by its owner only) so a restart of `local up` uses the same one.
fn local_password(dir: &Path) -> Result<String> {
    let path = dir.join("replication-password");
    if let Ok(p) = fs::read_to_string(&path) {
        return Ok(p.trim().to_string());
    }
    let mut bytes = [0u8; 18];
    let mut urandom = fs::File::open("/dev/urandom").context("cannot open /dev/urandom")?;
    std::io::Read::read_exact(&mut urandom, &mut bytes)?;
    let password: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    fs::write(&path, &password).with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    Ok(password)
}

fn find_pg_bindir() -> Result<PathBuf> {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if dir.join("postgres").is_file() {
                return Ok(dir);
            }
        }
    }
    let debian = Path::new("/usr/lib/postgresql/15/bin");
    if debian.join("postgres").is_file() {
        return Ok(debian.to_path_buf());
    }
    // A fresh Debian machine: a local cluster is a development tool run as root, so
    // install the server rather than leave the user to find the package name.
    if nix::unistd::geteuid().is_root() && Path::new("/usr/bin/apt-get").exists() {
        println!("PostgreSQL 15 server binaries not found: installing Debian's postgresql-15");
        println!("(give --pg-bindir to use another installation)");
        for args in [
            &["update", "-qq"][..],
            &[
                "install",
                "-y",
                "-qq",
                "--no-install-recommends",
                "postgresql-15",
            ][..],
        ] {
            let status = Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status()
                .context("cannot run apt-get")?;
            if !status.success() {
                bail!(
                    "apt-get {} failed ({status}); install postgresql-15 by hand",
                    args.join(" ")
                );
            }
        }
        if debian.join("postgres").is_file() {
            return Ok(debian.to_path_buf());
        }
    }
    bail!("cannot find the PostgreSQL server binaries; install postgresql-15 or give --pg-bindir")
}

fn read_pid_file(dir: &Path) -> Result<PidFile> {
    let path = dir.join("local.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a pgquorum PID file", path.display()))
}

fn write_pid_file(dir: &Path, pids: &PidFile) -> Result<()> {
    let path = dir.join("local.json");
    fs::write(&path, serde_json::to_vec_pretty(pids)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// True when `pid` is alive and is a pgquorum process (a PID reused by something
/// else must never be signalled).
fn pid_is_ours(pid: i32) -> bool {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains("pgquorum"))
        .unwrap_or(false)
}

fn no_cluster(dir: &Path) -> anyhow::Error {
    crate::exit::fail(
        crate::exit::Kind::Invalid,
        format!(
            "no local cluster is running in {} (no local.json there): nothing to stop",
            dir.display()
        ),
    )
}

/// The postmaster's PID from `PGDATA/postmaster.pid`, when that process is alive and is
/// a postgres (a stale file's PID may belong to something else by now).
fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    let text = fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = text.lines().next()?.trim().parse().ok()?;
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmdline)
        .contains("postgres")
        .then_some(pid)
}

fn local_status(dir: &Path, json: bool) -> Result<()> {
    if !dir.join("local.json").exists() {
        return Err(no_cluster(dir));
    }
    let pids = read_pid_file(dir)?;
    let rows: Vec<serde_json::Value> = pids
        .processes
        .iter()
        .map(|p| {
            let alive = pid_is_ours(p.pid);
            let pg = p.pgdata.as_deref().and_then(postmaster_pid);
            serde_json::json!({"name": p.name, "role": p.role, "pid": p.pid, "alive": alive,
                "postgres_pid": pg, "port": p.port, "http_port": p.http_port,
                "exited": p.exited})
        })
        .collect();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"dir": dir, "processes": rows}))?
        );
        return Ok(());
    }
    println!(
        "{:<10} {:<8} {:>8} {:<8} {:>12} {:>6} {:>6}",
        "NAME", "ROLE", "PID", "STATE", "POSTGRES PID", "PORT", "HTTP"
    );
    for (p, r) in pids.processes.iter().zip(&rows) {
        let state = if r["alive"].as_bool().unwrap_or(false) {
            "running"
        } else {
            "dead"
        };
        let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:<8} {:>8} {:<8} {:>12} {:>6} {:>6}{}",
            p.name,
            p.role,
            p.pid,
            state,
            opt(p
                .pgdata
                .as_deref()
                .and_then(postmaster_pid)
                .map(|x| x.to_string())),
            opt(p.port.map(|x| x.to_string())),
            opt(p.http_port.map(|x| x.to_string())),
            p.exited
                .as_deref()
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn parse_signal(s: &str) -> Result<Signal> {
    let upper = s.to_ascii_uppercase();
    let name = if upper.starts_with("SIG") {
        upper
    } else {
        format!("SIG{upper}")
    };
    name.parse::<Signal>().map_err(|_| {
        crate::exit::fail(
            crate::exit::Kind::Usage,
            format!("--signal {s}: not a signal name (KILL, TERM, INT, STOP, CONT, ...)"),
        )
    })
}

fn local_kill(k: &KillArgs, json: bool) -> Result<()> {
    let dir = &k.dir.dir;
    let sig = parse_signal(&k.signal)?;
    if !dir.join("local.json").exists() {
        return Err(no_cluster(dir));
    }
    let pids = read_pid_file(dir)?;
    let Some(p) = pids.processes.iter().find(|p| p.name == k.name) else {
        let names: Vec<&str> = pids.processes.iter().map(|p| p.name.as_str()).collect();
        return Err(crate::exit::fail(
            crate::exit::Kind::Invalid,
            format!(
                "no process {:?} in this local cluster (it has {})",
                k.name,
                names.join(", ")
            ),
        ));
    };
    let mut targets: Vec<(String, i32)> = Vec::new();
    let node = p.role == "keeper";
    if k.only.is_some() && !node {
        return Err(crate::exit::fail(
            crate::exit::Kind::Usage,
            format!("--only applies to a node; {} is a monitor member", p.name),
        ));
    }
    // The postmaster's PID is read before the keeper dies: a keeper that stops could
    // otherwise not be told apart from one that never ran postgres.
    let pg = p.pgdata.as_deref().and_then(postmaster_pid);
    if k.only != Some(NodePart::Postgres) {
        if pid_is_ours(p.pid) {
            targets.push((format!("{} ({})", p.name, p.role), p.pid));
        } else if k.only == Some(NodePart::Keeper) || !node {
            return Err(crate::exit::fail(
                crate::exit::Kind::NotAllowed,
                format!("{} (pid {}) is not running", p.name, p.pid),
            ));
        }
    }
    if node && k.only != Some(NodePart::Keeper) {
        match pg {
            Some(pid) => targets.push((format!("{}'s PostgreSQL (postmaster)", p.name), pid)),
            None if k.only == Some(NodePart::Postgres) => {
                return Err(crate::exit::fail(
                    crate::exit::Kind::NotAllowed,
                    format!("{}'s PostgreSQL is not running", p.name),
                ))
            }
            None => {}
        }
    }
    if targets.is_empty() {
        return Err(crate::exit::fail(
            crate::exit::Kind::NotAllowed,
            format!("nothing of {} is running", p.name),
        ));
    }
    let mut done = Vec::new();
    for (what, pid) in &targets {
        kill(Pid::from_raw(*pid), sig)
            .with_context(|| format!("cannot signal {what} (pid {pid})"))?;
        done.push(serde_json::json!({"what": what, "pid": pid, "signal": sig.as_str()}));
        if !json {
            println!("sent {} to {what}, pid {pid}", sig.as_str());
        }
    }
    if json {
        println!("{}", serde_json::json!({ "signalled": done }));
    } else if sig == Signal::SIGKILL && node {
        println!("watch it: pgquorum show state (the monitor notices within a lease; `local up` reports the exit)");
    }
    Ok(())
}

fn local_down(dir: &Path, json: bool) -> Result<()> {
    if !dir.join("local.json").exists() {
        return Err(no_cluster(dir));
    }
    let pids = read_pid_file(dir)?;
    let order = ["keeper", "monitor"];
    let mut stopped = Vec::new();
    for role in order {
        let group: Vec<&PidEntry> = pids.processes.iter().filter(|p| p.role == role).collect();
        for p in &group {
            if pid_is_ours(p.pid) {
                if !json {
                    println!("stopping {} (pid {})", p.name, p.pid);
                }
                stopped.push(serde_json::json!({"name": p.name, "pid": p.pid}));
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while group.iter().any(|p| pid_is_ours(p.pid)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        for p in &group {
            if pid_is_ours(p.pid) {
                eprintln!("{} did not stop; killing it", p.name);
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
        }
    }
    let _ = fs::remove_file(dir.join("local.json"));
    if json {
        println!("{}", serde_json::json!({ "stopped": stopped }));
    } else {
        println!("stopped");
    }
    Ok(())
}
