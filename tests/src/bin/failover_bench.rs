//! Write unavailability seen by a client, end to end: from a fault (node loss,
//! postmaster crash, planned switchover) to the client's first acknowledged commit
//! through the multi-host read-write address; and acknowledged rows lost (must be 0).
//!
//! Build and run (release):
//!   cargo build --release -p pgquorum && cargo build --release -p pgquorum-tests --bin failover-bench
//!   target/release/failover-bench --runs 5 --write-doc docs/benchmarks.md

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use pgquorum_tests::bench_doc::{cores, summary};
use pgquorum_tests::cluster::{client_settings, Cluster, Writer};

#[derive(Clone, Copy, Debug)]
enum Scenario {
    NodeLoss,
    PostmasterCrash,
    Switchover,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::NodeLoss => "node-loss",
            Scenario::PostmasterCrash => "postmaster-crash",
            Scenario::Switchover => "switchover",
        }
    }
    fn label(self) -> &'static str {
        match self {
            Scenario::NodeLoss => "node loss (keeper + postgres SIGKILL)",
            Scenario::PostmasterCrash => "postmaster crash (SIGKILL)",
            Scenario::Switchover => "planned switchover",
        }
    }
    fn target(self) -> f64 {
        match self {
            Scenario::NodeLoss => 3.0,
            Scenario::PostmasterCrash => 1.5,
            Scenario::Switchover => 1.0,
        }
    }
}

struct Figures {
    gaps: Vec<f64>,
    lost: usize,
    acked: usize,
}

/// The writer's unavailability after a fault at `t0`; a run that never recovers stops
/// the benchmark with what the monitor saw.
async fn gap(c: &Cluster, w: &Writer, t0: Instant) -> f64 {
    match w.unavailability(t0, Duration::from_secs(60)).await {
        Some(g) => g.as_secs_f64(),
        None => {
            let st = c.state().await.unwrap_or_default();
            let (_, events) = c.cli(&["show", "events", "--limit", "40"]);
            let (_, state) = c.cli(&["show", "state"]);
            panic!(
                "the writer never recovered; state: {}\n{state}\n{events}",
                pgquorum_tests::cluster::describe(&st),
            );
        }
    }
}

async fn missing_on_primary(c: &Cluster, acked: &BTreeSet<i64>) -> usize {
    let p = c.primary().await;
    let client = c
        .node(&p)
        .spec
        .connect()
        .await
        .expect("connect to the primary");
    let have: BTreeSet<i64> = client
        .query("SELECT n FROM acked", &[])
        .await
        .expect("read rows")
        .iter()
        .map(|r| r.get(0))
        .collect();
    acked.difference(&have).count()
}

async fn run(s: Scenario, runs: usize, tls: bool) -> Figures {
    let mut c = Cluster::start_tls(3, tls).await;
    let w = c.writer();
    w.wait_progress(100, "warm-up").await;
    let mut gaps = Vec::new();
    for i in 0..runs {
        let primary = c.primary().await;
        let t0 = Instant::now();
        match s {
            Scenario::NodeLoss => c.kill_node(&primary).await,
            Scenario::PostmasterCrash => {
                c.kill_postmaster(&primary);
            }
            Scenario::Switchover => {
                c.request_switchover().await.expect("switchover accepted");
            }
        }
        let g = gap(&c, &w, t0).await;
        eprintln!("{}: run {}: {g:.3} s", s.label(), i + 1);
        gaps.push(g);
        if matches!(s, Scenario::NodeLoss) {
            c.start_keeper(&primary);
        }
        c.wait_healthy(2).await;
        w.wait_progress(50, "between runs").await;
    }
    let acked = w.stop().await;
    let lost = missing_on_primary(&c, &acked).await;
    Figures {
        gaps,
        lost,
        acked: acked.len(),
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut runs = 5;
    let mut doc = None;
    // Which security to measure: tls (the default a user gets), insecure, or both side
    // by side (the TLS cost as a ratio measured in one run).
    let mut security = "both".to_string();
    let mut only: Option<String> = None;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--runs" => {
                runs = args[i + 1].parse().expect("--runs N");
                i += 1;
            }
            "--write-doc" => {
                doc = Some(args[i + 1].clone());
                i += 1;
            }
            "--security" => {
                security = args[i + 1].clone();
                i += 1;
            }
            // One scenario only (node-loss, postmaster-crash, switchover).
            "--scenario" => {
                only = Some(args[i + 1].clone());
                i += 1;
            }
            "--help" | "-h" => {
                println!(
                    "failover-bench [--runs N] [--security tls|insecure|both] \
                     [--scenario node-loss|postmaster-crash|switchover] [--write-doc FILE]"
                );
                return;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 1;
    }
    eprintln!(
        "pgquorum binary: {}",
        pgquorum_testkit::pgquorum_bin().display()
    );
    let modes: Vec<bool> = match security.as_str() {
        "tls" => vec![true],
        "insecure" => vec![false],
        "both" => vec![true, false],
        other => panic!("--security tls|insecure|both, not {other}"),
    };
    let mut table = String::from(
        "| scenario | security | runs | median (s) | min (s) | max (s) | target (s) | acknowledged rows | lost |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    let mut ratios = String::new();
    let scenarios: Vec<Scenario> = [
        Scenario::NodeLoss,
        Scenario::PostmasterCrash,
        Scenario::Switchover,
    ]
    .into_iter()
    .filter(|s| only.as_deref().is_none_or(|o| o == s.name()))
    .collect();
    assert!(
        !scenarios.is_empty(),
        "--scenario node-loss|postmaster-crash|switchover"
    );
    if only.is_some() && doc.is_some() {
        panic!("--write-doc records every scenario: run without --scenario");
    }
    for s in scenarios {
        let mut medians = Vec::new();
        for tls in &modes {
            let f = run(s, runs, *tls).await;
            let (med, min, max) = summary(&f.gaps).expect("at least one run");
            medians.push(med);
            let line = format!(
                "| {} | {} | {} | {med:.2} | {min:.2} | {max:.2} | {:.1} | {} | {} |\n",
                s.label(),
                if *tls { "mutual TLS" } else { "--insecure" },
                f.gaps.len(),
                s.target(),
                f.acked,
                f.lost
            );
            eprint!("{line}");
            table.push_str(&line);
        }
        if let [t, i] = medians[..] {
            ratios.push_str(&format!(
                "* {}: TLS / insecure median = {:.2}\n",
                s.label(),
                t / i
            ));
        }
    }
    if !ratios.is_empty() {
        table.push_str(&format!("\nCost of TLS, as ratios within this run (target: at most 1.10 for node loss and switchover):\n\n{ratios}"));
    }
    let cores = cores();
    let client = client_settings();
    let section = format!(
        "## Failover (end to end)\n\n\
         Measured by `target/release/failover-bench --runs {runs} --security {security} --write-doc docs/benchmarks.md` \
         (after `cargo build --release -p pgquorum && cargo build --release -p pgquorum-tests --bin failover-bench`): \
         3 monitor members, 3 nodes (keeper + PostgreSQL 15) on loopback, default settings, \
         release build, {cores} cores shared with other work. A client commits numbered rows \
         one at a time through the multi-host address ({client}, reconnect at once on \
         error). Unavailability \
         is from the fault to the first acknowledged commit after the client's first \
         failure. Lost = acknowledged numbers missing on the final primary.\n\n{table}"
    );
    if let Some(p) = doc {
        pgquorum_tests::bench_doc::write_section(&p, "## Failover (end to end)", &section)
            .expect("write the benchmarks document");
    }
    println!("{section}");
}
