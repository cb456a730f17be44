//! Side by side: pgquorum, pg_auto_failover 2.0 and Patroni + etcd, one after another in
//! one run, each with 3 PostgreSQL 15 nodes on loopback and synchronous replication, at
//! each system's default settings and at its fastest settings that are still safe.
//! Every system goes through the same [`bench`] function: the same client
//! ([`Writer::start_checked`]) and the same measurements:
//!
//! * write unavailability: from the fault to the first acknowledged commit after the
//!   client's first failure after the fault;
//! * acknowledged rows lost: acknowledged numbers missing on the final primary;
//! * seconds after a fault during which commits were acknowledged with no synchronous
//!   standby to wait for (a second failure then loses acknowledged data);
//! * the per-node agents' steady-state RSS/PSS and CPU with the client running.
//!
//! Build and run (release, as root: missing Debian packages are installed):
//!   cargo build --release -p pgquorum && cargo build --release -p pgquorum-tests --bin peer-bench
//!   target/release/peer-bench --runs 5 --write-doc docs/benchmarks.md

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::time::{Duration, Instant};

use pgquorum_tests::bench_doc::{cores, load_average, summary};
use pgquorum_tests::cluster::{client_settings, multi_host_config, Writer};
use pgquorum_tests::peers::pg_auto_failover::PgAutoFailover;
use pgquorum_tests::peers::pgquorum::Pgquorum;
use pgquorum_tests::peers::HaSystem;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scenario {
    NodeLoss,
    PostmasterCrash,
    Switchover,
}

impl Scenario {
    fn parse(s: &str) -> Scenario {
        match s {
            "node-loss" => Scenario::NodeLoss,
            "postmaster-crash" => Scenario::PostmasterCrash,
            "switchover" => Scenario::Switchover,
            other => panic!("unknown scenario {other} (node-loss, postmaster-crash, switchover)"),
        }
    }
    fn label(self) -> &'static str {
        match self {
            Scenario::NodeLoss => "node loss",
            Scenario::PostmasterCrash => "postmaster crash",
            Scenario::Switchover => "switchover",
        }
    }
}

/// How long one fault may keep the client from committing before the run counts as
/// failed (pg_auto_failover's defaults need about a minute for a node loss).
const RECOVERY: Duration = Duration::from_secs(240);
/// Steady state measured for the agents' CPU.
const IDLE: Duration = Duration::from_secs(20);

struct Row {
    system: String,
    settings: String,
    scenario: Scenario,
    gaps: Vec<f64>,
    /// Runs where the client did not commit again within [`RECOVERY`].
    failed: usize,
    lost: usize,
    acked: usize,
    /// Per run: seconds during which acknowledged commits had no synchronous standby.
    unprotected: Vec<f64>,
    unprotected_acks: usize,
}

struct Agent {
    system: String,
    settings: String,
    processes: usize,
    rss_kib: u64,
    pss_kib: u64,
    cpu_pct: f64,
}

struct Outcome {
    system: String,
    settings: String,
    settings_text: String,
    rows: Vec<Row>,
    agent: Option<Agent>,
}

/// Seconds in `[from, to)` during which acknowledged commits had no synchronous
/// standby: each episode runs from its first unprotected acknowledgement to the next
/// protected one (or to its last unprotected one when none followed); and how many.
fn unprotected_span(acks: &[(Instant, bool)], from: Instant, to: Option<Instant>) -> (f64, usize) {
    let mut total = 0.0;
    let mut count = 0;
    let mut open: Option<(Instant, Instant)> = None;
    for &(t, unprotected) in acks
        .iter()
        .filter(|a| a.0 >= from && to.is_none_or(|to| a.0 < to))
    {
        if unprotected {
            count += 1;
            open = Some(open.map_or((t, t), |(s, _)| (s, t)));
        } else if let Some((s, _)) = open.take() {
            total += (t - s).as_secs_f64();
        }
    }
    if let Some((s, last)) = open {
        total += (last - s).as_secs_f64();
    }
    (total, count)
}

/// Acknowledged numbers above `after` missing on the primary (read through the same
/// multi-host read-write address).
async fn lost_since(hosts: &[(String, u16)], acked: &BTreeSet<i64>, after: i64) -> usize {
    let cfg = multi_host_config(hosts);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((c, conn)) = cfg.connect(tokio_postgres::NoTls).await {
            tokio::spawn(async move {
                let _ = conn.await;
            });
            if let Ok(rows) = c.query("SELECT n FROM acked WHERE n > $1", &[&after]).await {
                let have: BTreeSet<i64> = rows.iter().map(|r| r.get(0)).collect();
                return acked
                    .range(after + 1..)
                    .filter(|n| !have.contains(n))
                    .count();
            }
        }
        assert!(Instant::now() < deadline, "cannot read the rows back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn proc_ticks(pid: u32) -> u64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some((_, rest)) = s.rsplit_once(')') else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15; `rest` starts at field 3.
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn proc_kib(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// RSS, PSS and CPU of the agents over [`IDLE`] of steady state (the client writing).
async fn measure_agents<S: HaSystem>(sys: &S, settings: &str) -> Agent {
    let pids = sys.agent_pids();
    let t0 = Instant::now();
    let c0: u64 = pids.iter().map(|p| proc_ticks(*p)).sum();
    tokio::time::sleep(IDLE).await;
    let c1: u64 = pids.iter().map(|p| proc_ticks(*p)).sum();
    let secs = t0.elapsed().as_secs_f64();
    // USER_HZ is 100 on Linux.
    let cpu_pct = (c1.saturating_sub(c0)) as f64 / 100.0 / secs * 100.0;
    Agent {
        system: sys.system(),
        settings: settings.to_string(),
        processes: pids.len(),
        rss_kib: pids
            .iter()
            .map(|p| proc_kib(&format!("/proc/{p}/status"), "VmRSS:"))
            .sum(),
        pss_kib: pids
            .iter()
            .map(|p| proc_kib(&format!("/proc/{p}/smaps_rollup"), "Pss:"))
            .sum(),
        cpu_pct,
    }
}

/// The one measurement path every system goes through.
async fn bench<S: HaSystem>(
    sys: &mut S,
    settings: &str,
    runs: usize,
    scenarios: &[Scenario],
) -> Outcome {
    let system = sys.system();
    let hosts = sys.hosts();
    let w = Writer::start_checked(hosts.clone());
    w.wait_progress(100, "warm-up").await;
    sys.wait_healthy(RECOVERY).await;
    let agent = measure_agents(sys, settings).await;
    eprintln!(
        "{system} ({settings}): agents {} processes, RSS {} KiB, PSS {} KiB, CPU {:.2} %",
        agent.processes, agent.rss_kib, agent.pss_kib, agent.cpu_pct
    );
    let mut rows = Vec::new();
    for &s in scenarios {
        let start_n = w.last_acked();
        let mut faults = Vec::new();
        let mut gaps = Vec::new();
        let mut failed = 0;
        for i in 0..runs {
            let primary = sys.primary(RECOVERY).await;
            let t0 = Instant::now();
            let wall = time_of_day();
            faults.push(t0);
            match s {
                Scenario::NodeLoss => sys.kill_node(&primary).await,
                Scenario::PostmasterCrash => sys.kill_postmaster(&primary),
                Scenario::Switchover => sys.switchover().await,
            }
            match w
                .unavailability(t0, RECOVERY)
                .await
                .map(|g| g.as_secs_f64())
            {
                Some(g) => {
                    eprintln!(
                        "{system} ({settings}) {}: run {}: {g:.3} s (fault at {wall} UTC)",
                        s.label(),
                        i + 1
                    );
                    // What the client saw, to tell where the time went.
                    for (at, e) in w.errors_after(t0).iter().take(4) {
                        eprintln!("    +{:.3} s: {e}", (*at - t0).as_secs_f64());
                    }
                    gaps.push(g);
                }
                None => {
                    eprintln!(
                        "{system} ({settings}) {}: run {}: no commit within {RECOVERY:?}",
                        s.label(),
                        i + 1
                    );
                    failed += 1;
                }
            }
            if s == Scenario::NodeLoss {
                sys.restart_node(&primary).await;
            }
            sys.wait_healthy(RECOVERY).await;
            w.wait_progress(50, "between runs").await;
        }
        let acks = w.unprotected();
        let mut unprotected = Vec::new();
        let mut unprotected_acks = 0;
        for (i, &t0) in faults.iter().enumerate() {
            let (span, n) = unprotected_span(&acks, t0, faults.get(i + 1).copied());
            unprotected.push(span);
            unprotected_acks += n;
        }
        let acked = w.acked();
        let lost = lost_since(&hosts, &acked, start_n).await;
        let acked_here = acked.range(start_n + 1..).count();
        eprintln!(
            "{system} ({settings}) {}: lost {lost} of {acked_here}; unprotected {unprotected:?} s ({unprotected_acks} acks)",
            s.label()
        );
        rows.push(Row {
            system: system.clone(),
            settings: settings.to_string(),
            scenario: s,
            gaps,
            failed,
            lost,
            acked: acked_here,
            unprotected,
            unprotected_acks,
        });
    }
    w.stop().await;
    Outcome {
        system,
        settings: settings.to_string(),
        settings_text: sys.settings(),
        rows,
        agent: Some(agent),
    }
}

/// Runs one system in its own thread and runtime, so that a system that fails (a
/// panic: it never recovered, never became healthy) is reported and the others still run.
fn isolated<F, Fut>(system: &str, settings: &str, f: F) -> Outcome
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: Future<Output = Outcome>,
{
    let r = std::thread::spawn(move || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(f())
    })
    .join();
    match r {
        Ok(o) => o,
        Err(e) => {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let first: String = msg.lines().next().unwrap_or("").chars().take(300).collect();
            eprintln!("{system} ({settings}) FAILED: {msg}");
            Outcome {
                system: system.to_string(),
                settings: settings.to_string(),
                settings_text: format!("FAILED: {first}"),
                rows: Vec::new(),
                agent: None,
            }
        }
    }
}

/// Wall-clock time of day (UTC, HH:MM:SS.mmm), to match the systems' own logs.
fn time_of_day() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let s = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        s / 3600,
        s / 60 % 60,
        s % 60,
        d.subsec_millis()
    )
}

fn median(v: &[f64]) -> Option<f64> {
    summary(v).map(|s| s.0)
}

/// Installs the Debian packages the chosen systems need, when missing.
fn install_missing(systems: &[String]) {
    let mut pkgs = Vec::new();
    if systems.iter().any(|s| s == "pg_auto_failover")
        && (!std::path::Path::new("/usr/bin/pg_autoctl").exists()
            || !std::path::Path::new("/usr/lib/postgresql/15/lib/pgautofailover.so").exists())
    {
        pkgs.extend(["postgresql-15-auto-failover", "pg-auto-failover-cli"]);
    }
    if systems.iter().any(|s| s == "patroni")
        && (!std::path::Path::new("/usr/bin/patroni").exists()
            || !std::path::Path::new("/usr/bin/etcd").exists())
    {
        pkgs.extend(["patroni", "etcd-server"]);
    }
    if pkgs.is_empty() {
        return;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "missing Debian packages {pkgs:?}: run as root to have them installed, or install them"
    );
    eprintln!("installing {pkgs:?}");
    let apt = |args: &[&str]| {
        std::process::Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    };
    let mut install = vec!["install", "-y", "--no-install-recommends"];
    install.extend(pkgs.iter().copied());
    if !apt(&install) {
        assert!(apt(&["update"]), "apt-get update failed");
        assert!(apt(&install), "apt-get install {pkgs:?} failed");
    }
}

fn render(outcomes: &[Outcome], command: &str, load_start: &str, load_end: &str) -> String {
    let mut s = String::from("## Side by side\n\n");
    let _ = write!(
        s,
        "Measured by `{command}` (after `cargo build --release -p pgquorum && cargo build \
         --release -p pgquorum-tests --bin peer-bench`), the systems one after another on one \
         machine ({} cores; load average {load_start} at the start, {load_end} at the end: other \
         work shared it). \
         Each system runs 3 PostgreSQL 15 nodes on loopback with synchronous replication. One \
         client for all: it commits numbered rows one at a time through the libpq multi-host \
         address ({}, reconnect at once), each commit a transaction that also reads whether it will wait \
         for a synchronous standby (`synchronous_standby_names` not empty, \
         `synchronous_commit` not local/off). Node loss = the agent and postgres SIGKILLed \
         together (restarted after the run); postmaster crash = SIGKILL of the pid in \
         postmaster.pid; switchover = the system's own switchover request. Unavailability \
         (s) = from the fault to the first acknowledged commit after the client's first \
         failure. Lost = acknowledged numbers missing on the final primary. No-sync acks \
         = seconds after the fault during which acknowledged commits had no synchronous \
         standby (median / max per run, and the count of such commits). Between runs every \
         system is back to a primary with two streaming standbys, both in its \
         synchronous_standby_names.\n\n",
        cores(),
        client_settings()
    );
    s.push_str(
        "| system | settings | scenario | runs | median (s) | min (s) | max (s) | rows lost | no-sync acks: s median / max (commits) |\n\
         |---|---|---|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        if o.rows.is_empty() {
            let _ = writeln!(
                s,
                "| {} | {} | — | 0 | — | — | — | — | {} |",
                o.system, o.settings, o.settings_text
            );
        }
        for r in &o.rows {
            let runs = if r.failed > 0 {
                format!("{} ({} never recovered)", r.gaps.len() + r.failed, r.failed)
            } else {
                r.gaps.len().to_string()
            };
            let (med, min, max) = match summary(&r.gaps) {
                Some((a, b, c)) => (format!("{a:.2}"), format!("{b:.2}"), format!("{c:.2}")),
                None => ("—".into(), "—".into(), "—".into()),
            };
            let (um, ux) = summary(&r.unprotected)
                .map(|(m, _, x)| (m, x))
                .unwrap_or((0.0, 0.0));
            let _ = writeln!(
                s,
                "| {} | {} | {} | {runs} | {med} | {min} | {max} | {} of {} | {um:.2} / {ux:.2} ({}) |",
                r.system,
                r.settings,
                r.scenario.label(),
                r.lost,
                r.acked,
                r.unprotected_acks
            );
        }
    }
    // pgquorum's ratio to each peer: peer median / pgquorum median, same run.
    let ours: Vec<&Row> = outcomes
        .iter()
        .filter(|o| o.system == "pgquorum")
        .flat_map(|o| o.rows.iter())
        .collect();
    let peers: Vec<&Row> = outcomes
        .iter()
        .filter(|o| o.system != "pgquorum")
        .flat_map(|o| o.rows.iter())
        .collect();
    if !ours.is_empty() && !peers.is_empty() {
        s.push_str(
            "\npgquorum's advantage (peer median / pgquorum median, same run; > 1 means pgquorum \
             takes writes again sooner):\n\n| peer | settings | scenario | peer median (s) | pgquorum median (s) | ratio |\n|---|---|---|---|---|---|\n",
        );
        for p in &peers {
            let Some(q) = ours.iter().find(|q| q.scenario == p.scenario) else {
                continue;
            };
            if let (Some(pm), Some(qm)) = (median(&p.gaps), median(&q.gaps)) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {pm:.2} | {qm:.2} | {:.1}× |",
                    p.system,
                    p.settings,
                    p.scenario.label(),
                    pm / qm
                );
            }
        }
    }
    s.push_str(
        "\nAgents at steady state, the client writing (sum over the 3 nodes; per node = /3). \
         RSS counts shared pages once per process, PSS shares them out; CPU is utime+stime \
         over 20 s. pgquorum: the keeper; pg_auto_failover: every pg_autoctl process of a node \
         (supervisor, node-active service, postgres controller), not postgres; Patroni: the \
         patroni process. Monitors and etcd are not agents.\n\n\
         | system | settings | processes | RSS per node (MiB) | PSS per node (MiB) | CPU per node (% of a core) |\n|---|---|---|---|---|---|\n",
    );
    for o in outcomes {
        if let Some(a) = &o.agent {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} | {:.2} |",
                a.system,
                a.settings,
                a.processes,
                a.rss_kib as f64 / 1024.0 / 3.0,
                a.pss_kib as f64 / 1024.0 / 3.0,
                a.cpu_pct / 3.0
            );
        }
    }
    s.push_str("\nSettings, and why each \"fast\" set is safe:\n\n");
    for o in outcomes {
        let _ = writeln!(s, "* {} ({}): {}", o.system, o.settings, o.settings_text);
    }
    s.push('\n');
    s
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut runs = 5;
    let mut doc = None;
    let mut systems: Vec<String> = vec![
        "pgquorum".into(),
        "pg_auto_failover".into(),
        "patroni".into(),
    ];
    let mut settings: Vec<String> = vec!["default".into(), "fast".into()];
    let mut scenarios = vec![
        Scenario::NodeLoss,
        Scenario::PostmasterCrash,
        Scenario::Switchover,
    ];
    let list = |v: &str| v.split(',').map(str::to_string).collect::<Vec<_>>();
    let mut i = 1;
    while i < args.len() {
        let val = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--runs" => runs = val.parse().expect("--runs N"),
            "--write-doc" => doc = Some(val),
            "--systems" => systems = list(&val),
            "--settings" => settings = list(&val),
            "--scenarios" => scenarios = list(&val).iter().map(|s| Scenario::parse(s)).collect(),
            other => panic!(
                "unknown argument {other}; options: --runs N, --systems pgquorum,pg_auto_failover,patroni, \
                 --settings default,fast, --scenarios node-loss,postmaster-crash,switchover, --write-doc PATH"
            ),
        }
        i += 2;
    }
    let command = format!("target/release/peer-bench {}", args[1..].join(" "));
    install_missing(&systems);
    eprintln!(
        "pgquorum binary: {}",
        pgquorum_testkit::pgquorum_bin().display()
    );
    let load_start = load_average();
    let mut outcomes: Vec<Outcome> = Vec::new();
    for system in &systems {
        // pgquorum's defaults are its fast settings: measured once.
        let set: Vec<(String, bool)> = if system == "pgquorum" {
            vec![("default = fast".into(), false)]
        } else {
            settings.iter().map(|s| (s.clone(), s == "fast")).collect()
        };
        for (label, fast) in set {
            let sc = scenarios.clone();
            let l = label.clone();
            let o = match system.as_str() {
                "pgquorum" => isolated(system, &label, move || async move {
                    let mut s = Pgquorum::start(fast).await;
                    bench(&mut s, &l, runs, &sc).await
                }),
                "pg_auto_failover" => isolated(system, &label, move || async move {
                    let mut s = PgAutoFailover::start(fast).await;
                    bench(&mut s, &l, runs, &sc).await
                }),
                "patroni" => isolated(system, &label, move || async move {
                    let mut s = pgquorum_tests::peers::patroni::Patroni::start(fast).await;
                    bench(&mut s, &l, runs, &sc).await
                }),
                other => panic!("unknown system {other} (pgquorum, pg_auto_failover, patroni)"),
            };
            outcomes.push(o);
            let section = render(&outcomes, &command, &load_start, &load_average());
            if let Some(p) = &doc {
                pgquorum_tests::bench_doc::write_section(p, "## Side by side", &section)
                    .expect("write the benchmarks document");
            }
        }
    }
    println!(
        "{}",
        render(&outcomes, &command, &load_start, &load_average())
    );
}

#[cfg(test)]
mod tests {
    use super::unprotected_span;
    use std::time::{Duration, Instant};

    #[test]
    fn an_unprotected_episode_lasts_until_the_next_protected_ack() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let acks = vec![
            (at(0), false),
            (at(100), true),
            (at(300), true),
            (at(1100), false),
            (at(2000), true),
            (at(2500), false),
        ];
        // Fault at 50 ms: one episode from 100 ms to the protected ack at 1100 ms, then
        // one at 2000 ms still open when the window ends at 2200 ms (counted up to its
        // last unprotected ack: 0 s).
        let (s, n) = unprotected_span(&acks, at(50), Some(at(2200)));
        assert_eq!(n, 3);
        assert!((s - 1.0).abs() < 1e-9, "{s}");
        // No unprotected acknowledgement: nothing to report.
        assert_eq!(unprotected_span(&acks, at(1000), Some(at(1500))), (0.0, 0));
    }
}
