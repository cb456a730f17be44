//! Monitor faults: the monitor leader SIGKILLed in the middle of a failover (the
//! failover completes), then one member down for the rest of the test (switchover and
//! node loss still work).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use pgquorum_tests::cluster::{primary_of, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_survives_monitor_leader_loss_and_a_member_down() {
    let mut c = Cluster::start(3).await;
    let old = c.primary().await;
    let w = c.writer();
    w.wait_progress(100, "before the fault").await;

    // The node vanishes; as soon as the monitor has started the failover (the old
    // primary's goal changed), the monitor leader is killed too.
    c.kill_node(&old).await;
    c.wait_state("the failover to start", |ns| {
        ns.iter()
            .any(|n| n.name == old && n.goal_state != "primary")
    })
    .await;
    let leader = c.monitors.wait_leader(Duration::from_secs(10)).await;
    c.monitors.kill(leader);
    let ns = c
        .wait_state("a new primary", |ns| {
            primary_of(ns).is_some_and(|p| p != old)
        })
        .await;
    let new = primary_of(&ns).unwrap();
    w.wait_progress(100, "after the failover").await;

    // The old node rejoins while one monitor member stays down.
    c.start_keeper(&old);
    c.wait_healthy(2).await;
    let (ok, out) = c.cli(&["perform", "switchover", "--timeout", "60"]);
    assert!(
        ok,
        "switchover with a monitor member down: {out}\n{}",
        c.logs()
    );
    let after = c.primary().await;
    assert_ne!(after, new);
    w.wait_progress(100, "after the switchover").await;
    let acked = w.stop().await;
    for n in ["node1", "node2", "node3"] {
        c.assert_rows_on(n, &acked).await;
    }
}
