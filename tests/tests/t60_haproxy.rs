//! HAProxy with the shipped deploy/haproxy/haproxy.cfg in front of a real cluster (3
//! monitor members, 3 keepers with PostgreSQL 15): the read-write port leads to the
//! primary and the read-only port to standbys; a client writing through the
//! read-write port keeps committing across a switchover and across the SIGKILL of the
//! primary's keeper and postmaster, and no acknowledged row is lost. The same through
//! PgBouncer (deploy/pgbouncer/pgbouncer.ini, transaction pooling) in front of
//! HAProxy's read-write port.
//! Needs `cargo build -p pgquorum`, PostgreSQL 15 and Debian's haproxy (tests/run
//! installs them as root), Debian's pgbouncer likewise.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgquorum_testkit::postgres::{wait_for, Keeper, NodeSpec, PgDir};
use pgquorum_tests::haproxy::{Haproxy, Pgbouncer};
use pgquorum_tests::monitor_group::MonitorGroup;

const START: Duration = Duration::from_secs(180);
const SETTLE: Duration = Duration::from_secs(90);

struct Cluster {
    // Field order is drop order: HAProxy, keepers (each SIGKILLed; its postgres gets
    // the keeper's death signal), then the monitor group and the directory.
    haproxy: Option<Haproxy>,
    keepers: Vec<Keeper>,
    specs: Vec<NodeSpec>,
    group: MonitorGroup,
    _dir: PgDir,
}

impl Cluster {
    async fn start() -> Cluster {
        let mut group = MonitorGroup::new(3);
        for id in [1, 2, 3] {
            group.start(id);
        }
        group.wait_leader(Duration::from_secs(30)).await;
        let dir = PgDir::new();
        let specs: Vec<NodeSpec> = (1..=3)
            .map(|i| NodeSpec::new(&format!("node{i}"), dir.path()))
            .collect();
        let monitors = [1, 2, 3]
            .iter()
            .map(|id| group.addr(*id))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Cluster {
            haproxy: None,
            keepers: Vec::new(),
            specs,
            group,
            _dir: dir,
        };
        for i in 0..3 {
            c.start_keeper(i, &monitors);
            if i == 0 {
                // The first node bootstraps as primary before the others join.
                let s = c.specs[0].clone();
                c.wait_http(&s, "/primary", START).await;
            }
        }
        for i in 1..3 {
            let s = c.specs[i].clone();
            c.wait_http(&s, "/replica", START).await;
        }
        c.wait_settled(START).await;
        let nodes: Vec<(u16, u16)> = c.specs.iter().map(|s| (s.pg_port, s.http.port())).collect();
        c.haproxy = Some(Haproxy::start(c._dir.path(), &nodes));
        c
    }

    fn start_keeper(&mut self, i: usize, monitors: &str) {
        let s = &self.specs[i];
        let mut args = s.args();
        args.extend([
            "--monitor".to_string(),
            monitors.to_string(),
            "--pg-hba".to_string(),
            "host all all 127.0.0.1/32 trust".to_string(),
        ]);
        self.keepers
            .push(Keeper::spawn("run", &args, &s.keeper_log()));
    }

    fn haproxy(&self) -> &Haproxy {
        self.haproxy.as_ref().unwrap()
    }

    async fn wait_http(&self, s: &NodeSpec, path: &str, timeout: Duration) {
        let what = format!("{} to answer 200 on {path}", s.name);
        let s2 = s.clone();
        let p = path.to_string();
        let ok = tokio::time::timeout(
            timeout,
            wait_for(&what, timeout, || {
                let s = s2.clone();
                let p = p.clone();
                async move { (s.http_get(&p).map(|r| r.0) == Some(200)).then_some(()) }
            }),
        )
        .await;
        if ok.is_err() {
            panic!("timed out waiting for {what}\n{}", self.logs());
        }
    }

    /// Waits until HAProxy's read-write side has exactly node `i` up (a freshly
    /// started HAProxy counts every server up until its first checks fail).
    async fn wait_rw_on(&self, i: usize) {
        let h = self.haproxy();
        let want = vec![format!("node{}", i + 1)];
        wait_for(
            "HAProxy to route read-write to the primary only",
            SETTLE,
            || async { (h.up_servers("pgquorum_rw").as_ref() == Some(&want)).then_some(()) },
        )
        .await;
    }

    /// Waits until the monitor group sees every running node at its goal, one of them
    /// `primary` and the others `secondary` (operations are refused while a node is
    /// in transition).
    async fn wait_settled(&self, timeout: Duration) {
        let running: Vec<String> = self
            .specs
            .iter()
            .zip(&self.keepers)
            .filter(|(_, k)| k.pid().is_some())
            .map(|(s, _)| s.name.clone())
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let (ok, out) = self.cli(&["show", "state", "--json"]);
            let states: Option<Vec<String>> = ok
                .then(|| serde_json::from_str::<serde_json::Value>(&out).ok())
                .flatten()
                .and_then(|v| {
                    v.get("nodes")?
                        .as_array()?
                        .iter()
                        .filter(|n| {
                            running
                                .iter()
                                .any(|r| Some(r.as_str()) == n["name"].as_str())
                        })
                        .map(|n| {
                            let rep = n["reported_state"].as_str()?;
                            (Some(rep) == n["goal_state"].as_str()).then(|| rep.to_string())
                        })
                        .collect()
                });
            if let Some(st) = states {
                let primaries = st.iter().filter(|s| *s == "primary").count();
                let secondaries = st.iter().filter(|s| *s == "secondary").count();
                if st.len() == running.len()
                    && primaries == 1
                    && primaries + secondaries == st.len()
                {
                    return;
                }
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "timed out waiting for one primary and settled secondaries: {out}\n{}",
                    self.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until HAProxy's read-only side has exactly the nodes other than `p` up.
    async fn wait_ro_without(&self, p: usize) {
        let h = self.haproxy();
        let want: Vec<String> = (0..self.specs.len())
            .filter(|i| *i != p)
            .map(|i| format!("node{}", i + 1))
            .collect();
        wait_for(
            "HAProxy to route read-only to the standbys only",
            SETTLE,
            || async { (h.up_servers("pgquorum_ro").as_ref() == Some(&want)).then_some(()) },
        )
        .await;
    }

    /// Index of the node whose keeper answers /primary, once exactly one does.
    async fn primary(&self, timeout: Duration) -> usize {
        let specs = self.specs.clone();
        wait_for("exactly one node answering /primary", timeout, || {
            let specs = specs.clone();
            async move {
                let up: Vec<usize> = (0..specs.len())
                    .filter(|i| specs[*i].http_get("/primary").map(|r| r.0) == Some(200))
                    .collect();
                (up.len() == 1).then(|| up[0])
            }
        })
        .await
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let monitors = [1, 2, 3]
            .iter()
            .map(|id| self.group.addr(*id))
            .collect::<Vec<_>>()
            .join(",");
        let mut all: Vec<&str> = args.to_vec();
        all.extend(["--monitor", &monitors]);
        self.group.cli(&all)
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for (k, spec) in self.keepers.iter().zip(&self.specs) {
            let text = k.log_text();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            s.push_str(&format!("---- keeper {} (last lines) ----\n", spec.name));
            for l in tail.into_iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        if let Some(h) = &self.haproxy {
            s.push_str("---- haproxy ----\n");
            s.push_str(&h.log());
        }
        s.push_str(&self.group.logs());
        s
    }
}

/// Inserts numbered rows into `table` through `port` (HAProxy's read-write port or
/// PgBouncer), one per transaction,
/// reconnecting after any error; records the numbers whose COMMIT was acknowledged.
struct Writer {
    acked: Arc<Mutex<Vec<i64>>>,
    errors: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writer {
    fn start(port: u16, table: &'static str) -> Writer {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, e, st) = (acked.clone(), errors.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let mut client: Option<tokio_postgres::Client> = None;
            let mut next: i64 = 1;
            while !st.load(Ordering::SeqCst) {
                if client.is_none() {
                    let mut c = tokio_postgres::Config::new();
                    c.host("127.0.0.1")
                        .port(port)
                        .user("postgres")
                        .dbname("postgres")
                        .connect_timeout(Duration::from_secs(2));
                    match c.connect(tokio_postgres::NoTls).await {
                        Ok((cl, conn)) => {
                            tokio::spawn(async move {
                                let _ = conn.await;
                            });
                            client = Some(cl);
                        }
                        Err(_) => {
                            e.fetch_add(1, Ordering::SeqCst);
                            // Back off while no primary is reachable.
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    }
                }
                let Some(cl) = client.as_ref() else { continue };
                let id = next;
                next += 1;
                // A COMMIT that does not come back is an unknown outcome: the row may
                // or may not exist, and it is not counted as acknowledged.
                // The simple query protocol: no prepared statements, which transaction
                // pooling would send to another server connection.
                let sql = format!("INSERT INTO {table} (id) VALUES ({id})");
                let r = tokio::time::timeout(Duration::from_secs(5), cl.simple_query(&sql)).await;
                let inserted = matches!(&r, Ok(Ok(msgs)) if msgs.iter().any(|m| matches!(
                    m,
                    tokio_postgres::SimpleQueryMessage::CommandComplete(1)
                )));
                match inserted {
                    true => a.lock().unwrap().push(id),
                    false => {
                        e.fetch_add(1, Ordering::SeqCst);
                        client = None;
                    }
                }
            }
        });
        Writer {
            acked,
            errors,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` commits beyond `from` have been acknowledged.
    async fn wait_more(&self, from: usize, more: usize, what: &str, c: &Cluster) {
        let deadline = tokio::time::Instant::now() + SETTLE;
        while self.count() < from + more {
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{what}: only {} of {more} more commits acknowledged through HAProxy in {SETTLE:?} ({} errors)\n{}",
                    self.count() - from,
                    self.errors.load(Ordering::SeqCst),
                    c.logs()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(self) -> Vec<i64> {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let v = self.acked.lock().unwrap().clone();
        v
    }
}

async fn server_port(h: &Haproxy, rw: bool) -> (i32, bool) {
    let c = h.connect(rw).await.expect("connect through HAProxy");
    let row = c
        .query_one("SELECT inet_server_port(), pg_is_in_recovery()", &[])
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

async fn assert_all_present(c: &Cluster, table: &str, acked: &[i64]) {
    let h = c.haproxy();
    let client = wait_for(
        "a connection through the read-write port",
        SETTLE,
        || async { h.connect(true).await.ok() },
    )
    .await;
    let rows = client
        .query(&format!("SELECT id FROM {table}"), &[])
        .await
        .unwrap();
    let present: std::collections::HashSet<i64> = rows.iter().map(|r| r.get(0)).collect();
    let lost: Vec<i64> = acked
        .iter()
        .filter(|i| !present.contains(i))
        .copied()
        .collect();
    assert!(
        lost.is_empty(),
        "{table}: {} acknowledged rows lost (of {}): {:?}",
        lost.len(),
        acked.len(),
        &lost[..lost.len().min(20)]
    );
}

async fn create_table(h: &Haproxy) {
    let c = wait_for(
        "a connection through the read-write port",
        SETTLE,
        || async { h.connect(true).await.ok() },
    )
    .await;
    c.batch_execute("CREATE TABLE t60 (id bigint PRIMARY KEY); CREATE TABLE t60_bouncer (id bigint PRIMARY KEY)")
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rw_port_leads_to_the_primary_ro_to_standbys_and_pgbouncer_pools_through_it() {
    let c = Cluster::start().await;
    let h = c.haproxy();
    let p = c.primary(SETTLE).await;
    c.wait_rw_on(p).await;
    c.wait_ro_without(p).await;
    let (port, in_recovery) = wait_for("HAProxy's read-write port", SETTLE, || async {
        match h.connect(true).await {
            Ok(_) => Some(server_port(h, true).await),
            Err(_) => None,
        }
    })
    .await;
    assert_eq!(
        port,
        i32::from(c.specs[p].pg_port),
        "rw port reached a standby"
    );
    assert!(!in_recovery);
    create_table(h).await;
    for _ in 0..4 {
        let (port, in_recovery) = wait_for("HAProxy's read-only port", SETTLE, || async {
            match h.connect(false).await {
                Ok(_) => Some(server_port(h, false).await),
                Err(_) => None,
            }
        })
        .await;
        assert!(in_recovery, "ro port reached the primary");
        assert_ne!(port, i32::from(c.specs[p].pg_port));
    }
    let w = Writer::start(h.ports.rw, "t60");
    let bouncer = Pgbouncer::start(c._dir.path(), h.ports.rw);
    let wb = Writer::start(bouncer.port, "t60_bouncer");
    w.wait_more(0, 100, "steady state", &c).await;
    wb.wait_more(0, 100, "steady state through PgBouncer", &c)
        .await;
    let acked = w.finish().await;
    let acked_b = wb.finish().await;
    assert_all_present(&c, "t60", &acked).await;
    assert_all_present(&c, "t60_bouncer", &acked_b).await;

    // The leader's /metrics tells what Prometheus alerts on: nodes by state and
    // how long ago each keeper was heard.
    let leader = c.group.wait_leader(SETTLE).await;
    let addr: std::net::SocketAddr = c.group.addr(leader).parse().unwrap();
    let (code, metrics) = pgquorum_testkit::postgres::http_get(addr, "/metrics").unwrap();
    assert_eq!(code, 200);
    let has = |needle: &str| metrics.lines().any(|l| l.contains(needle));
    assert!(
        has(r#"formation="default",state="primary"} 1"#),
        "{metrics}"
    );
    assert!(
        has(r#"formation="default",state="secondary"} 2"#),
        "{metrics}"
    );
    for i in 1..=3 {
        assert!(
            has(&format!(
                r#"pgquorum_monitor_node_heartbeat_age_seconds{{member="{leader}",formation="default",node="node{i}"}}"#
            )),
            "{metrics}"
        );
        assert!(
            has(&format!(r#"node="node{i}"}} 1"#)),
            "timeline 1 for node{i}: {metrics}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_through_haproxy_survive_a_switchover_and_a_primary_kill() {
    let mut c = Cluster::start().await;
    let old = c.primary(SETTLE).await;
    c.wait_rw_on(old).await;
    create_table(c.haproxy()).await;
    let w = Writer::start(c.haproxy().ports.rw, "t60");
    let bouncer = Pgbouncer::start(c._dir.path(), c.haproxy().ports.rw);
    let wb = Writer::start(bouncer.port, "t60_bouncer");
    w.wait_more(0, 50, "before the switchover", &c).await;
    wb.wait_more(0, 50, "before the switchover, through PgBouncer", &c)
        .await;

    // Planned switchover through the operator's command.
    // The monitor refuses while any node is still in a transition (it may start one,
    // such as apply_settings, right after the cluster looked settled): retry those.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let out = loop {
        let (ok, out) = c.cli(&["perform", "switchover", "--timeout", "90"]);
        if ok {
            break out;
        }
        assert!(
            out.contains("not allowed now") && tokio::time::Instant::now() < deadline,
            "perform switchover failed: {out}\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("perform switchover: {out}");
    let new = c.primary(SETTLE).await;
    assert_ne!(new, old, "the switchover kept the same primary");
    let (n, nb) = (w.count(), wb.count());
    w.wait_more(n, 50, "after the switchover", &c).await;
    wb.wait_more(nb, 50, "after the switchover, through PgBouncer", &c)
        .await;
    let (port, _) = server_port(c.haproxy(), true).await;
    assert_eq!(port, i32::from(c.specs[new].pg_port));
    c.wait_settled(SETTLE).await;

    // The primary's keeper and postmaster die at once (SIGKILL by the PIDs we know).
    let pm = c.specs[new].postmaster_pid();
    c.keepers[new].kill();
    if let Some(pid) = pm {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let (n, nb) = (w.count(), wb.count());
    let third = wait_for("a new primary after the kill", SETTLE, || {
        let specs = c.specs.clone();
        async move {
            (0..specs.len())
                .find(|i| *i != new && specs[*i].http_get("/primary").map(|r| r.0) == Some(200))
        }
    })
    .await;
    w.wait_more(n, 50, "after the primary was killed", &c).await;
    wb.wait_more(
        nb,
        50,
        "after the primary was killed, through PgBouncer",
        &c,
    )
    .await;
    let (port, _) = server_port(c.haproxy(), true).await;
    assert_eq!(port, i32::from(c.specs[third].pg_port));

    let acked = w.finish().await;
    let acked_b = wb.finish().await;
    assert_all_present(&c, "t60", &acked).await;
    assert_all_present(&c, "t60_bouncer", &acked_b).await;
    drop(bouncer);
    c.haproxy = None;
}
