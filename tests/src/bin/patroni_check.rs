//! Drives Patroni + etcd (tests/src/peers/patroni.rs) through the side-by-side
//! benchmark's scenarios once each, at Patroni's defaults and at its fastest safe
//! settings, to show the harness works; prints per scenario the write gap seen by one
//! client, how long commits were acknowledged after a promotion while the new primary
//! had no synchronous standby, and acknowledged rows missing on the primary.
//!
//!   cargo build -p pgquorum-tests --bin patroni-check
//!   target/debug/patroni-check [--mode default|fast|both] [--runs N]

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgquorum_tests::cluster::Writer;
use pgquorum_tests::peers::patroni::Patroni;
use pgquorum_tests::peers::HaSystem;
use tokio_postgres::NoTls;

const SETTLE: Duration = Duration::from_secs(120);

#[derive(Clone, Copy)]
enum Scenario {
    NodeLoss,
    PostmasterCrash,
    Switchover,
}

impl Scenario {
    fn label(self) -> &'static str {
        match self {
            Scenario::NodeLoss => "node loss (patroni + postgres SIGKILL)",
            Scenario::PostmasterCrash => "postmaster crash (SIGKILL)",
            Scenario::Switchover => "planned switchover",
        }
    }
}

/// One look at one node: is it a primary, and do its commits wait for a synchronous
/// standby (synchronous_standby_names set: a commit is acknowledged only once it is on
/// a second node — with it empty, commits are acknowledged from one node alone).
struct Sample {
    at: Instant,
    node: String,
    primary: bool,
    sync: bool,
}

async fn connect(port: u16) -> Option<tokio_postgres::Client> {
    let mut cfg = tokio_postgres::Config::new();
    cfg.host("127.0.0.1")
        .port(port)
        .user("postgres")
        .dbname("postgres")
        .connect_timeout(Duration::from_millis(500));
    let (c, conn) = cfg.connect(NoTls).await.ok()?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Some(c)
}

/// Polls every node every 20 ms until stopped.
fn sample(
    nodes: Vec<(String, u16)>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<Vec<Sample>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        let mut clients: Vec<Option<tokio_postgres::Client>> = nodes.iter().map(|_| None).collect();
        while !*stop.borrow() {
            for (i, (name, port)) in nodes.iter().enumerate() {
                if clients[i].as_ref().is_none_or(|c| c.is_closed()) {
                    clients[i] = connect(*port).await;
                }
                let Some(c) = &clients[i] else { continue };
                let q = c.query_one(
                    "SELECT NOT pg_is_in_recovery(), \
                     current_setting('synchronous_standby_names') <> ''",
                    &[],
                );
                match tokio::time::timeout(Duration::from_millis(500), q).await {
                    Ok(Ok(row)) => out.push(Sample {
                        at: Instant::now(),
                        node: name.clone(),
                        primary: row.get(0),
                        sync: row.get(1),
                    }),
                    _ => clients[i] = None,
                }
            }
            let _ = tokio::time::timeout(Duration::from_millis(20), stop.changed()).await;
        }
        out
    })
}

async fn rows_on(port: u16) -> BTreeSet<i64> {
    let c = connect(port).await.expect("connect to the primary");
    c.query("SELECT n FROM acked", &[])
        .await
        .expect("read rows")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn lost(sys: &Patroni, acked: &BTreeSet<i64>) -> usize {
    let p = sys.primary(SETTLE).await;
    let have = rows_on(sys.pg_port(&p)).await;
    acked.difference(&have).count()
}

struct Outcome {
    gap: f64,
    unsynced: f64,
    lost: usize,
}

async fn run(sys: &mut Patroni, w: &Writer, s: Scenario) -> Outcome {
    let names: Vec<(String, u16)> = (1..=3)
        .map(|i| {
            let n = format!("node{i}");
            let p = sys.pg_port(&n);
            (n, p)
        })
        .collect();
    let old = sys.primary(SETTLE).await;
    let (c0, r0) = (w.acked_count(), Instant::now());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rate = (w.acked_count() - c0) as f64 / r0.elapsed().as_secs_f64();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let sampler = sample(names, stopped);
    let t0 = Instant::now();
    match s {
        Scenario::NodeLoss => sys.kill_node(&old).await,
        Scenario::PostmasterCrash => sys.kill_postmaster(&old),
        Scenario::Switchover => sys.switchover().await,
    }
    let deadline = Instant::now() + SETTLE;
    let (err, ack) = loop {
        if let Some(e) = w.first_error_after(t0) {
            if let Some(a) = w.first_ack_after(e) {
                break (e, a);
            }
        }
        if Instant::now() > deadline {
            panic!("the writer never recovered\n{}", sys.logs());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let gap = (ack - t0).as_secs_f64();
    if matches!(s, Scenario::NodeLoss) {
        sys.restart_node(&old).await;
    }
    sys.wait_healthy(SETTLE).await;
    w.wait_progress(50, "after the scenario").await;
    let _ = stop.send(true);
    let samples = sampler.await.expect("sampler");
    // The primary that took the writes after the failure: from its first look as a
    // primary after the writer's first error, until its first look with commits
    // waiting for a standby.
    let new = sys.primary(SETTLE).await;
    let as_primary: Vec<&Sample> = samples
        .iter()
        .filter(|x| x.node == new && x.primary && x.at > err)
        .collect();
    let synced = as_primary.iter().find(|x| x.sync).map(|x| x.at);
    let unsynced = match synced {
        Some(t) if t > ack => (t - ack).as_secs_f64(),
        Some(_) => 0.0,
        None => f64::NAN,
    };
    let acked = w.acked();
    let lost = lost(sys, &acked).await;
    eprintln!(
        "{}: {old} -> {new} (writer at {rate:.0} commits/s before): gap {gap:.3} s, acknowledged without a sync standby for {unsynced:.3} s, {lost} of {} acknowledged rows lost",
        s.label(),
        acked.len()
    );
    Outcome {
        gap,
        unsynced,
        lost,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut modes = vec![false, true];
    let mut runs = 1;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--mode" => {
                modes = match args[i + 1].as_str() {
                    "default" => vec![false],
                    "fast" => vec![true],
                    "both" => vec![false, true],
                    m => panic!("--mode default|fast|both, not {m}"),
                };
                i += 1;
            }
            "--runs" => {
                runs = args[i + 1].parse().expect("--runs N");
                i += 1;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    let mut table = String::from(
        "| settings | scenario | write gap (s) | acked w/o sync standby (s) | lost |\n|---|---|---|---|---|\n",
    );
    for fast in modes {
        let started = Instant::now();
        let mut sys = Patroni::start(fast).await;
        eprintln!(
            "{} started and healthy in {:.1} s\n{}",
            sys.system(),
            started.elapsed().as_secs_f64(),
            sys.settings()
        );
        let w = Writer::start(sys.hosts());
        w.wait_progress(100, "warm-up").await;
        for s in [
            Scenario::NodeLoss,
            Scenario::PostmasterCrash,
            Scenario::Switchover,
        ] {
            for _ in 0..runs {
                let o = run(&mut sys, &w, s).await;
                table.push_str(&format!(
                    "| {} | {} | {:.2} | {:.2} | {} |\n",
                    if fast { "fast" } else { "defaults" },
                    s.label(),
                    o.gap,
                    o.unsynced,
                    o.lost
                ));
            }
        }
        let acked = w.stop().await;
        let l = lost(&sys, &acked).await;
        eprintln!(
            "{}: {} rows acknowledged in all, {l} missing on the final primary",
            if fast { "fast" } else { "defaults" },
            acked.len()
        );
        println!("agent pids: {:?}", sys.agent_pids());
    }
    println!("{table}");
}
