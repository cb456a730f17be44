//! Planned switchover and `perform failover` through the CLI while a client writes,
//! then a switchover back to the primary before the failover: no acknowledged row is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgquorum_tests::cluster::{primary_of, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switchover_failover_and_back() {
    let c = Cluster::start(3).await;
    let first = c.primary().await;
    let w = c.writer();
    w.wait_progress(100, "before the switchover").await;

    let (ok, out) = c.cli(&["perform", "switchover", "--timeout", "60"]);
    assert!(ok, "switchover failed: {out}\n{}", c.logs());
    let second = c.primary().await;
    assert_ne!(second, first, "{out}");
    w.wait_progress(100, "after the switchover").await;
    c.wait_healthy(2).await;

    let (ok, out) = c.cli(&["perform", "failover", "--timeout", "60"]);
    assert!(ok, "failover failed: {out}\n{}", c.logs());
    let third = c.primary().await;
    assert_ne!(third, second, "{out}");
    w.wait_progress(100, "after the failover").await;
    c.wait_healthy(2).await;

    let (ok, out) = c.cli(&[
        "perform",
        "switchover",
        "--candidate",
        &second,
        "--timeout",
        "60",
    ]);
    assert!(ok, "switchover back failed: {out}\n{}", c.logs());
    let ns = c.wait_healthy(2).await;
    assert_eq!(primary_of(&ns).as_deref(), Some(second.as_str()));
    w.wait_progress(100, "after the switchover back").await;
    let acked = w.stop().await;
    for n in ["node1", "node2", "node3"] {
        c.assert_rows_on(n, &acked).await;
    }
}
