//! A randomized fault campaign against one cluster in network namespaces (3 monitor
//! members and 3 nodes, each on its own host): partitions, vanished hosts, flapping
//! links and paused keepers, one after the other, each healed before the next, with a
//! client committing numbered rows through the multi-host address and a probe writing
//! directly to every node (`synchronous_commit = local`).
//!
//!   cargo build -p pgquorum && cargo build -p pgquorum-tests --bin fault-bench
//!   target/debug/fault-bench --campaign 12 --seed 1 [--write-doc docs/benchmarks.md]
//!   target/debug/fault-bench --kind primary-and-leader-cut --secs 20   (replay one)
//!   target/debug/fault-bench --kind standby-isolated --campaign 12   (one kind, 12 times)
//!
//! Per fault kind it reports: faults run, write unavailability p50/p99 (from the fault to
//! the first commit after the first failed one), the longest two-writer overlap, commits
//! acknowledged without a synchronous standby, and faults that did not heal; at the end,
//! acknowledged rows and rows missing on the final primary. Needs root (`ip netns`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use pgquorum_testkit::netns::{skip_without_netns, Paused};
use pgquorum_tests::bench_doc::{cores, load_average};
use pgquorum_tests::cluster::{client_settings, healthy, primary_of, Writer};
use pgquorum_tests::netcluster::NetCluster;
use pgquorum_tests::oracle::{longest_overlap, Attempt, Probe};

const KINDS: [&str; 9] = [
    "pause-primary-keeper",
    "freeze-primary-postgres",
    "primary-host-vanishes",
    "primary-cut-from-monitors",
    "primary-and-leader-cut",
    "primary-with-standby-minority",
    "standby-isolated",
    "leader-isolated",
    "primary-link-flap",
];

/// A heal slower than this prints the cluster's logs (issue 13 asks for a heal within a
/// few seconds of the fault's end in every scenario).
const SLOW_HEAL: Duration = Duration::from_secs(10);

fn usage() -> String {
    format!(
        "usage: fault-bench [--campaign N] [--seed S] [--kind KIND [--secs N]] \
         [--write-doc docs/benchmarks.md]\n\
         Runs N faults drawn from seed S (or one fault of KIND lasting N s: the replay line \
         a failed campaign prints; with --campaign, N faults of KIND) against 3 monitor members and 3 nodes in network \
         namespaces, with a client and a probe writing throughout. Needs root.\n\
         Kinds: {}",
        KINDS.join(", ")
    )
}

/// The value of a flag, or exit 2 with the usage.
fn parsed<T: std::str::FromStr>(flag: &str, v: &str) -> T {
    v.parse().unwrap_or_else(|_| {
        eprintln!("fault-bench: {flag} needs a number, not {v:?}\n{}", usage());
        std::process::exit(2)
    })
}

/// splitmix64: a seeded sequence, so a campaign is repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[derive(Default)]
struct Stats {
    runs: u32,
    unavailable_ms: Vec<f64>,
    overlap_ms: u128,
    unprotected: usize,
    not_healed: u32,
    heal_ms: Vec<f64>,
    /// From the fault to the first probe write another node than the old primary
    /// accepted (faults that moved the primary only): the server side of the
    /// unavailability, without the client's timeouts.
    promoted_ms: Vec<f64>,
}

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() as f64 - 1.0)).round() as usize;
    Some(s[i.min(s.len() - 1)])
}

fn ms(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into())
}

/// Runs fault `kind` for `secs` and heals it.
async fn inject(nc: &NetCluster, kind: &str, secs: u64, rng: &mut Rng) {
    let d = Duration::from_secs(secs);
    let primary = nc.c.primary().await;
    let leader = nc.c.monitors.wait_leader(Duration::from_secs(30)).await;
    let leader_host = NetCluster::member_host(leader);
    let standbys = nc.c.others(&primary);
    let all: Vec<String> = nc.net.hosts.iter().map(|h| h.name.clone()).collect();
    let rest = |minority: &[&str]| -> Vec<String> {
        all.iter()
            .filter(|h| !minority.contains(&h.as_str()))
            .cloned()
            .collect()
    };
    let cut = |minority: &[&str]| {
        let r = rest(minority);
        let r: Vec<&str> = r.iter().map(String::as_str).collect();
        nc.net.partition(minority, &r).unwrap();
    };
    match kind {
        "pause-primary-keeper" => {
            let pid = nc.c.node(&primary).keeper.as_ref().unwrap().pid().unwrap();
            let p = Paused::new(pid).unwrap();
            tokio::time::sleep(d).await;
            drop(p);
        }
        "freeze-primary-postgres" => {
            // The postmaster and every backend stopped; the keeper runs on.
            // Backends are not in the postmaster's process group (each calls setsid):
            // the postmaster and its children, found by parent pid.
            let mut paused = Vec::new();
            if let Some(pm) = nc.c.node(&primary).spec.postmaster_pid() {
                paused.push(Paused::new(pm as u32).unwrap());
                for child in children_of(pm) {
                    if let Ok(p) = Paused::new(child) {
                        paused.push(p);
                    }
                }
            }
            tokio::time::sleep(d).await;
            drop(paused);
        }
        "primary-host-vanishes" => {
            nc.net.set_link(&primary, false).unwrap();
            tokio::time::sleep(d).await;
            nc.net.set_link(&primary, true).unwrap();
        }
        "primary-cut-from-monitors" => {
            nc.net.partition(&[&primary], &["m1", "m2", "m3"]).unwrap();
            tokio::time::sleep(d).await;
        }
        "primary-and-leader-cut" => {
            cut(&[&primary, &leader_host]);
            tokio::time::sleep(d).await;
        }
        "primary-with-standby-minority" => {
            let s = &standbys[rng.below(standbys.len() as u64) as usize];
            cut(&[&primary, s]);
            tokio::time::sleep(d).await;
        }
        "standby-isolated" => {
            let s = &standbys[rng.below(standbys.len() as u64) as usize];
            nc.net.isolate(s).unwrap();
            tokio::time::sleep(d).await;
        }
        "leader-isolated" => {
            nc.net.isolate(&leader_host).unwrap();
            tokio::time::sleep(d).await;
        }
        "primary-link-flap" => {
            nc.net
                .flap(
                    &primary,
                    secs.div_ceil(2) as u32,
                    Duration::from_millis(1000),
                    Duration::from_millis(1000),
                )
                .await
                .unwrap();
        }
        other => panic!("unknown fault kind {other}; known: {KINDS:?}"),
    }
    nc.net.heal_all().unwrap();
}

/// The pids whose parent is `pid`.
fn children_of(pid: i32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|st| {
                    st.rsplit_once(") ")
                        .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<i32>().ok())
                })
                == Some(pid)
        })
        .collect()
}

/// Only the probe writes sent in [from, to].
fn window(
    seen: &BTreeMap<String, Vec<Attempt>>,
    from: Instant,
    to: Instant,
) -> BTreeMap<String, Vec<Attempt>> {
    seen.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                v.iter()
                    .filter(|a| a.sent >= from && a.sent <= to)
                    .copied()
                    .collect::<Vec<_>>(),
            )
        })
        .filter(|(_, v)| !v.is_empty())
        .collect()
}

async fn wait_healthy(nc: &NetCluster, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if let Some(ns) = nc.c.state().await {
            if healthy(&ns, nc.c.nodes.len() - 1) {
                return true;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut campaign: Option<u32> = None;
    let mut seed = 1u64;
    let mut only: Option<String> = None;
    let mut secs: Option<u64> = None;
    let mut doc: Option<String> = None;
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--campaign" => campaign = Some(parsed("--campaign", &v)),
            "--seed" => seed = parsed("--seed", &v),
            "--kind" => only = Some(v),
            "--secs" => secs = Some(parsed("--secs", &v)),
            "--write-doc" => doc = Some(v),
            "--help" | "-h" => {
                println!("{}", usage());
                return;
            }
            other => {
                eprintln!("fault-bench: unknown argument {other}\n{}", usage());
                std::process::exit(2);
            }
        }
        i += 2;
    }
    if let Some(k) = &only {
        if !KINDS.contains(&k.as_str()) {
            eprintln!("fault-bench: unknown kind {k}\n{}", usage());
            std::process::exit(2);
        }
    }
    // One fault of a kind is the replay line; `--kind K --campaign N` repeats it N times
    // (to catch a rare outcome of one fault with its logs kept).
    let campaign = campaign.unwrap_or(if only.is_some() { 1 } else { 10 });
    if skip_without_netns("fault-bench") {
        std::process::exit(2);
    }
    let nc = NetCluster::start(3).await;
    let w = Writer::start_checked(nc.c.hosts());
    w.wait_progress(50, "before the campaign").await;
    let probe = Probe::start(nc.probe_targets());
    let mut rng = Rng(seed);
    let mut stats: BTreeMap<String, Stats> = BTreeMap::new();
    let mut failures: Vec<String> = Vec::new();
    let started = Instant::now();
    for n in 0..campaign {
        let kind = only
            .clone()
            .unwrap_or_else(|| KINDS[rng.below(KINDS.len() as u64) as usize].to_string());
        let d = secs.unwrap_or(3 + rng.below(13));
        let replay = format!("fault-bench --kind {kind} --secs {d}");
        let before = nc.c.primary().await;
        let t0 = Instant::now();
        inject(&nc, &kind, d, &mut rng).await;
        let healed_at = Instant::now();
        let ok = wait_healthy(&nc, Duration::from_secs(90)).await;
        let heal = healed_at.elapsed();
        // The writer must commit again before the next fault.
        let progressed = {
            let before = w.acked_count();
            let deadline = Instant::now() + Duration::from_secs(30);
            while w.acked_count() < before + 20 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            w.acked_count() >= before + 20
        };
        let end = Instant::now();
        let unavailable = match w.first_error_after(t0).filter(|e| *e < end) {
            None => Duration::ZERO,
            Some(e) => w.first_ack_after(e).map(|a| a - t0).unwrap_or(end - t0),
        };
        let seen = window(&probe.attempts(), t0 - Duration::from_secs(2), end);
        let (overlap, why) = longest_overlap(&seen);
        let unprotected = w
            .unprotected()
            .iter()
            .filter(|(at, u)| *u && *at >= t0 && *at <= end)
            .count();
        let promoted = probe
            .accepted()
            .iter()
            .filter(|(node, _)| **node != before)
            .filter_map(|(_, v)| v.iter().find(|a| a.sent > t0 && a.sent < end))
            .map(|a| a.acked - t0)
            .min();
        let s = stats.entry(kind.clone()).or_default();
        s.runs += 1;
        if let Some(p) = promoted {
            s.promoted_ms.push(p.as_secs_f64() * 1000.0);
        }
        s.unavailable_ms.push(unavailable.as_secs_f64() * 1000.0);
        s.overlap_ms = s.overlap_ms.max(overlap.as_millis());
        s.unprotected += unprotected;
        if ok {
            s.heal_ms.push(heal.as_secs_f64() * 1000.0);
        } else {
            s.not_healed += 1;
        }
        let line = format!(
            "fault {n}: {kind} {d} s: unavailable {} ms{}, overlap {} ms, {unprotected} unprotected, {}",
            unavailable.as_millis(),
            promoted
                .map(|p| format!(" (another node took writes at {} ms)", p.as_millis()))
                .unwrap_or_default(),
            overlap.as_millis(),
            if ok {
                format!("healed in {} ms", heal.as_millis())
            } else {
                "NOT HEALED".into()
            }
        );
        eprintln!("{line}");
        if std::env::var_os("FAULT_BENCH_CLIENT_ERRORS").is_some() {
            for (at, e) in w.errors_after(t0).iter().filter(|(at, _)| *at < end) {
                eprintln!("  client error at {} ms: {e}", (*at - t0).as_millis());
            }
        }
        if ok && heal > SLOW_HEAL {
            // Rare and load-dependent (once in CI, not in a replay): the logs of the
            // moment are the only way to learn why, so print them where CI keeps them.
            eprintln!(
                "slow heal ({} ms): the last log lines\n{}",
                heal.as_millis(),
                nc.c.logs()
            );
        }
        if !overlap.is_zero() || unprotected > 0 || !ok || !progressed {
            failures.push(format!("{line} ({why}); replay: {replay}"));
        }
        if !ok || !progressed {
            eprintln!(
                "the cluster did not heal: campaign stopped\n{}",
                nc.c.logs()
            );
            break;
        }
    }
    // Counted once the cluster has settled: a primary between two states is not one.
    let settled = wait_healthy(&nc, Duration::from_secs(60)).await;
    let acked = w.stop().await;
    let _ = probe.stop().await;
    let final_primary =
        nc.c.state()
            .await
            .and_then(|ns| primary_of(&ns))
            .unwrap_or_default();
    let spec =
        nc.c.nodes
            .iter()
            .find(|n| n.spec.name == final_primary)
            .map(|n| n.spec.clone());
    let conn = match &spec {
        Some(s) => s.connect().await.ok(),
        None => None,
    };
    let have: BTreeSet<i64> = match conn {
        Some(c) => c
            .query("SELECT n FROM acked", &[])
            .await
            .map(|rows| rows.iter().map(|r| r.get::<_, i64>(0)).collect())
            .unwrap_or_default(),
        None => BTreeSet::new(),
    };
    let lost = acked.difference(&have).count();
    if !settled || spec.is_none() {
        failures.push("no healthy cluster at the end: rows not counted".into());
    }
    let total: u32 = stats.values().map(|s| s.runs).sum();
    let mut table = String::from(
        "| fault | runs | unavailable p50 ms | p99 ms | another node writable p50 ms (runs) | longest overlap ms | unprotected acks | heal p50 ms | not healed |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for (k, s) in &stats {
        table.push_str(&format!(
            "| {k} | {} | {} | {} | {} ({}) | {} | {} | {} | {} |\n",
            s.runs,
            ms(percentile(&s.unavailable_ms, 50.0)),
            ms(percentile(&s.unavailable_ms, 99.0)),
            ms(percentile(&s.promoted_ms, 50.0)),
            s.promoted_ms.len(),
            s.overlap_ms,
            s.unprotected,
            ms(percentile(&s.heal_ms, 50.0)),
            s.not_healed
        ));
    }
    let summary = format!(
        "{total} faults in {} s (seed {seed}); {} rows acknowledged, {lost} missing on the final primary ({final_primary}).",
        started.elapsed().as_secs(),
        acked.len()
    );
    println!("{table}\n{summary}");
    for f in &failures {
        println!("FAILED: {f}");
    }
    if let Some(p) = doc {
        let build = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        let mut section = format!(
            "## Fault campaign\n\n\
             Each fault lasts 3-15 s (drawn from the seed) and is healed before the next; \
             3 monitor members and 3 nodes, each in its own network namespace on one bridge, \
             default settings, {build} build, {} cores, load {}. Unavailability runs from the \
             fault to the first commit after the first failed one (0 when no commit failed), as the \
             client sees it (multi-host address, {}); \
             \"another node writable\" is when the probe's first direct write to a node other than \
             the old primary was acknowledged (faults that moved the primary), without the \
             client's timeouts; overlap is how long two nodes were both surely taking \
             `synchronous_commit = local` writes (oracle in tests/src/oracle.rs).\n\n{table}\n{summary}\n",
            cores(),
            load_average(),
            client_settings()
        );
        for f in &failures {
            section.push_str(&format!("\n* failed: {f}"));
        }
        section.push_str(&format!(
            "\n\nMeasured by `target/{build}/fault-bench --campaign {campaign} --seed {seed} --write-doc docs/benchmarks.md`.\n"
        ));
        pgquorum_tests::bench_doc::write_section(&p, "## Fault campaign", &section)
            .expect("writing the benchmark document");
    }
    if !failures.is_empty() || lost > 0 {
        // exit() runs no destructors: stop every process and remove the namespaces and
        // directories first.
        drop(nc);
        std::process::exit(1);
    }
}
