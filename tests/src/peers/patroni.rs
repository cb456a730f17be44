//! Patroni 3.0 with a 3-member etcd 3.4 cluster, as the side-by-side benchmark runs it:
//! three etcd members and three Patroni nodes (each starting its own PostgreSQL 15) on
//! loopback, `synchronous_mode: true`, either at Patroni's defaults or at the fastest
//! timings Patroni documents as safe.
//!
//! Patroni talks to etcd over the v3 protocol (`etcd3:`), because etcd 3.4 serves the
//! v2 API only when asked to. Patroni runs as the `postgres` user; the postmaster it starts
//! is not its child (Patroni detaches it), so postmasters are found through each data
//! directory's `postmaster.pid` and SIGKILLed by that PID, on faults and on drop.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use pgquorum_testkit::postgres::{http_request, kill9, port_free, postgres_ids, PgDir, PG_BINDIR};
use pgquorum_testkit::{free_port, Proc};

use super::HaSystem;

const PATRONI: &str = "/usr/bin/patroni";
const ETCD: &str = "/usr/bin/etcd";

/// Dynamic (DCS) settings at Patroni's defaults, except synchronous replication on.
const DEFAULT_DCS: &str = concat!(
    "    ttl: 30\n",
    "    loop_wait: 10\n",
    "    retry_timeout: 10\n",
    "    synchronous_mode: true\n",
    "    synchronous_mode_strict: false\n",
);

/// PostgreSQL parameters of the fast settings (in the DCS, so every node has them).
const FAST_PG: &str = concat!(
    "      parameters:\n",
    "        wal_retrieve_retry_interval: 500ms\n",
);

/// The fastest timings Patroni allows and documents as safe; see [`FAST_WHY`].
const FAST_DCS: &str = concat!(
    "    ttl: 20\n",
    "    loop_wait: 1\n",
    "    retry_timeout: 9\n",
    "    synchronous_mode: true\n",
    "    synchronous_mode_strict: true\n",
);

const DEFAULT_WHY: &str = "Patroni defaults (ttl 30 s, loop_wait 10 s, retry_timeout 10 s, \
primary_start_timeout 300 s) with synchronous_mode: true and synchronous_mode_strict: false \
(the default): when no synchronous standby is available — e.g. right after a promotion, \
until a standby streams from the new primary — the primary clears synchronous_standby_names \
and acknowledges commits that exist on one node only. use_pg_rewind and \
remove_data_directory_on_rewind_failure on, so a lost primary can rejoin.";

const FAST_WHY: &str = "ttl 20 s, loop_wait 1 s, retry_timeout 9 s, synchronous_mode: true, \
synchronous_mode_strict: true; everything else at defaults (primary_start_timeout 300 s: a \
crashed primary is recovered and restarted in place rather than failed over). Why safe: \
20 s and 1 s are the smallest ttl and loop_wait Patroni documents (since 3.2, which also \
raises smaller values to them), and loop_wait + 2 × retry_timeout = 19 ≤ ttl is the rule its \
docs require: a primary that cannot renew its leader key gives up after retry_timeout and \
demotes itself before the key expires and another node may take it, so there are never two \
primaries. synchronous_mode already lets only the synchronous standby be promoted; \
synchronous_mode_strict adds that synchronous_standby_names stays set when no standby is \
there, so no commit is acknowledged before it is on a second node (writes block instead, \
e.g. after a promotion until a standby streams from the new primary). A shorter loop_wait \
costs only more DCS traffic. PostgreSQL's wal_retrieve_retry_interval 500 ms (default 5 s): \
a standby whose connection to a new primary fails (its replication slot is not created yet) \
retries after 0.5 s instead of 5 s; it paces retries only.";

/// How long Patroni's bootstrap, a failover or a rejoin may take before we give up.
const SETTLE: Duration = Duration::from_secs(120);

struct Node {
    name: String,
    pg_port: u16,
    api: SocketAddr,
    yml: PathBuf,
    data: PathBuf,
    log: PathBuf,
    proc: Option<Proc>,
}

impl Node {
    /// The live postmaster's PID from `postmaster.pid`, if any.
    fn postmaster_pid(&self) -> Option<i32> {
        let t = std::fs::read_to_string(self.data.join("postmaster.pid")).ok()?;
        let pid: i32 = t.lines().next()?.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }
}

/// Patroni 3.0 + etcd 3.4: three etcd members, three Patroni nodes with PostgreSQL 15.
pub struct Patroni {
    fast: bool,
    version: String,
    nodes: Vec<Node>,
    etcd: Vec<Proc>,
    dir: PgDir,
}

/// Installs Patroni and etcd if missing (we run as root on Debian bookworm).
fn ensure_installed() {
    if Path::new(PATRONI).is_file() && Path::new(ETCD).is_file() {
        return;
    }
    eprintln!("installing patroni and etcd-server with apt-get");
    let ok = Command::new("apt-get")
        .args(["install", "-y", "patroni", "etcd-server"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok || !Path::new(PATRONI).is_file() || !Path::new(ETCD).is_file() {
        panic!(
            "Patroni and etcd are needed ({PATRONI}, {ETCD}); `apt-get install -y patroni \
             etcd-server` failed — run it as root on Debian bookworm (patroni 3.0.2, \
             etcd-server 3.4.23)"
        );
    }
}

fn version_of(bin: &str, arg: &str) -> String {
    Command::new(bin)
        .arg(arg)
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .and_then(|l| l.split_whitespace().last().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

/// A process is alive unless it is gone or a zombie (a SIGKILLed postmaster whose
/// parent has not reaped it yet holds neither its port nor its data directory).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// One HTTP/1.0 request with a JSON body: (status, body). Patroni answers a switchover
/// only once it is over, hence the long wait.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
    http_request(addr, method, path, Some(body), Duration::from_secs(30))
}

/// GET with a short read timeout (health polling must not hang on a stuck node).
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    http_request(addr, "GET", path, None, Duration::from_secs(3))
}

fn get_json(addr: SocketAddr, path: &str) -> Option<serde_json::Value> {
    let (code, body) = get(addr, path)?;
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

fn primary_of(apis: &[(String, SocketAddr)]) -> Option<String> {
    let mut p = apis
        .iter()
        .filter(|(_, api)| get(*api, "/primary").is_some_and(|(c, _)| c == 200));
    match (p.next(), p.next()) {
        (Some((name, _)), None) => Some(name.clone()),
        _ => None,
    }
}

/// A leader, both standbys streaming from it, one of them synchronous both in
/// PostgreSQL (pg_stat_replication) and in the DCS (role sync_standby).
fn healthy(apis: &[(String, SocketAddr)]) -> Result<(), String> {
    let leader = primary_of(apis).ok_or("no single primary")?;
    let api = apis
        .iter()
        .find(|(n, _)| *n == leader)
        .map(|(_, a)| *a)
        .ok_or("leader unknown")?;
    let status = get_json(api, "/patroni").ok_or("leader's /patroni unanswered")?;
    let repl = status["replication"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let streaming = repl.iter().filter(|r| r["state"] == "streaming").count();
    let sync = repl.iter().filter(|r| r["sync_state"] == "sync").count();
    if streaming != 2 || sync != 1 {
        return Err(format!(
            "{leader} has {streaming} streaming standbys, {sync} synchronous"
        ));
    }
    let cluster = get_json(api, "/cluster").ok_or("/cluster unanswered")?;
    let members = cluster["members"].as_array().cloned().unwrap_or_default();
    let running = members.iter().filter(|m| m["state"] == "running").count();
    let sync_dcs = members
        .iter()
        .filter(|m| m["role"] == "sync_standby")
        .count();
    if running != 3 || sync_dcs != 1 {
        return Err(format!("DCS: {running} running, {sync_dcs} sync_standby"));
    }
    Ok(())
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(lines)..].join("\n")
}

impl Patroni {
    /// Starts etcd and three Patroni nodes; returns once there is a leader with two
    /// streaming standbys, one of them synchronous.
    pub async fn start(fast: bool) -> Patroni {
        ensure_installed();
        let version = format!(
            "Patroni {} + etcd {}",
            version_of(PATRONI, "--version"),
            version_of(ETCD, "--version")
        );
        let dir = PgDir::new();
        let mut p = Patroni {
            fast,
            version,
            nodes: Vec::new(),
            etcd: Vec::new(),
            dir,
        };
        let clients = p.start_etcd();
        p.wait_etcd(&clients).await;
        let hosts = clients
            .iter()
            .map(|c| format!("127.0.0.1:{c}"))
            .collect::<Vec<_>>()
            .join(",");
        for i in 1..=3 {
            let name = format!("node{i}");
            let pg_port = free_port();
            let api = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let root = p.dir.path();
            let node = Node {
                yml: root.join(format!("{name}.yml")),
                data: root.join(&name),
                log: root.join(format!("{name}.patroni.log")),
                name,
                pg_port,
                api,
                proc: None,
            };
            std::fs::write(&node.yml, p.yaml(&node, &hosts)).expect("write patroni.yml");
            p.nodes.push(node);
        }
        for i in 0..3 {
            p.spawn(i);
        }
        p.wait_healthy(SETTLE).await;
        p
    }

    fn start_etcd(&mut self) -> Vec<u16> {
        let peers: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let initial = (0..3)
            .map(|i| format!("etcd{}=http://127.0.0.1:{}", i + 1, peers[i]))
            .collect::<Vec<_>>()
            .join(",");
        for i in 0..3 {
            let name = format!("etcd{}", i + 1);
            let data = self.dir.path().join(&name);
            let log = self.dir.path().join(format!("{name}.log"));
            let client = format!("http://127.0.0.1:{}", clients[i]);
            let peer = format!("http://127.0.0.1:{}", peers[i]);
            let mut cmd = Command::new(ETCD);
            cmd.args([
                "--name",
                &name,
                "--data-dir",
                &data.display().to_string(),
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &initial,
                "--initial-cluster-state",
                "new",
                "--initial-cluster-token",
                "pgq-bench",
            ]);
            let proc = Proc::spawn_with(&name, &mut cmd, &log)
                .unwrap_or_else(|e| panic!("spawning etcd: {e}"));
            self.etcd.push(proc);
        }
        clients
    }

    /// Every member answers /health (which needs a Raft leader).
    async fn wait_etcd(&self, clients: &[u16]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let healthy = clients.iter().all(|c| {
                get(SocketAddr::from(([127, 0, 0, 1], *c)), "/health")
                    .is_some_and(|(code, body)| code == 200 && body.contains("true"))
            });
            if healthy {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self.etcd.iter().map(|e| e.log_text()).collect();
                panic!("etcd did not become healthy in 30 s:\n{}", logs.join("\n"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn yaml(&self, n: &Node, etcd_hosts: &str) -> String {
        let (dcs, params) = if self.fast {
            (FAST_DCS, FAST_PG)
        } else {
            (DEFAULT_DCS, "")
        };
        let root = self.dir.path().display();
        format!(
            "\
scope: pgq-bench
namespace: /pgq-bench/
name: {name}
restapi:
  listen: {api}
  connect_address: {api}
etcd3:
  hosts: {etcd_hosts}
bootstrap:
  dcs:
{dcs}    postgresql:
      use_pg_rewind: true
      remove_data_directory_on_rewind_failure: true
      use_slots: true
{params}  initdb:
  - encoding: UTF8
postgresql:
  listen: 127.0.0.1:{port}
  connect_address: 127.0.0.1:{port}
  data_dir: {data}
  bin_dir: {bindir}
  pgpass: {root}/{name}.pgpass
  use_pg_rewind: true
  remove_data_directory_on_rewind_failure: true
  authentication:
    superuser:
      username: postgres
      password: bench-secret
    replication:
      username: replicator
      password: bench-secret
  parameters:
    unix_socket_directories: '{root}'
  pg_hba:
  - local all all trust
  - host all all 127.0.0.1/32 trust
  - host replication all 127.0.0.1/32 trust
",
            name = n.name,
            api = n.api,
            port = n.pg_port,
            data = n.data.display(),
            bindir = PG_BINDIR,
        )
    }

    fn spawn(&mut self, i: usize) {
        let (u, g) = postgres_ids();
        let n = &mut self.nodes[i];
        let mut cmd = Command::new(PATRONI);
        cmd.arg(&n.yml)
            .env("HOME", "/var/lib/postgresql")
            .env("USER", "postgres")
            .env("LOGNAME", "postgres")
            .env("PYTHONUNBUFFERED", "1")
            .current_dir(self.dir.path());
        std::os::unix::process::CommandExt::uid(&mut cmd, u.as_raw());
        std::os::unix::process::CommandExt::gid(&mut cmd, g.as_raw());
        let proc = Proc::spawn_with(&n.name, &mut cmd, &n.log)
            .unwrap_or_else(|e| panic!("spawning patroni: {e}"));
        n.proc = Some(proc);
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The PostgreSQL port of `name` (for reading the table on a node).
    pub fn pg_port(&self, name: &str) -> u16 {
        self.nodes[self.index(name)].pg_port
    }

    fn apis(&self) -> Vec<(String, SocketAddr)> {
        self.nodes.iter().map(|n| (n.name.clone(), n.api)).collect()
    }

    /// The node that holds the leader key and runs as primary, if exactly one does.
    /// (Blocking HTTP runs off the async workers: the writer shares them.)
    async fn current_primary(&self) -> Option<String> {
        let apis = self.apis();
        tokio::task::spawn_blocking(move || primary_of(&apis))
            .await
            .expect("primary poll")
    }

    async fn healthy_now(&self) -> Result<(), String> {
        let apis = self.apis();
        tokio::task::spawn_blocking(move || healthy(&apis))
            .await
            .expect("health poll")
    }

    /// Tails of every Patroni log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        for n in &self.nodes {
            s.push_str(&format!("---- {} patroni (last lines) ----\n", n.name));
            s.push_str(&tail(&n.log, 30));
            s.push('\n');
        }
        s
    }

    fn kill_everything(&mut self) {
        // Patroni first, so that it does not start a postmaster we then miss.
        for n in &mut self.nodes {
            if let Some(mut p) = n.proc.take() {
                p.kill();
            }
        }
        // A postmaster Patroni was starting as it died may write its pid file a moment
        // later: look until every data directory is free or a deadline passes.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut any = false;
            for n in &self.nodes {
                if let Some(pid) = n.postmaster_pid() {
                    kill9(pid);
                    any = true;
                }
            }
            if !any || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for e in &mut self.etcd {
            e.kill();
        }
    }
}

impl Drop for Patroni {
    fn drop(&mut self) {
        self.kill_everything();
    }
}

impl HaSystem for Patroni {
    fn system(&self) -> String {
        self.version.clone()
    }

    fn settings(&self) -> String {
        if self.fast {
            format!("fast: {FAST_WHY}")
        } else {
            format!("defaults: {DEFAULT_WHY}")
        }
    }

    fn hosts(&self) -> Vec<(String, u16)> {
        self.nodes
            .iter()
            .map(|n| ("127.0.0.1".to_string(), n.pg_port))
            .collect()
    }

    async fn primary(&self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some(p) = self.current_primary().await {
                return p;
            }
            if Instant::now() > deadline {
                panic!(
                    "no single Patroni primary within {within:?}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn kill_node(&mut self, node: &str) {
        let i = self.index(node);
        let n = &mut self.nodes[i];
        let pm = n.postmaster_pid();
        if let Some(mut p) = n.proc.take() {
            p.kill();
        }
        if let Some(pid) = pm {
            kill9(pid);
        }
        // Once the postmaster is gone its backends exit; wait for the port and the data
        // directory to be free so that a restart can use them.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n = &self.nodes[i];
            if let Some(pid) = n.postmaster_pid() {
                kill9(pid);
            } else if port_free(n.pg_port) {
                return;
            }
            if Instant::now() > deadline {
                panic!("{node}'s postgres did not go away after SIGKILL");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn restart_node(&mut self, node: &str) {
        let i = self.index(node);
        self.spawn(i);
    }

    fn kill_postmaster(&self, node: &str) {
        let n = &self.nodes[self.index(node)];
        let pid = n
            .postmaster_pid()
            .unwrap_or_else(|| panic!("{node} has no running postmaster"));
        kill9(pid);
    }

    async fn switchover(&self) {
        let leader = self.primary(SETTLE).await;
        let api = self.nodes[self.index(&leader)].api;
        let body = format!("{{\"leader\": \"{leader}\"}}");
        // Patroni answers a switchover request only once it is over (it polls the
        // result); accepted means the old leader stopped being primary.
        let req = tokio::task::spawn_blocking(move || http(api, "POST", "/switchover", &body));
        let deadline = Instant::now() + SETTLE;
        loop {
            if req.is_finished() {
                let r = req.await.expect("switchover request");
                match r {
                    Some((200, _)) => return,
                    other => panic!("switchover refused: {other:?}\n{}", self.logs()),
                }
            }
            let still = tokio::task::spawn_blocking(move || get(api, "/primary"))
                .await
                .expect("primary poll")
                .is_some_and(|(c, _)| c == 200);
            if !still {
                // The answer arrives later; a failure then shows in the figures.
                tokio::spawn(async move {
                    if let Ok(Some((code, body))) = req.await {
                        if code != 200 {
                            eprintln!("patroni switchover answered {code}: {body}");
                        }
                    }
                });
                return;
            }
            if Instant::now() > deadline {
                panic!("switchover not under way after {SETTLE:?}\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            match self.healthy_now().await {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "Patroni not healthy within {within:?}: {e}\n{}",
                        self.logs()
                    );
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    fn agent_pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.proc.as_ref().map(Proc::pid))
            .collect()
    }
}
