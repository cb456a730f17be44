//! Monitor group benchmark: a real 3-member group of `pgquorum` processes on loopback.
//!
//! (a) SIGKILL of the leader -> first write committed by a new leader (N runs).
//! (b) committed writes/s and p50/p99 latency with 1, 16 and 64 concurrent clients.
//!
//! Build and run (release):
//!   cargo build --release -p pgquorum -p pgquorum-tests --bin monitor-bench
//!   target/release/monitor-bench --runs 12 --seconds 10 --write-doc docs/benchmarks.md
//! The `pgquorum` binary is taken from next to this one (or $PGQUORUM_BIN).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgquorum_api::client::MonitorClient;
use pgquorum_tests::bench_doc::{cores, load_average_1m};
use pgquorum_tests::monitor_group::{create_formation, drop_formation, MonitorGroup};

const WAIT: Duration = Duration::from_secs(60);

struct Args {
    runs: usize,
    seconds: u64,
    clients: Vec<usize>,
    write_doc: Option<String>,
    /// Extra `monitor run` arguments (e.g. "--snapshot-threshold 20000").
    member_args: Vec<String>,
    /// A second throughput table with these `monitor run` arguments.
    also_member_args: Vec<String>,
    /// Only measure the cost of TLS: leader failover and steady writes, with mutual TLS
    /// and with --insecure, side by side (its own section of the document).
    tls_compare: bool,
}

fn args() -> Args {
    let mut a = Args {
        runs: 12,
        seconds: 10,
        clients: vec![1, 16, 64],
        write_doc: None,
        member_args: Vec::new(),
        also_member_args: Vec::new(),
        tls_compare: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--runs" => a.runs = v.parse().expect("--runs N"),
            "--seconds" => a.seconds = v.parse().expect("--seconds N"),
            "--clients" => {
                a.clients = v
                    .split(',')
                    .map(|c| c.parse().expect("--clients 1,16,64"))
                    .collect()
            }
            "--write-doc" => a.write_doc = Some(v),
            "--tls-compare" => a.tls_compare = v == "1" || v == "true",
            "--member-args" => a.member_args = v.split_whitespace().map(str::to_owned).collect(),
            "--also-member-args" => {
                a.also_member_args = v.split_whitespace().map(str::to_owned).collect()
            }
            _ => panic!(
                "unknown argument {k}; use --runs N --seconds N --clients 1,16,64 --write-doc FILE"
            ),
        }
    }
    a
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn failover_runs(runs: usize, member_args: &[String], tls: bool) -> Vec<Duration> {
    let mut g = MonitorGroup::with_tls(3, tls);
    g.extra_args = member_args.to_vec();
    for id in [1, 2, 3] {
        g.start(id);
    }
    let mut out = Vec::new();
    for run in 0..runs {
        let leader = g.wait_leader(WAIT).await;
        let others: Vec<String> = [1, 2, 3]
            .into_iter()
            .filter(|i| *i != leader)
            .map(|i| g.addr(i))
            .collect();
        let c = MonitorClient::new(others, g.admin())
            .unwrap()
            .retry_for(Duration::ZERO)
            .request_timeout(Duration::from_secs(5));
        // Warm the connections so that the figure is failover, not TCP setup.
        create_formation(&c, &format!("warm-{run}")).await.unwrap();
        let started = Instant::now();
        g.kill(leader);
        let mut i = 0;
        loop {
            i += 1;
            if create_formation(&c, &format!("fo-{run}-{i}")).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        eprintln!(
            "failover run {run}: leader {leader} killed, first write committed after {} ms",
            ms(took)
        );
        out.push(took);
        g.start(leader);
        // Let the restarted member catch up before the next kill.
        let all: std::collections::BTreeSet<String> = [format!("fo-{run}-{i}")].into();
        g.wait_applied(leader, &all, WAIT).await;
    }
    out
}

struct Load {
    clients: usize,
    writes: u64,
    per_sec: f64,
    p50: Duration,
    p99: Duration,
    errors: u64,
}

/// What each benchmark write does.
#[derive(Clone, Copy, PartialEq)]
enum Workload {
    /// Every write creates a new formation: the state grows without bound.
    Grow,
    /// Each client creates its own formation, then drops it, and again: the state stays
    /// as small as a real cluster's.
    Steady,
}

async fn load(g: &MonitorGroup, clients: usize, seconds: u64, tag: &str, work: Workload) -> Load {
    let leader = g.wait_leader(WAIT).await;
    let addr = g.addr(leader);
    let errors = Arc::new(AtomicU64::new(0));
    let stop_at = Instant::now() + Duration::from_secs(seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let c = MonitorClient::new([addr.clone()], g.admin()).unwrap();
        let errors = errors.clone();
        let tag = tag.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < stop_at {
                let t = Instant::now();
                let r = match work {
                    Workload::Grow => create_formation(&c, &format!("{tag}-{w}-{i}")).await,
                    Workload::Steady if i.is_multiple_of(2) => {
                        create_formation(&c, &format!("{tag}-{w}")).await
                    }
                    Workload::Steady => drop_formation(&c, &format!("{tag}-{w}")).await,
                };
                match r {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                i += 1;
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    all.sort();
    Load {
        clients,
        writes: all.len() as u64,
        per_sec: all.len() as f64 / elapsed.as_secs_f64(),
        p50: pct(&all, 0.50),
        p99: pct(&all, 0.99),
        errors: errors.load(Ordering::Relaxed),
    }
}

async fn load_table(a: &Args, member_args: &[String], work: Workload, tls: bool) -> Vec<Load> {
    let mut g = MonitorGroup::with_tls(3, tls);
    g.extra_args = member_args.to_vec();
    for id in [1, 2, 3] {
        g.start(id);
    }
    g.wait_leader(WAIT).await;
    let mut loads = Vec::new();
    for c in &a.clients {
        let l = load(&g, *c, a.seconds, &format!("c{c}"), work).await;
        eprintln!(
            "[{}] {} clients: {} writes, {:.0} writes/s, p50 {} ms, p99 {} ms, {} errors",
            member_args.join(" "),
            l.clients,
            l.writes,
            l.per_sec,
            ms(l.p50),
            ms(l.p99),
            l.errors
        );
        loads.push(l);
    }
    loads
}

fn table(loads: &[Load]) -> String {
    let mut s = String::from(
        "| concurrent clients | writes/s | p50 latency | p99 latency | errors |\n|---|---|---|---|---|\n",
    );
    for l in loads {
        s.push_str(&format!(
            "| {} | {:.0} | {} ms | {} ms | {} |\n",
            l.clients,
            l.per_sec,
            ms(l.p50),
            ms(l.p99),
            l.errors
        ));
    }
    s
}

/// Leader failover and steady writes with mutual TLS and with --insecure, in one run.
async fn tls_compare(a: &Args) {
    let load_before = load_average_1m();
    let mut rows = String::from(
        "| security | leader kill → first write, median (runs) | writes/s at 16 clients | p50 | p99 |\n|---|---|---|---|---|\n",
    );
    let mut medians = Vec::new();
    let mut rates = Vec::new();
    let mut p99s = Vec::new();
    for tls in [true, false] {
        let mut fo = failover_runs(a.runs, &a.member_args, tls).await;
        fo.sort();
        let one = Args {
            runs: a.runs,
            seconds: a.seconds,
            clients: vec![16],
            write_doc: None,
            member_args: a.member_args.clone(),
            also_member_args: Vec::new(),
            tls_compare: true,
        };
        let loads = load_table(&one, &a.member_args, Workload::Steady, tls).await;
        let l = &loads[0];
        rows.push_str(&format!(
            "| {} | {} ms ({}) | {:.0} | {} ms | {} ms |\n",
            if tls { "mutual TLS" } else { "--insecure" },
            ms(pct(&fo, 0.5)),
            fo.len(),
            l.per_sec,
            ms(l.p50),
            ms(l.p99)
        ));
        medians.push(pct(&fo, 0.5).as_secs_f64());
        rates.push(l.per_sec);
        p99s.push(l.p99.as_secs_f64());
    }
    let s = format!(
        "## Cost of TLS (monitor group)\n\n\
         Measured by `target/release/monitor-bench --tls-compare 1 --runs {} --seconds {} --write-doc docs/benchmarks.md`: \
         the same group and workloads as above (steady workload: each client creates and drops its own formation), \
         once with mutual TLS 1.3 on every channel (members, clients) and once with `--insecure`, in one run on \
         {} cores shared with other work; load average before / after: {load_before} / {}.\n\n{rows}\n\
         Ratios TLS / insecure in this run: leader failover {:.2}, writes/s {:.2}, p99 {:.2}.\n\n",
        a.runs,
        a.seconds,
        cores(),
        load_average_1m(),
        medians[0] / medians[1].max(1e-9),
        rates[0] / rates[1].max(1e-9),
        p99s[0] / p99s[1].max(1e-9),
    );
    println!("{s}");
    if let Some(p) = &a.write_doc {
        pgquorum_tests::bench_doc::write_section(p, "## Cost of TLS (monitor group)", &s)
            .expect("write the benchmarks document");
    }
}

#[tokio::main]
async fn main() {
    let a = args();
    let load_before = load_average_1m();
    eprintln!(
        "pgquorum binary: {}",
        pgquorum_testkit::pgquorum_bin().display()
    );

    if a.tls_compare {
        tls_compare(&a).await;
        return;
    }
    let mut fo = failover_runs(a.runs, &a.member_args, true).await;
    fo.sort();
    let median = pct(&fo, 0.5);

    let loads = load_table(&a, &a.member_args, Workload::Grow, true).await;
    let also = if a.also_member_args.is_empty() {
        None
    } else {
        Some(load_table(&a, &a.also_member_args, Workload::Grow, true).await)
    };
    let steady = load_table(&a, &a.member_args, Workload::Steady, true).await;
    let load_after = load_average_1m();

    let cores = cores();
    let mut s = String::new();
    s.push_str("## Monitor group\n\n");
    s.push_str(&format!(
        "Measured by `target/release/monitor-bench --runs {} --seconds {}{} --write-doc docs/benchmarks.md` \
         (after `cargo build --release -p pgquorum -p pgquorum-tests --bin monitor-bench`): \
         a real group of 3 `pgquorum monitor run` processes on loopback, release build, {cores} cores \
         shared with other work, default settings (Raft heartbeat 75 ms, election timeout 225-450 ms, \
         snapshot every 5,000 entries). A write is a `CreateFormation` with a new name, \
         acknowledged after it is committed by a majority (flushed to disk on each) and applied. \
         Load average (1 min) of the machine before / after the run: {load_before} / {load_after}.\n\n",
        a.runs,
        a.seconds,
        if a.also_member_args.is_empty() {
            String::new()
        } else {
            format!(" --also-member-args \"{}\"", a.also_member_args.join(" "))
        }
    ));
    s.push_str(&format!(
        "### Leader SIGKILL to the first write committed by the new leader ({} runs)\n\n\
         | median | min | max |\n|---|---|---|\n| {} ms | {} ms | {} ms |\n\n\
         The client writes to the two surviving members in a loop from the moment of the kill \
         (connections warmed beforehand). Target: median at most 1 s.\n\n",
        fo.len(),
        ms(median),
        ms(fo[0]),
        ms(fo[fo.len() - 1])
    ));
    s.push_str(&format!(
        "### Committed writes per second ({} s per row, clients write to the leader)\n\n{}",
        a.seconds,
        table(&loads)
    ));
    if let Some(also) = &also {
        s.push_str(&format!(
            "\nThe same with `monitor run {}`:\n\n{}",
            a.also_member_args.join(" "),
            table(also)
        ));
    }
    s.push_str(&format!(
        "\nThe same at default settings with a state that stays small: each client creates its own \
         formation, then drops it, and again (every write is still a committed, flushed Raft entry):\n\n{}",
        table(&steady)
    ));
    s.push_str(
        "\nTarget: at least 3,000 writes/s at 64 clients with p99 at most 30 ms. Writes are batched: \
         openraft hands the log store every entry that queued while the previous flush ran, and one \
         sled flush covers them all. Every write of this benchmark adds a formation, so the state \
         grows without bound (tens of thousands of formations by the last row) and each snapshot \
         (clone, serialise, store, flush several MB) costs tail latency; a real cluster state (a \
         few formations and nodes, a bounded event history) snapshots in well under a millisecond. \
         The second and third tables separate the two costs.\n\n",
    );
    println!("{s}");
    if let Some(p) = a.write_doc {
        pgquorum_tests::bench_doc::write_section(&p, "## Monitor group", &s)
            .expect("write the benchmarks document");
        eprintln!("written to {p}");
    }
}
