//! Two failures in a row under `on-quorum-loss block` (the default): the primary's node
//! vanishes, then the new primary's node vanishes right after its first acknowledged
//! write. The third node, promoted with no standby in sync with it, must not
//! acknowledge a single commit while its `synchronous_standby_names` is empty (the fault
//! harness saw 77 to 1,409 such commits, which a next failure loses); its commits wait
//! until a standby has rejoined. Every acknowledged row survives.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgquorum_tests::cluster::{primary_of, Cluster, Writer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_primary_after_two_failures_acknowledges_nothing_unprotected() {
    let mut c = Cluster::start(3).await;
    let first = c.primary().await;
    let w = Writer::start_checked(c.hosts());
    w.wait_progress(100, "before the faults").await;

    let t1 = Instant::now();
    c.kill_node(&first).await;
    let ns = c
        .wait_state("a second primary", |ns| {
            primary_of(ns).is_some_and(|p| p != first)
        })
        .await;
    let second = primary_of(&ns).unwrap();
    // Its first acknowledged write, then its node vanishes too.
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.first_ack_after(t1).is_none() {
        assert!(
            Instant::now() < deadline,
            "no write acknowledged after the first failover\n{}",
            c.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    c.kill_node(&second).await;
    // With both other nodes gone it cannot reach `primary` (which needs a standby in
    // sync): it takes writes from `wait_primary` on.
    let taking_writes = |ns: &[pgquorum_api::pb::monitor::NodeStatus]| {
        ns.iter()
            .find(|n| {
                n.name != first
                    && n.name != second
                    && n.reported_state == n.goal_state
                    && matches!(n.goal_state.as_str(), "wait_primary" | "primary")
            })
            .map(|n| n.name.clone())
    };
    let ns = c
        .wait_state("a third primary", |ns| taking_writes(ns).is_some())
        .await;
    let third = taking_writes(&ns).unwrap();
    // Let it run alone for a while: commits must wait, not be acknowledged alone.
    tokio::time::sleep(Duration::from_secs(3)).await;

    c.start_keeper(&first);
    c.start_keeper(&second);
    c.wait_healthy(2).await;
    w.wait_progress(100, "after both nodes rejoined").await;
    let unprotected: Vec<(Instant, bool)> =
        w.unprotected().into_iter().filter(|(_, u)| *u).collect();
    let acked = w.stop().await;
    assert!(
        unprotected.is_empty(),
        "{} commits acknowledged with no synchronous standby, the first {:?} after the first fault (third primary {third})\n{}",
        unprotected.len(),
        unprotected[0].0.duration_since(t1),
        c.logs()
    );
    for n in [first.as_str(), second.as_str(), third.as_str()] {
        c.assert_rows_on(n, &acked).await;
    }
}
