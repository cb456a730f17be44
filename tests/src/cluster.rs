//! A whole pgquorum cluster of real processes on loopback: a monitor group, and nodes
//! (each a `pgquorum keeper run` as the `postgres` user with its PostgreSQL as a child),
//! plus a [`Writer`] that commits numbered rows through the libpq-style multi-host
//! address and records every number whose commit was acknowledged.
//!
//! Faults are SIGKILLs by PID: the keeper's, the postmaster's (from postmaster.pid), a
//! monitor member's. Everything is killed and removed on drop, even when a test panics.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgquorum_api::pb::monitor as pb;
use pgquorum_testkit::postgres::{kill9, port_free, Keeper, NodeSpec, PgDir};
use tokio_postgres::config::TargetSessionAttrs;
use tokio_postgres::NoTls;

use crate::monitor_group::MonitorGroup;
use crate::upgrade::OtherBinary;

/// One cluster at a time per test binary: each is 3 monitors, 3 postgres and 3 keepers
/// on a machine with few cores.
static ONE_CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

pub struct Node {
    pub spec: NodeSpec,
    pub keeper: Option<Keeper>,
    pub extra_args: Vec<String>,
    /// Command prefix the keeper is started through (a network namespace), or empty.
    pub prefix: Vec<String>,
    /// Runs this binary instead of this build's (a rolling-upgrade test), from the
    /// keeper's next start on.
    pub bin: Option<OtherBinary>,
}

pub struct Cluster {
    pub monitors: MonitorGroup,
    pub nodes: Vec<Node>,
    pub dir: PgDir,
    /// The pg_hba line that lets the test's clients in.
    pub hba: String,
    _one: tokio::sync::MutexGuard<'static, ()>,
}

/// How long a whole bootstrap, failover or rejoin may take before a test gives up.
pub const SETTLE: Duration = Duration::from_secs(60);

impl Cluster {
    /// 3 monitor members, `n` nodes; returns once there is a primary and `n - 1`
    /// streaming secondaries.
    pub async fn start(n: usize) -> Cluster {
        Cluster::start_with(n, |_| Vec::new()).await
    }

    /// Same, with extra `keeper run` arguments per node index.
    pub async fn start_with(n: usize, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        Cluster::start_full(n, !pgquorum_testkit::insecure_requested(), extra).await
    }

    /// With TLS (`tls`) or `--insecure` whatever the environment says (benchmarks
    /// compare both in one run).
    pub async fn start_tls(n: usize, tls: bool) -> Cluster {
        Cluster::start_full(n, tls, |_| Vec::new()).await
    }

    async fn start_full(n: usize, tls: bool, extra: impl Fn(usize) -> Vec<String>) -> Cluster {
        let one = ONE_CLUSTER.lock().await;
        let monitors = MonitorGroup::with_tls(3, tls);
        let dir = PgDir::new();
        let nodes = (0..n)
            .map(|i| Node {
                spec: NodeSpec::new(&format!("node{}", i + 1), dir.path()),
                keeper: None,
                extra_args: extra(i),
                prefix: Vec::new(),
                bin: None,
            })
            .collect();
        Cluster::start_on(one, monitors, dir, nodes, "host all all 127.0.0.1/32 trust").await
    }

    /// A cluster of given monitor members (not started yet) and nodes, e.g. each in a
    /// network namespace; `hba` lets the test's clients in.
    pub async fn start_custom(
        monitors: MonitorGroup,
        dir: PgDir,
        nodes: Vec<Node>,
        hba: &str,
    ) -> Cluster {
        let one = ONE_CLUSTER.lock().await;
        Cluster::start_on(one, monitors, dir, nodes, hba).await
    }

    async fn start_on(
        one: tokio::sync::MutexGuard<'static, ()>,
        mut monitors: MonitorGroup,
        dir: PgDir,
        nodes: Vec<Node>,
        hba: &str,
    ) -> Cluster {
        let n = nodes.len();
        let ids: Vec<u64> = monitors.members.keys().copied().collect();
        for id in ids {
            monitors.start(id);
        }
        monitors.wait_leader(Duration::from_secs(30)).await;
        let mut c = Cluster {
            monitors,
            nodes,
            dir,
            hba: hba.to_string(),
            _one: one,
        };
        // The first node bootstraps as the primary before the others ask to join.
        let first = c.nodes[0].spec.name.clone();
        c.start_keeper(&first);
        c.wait_state(&format!("{first} to be a single primary"), |ns| {
            ns.iter()
                .any(|n| n.name == first && n.reported_state == "single")
        })
        .await;
        for i in 1..n {
            let name = c.nodes[i].spec.name.clone();
            c.start_keeper(&name);
        }
        c.wait_healthy(n - 1).await;
        c
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.spec.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The names of the nodes other than `name` (the standbys, given the primary).
    pub fn others(&self, name: &str) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| n.spec.name.clone())
            .filter(|n| n != name)
            .collect()
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.spec.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn monitor_list(&self) -> String {
        self.monitors
            .members
            .values()
            .map(|m| m.addr.clone())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts (or restarts) the keeper of `name`; its postgres comes with it.
    pub fn start_keeper(&mut self, name: &str) {
        self.start_keeper_edited(name, |_| {});
    }

    /// [`Cluster::start_keeper`] with the argument list changed by `edit` (e.g. another
    /// `--pg-host`).
    pub fn start_keeper_edited(&mut self, name: &str, edit: impl Fn(&mut Vec<String>)) {
        let monitors = self.monitor_list();
        let hba = self.hba.clone();
        let certs = self.monitors.certs.clone();
        let dir = self.dir.path().to_path_buf();
        let node = self.node_mut(name);
        let mut args = node.spec.args();
        match &certs {
            Some(c) => {
                let own = c.keeper_dir(&node.spec.name, &dir);
                args.extend(["--certs-dir".to_string(), own.display().to_string()]);
            }
            None => args.push("--insecure".into()),
        }
        // NodeSpec::args lets loopback in; a cluster in namespaces adds its subnet.
        args.extend(["--monitor".to_string(), monitors, "--pg-hba".into(), hba]);
        args.extend(node.extra_args.iter().cloned());
        edit(&mut args);
        let bin = match &node.bin {
            Some(other) => {
                other.edit("keeper", &mut args);
                other.path.clone()
            }
            None => pgquorum_testkit::pgquorum_bin(),
        };
        node.keeper = Some(Keeper::spawn_in(
            &node.prefix,
            &bin,
            "run",
            &args,
            &node.spec.keeper_log(),
        ));
    }

    /// The node vanishes: its keeper and its postmaster SIGKILLed together.
    pub async fn kill_node(&mut self, name: &str) {
        let node = self.node_mut(name);
        let pm = node.spec.postmaster_pid();
        if let Some(mut k) = node.keeper.take() {
            k.kill();
        }
        if let Some(pid) = pm {
            kill9(pid);
        }
        // The postmaster's children exit once it is gone; wait so that the port and
        // the data directory are free for a restart.
        let spec = node.spec.clone();
        pgquorum_testkit::wait_until_async(Duration::from_secs(10), "postmaster gone", || {
            let spec = spec.clone();
            async move { spec.postmaster_pid().is_none() && port_free(spec.pg_port) }
        })
        .await
        .unwrap();
    }

    /// Only the postmaster of `name` SIGKILLed; returns its pid.
    pub fn kill_postmaster(&self, name: &str) -> i32 {
        let pid = self
            .node(name)
            .spec
            .postmaster_pid()
            .unwrap_or_else(|| panic!("{name} has no running postmaster"));
        kill9(pid);
        pid
    }

    /// Asks the monitor group for a planned switchover of the default formation (any
    /// candidate); returns once it is accepted or refused, not done.
    pub async fn request_switchover(&self) -> Result<(), pgquorum_api::client::ClientError> {
        self.monitors
            .client()
            .call(|mut raw| async move {
                raw.perform_switchover(pb::PerformSwitchoverRequest {
                    formation: "default".into(),
                    group_id: 0,
                    candidate: String::new(),
                })
                .await
            })
            .await
            .map(|_| ())
    }

    pub async fn state(&self) -> Option<Vec<pb::NodeStatus>> {
        let c = self.monitors.client();
        c.call(|mut raw| async move {
            raw.get_state(pb::GetStateRequest {
                formation: String::new(),
                linearizable: false,
            })
            .await
        })
        .await
        .ok()
        .map(|r| r.nodes)
    }

    /// Polls the monitor's view until `done` holds.
    pub async fn wait_state(
        &self,
        what: &str,
        done: impl Fn(&[pb::NodeStatus]) -> bool,
    ) -> Vec<pb::NodeStatus> {
        let deadline = Instant::now() + SETTLE;
        let mut last = Vec::new();
        loop {
            if let Some(ns) = self.state().await {
                if done(&ns) {
                    return ns;
                }
                last = ns;
            }
            if Instant::now() > deadline {
                panic!(
                    "timed out after {SETTLE:?} waiting for {what}; state: {}\n{}",
                    describe(&last),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// One primary and `standbys` secondaries, every node at its goal.
    pub async fn wait_healthy(&self, standbys: usize) -> Vec<pb::NodeStatus> {
        self.wait_state(&format!("a primary and {standbys} secondaries"), |ns| {
            healthy(ns, standbys)
        })
        .await
    }

    /// The primary, once there is exactly one at its goal (a primary between two
    /// states, e.g. applying new synchronous_standby_names, is waited for).
    pub async fn primary(&self) -> String {
        let ns = self
            .wait_state("a primary", |ns| primary_of(ns).is_some())
            .await;
        primary_of(&ns).unwrap()
    }

    /// `pgquorum ARGS... --monitor LIST`: (success, output).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let list = self.monitor_list();
        let mut a: Vec<&str> = args.to_vec();
        a.extend(["--monitor", &list]);
        self.monitors.cli(&a)
    }

    /// Node ports for the multi-host address, in node order.
    pub fn hosts(&self) -> Vec<(String, u16)> {
        self.nodes
            .iter()
            .map(|n| (n.spec.host.to_string(), n.spec.pg_port))
            .collect()
    }

    pub fn writer(&self) -> Writer {
        Writer::start(self.hosts())
    }

    /// Every acknowledged number is in the table on `name` (waits for replay there).
    pub async fn assert_rows_on(&self, name: &str, acked: &BTreeSet<i64>) {
        let spec = self.node(name).spec.clone();
        let deadline = Instant::now() + SETTLE;
        loop {
            let have = rows_on(&spec).await;
            let missing: Vec<i64> = match &have {
                Some(h) => acked.difference(h).copied().take(10).collect(),
                None => vec![-1],
            };
            if missing.is_empty() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name} lacks acknowledged rows (first missing: {missing:?}; {} acknowledged)\n{}",
                    acked.len(),
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Tails of every log, for failure messages.
    pub fn logs(&self) -> String {
        let mut s = self.monitors.logs();
        for n in &self.nodes {
            for (what, path) in [
                ("keeper", n.spec.keeper_log()),
                ("postgres", postgres_log(&n.spec)),
            ] {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                s.push_str(&format!("---- {} {what} (last lines) ----\n", n.spec.name));
                for l in tail.into_iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Keepers first (their postgres gets PDEATHSIG), then any postmaster left.
        for n in &mut self.nodes {
            let pm = n.spec.postmaster_pid();
            if let Some(mut k) = n.keeper.take() {
                k.kill();
            }
            if let Some(pid) = pm {
                kill9(pid);
            }
        }
    }
}

fn postgres_log(spec: &NodeSpec) -> PathBuf {
    let mut p = spec.pgdata().into_os_string();
    p.push(".postgres.log");
    PathBuf::from(p)
}

pub fn primary_of(ns: &[pb::NodeStatus]) -> Option<String> {
    let mut p = ns
        .iter()
        .filter(|n| n.reported_state == "primary" && n.goal_state == "primary");
    match (p.next(), p.next()) {
        (Some(n), None) => Some(n.name.clone()),
        _ => None,
    }
}

pub fn healthy(ns: &[pb::NodeStatus], standbys: usize) -> bool {
    primary_of(ns).is_some()
        && ns
            .iter()
            .filter(|n| n.reported_state == "secondary" && n.goal_state == "secondary")
            .count()
            == standbys
        && ns.iter().all(|n| n.reported_state == n.goal_state)
}

pub fn describe(ns: &[pb::NodeStatus]) -> String {
    ns.iter()
        .map(|n| format!("{} {}→{}", n.name, n.reported_state, n.goal_state))
        .collect::<Vec<_>>()
        .join(", ")
}

async fn rows_on(spec: &NodeSpec) -> Option<BTreeSet<i64>> {
    let c = spec.connect().await.ok()?;
    let rows = c.query("SELECT n FROM acked", &[]).await.ok()?;
    Some(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
}

/// What the writer saw.
#[derive(Debug, Default)]
pub struct Log {
    /// Acknowledged numbers, with when the acknowledgement arrived.
    pub acked: Vec<(i64, Instant)>,
    /// Failed or unanswered attempts.
    pub errors: Vec<(Instant, String)>,
    /// Only from [`Writer::start_checked`]: for each acknowledgement, whether the
    /// commit was made with no synchronous standby to wait for.
    pub unprotected: Vec<(Instant, bool)>,
}

/// Commits `INSERT INTO acked VALUES (n)` for n = 1, 2, ... through a multi-host
/// read-write connection, reconnecting after any error.
pub struct Writer {
    log: Arc<Mutex<Log>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// How long one commit may take before the writer gives up on it (not acknowledged)
/// and reconnects.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(2);

pub fn multi_host_config(hosts: &[(String, u16)]) -> tokio_postgres::Config {
    let mut cfg = tokio_postgres::Config::new();
    for (h, p) in hosts {
        cfg.host(h).port(*p);
    }
    cfg.user("postgres")
        .dbname("postgres")
        .application_name("e2e-writer")
        .target_session_attrs(TargetSessionAttrs::ReadWrite)
        // A host that vanished answers nothing: each reconnection through the host list
        // waits this long on it before trying the next host. A TCP handshake on a LAN
        // takes well under a millisecond, and the kernel answers it however loaded
        // postgres is.
        .connect_timeout(CONNECT_TIMEOUT)
        // ... and the statement in flight when it vanished gets no answer: without this,
        // only COMMIT_TIMEOUT would end it. Sent data unacknowledged by the peer's kernel
        // for this long closes the connection; a slow commit (waiting for a synchronous
        // standby) is acknowledged at the TCP level at once, so it is not cut short.
        .tcp_user_timeout(TCP_USER_TIMEOUT);
    cfg
}

/// The client settings whose values docs/benchmarks.md and docs/operations.md quote.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(1);

/// The writer's settings as the benchmark sections describe them.
pub fn client_settings() -> String {
    format!(
        "target_session_attrs=read-write, connect_timeout {} s, tcp_user_timeout {} s, commit \
         timeout {} s",
        CONNECT_TIMEOUT.as_secs_f64(),
        TCP_USER_TIMEOUT.as_secs_f64(),
        COMMIT_TIMEOUT.as_secs_f64()
    )
}

impl Writer {
    pub fn start(hosts: Vec<(String, u16)>) -> Writer {
        Writer::start_with(hosts, false)
    }

    /// Same, but each commit is one transaction that also reads whether the primary had
    /// a synchronous standby to wait for (`synchronous_standby_names` not empty and
    /// `synchronous_commit` neither `local` nor `off`), recorded in [`Log::unprotected`]
    /// for each acknowledgement. One round trip, as the plain writer.
    pub fn start_checked(hosts: Vec<(String, u16)>) -> Writer {
        Writer::start_with(hosts, true)
    }

    fn start_with(hosts: Vec<(String, u16)>, checked: bool) -> Writer {
        let log = Arc::new(Mutex::new(Log::default()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let l = log.clone();
        let task = tokio::spawn(async move {
            let cfg = multi_host_config(&hosts);
            let mut n: i64 = 0;
            let mut client: Option<tokio_postgres::Client> = None;
            while !*stopped.borrow() {
                if client.as_ref().is_none_or(|c| c.is_closed()) {
                    client = None;
                    match tokio::time::timeout(COMMIT_TIMEOUT * 2, cfg.connect(NoTls)).await {
                        Ok(Ok((c, conn))) => {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            let _ = c
                                .batch_execute(
                                    "CREATE TABLE IF NOT EXISTS acked (n bigint PRIMARY KEY)",
                                )
                                .await;
                            client = Some(c);
                        }
                        Ok(Err(e)) => {
                            l.lock()
                                .unwrap()
                                .errors
                                .push((Instant::now(), e.to_string()));
                            pause(&mut stopped).await;
                            continue;
                        }
                        Err(_) => {
                            l.lock()
                                .unwrap()
                                .errors
                                .push((Instant::now(), "connect timed out".into()));
                            continue;
                        }
                    }
                }
                let Some(c) = &client else { continue };
                n += 1;
                let r = if checked {
                    tokio::time::timeout(COMMIT_TIMEOUT, checked_commit(c, n)).await
                } else {
                    tokio::time::timeout(
                        COMMIT_TIMEOUT,
                        c.execute("INSERT INTO acked VALUES ($1)", &[&n]),
                    )
                    .await
                    .map(|r| r.map(|_| false))
                };
                match r {
                    Ok(Ok(unprotected)) => {
                        let now = Instant::now();
                        let mut log = l.lock().unwrap();
                        log.acked.push((n, now));
                        if checked {
                            log.unprotected.push((now, unprotected));
                        }
                    }
                    Ok(Err(e)) => {
                        l.lock()
                            .unwrap()
                            .errors
                            .push((Instant::now(), e.to_string()));
                        client = None;
                    }
                    Err(_) => {
                        l.lock()
                            .unwrap()
                            .errors
                            .push((Instant::now(), "commit timed out".into()));
                        client = None;
                    }
                }
            }
        });
        Writer {
            log,
            stop,
            task: Some(task),
        }
    }

    /// The acknowledgements' times and whether each was made with no synchronous
    /// standby (empty unless started with [`Writer::start_checked`]).
    pub fn unprotected(&self) -> Vec<(Instant, bool)> {
        self.log.lock().unwrap().unprotected.clone()
    }

    /// The highest acknowledged number so far (0 before the first).
    pub fn last_acked(&self) -> i64 {
        self.log
            .lock()
            .unwrap()
            .acked
            .last()
            .map(|a| a.0)
            .unwrap_or(0)
    }

    pub fn acked(&self) -> BTreeSet<i64> {
        self.log.lock().unwrap().acked.iter().map(|a| a.0).collect()
    }

    pub fn acked_count(&self) -> usize {
        self.log.lock().unwrap().acked.len()
    }

    /// The first acknowledgement after `t`, if any yet.
    pub fn first_ack_after(&self, t: Instant) -> Option<Instant> {
        self.log
            .lock()
            .unwrap()
            .acked
            .iter()
            .map(|a| a.1)
            .find(|at| *at > t)
    }

    /// The longest time from `t` until now without an acknowledgement: between two
    /// consecutive ones, from `t` to the first, or from the last until now.
    pub fn longest_pause(&self, t: Instant) -> Duration {
        let now = Instant::now();
        let log = self.log.lock().unwrap();
        let mut prev = t;
        let mut longest = Duration::ZERO;
        for at in log.acked.iter().map(|a| a.1).filter(|at| *at > t) {
            longest = longest.max(at - prev);
            prev = at;
        }
        longest.max(now - prev)
    }

    /// The failed attempts after `t` so far.
    pub fn errors_after(&self, t: Instant) -> Vec<(Instant, String)> {
        self.log
            .lock()
            .unwrap()
            .errors
            .iter()
            .filter(|e| e.0 > t)
            .cloned()
            .collect()
    }

    /// Write unavailability after a fault at `t0`, once it is over: from `t0` to the first
    /// acknowledgement after the first failure after `t0` (an acknowledgement of a commit
    /// already under way at the fault does not count), waiting up to `within`.
    pub async fn unavailability(&self, t0: Instant, within: Duration) -> Option<Duration> {
        let deadline = t0 + within;
        loop {
            if let Some(e) = self.first_error_after(t0) {
                if let Some(a) = self.first_ack_after(e) {
                    return Some(a - t0);
                }
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The first failed attempt after `t`, if any yet.
    pub fn first_error_after(&self, t: Instant) -> Option<Instant> {
        self.log
            .lock()
            .unwrap()
            .errors
            .iter()
            .map(|e| e.0)
            .find(|at| *at > t)
    }

    /// Waits until `more` commits were acknowledged after now.
    pub async fn wait_progress(&self, more: usize, what: &str) {
        let target = self.acked_count() + more;
        let deadline = Instant::now() + SETTLE;
        while self.acked_count() < target {
            if Instant::now() > deadline {
                let errs: Vec<String> = self
                    .log
                    .lock()
                    .unwrap()
                    .errors
                    .iter()
                    .rev()
                    .take(5)
                    .map(|e| e.1.clone())
                    .collect();
                panic!("the writer made no progress ({what}); last errors: {errs:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops writing; returns the acknowledged numbers.
    pub async fn stop(mut self) -> BTreeSet<i64> {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        self.acked()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

/// Inserts `n` and reads, in the same transaction, whether the commit will wait for a
/// synchronous standby; Ok(true) when it will not (the acknowledgement then only
/// means the row is on the primary's disk).
async fn checked_commit(c: &tokio_postgres::Client, n: i64) -> Result<bool, tokio_postgres::Error> {
    let msgs = c
        .simple_query(&format!(
            "BEGIN; INSERT INTO acked VALUES ({n}); \
             SELECT current_setting('synchronous_standby_names') = '' \
                 OR current_setting('synchronous_commit') IN ('off', 'local'); \
             COMMIT"
        ))
        .await?;
    Ok(msgs.iter().any(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
        _ => false,
    }))
}

/// A short pause between failed connection attempts, cut short by stop.
async fn pause(stopped: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = tokio::time::timeout(Duration::from_millis(50), stopped.changed()).await;
}
