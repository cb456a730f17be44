//! Partitions in network namespaces (issue 13): every monitor member and every node on
//! its own host of a bridge, the test's writer (multi-host URI) and probe (direct
//! `synchronous_commit = local` writes to each node) on the bridge, so they reach every
//! node whatever the cut. The oracle, in each test: every acknowledged row is on the
//! final primary; no two nodes accepted writes at overlapping times; the cluster heals.
//! Skipped, loudly, where `ip netns add` is not permitted.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgquorum_testkit::netns::skip_without_netns;
use pgquorum_tests::cluster::{primary_of, Writer};
use pgquorum_tests::netcluster::NetCluster;
use pgquorum_tests::oracle::{describe, longest_overlap, Probe};

/// After the fault: the cluster heals, the writer commits again, and the oracle holds.
async fn heal_and_check(nc: &NetCluster, w: Writer, probe: Probe, t0: Instant, what: &str) {
    let ns = nc.c.wait_healthy(nc.c.nodes.len() - 1).await;
    let healed = t0.elapsed();
    let primary = primary_of(&ns).unwrap();
    w.wait_progress(50, "after the heal").await;
    let unprotected = w.unprotected().iter().filter(|u| u.1).count();
    let acked = w.stop().await;
    let seen = probe.stop().await;
    let (overlap, why) = longest_overlap(&seen);
    eprintln!(
        "{what}: healed {} ms after the fault began; final primary {primary}; {} rows \
         acknowledged, {unprotected} without a synchronous standby; longest two-writer \
         overlap {} ms; probe: {}",
        healed.as_millis(),
        acked.len(),
        overlap.as_millis(),
        describe(&seen, t0)
    );
    assert_eq!(
        overlap,
        Duration::ZERO,
        "{what}: two nodes accepted writes at overlapping times: {why}\nprobe: {}\n{}",
        describe(&seen, t0),
        nc.c.logs()
    );
    nc.c.assert_rows_on(&primary, &acked).await;
}

async fn start_load(nc: &NetCluster) -> (Writer, Probe, String) {
    let old = nc.c.primary().await;
    let w = Writer::start_checked(nc.c.hosts());
    w.wait_progress(50, "before the fault").await;
    let probe = Probe::start(nc.probe_targets());
    let p = &probe;
    let o = old.clone();
    pgquorum_testkit::wait_until_async(
        Duration::from_secs(20),
        "a probe write on the primary",
        || {
            let ok = p.last_accepted(&o).is_some();
            async move { ok }
        },
    )
    .await
    .unwrap();
    (w, probe, old)
}

/// Issue 13 item 1: the primary's node and the monitor leader are cut off together from
/// the other two members and the standbys for 20 s (the test's clients still reach
/// every node). The majority must promote a standby only once the old primary is
/// fenced: an isolated leader must stop granting it leases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_and_monitor_leader_cut_off_together() {
    if skip_without_netns("primary_and_monitor_leader_cut_off_together") {
        return;
    }
    let nc = NetCluster::start(3).await;
    let leader = nc.c.monitors.wait_leader(Duration::from_secs(30)).await;
    let (w, probe, old) = start_load(&nc).await;
    let leader_host = NetCluster::member_host(leader);
    let minority = [old.as_str(), leader_host.as_str()];
    let majority: Vec<String> = nc
        .net
        .hosts
        .iter()
        .map(|h| h.name.clone())
        .filter(|h| !minority.contains(&h.as_str()))
        .collect();
    let majority: Vec<&str> = majority.iter().map(String::as_str).collect();
    nc.net.partition(&minority, &majority).unwrap();
    let t0 = Instant::now();
    // Fenced, the old primary's postmaster must be gone while the cut lasts, not
    // linger in a fast shutdown whose WAL senders wait for standbys it cannot reach
    // (it did, until the partition healed, and the heal began by waiting for it).
    let spec = nc.c.node(&old).spec.clone();
    pgquorum_testkit::wait_until_async(
        Duration::from_secs(15),
        "the fenced old primary's postmaster to exit while cut off",
        || {
            let gone = spec.postmaster_pid().is_none();
            async move { gone }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", nc.c.logs()));
    eprintln!(
        "old primary's postmaster gone {} ms after the cut",
        t0.elapsed().as_millis()
    );
    tokio::time::sleep(Duration::from_secs(20).saturating_sub(t0.elapsed())).await;
    nc.net.heal_all().unwrap();
    heal_and_check(&nc, w, probe, t0, "primary + leader cut off 20 s").await;
}

/// The primary's host vanishes (its link goes down: no process is killed) for 20 s: a
/// standby is promoted, and the old primary, back, rejoins without having taken a write
/// alongside the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_host_vanishes() {
    if skip_without_netns("primary_host_vanishes") {
        return;
    }
    let nc = NetCluster::start(3).await;
    let (w, probe, old) = start_load(&nc).await;
    nc.net.set_link(&old, false).unwrap();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(20)).await;
    nc.net.set_link(&old, true).unwrap();
    heal_and_check(&nc, w, probe, t0, "primary host link down 20 s").await;
}

/// The primary loses the monitor members only (its standbys and clients still reach
/// it) for 15 s: it cannot renew its lease and must stop taking writes before a standby
/// is promoted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn primary_cut_from_the_monitors_only() {
    if skip_without_netns("primary_cut_from_the_monitors_only") {
        return;
    }
    let nc = NetCluster::start(3).await;
    let (w, probe, old) = start_load(&nc).await;
    nc.net.partition(&[&old], &["m1", "m2", "m3"]).unwrap();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    nc.net.heal_all().unwrap();
    heal_and_check(&nc, w, probe, t0, "primary cut from the monitors 15 s").await;
}

/// The monitor leader alone, cut from every other host for 15 s (DESIGN.md invariant 3:
/// losing a minority of members, the leader included, changes nothing for PostgreSQL):
/// the primary stays the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn monitor_leader_alone() {
    if skip_without_netns("monitor_leader_alone") {
        return;
    }
    let nc = NetCluster::start(3).await;
    let leader = nc.c.monitors.wait_leader(Duration::from_secs(30)).await;
    let (w, probe, old) = start_load(&nc).await;
    nc.net.isolate(&NetCluster::member_host(leader)).unwrap();
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(15)).await;
    nc.net.heal_all().unwrap();
    let seen = probe.attempts();
    let others: Vec<String> = probe.accepted().into_keys().filter(|n| *n != old).collect();
    assert!(
        others.is_empty(),
        "a failover for the loss of one monitor member: {}",
        describe(&seen, t0)
    );
    heal_and_check(&nc, w, probe, t0, "monitor leader alone 15 s").await;
}

/// A standby alone, cut from every other host, then, once the cluster says it is healthy
/// again, the other standby alone. Under `ANY 1 (a, b)` the primary needs one of them:
/// the first must really stream again when the monitor calls it a secondary. Seen in
/// `fault-bench --kind standby-isolated --campaign 14 --seed 5`: the primary's WAL
/// sender to the first standby sat in TCP retransmission backoff after the heal (its
/// pg_stat_replication row still said streaming, a few MB behind, so the monitor moved
/// the standby back to secondary at once), and with the second one cut off no commit
/// was acknowledged for the whole fault, up to 15 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standbys_isolated_one_after_the_other() {
    if skip_without_netns("standbys_isolated_one_after_the_other") {
        return;
    }
    let nc = NetCluster::start(3).await;
    let (w, probe, old) = start_load(&nc).await;
    let standbys = nc.c.others(&old);
    let t0 = Instant::now();
    // 30 s: the primary's retransmissions to the cut-off standby back off to 25.6 s
    // apart, so without a timeout of its own its WAL stream resumes long after the heal
    // (PostgreSQL's default wal_sender_timeout and wal_receiver_timeout are 60 s).
    let first = Duration::from_secs(30);
    nc.net.isolate(&standbys[0]).unwrap();
    tokio::time::sleep(first).await;
    nc.net.heal_all().unwrap();
    nc.c.wait_healthy(nc.c.nodes.len() - 1).await;
    let healthy_after = t0.elapsed() - first;
    nc.net.isolate(&standbys[1]).unwrap();
    // The primary keeps its sync names (the isolated standby stays in the set); its
    // commits need the first standby's flushes now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = w.acked_count();
    tokio::time::sleep(Duration::from_secs(7)).await;
    let during = w.acked_count() - before;
    nc.net.heal_all().unwrap();
    eprintln!(
        "{} back (healthy) {} ms after its heal; {during} commits acknowledged while {} \
         was cut off",
        standbys[0],
        healthy_after.as_millis(),
        standbys[1]
    );
    assert!(
        during >= 20,
        "only {during} commits acknowledged in the 7 s after {} was cut off although {} \
         was reported healthy again: its replication connection was not live\n{}",
        standbys[1],
        standbys[0],
        nc.c.logs()
    );
    heal_and_check(&nc, w, probe, t0, "standbys isolated one after the other").await;
    assert_eq!(nc.c.primary().await, old, "a failover for a standby's loss");
}
