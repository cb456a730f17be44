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

use pgquorum_testkit::postgres::wait_for;
use pgquorum_tests::cluster::Cluster;
use pgquorum_tests::haproxy::{Haproxy, Pgbouncer};

const SETTLE: Duration = Duration::from_secs(90);

/// The shared cluster harness with HAProxy (the shipped configuration) in front of it.
/// Field order is drop order: HAProxy before the cluster it points at.
struct Fronted {
    haproxy: Option<Haproxy>,
    c: Cluster,
}

impl Fronted {
    async fn start() -> Fronted {
        let c = Cluster::start(3).await;
        let nodes: Vec<(u16, u16)> = c
            .nodes
            .iter()
            .map(|n| (n.spec.pg_port, n.spec.http.port()))
            .collect();
        let haproxy = Some(Haproxy::start(c.dir.path(), &nodes));
        Fronted { haproxy, c }
    }

    fn haproxy(&self) -> &Haproxy {
        self.haproxy.as_ref().unwrap()
    }

    /// Waits until HAProxy's read-write side has exactly `primary` up (a freshly
    /// started HAProxy counts every server up until its first checks fail).
    async fn wait_rw_on(&self, primary: &str) {
        let h = self.haproxy();
        let want = vec![primary.to_string()];
        wait_for(
            "HAProxy to route read-write to the primary only",
            SETTLE,
            || async { (h.up_servers("pgquorum_rw").as_ref() == Some(&want)).then_some(()) },
        )
        .await;
    }

    /// Waits until HAProxy's read-only side has exactly the nodes other than `primary` up.
    async fn wait_ro_without(&self, primary: &str) {
        let h = self.haproxy();
        let want: Vec<String> = self
            .c
            .nodes
            .iter()
            .map(|n| n.spec.name.clone())
            .filter(|n| n != primary)
            .collect();
        wait_for(
            "HAProxy to route read-only to the standbys only",
            SETTLE,
            || async { (h.up_servers("pgquorum_ro").as_ref() == Some(&want)).then_some(()) },
        )
        .await;
    }

    fn pg_port(&self, name: &str) -> i32 {
        i32::from(self.c.node(name).spec.pg_port)
    }

    fn logs(&self) -> String {
        let mut s = self.c.logs();
        if let Some(h) = &self.haproxy {
            s.push_str("---- haproxy ----\n");
            s.push_str(&h.log());
        }
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
                    match pgquorum_testkit::postgres::connect_tcp(port, "postgres").await {
                        Ok(cl) => client = Some(cl),
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
    async fn wait_more(&self, from: usize, more: usize, what: &str, c: &Fronted) {
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

async fn assert_all_present(c: &Fronted, table: &str, acked: &[i64]) {
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
    let f = Fronted::start().await;
    let h = f.haproxy();
    let p = f.c.primary().await;
    f.wait_rw_on(&p).await;
    f.wait_ro_without(&p).await;
    let (port, in_recovery) = wait_for("HAProxy's read-write port", SETTLE, || async {
        match h.connect(true).await {
            Ok(_) => Some(server_port(h, true).await),
            Err(_) => None,
        }
    })
    .await;
    assert_eq!(port, f.pg_port(&p), "rw port reached a standby");
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
        assert_ne!(port, f.pg_port(&p));
    }
    let w = Writer::start(h.ports.rw, "t60");
    let bouncer = Pgbouncer::start(f.c.dir.path(), h.ports.rw);
    let wb = Writer::start(bouncer.port, "t60_bouncer");
    w.wait_more(0, 100, "steady state", &f).await;
    wb.wait_more(0, 100, "steady state through PgBouncer", &f)
        .await;
    let acked = w.finish().await;
    let acked_b = wb.finish().await;
    assert_all_present(&f, "t60", &acked).await;
    assert_all_present(&f, "t60_bouncer", &acked_b).await;

    // The leader's /metrics tells what Prometheus alerts on: nodes by state and
    // how long ago each keeper was heard.
    let leader = f.c.monitors.wait_leader(SETTLE).await;
    let addr: std::net::SocketAddr = f.c.monitors.members[&leader].metrics.parse().unwrap();
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
    let mut f = Fronted::start().await;
    let old = f.c.primary().await;
    f.wait_rw_on(&old).await;
    create_table(f.haproxy()).await;
    let w = Writer::start(f.haproxy().ports.rw, "t60");
    let bouncer = Pgbouncer::start(f.c.dir.path(), f.haproxy().ports.rw);
    let wb = Writer::start(bouncer.port, "t60_bouncer");
    w.wait_more(0, 50, "before the switchover", &f).await;
    wb.wait_more(0, 50, "before the switchover, through PgBouncer", &f)
        .await;

    // Planned switchover through the operator's command.
    // The monitor refuses while any node is still in a transition (it may start one,
    // such as apply_settings, right after the cluster looked settled): retry those.
    let deadline = tokio::time::Instant::now() + SETTLE;
    let out = loop {
        let (ok, out) = f.c.cli(&["perform", "switchover", "--timeout", "90"]);
        if ok {
            break out;
        }
        assert!(
            out.contains("not allowed now") && tokio::time::Instant::now() < deadline,
            "perform switchover failed: {out}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("perform switchover: {out}");
    let new = f.c.primary().await;
    assert_ne!(new, old, "the switchover kept the same primary");
    let (n, nb) = (w.count(), wb.count());
    w.wait_more(n, 50, "after the switchover", &f).await;
    wb.wait_more(nb, 50, "after the switchover, through PgBouncer", &f)
        .await;
    let (port, _) = server_port(f.haproxy(), true).await;
    assert_eq!(port, f.pg_port(&new));
    f.c.wait_healthy(2).await;

    // The primary's keeper and postmaster die at once (SIGKILL by the PIDs we know).
    f.c.kill_node(&new).await;
    let (n, nb) = (w.count(), wb.count());
    let ns =
        f.c.wait_state("a new primary after the kill", |ns| {
            pgquorum_tests::cluster::primary_of(ns).is_some_and(|p| p != new)
        })
        .await;
    let third = pgquorum_tests::cluster::primary_of(&ns).unwrap();
    w.wait_more(n, 50, "after the primary was killed", &f).await;
    wb.wait_more(
        nb,
        50,
        "after the primary was killed, through PgBouncer",
        &f,
    )
    .await;
    let (port, _) = server_port(f.haproxy(), true).await;
    assert_eq!(port, f.pg_port(&third));

    let acked = w.finish().await;
    let acked_b = wb.finish().await;
    assert_all_present(&f, "t60", &acked).await;
    assert_all_present(&f, "t60_bouncer", &acked_b).await;
    drop(bouncer);
    f.haproxy = None;
}
