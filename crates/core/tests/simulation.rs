//! Seeded simulation of the whole cluster (see tests/sim/mod.rs).
//!
//! `PGQUORUM_SIM_SEEDS` (default 10000) seeds run from `PGQUORUM_SIM_FIRST_SEED`
//! (default 0); `PGQUORUM_SIM_SEED=N` replays one seed with its trace printed (with
//! `PGQUORUM_SIM_WITHOUT_PROOF=1`, as the deposed leader without its leadership proof;
//! with `PGQUORUM_SIM_WITHOUT_REPORT_ORDER=1`, with every report admitted unjudged).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod sim;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

fn replay_command(seed: u64) -> String {
    format!("PGQUORUM_SIM_SEED={seed} cargo test -p pgquorum-core --test simulation -- --nocapture")
}

#[test]
fn simulated_clusters_keep_the_invariants() {
    if let Some(seed) = env_u64("PGQUORUM_SIM_SEED") {
        let mut s = sim::Sim::new(seed, true);
        // Replays a seed of `leases_granted_without_leadership_proof_overlap`.
        if std::env::var_os("PGQUORUM_SIM_WITHOUT_PROOF").is_some() {
            s = s.without_lease_proof();
        }
        // Replays a seed of `reports_applied_unjudged_are_caught`.
        if std::env::var_os("PGQUORUM_SIM_WITHOUT_REPORT_ORDER").is_some() {
            s = s.without_report_order();
        }
        match s.run() {
            Ok(s) => println!(
                "seed {seed}: ok, {} commits acknowledged, {} promotions/demotions",
                s.acked_count, s.failovers
            ),
            Err(sim::Failure(msg)) => panic!(
                "seed {seed} failed: {msg}\nreplay: {}",
                replay_command(seed)
            ),
        }
        return;
    }
    let seeds = env_u64("PGQUORUM_SIM_SEEDS").unwrap_or(10_000);
    let first = env_u64("PGQUORUM_SIM_FIRST_SEED").unwrap_or(0);
    let mut acked = 0;
    let mut failovers = 0;
    let mut t = [0u64; 12];
    let mut stale = [0u64; 4];
    for seed in first..first + seeds {
        match sim::Sim::new(seed, false).run() {
            Ok(s) => {
                acked += s.acked_count;
                failovers += s.failovers;
                for (x, v) in t.iter_mut().zip([
                    s.crashes,
                    s.partitions,
                    s.leader_changes,
                    s.operator_ok,
                    s.operator_refused,
                    s.async_acked,
                    s.pg_crashes,
                    s.depositions,
                    s.held_back,
                    s.retries,
                    s.applied_out_of_order,
                    s.stale_report_states,
                ]) {
                    *x += v;
                }
                for (x, v) in stale.iter_mut().zip(s.stale) {
                    *x += v;
                }
            }
            Err(sim::Failure(msg)) => {
                panic!(
                    "seed {seed} failed: {msg}\nreplay exactly with:\n  {}",
                    replay_command(seed)
                )
            }
        }
    }
    println!(
        "{seeds} seeds: {acked} synchronously acknowledged commits, {} acknowledged with synchronous replication off by choice, {failovers} demotions/promotions, {} machine crashes, {} PostgreSQL crashes, {} partitions, {} monitor leader changes, {} monitor leaders deposed while answering, {} operator commands applied, {} refused; {} heartbeats held back in flight, stale reports refused: {} first of a keeper process at a member, {} superseded, {} from a replaced process, {} delayed; {} retries; {} reports admitted by a leader after a newer one of the same keeper process was applied by an earlier leader, {} of their state reports refused by the state machine as not newer than the last applied",
        t[5], t[0], t[6], t[1], t[2], t[7], t[3], t[4], t[8], stale[0], stale[1], stale[2], stale[3], t[9], t[10], t[11]
    );
    // The simulation must exercise what it claims to check.
    assert!(acked > seeds * 10, "too few acknowledged commits: {acked}");
    assert!(failovers > seeds / 2, "too few failovers: {failovers}");
    let late = stale[1] + stale[2] + stale[3];
    assert!(late > seeds, "too few stale reports refused: {stale:?}");
}

/// The report-order oracle can fail: with every report admitted unjudged (the monitor
/// before `ReportOrder`), a heartbeat held back in flight is applied after newer ones.
#[test]
fn reports_applied_unjudged_are_caught() {
    let seeds = 100;
    let mut caught = Vec::new();
    for seed in 0..seeds {
        if let Err(sim::Failure(msg)) = sim::Sim::new(seed, false).without_report_order().run() {
            caught.push(seed);
            if caught.len() == 1 {
                println!(
                    "seed {seed} without the report order: {}",
                    msg.lines().next().unwrap_or("")
                );
            }
        }
    }
    println!(
        "without the report order, {} of {seeds} seeds failed: {caught:?}",
        caught.len()
    );
    assert!(
        !caught.is_empty(),
        "no seed caught reports applied out of order"
    );
}

/// The lease oracle can fail: a deposed leader that answers without its leadership proof
/// (the monitor before issue 13) renews its stale primary's lease while the new leader,
/// which never heard from that primary, promotes another node once the lease it must
/// assume has run out.
#[test]
fn leases_granted_without_leadership_proof_overlap() {
    let seeds = 300;
    let mut overlaps = Vec::new();
    for seed in 0..seeds {
        if let Err(sim::Failure(msg)) = sim::Sim::new(seed, false).without_lease_proof().run() {
            assert!(
                msg.contains("writable leases overlap"),
                "seed {seed} failed otherwise: {msg}"
            );
            overlaps.push(seed);
        }
    }
    println!(
        "without the proof, {} of {seeds} seeds had overlapping writable leases: {overlaps:?}",
        overlaps.len()
    );
    assert!(!overlaps.is_empty(), "no seed caught the missing proof");
}

/// The benchmark behind docs/benchmarks.md: seeds per second (median of 3 runs).
/// `cargo test -p pgquorum-core --test simulation -- --ignored --nocapture simulation_speed`
#[test]
#[ignore]
#[allow(clippy::disallowed_methods)] // the harness measures wall time, not the core
fn simulation_speed() {
    let seeds = env_u64("PGQUORUM_SIM_SEEDS").unwrap_or(2_000);
    let mut rates = Vec::new();
    for run in 0..3u64 {
        let start = std::time::Instant::now();
        for seed in 0..seeds {
            let s = sim::Sim::new(1_000_000 + run * seeds + seed, false);
            if let Err(sim::Failure(msg)) = s.run() {
                panic!("seed failed: {msg}");
            }
        }
        rates.push(seeds as f64 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!(
        "simulation: {seeds} seeds per run, runs {rates:.0?} seeds/s, median {:.0} seeds/s",
        rates[1]
    );
}

/// Time to writes after the primary's machine dies (default lease 1500 ms + 300 ms
/// margin, heartbeat 200 ms, up to 14 % slow keeper clocks, message delays as in the
/// simulation): the figure in docs/benchmarks.md.
/// `cargo test -p pgquorum-core --test simulation -- --ignored --nocapture failover_time`
#[test]
#[ignore]
fn failover_time() {
    let mut times: Vec<u64> = (0..1000u64)
        .map(|seed| match sim::Sim::new(seed, false).failover_time() {
            Ok(t) => t,
            Err(sim::Failure(msg)) => panic!("seed {seed}: {msg}"),
        })
        .collect();
    times.sort_unstable();
    println!(
        "failover (simulated ms from primary death to writes elsewhere), 1000 seeds: min {} median {} p90 {} max {}",
        times[0],
        times[500],
        times[900],
        times[999]
    );
}
