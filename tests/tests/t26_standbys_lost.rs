//! Both standbys lost. With on_quorum_loss = block (the default) the primary keeps its
//! synchronous standby names, so commits wait rather than being acknowledged without a
//! copy; once a standby is back, writes resume. With on_quorum_loss = continue the
//! primary goes on alone. No acknowledged row is ever lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgquorum_tests::cluster::{primary_of, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_standbys_lost_blocks_or_continues_as_configured() {
    let mut c = Cluster::start(3).await;
    let primary = c.primary().await;
    assert_eq!(primary, "node1");
    let w = c.writer();
    w.wait_progress(100, "before the fault").await;

    c.kill_node("node2").await;
    c.kill_node("node3").await;
    let lost_at = Instant::now();
    // Commits issued after both are gone are not acknowledged: wait for the writer to
    // see its first failure after the fault, then check no ack arrives for a while
    // (the commit timeout is 2 s; the monitor takes about a lease to notice).
    c.wait_state("the monitor to see both standbys gone", |ns| {
        ns.iter()
            .filter(|n| n.name != "node1")
            .all(|n| n.health != "healthy")
    })
    .await;
    let seen = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let acked_since = w.first_ack_after(seen + Duration::from_millis(500));
    assert!(
        acked_since.is_none(),
        "a commit was acknowledged with no standby {:?} after the loss",
        acked_since.map(|a| a - lost_at)
    );

    c.start_keeper("node2");
    w.wait_progress(100, "after a standby came back").await;
    c.start_keeper("node3");
    let ns = c.wait_healthy(2).await;
    assert_eq!(primary_of(&ns).as_deref(), Some("node1"));

    // on_quorum_loss = continue: the primary goes on alone once the monitor has
    // dropped its synchronous standby names.
    let (ok, out) = c.cli(&["set", "formation", "on-quorum-loss", "continue"]);
    assert!(ok, "{out}");
    c.kill_node("node2").await;
    c.kill_node("node3").await;
    w.wait_progress(100, "alone, with on_quorum_loss = continue")
        .await;
    c.start_keeper("node2");
    c.start_keeper("node3");
    let ns = c.wait_healthy(2).await;
    assert_eq!(primary_of(&ns).as_deref(), Some("node1"));
    w.wait_progress(100, "with both standbys back").await;
    let acked = w.stop().await;
    for n in ["node1", "node2", "node3"] {
        c.assert_rows_on(n, &acked).await;
    }
}
