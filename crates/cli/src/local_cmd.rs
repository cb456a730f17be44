//! `pgquorum local up|down`: a whole HA cluster on loopback in one directory — the
//! monitor group and N keepers, each with its PostgreSQL — for trying pgquorum out and
//! for development. Processes are ordinary `pgquorum` children of this command; their
//! PIDs are written to `DIR/local.json` so `local down` can stop a cluster left behind.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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
    Up(UpArgs),
    /// Stop a local cluster left running (for example after its terminal was closed).
    Down(DownArgs),
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
}

#[derive(clap::Args)]
struct DownArgs {
    #[arg(long, default_value = "pgquorum-local")]
    dir: PathBuf,
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
}

pub fn run(args: LocalArgs, trust: &TrustArgs) -> Result<()> {
    match args.command {
        LocalCommand::Up(up) => local_up(up, trust),
        LocalCommand::Down(down) => local_down(&down.dir),
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
    keepers: Vec<(String, Child)>,
    monitors: Vec<(String, Child)>,
}

impl Cluster {
    fn stop(&mut self) {
        stop_children(&mut self.keepers, Duration::from_secs(30));
        stop_children(&mut self.monitors, Duration::from_secs(10));
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}

fn stop_children(children: &mut Vec<(String, Child)>, grace: Duration) {
    for (_, child) in children.iter() {
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    for (name, child) in children.iter_mut() {
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

fn local_up(args: UpArgs, trust: &TrustArgs) -> Result<()> {
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
    let mut pids = Vec::new();
    println!(
        "Starting {} monitor members and {} nodes in {}",
        args.monitors,
        args.nodes,
        dir.display()
    );
    for (id, port, metrics_port) in &layout.monitors {
        let name = format!("monitor{id}");
        let mut cmd = Command::new(&bin);
        cmd.arg("monitor")
            .arg("run")
            .arg("--node-id")
            .arg(id.to_string())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--data-dir")
            .arg(dir.join(&name));
        match &certs_dir {
            Some(d) => cmd.arg("--certs-dir").arg(d),
            None => cmd.arg("--insecure"),
        };
        for p in &peers {
            cmd.arg("--peer").arg(p);
        }
        let child = spawn_logged(cmd, &dir, &name)?;
        pids.push(PidEntry {
            role: "monitor".into(),
            name: name.clone(),
            pid: child.id() as i32,
        });
        cluster.monitors.push((name, child));
    }
    for (name, pg_port, http_port) in &layout.nodes {
        let node_dir = dir.join(name);
        fs::create_dir_all(&node_dir)?;
        if let Some(user) = &run_as {
            nix::unistd::chown(&node_dir, Some(user.uid), Some(user.gid))?;
            nix::unistd::chown(&dir.join("logs"), Some(user.uid), Some(user.gid))?;
        }
        let mut cmd = Command::new(&bin);
        cmd.arg("keeper")
            .arg("run")
            .arg("--name")
            .arg(name)
            .arg("--pgdata")
            .arg(node_dir.join("pgdata"))
            .arg("--pg-host")
            .arg("127.0.0.1")
            .arg("--pg-port")
            .arg(pg_port.to_string())
            .arg("--monitor")
            .arg(monitor_list.join(","))
            .arg("--http")
            .arg(format!("127.0.0.1:{http_port}"))
            .arg("--pg-bindir")
            .arg(&pg_bindir)
            .arg("--socket-dir")
            .arg(&node_dir)
            // A development cluster on loopback: clients on this machine need no password.
            .arg("--pg-hba")
            .arg("host all all 127.0.0.1/32 trust");
        // With certificates the standbys authenticate by certificate: no password.
        match &certs_dir {
            Some(_) => cmd.arg("--certs-dir").arg(node_dir.join("certs")),
            None => cmd
                .arg("--insecure")
                .env("PGQUORUM_REPLICATION_PASSWORD", &replication_password),
        };
        if let Some(user) = &run_as {
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
            cmd.env("HOME", &node_dir).env("USER", "postgres");
        }
        let child = spawn_logged(cmd, &dir, name)?;
        pids.push(PidEntry {
            role: "keeper".into(),
            name: name.clone(),
            pid: child.id() as i32,
        });
        cluster.keepers.push((name.clone(), child));
        // Let the first node bootstrap as primary before the others ask to join.
        if cluster.keepers.len() == 1 {
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    write_pid_file(&dir, &PidFile { processes: pids })?;
    println!("Logs: {}/logs/*.log", dir.display());

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = rt.block_on(watch(
        &layout,
        &monitor_list,
        &watch_security,
        certs_dir.as_deref(),
        &mut cluster,
        args.timeout,
    ));
    println!("Stopping the cluster...");
    cluster.stop();
    let _ = fs::remove_file(dir.join("local.json"));
    println!("Stopped. Data and logs stay in {}", dir.display());
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

async fn watch(
    layout: &Layout,
    monitors: &[String],
    security: &Security,
    certs_dir: Option<&Path>,
    cluster: &mut Cluster,
    timeout_s: u64,
) -> Result<()> {
    let start = Instant::now();
    let mut last: Vec<String> = Vec::new();
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
        for (name, child) in cluster
            .monitors
            .iter_mut()
            .chain(cluster.keepers.iter_mut())
        {
            if let Ok(Some(status)) = child.try_wait() {
                bail!("{name} exited ({status}); see its log in the logs directory");
            }
        }
        let Some(nodes) = fetch_state(monitors, security).await else {
            if !announced && start.elapsed() > Duration::from_secs(timeout_s) {
                bail!("the monitor group did not answer within {timeout_s} s");
            }
            continue;
        };
        let lines = describe(&nodes);
        if lines != last {
            println!("[{:>6.1}s]", start.elapsed().as_secs_f64());
            for l in &lines {
                println!("  {l}");
            }
            last = lines;
        }
        if !announced && ready(&nodes, layout.nodes.len()) {
            announced = true;
            let hosts: Vec<String> = layout
                .nodes
                .iter()
                .map(|(_, p, _)| format!("127.0.0.1:{p}"))
                .collect();
            println!();
            println!(
                "The cluster is up after {:.1} s.",
                start.elapsed().as_secs_f64()
            );
            println!(
                "  read-write: postgresql://postgres@{}/postgres?target_session_attrs=read-write&connect_timeout=2",
                hosts.join(",")
            );
            println!(
                "  read-only:  postgresql://postgres@{}/postgres?target_session_attrs=prefer-standby&connect_timeout=2",
                hosts.join(",")
            );
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

fn local_down(dir: &Path) -> Result<()> {
    if !dir.join("local.json").exists() {
        bail!(
            "no local cluster is running in {} (no local.json there): nothing to stop",
            dir.display()
        );
    }
    let pids = read_pid_file(dir)?;
    let order = ["keeper", "monitor"];
    for role in order {
        let group: Vec<&PidEntry> = pids.processes.iter().filter(|p| p.role == role).collect();
        for p in &group {
            if pid_is_ours(p.pid) {
                println!("stopping {} (pid {})", p.name, p.pid);
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
    println!("stopped");
    Ok(())
}
