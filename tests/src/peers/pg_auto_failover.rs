//! pg_auto_failover 2.0 (Debian's `pg-auto-failover-cli` and
//! `postgresql-15-auto-failover`) for the side-by-side benchmark: one monitor and three
//! `pg_autoctl` nodes on loopback, everything under one temp dir (pg_autoctl's XDG
//! config and state included), run as the `postgres` user, every process started here
//! and SIGKILLed by PID on drop.
//!
//! Synchronous replication is pg_auto_failover's default: number_sync_standbys 1 and
//! replication-quorum true on every node, which gives `ANY 1 (standby, standby)`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use pgquorum_testkit::postgres::{connect_tcp, postgres_ids, PgDir, PG_BINDIR};

use super::HaSystem;

const PG_AUTOCTL: &str = "/usr/bin/pg_autoctl";

/// Monitor GUCs (milliseconds) and the keeper's network_partition_timeout (seconds)
/// of the "fast" settings; see [`FAST_SETTINGS`] for why they are safe.
const FAST_MONITOR_GUCS: &[(&str, &str)] = &[
    ("pgautofailover.health_check_period", "1000"),
    ("pgautofailover.health_check_timeout", "1000"),
    ("pgautofailover.health_check_max_retries", "1"),
    ("pgautofailover.health_check_retry_delay", "500"),
    ("pgautofailover.node_considered_unhealthy_timeout", "4000"),
    ("pgautofailover.primary_demote_timeout", "8000"),
];
const FAST_NETWORK_PARTITION_TIMEOUT: &str = "3";
const FAST_WAL_RETRIEVE_RETRY_INTERVAL: &str = "200ms";

const DEFAULT_SETTINGS: &str = "pg_auto_failover's defaults: monitor health_check_period 5 s, \
health_check_timeout 5 s, health_check_max_retries 2, health_check_retry_delay 2 s, \
node_considered_unhealthy_timeout 20 s, primary_demote_timeout 30 s; keeper \
network_partition_timeout 20 s (keeper loop 1 s); number_sync_standbys 1 with \
replication-quorum true on every node";

const FAST_SETTINGS: &str = "monitor health_check_period 1 s, health_check_timeout 1 s, \
health_check_max_retries 1, health_check_retry_delay 0.5 s, \
node_considered_unhealthy_timeout 4 s, primary_demote_timeout 8 s; keeper \
network_partition_timeout 3 s; wal_retrieve_retry_interval 200 ms on every node. \
Why safe: a primary that the monitor cannot see must have stopped before a standby is \
promoted. The monitor promotes no earlier than unhealthy_timeout + primary_demote_timeout \
= 12 s after the primary's last report; a primary cut off from the monitor and its \
standbys decides to stop when more than network_partition_timeout whole seconds passed \
since its last contact (at most 3 + 1 s of rounding + one keeper loop of 1 s sleep and a \
2 s monitor connect timeout = 7 s) and a fast shutdown of this small database takes \
well under 2 s: 9 s < 12 s, the same ordering the defaults keep (21 s < 50 s) with a \
3 s margin. 4 s without a report is four missed 1 s reports, and a node also needs a \
failed health check before it counts as unhealthy, so a keeper that is merely slow is \
not failed over. Synchronous replication and the LSN checks before a promotion are \
unchanged. wal_retrieve_retry_interval only sets how soon a standby retries \
connecting to its primary (the default 5 s is what a postmaster crash waits for).";

struct PafNode {
    name: String,
    port: u16,
    pgdata: PathBuf,
    agent: Option<Child>,
}

pub struct PgAutoFailover {
    // Declared first so that processes die before the directory goes.
    nodes: Vec<PafNode>,
    monitor: Option<Child>,
    monitor_port: u16,
    monitor_pgdata: PathBuf,
    fast: bool,
    sync_names: String,
    dir: PgDir,
}

/// How long bootstrap, a failover or a rejoin may take before the benchmark gives up
/// (pg_auto_failover's defaults need about a minute for a node loss).
const SETTLE: Duration = Duration::from_secs(240);

impl PgAutoFailover {
    pub async fn start(fast: bool) -> Self {
        let dir = PgDir::new();
        let monitor_port = pgquorum_testkit::free_port();
        let monitor_pgdata = dir.path().join("monitor");
        let mut s = PgAutoFailover {
            nodes: Vec::new(),
            monitor: None,
            monitor_port,
            monitor_pgdata: monitor_pgdata.clone(),
            fast,
            sync_names: String::new(),
            dir,
        };
        let port = monitor_port.to_string();
        let pgdata = monitor_pgdata.display().to_string();
        s.monitor = Some(s.spawn(
            &[
                "create",
                "monitor",
                "--pgdata",
                &pgdata,
                "--pgport",
                &port,
                "--hostname",
                "127.0.0.1",
                "--auth",
                "trust",
                "--no-ssl",
                "--run",
            ],
            "monitor",
        ));
        s.wait("the monitor", Cond::MonitorUp).await;
        if fast {
            let c = s.monitor_client().await.expect("connect to the monitor");
            for (k, v) in FAST_MONITOR_GUCS {
                c.batch_execute(&format!("ALTER SYSTEM SET {k} = '{v}'"))
                    .await
                    .unwrap_or_else(|e| panic!("set {k}: {e}"));
            }
            c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
        }
        for i in 1..=3 {
            let name = format!("node{i}");
            let pgdata = s.dir.path().join(&name);
            s.nodes.push(PafNode {
                name,
                port: pgquorum_testkit::free_port(),
                pgdata,
                agent: None,
            });
        }
        // The first node registers alone and becomes `single`; the others then join
        // as standbys (both at once, as pg_auto_failover allows).
        s.create_node(0);
        s.wait("node1 to be single", Cond::FirstSingle).await;
        s.create_node(1);
        s.create_node(2);
        s.wait_healthy(SETTLE).await;
        if fast {
            for n in &s.nodes {
                let pgdata = n.pgdata.display().to_string();
                // `config set` reloads the running pg_autoctl.
                s.run_to_end(&[
                    "config",
                    "set",
                    "--pgdata",
                    &pgdata,
                    "timeout.network_partition_timeout",
                    FAST_NETWORK_PARTITION_TIMEOUT,
                ]);
                let c = connect(n.port).await.expect("connect to a node");
                c.batch_execute(&format!(
                    "ALTER SYSTEM SET wal_retrieve_retry_interval = '{FAST_WAL_RETRIEVE_RETRY_INTERVAL}'"
                ))
                .await
                .unwrap();
                c.batch_execute("SELECT pg_reload_conf()").await.unwrap();
            }
        }
        let p = s.primary(SETTLE).await;
        let port = s.node(&p).port;
        let c = connect(port).await.expect("connect to the primary");
        let row = c
            .query_one("SHOW synchronous_standby_names", &[])
            .await
            .unwrap();
        s.sync_names = row.get(0);
        eprintln!(
            "pg_auto_failover: synchronous_standby_names = {}",
            s.sync_names
        );
        s
    }

    fn node(&self, name: &str) -> &PafNode {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn node_mut(&mut self, name: &str) -> &mut PafNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn monitor_uri(&self) -> String {
        format!(
            "postgres://autoctl_node@127.0.0.1:{}/pg_auto_failover?sslmode=prefer",
            self.monitor_port
        )
    }

    /// `pg_autoctl ARGS` as `postgres`, with its config and state under our dir and
    /// its output appended to `<dir>/<log>.log`.
    fn command(&self, args: &[&str], log: &str) -> Command {
        let (u, g) = postgres_ids();
        let path = self.dir.path().join(format!("{log}.log"));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("log {}: {e}", path.display()));
        let err = out.try_clone().unwrap();
        let d = self.dir.path();
        let mut cmd = Command::new(PG_AUTOCTL);
        cmd.args(args)
            .env("HOME", d)
            .env("XDG_CONFIG_HOME", d.join("xdg-config"))
            .env("XDG_DATA_HOME", d.join("xdg-data"))
            .env("XDG_RUNTIME_DIR", d.join("xdg-run"))
            .env("PATH", format!("{PG_BINDIR}:/usr/local/bin:/usr/bin:/bin"))
            .env_remove("PGDATA")
            .env_remove("PGPORT")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        std::os::unix::process::CommandExt::uid(&mut cmd, u.as_raw());
        std::os::unix::process::CommandExt::gid(&mut cmd, g.as_raw());
        cmd
    }

    fn spawn(&self, args: &[&str], log: &str) -> Child {
        self.command(args, log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning pg_autoctl: {e}"))
    }

    fn run_to_end(&self, args: &[&str]) {
        let st = self
            .command(args, "commands")
            .status()
            .unwrap_or_else(|e| panic!("running pg_autoctl: {e}"));
        assert!(st.success(), "pg_autoctl {args:?} failed: {st}");
    }

    fn create_node(&mut self, i: usize) {
        let uri = self.monitor_uri();
        let n = &self.nodes[i];
        let (name, pgdata, port) = (
            n.name.clone(),
            n.pgdata.display().to_string(),
            n.port.to_string(),
        );
        let child = self.spawn(
            &[
                "create",
                "postgres",
                "--pgdata",
                &pgdata,
                "--pgport",
                &port,
                "--hostname",
                "127.0.0.1",
                "--name",
                &name,
                "--monitor",
                &uri,
                "--auth",
                "trust",
                "--no-ssl",
                "--pgctl",
                &format!("{PG_BINDIR}/pg_ctl"),
                "--run",
            ],
            &name,
        );
        self.nodes[i].agent = Some(child);
    }

    async fn monitor_client(&self) -> Option<tokio_postgres::Client> {
        connect_tcp(self.monitor_port, "pg_auto_failover")
            .await
            .ok()
    }

    async fn monitor_query(&self, sql: &str) -> Option<Vec<tokio_postgres::Row>> {
        self.monitor_client().await?.query(sql, &[]).await.ok()
    }

    async fn states(&self) -> Option<Vec<NodeState>> {
        let rows = self
            .monitor_query(
                "SELECT nodename, reportedstate::text, goalstate::text, reportedpgisrunning \
                 FROM pgautofailover.node ORDER BY nodeid",
            )
            .await?;
        Some(
            rows.iter()
                .map(|r| NodeState {
                    name: r.get(0),
                    reported: r.get(1),
                    goal: r.get(2),
                    running: r.get(3),
                })
                .collect(),
        )
    }

    async fn holds(&self, c: Cond) -> bool {
        match c {
            Cond::MonitorUp => self
                .monitor_query("SELECT count(*) FROM pgautofailover.node")
                .await
                .is_some(),
            Cond::FirstSingle => self.states().await.is_some_and(|ns| {
                ns.iter()
                    .any(|n| n.name == "node1" && n.reported == "single" && n.goal == "single")
            }),
        }
    }

    async fn wait(&self, what: &str, c: Cond) {
        let deadline = Instant::now() + SETTLE;
        loop {
            if self.holds(c).await {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "pg_auto_failover: timed out after {SETTLE:?} waiting for {what}; state: {:?}\n{}",
                    self.states().await,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for log in ["monitor", "node1", "node2", "node3", "commands"] {
            let text = std::fs::read_to_string(self.dir.path().join(format!("{log}.log")))
                .unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            s.push_str(&format!("---- {log} (last lines) ----\n"));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Every pg_autoctl process of a node: the one we started and its pg_autoctl
    /// descendants (supervisor, node-active service, postgres controller), not postgres.
    fn agent_tree(agent: &Child) -> Vec<u32> {
        let mut out = vec![agent.id()];
        let mut i = 0;
        while i < out.len() {
            for c in children(out[i]) {
                if exe_is(c, Path::new(PG_AUTOCTL)) {
                    out.push(c);
                }
            }
            i += 1;
        }
        out
    }
}

impl HaSystem for PgAutoFailover {
    fn system(&self) -> String {
        "pg_auto_failover 2.0".into()
    }

    fn settings(&self) -> String {
        let base = if self.fast {
            FAST_SETTINGS
        } else {
            DEFAULT_SETTINGS
        };
        format!(
            "{}. Observed synchronous_standby_names: `{}`.",
            base.trim_end_matches('.'),
            self.sync_names
        )
    }

    fn hosts(&self) -> Vec<(String, u16)> {
        self.nodes
            .iter()
            .map(|n| ("127.0.0.1".to_string(), n.port))
            .collect()
    }

    async fn primary(&self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(ns) = self.states().await {
                let mut p = ns.iter().filter(|n| {
                    n.goal == n.reported && (n.goal == "primary" || n.goal == "wait_primary")
                });
                if let (Some(n), None) = (p.next(), p.next()) {
                    return n.name.clone();
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "pg_auto_failover: no primary after {within:?}: {:?}\n{}",
                    self.states().await,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn kill_node(&mut self, node: &str) {
        let n = self.node_mut(node);
        let pm = postmaster_pid(&n.pgdata);
        let mut pids = n.agent.as_ref().map(Self::agent_tree).unwrap_or_default();
        pids.extend(pm.map(|p| p as u32));
        for p in &pids {
            kill9(*p);
        }
        if let Some(mut a) = n.agent.take() {
            let _ = a.wait();
        }
        let (pgdata, port) = (n.pgdata.clone(), n.port);
        let deadline = Instant::now() + Duration::from_secs(10);
        while postmaster_pid(&pgdata).is_some()
            || std::net::TcpListener::bind(("127.0.0.1", port)).is_err()
        {
            assert!(Instant::now() < deadline, "{node}'s postmaster did not go");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn restart_node(&mut self, node: &str) {
        let pgdata = self.node(node).pgdata.display().to_string();
        let child = self.spawn(&["run", "--pgdata", &pgdata], node);
        self.node_mut(node).agent = Some(child);
    }

    fn kill_postmaster(&self, node: &str) {
        let pid = postmaster_pid(&self.node(node).pgdata)
            .unwrap_or_else(|| panic!("{node} has no running postmaster"));
        kill9(pid as u32);
    }

    async fn switchover(&self) {
        // What `pg_autoctl perform switchover` calls, without its wait loop.
        let c = self.monitor_client().await.expect("connect to the monitor");
        c.batch_execute("SELECT pgautofailover.perform_failover('default', 0)")
            .await
            .expect("switchover accepted");
    }

    async fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within.max(SETTLE);
        loop {
            if let Some(ns) = self.states().await {
                let at = |r: &str| {
                    ns.iter()
                        .filter(|n| n.reported == r && n.goal == r && n.running)
                        .count()
                };
                if at("primary") == 1 && at("secondary") == 2 {
                    let p = ns.iter().find(|n| n.reported == "primary").unwrap();
                    if streaming_sync(self.node(&p.name).port).await {
                        return;
                    }
                }
            }
            if Instant::now() > deadline {
                panic!(
                    "pg_auto_failover: not healthy after {within:?}: {:?}\n{}",
                    self.states().await,
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn agent_pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.agent.as_ref())
            .flat_map(Self::agent_tree)
            .collect()
    }
}

impl Drop for PgAutoFailover {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            let pm = postmaster_pid(&n.pgdata);
            if let Some(mut a) = n.agent.take() {
                for p in Self::agent_tree(&a) {
                    kill9(p);
                }
                let _ = a.wait();
            }
            if let Some(p) = pm {
                kill9(p as u32);
            }
        }
        let pm = postmaster_pid(&self.monitor_pgdata);
        if let Some(mut m) = self.monitor.take() {
            for p in Self::agent_tree(&m) {
                kill9(p);
            }
            let _ = m.wait();
        }
        if let Some(p) = pm {
            kill9(p as u32);
        }
    }
}

#[derive(Clone, Copy)]
enum Cond {
    MonitorUp,
    FirstSingle,
}

#[derive(Debug)]
#[allow(dead_code)] // read through Debug in failure messages
struct NodeState {
    name: String,
    reported: String,
    goal: String,
    running: bool,
}

async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    connect_tcp(port, "postgres").await.ok()
}

/// Two standbys streaming from the primary on `port`, and synchronous replication on.
async fn streaming_sync(port: u16) -> bool {
    let Some(c) = connect(port).await else {
        return false;
    };
    let Ok(r) = c
        .query_one(
            "SELECT (SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'), \
                    (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')), \
                    current_setting('synchronous_standby_names')",
            &[],
        )
        .await
    else {
        return false;
    };
    r.get::<_, i64>(0) == 2 && r.get::<_, i64>(1) >= 1 && !r.get::<_, String>(2).is_empty()
}

fn postmaster_pid(pgdata: &Path) -> Option<i32> {
    let t = std::fs::read_to_string(pgdata.join("postmaster.pid")).ok()?;
    let pid: i32 = t.lines().next()?.trim().parse().ok()?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).ok()?;
    Some(pid)
}

pub(crate) fn kill9(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Direct children of `pid`, from /proc/<pid>/task/*/children.
pub(crate) fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

fn exe_is(pid: u32, exe: &Path) -> bool {
    std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|p| p == exe)
}
