//! Maintenance on a standby, then on the primary (a standby takes over); a node with
//! candidate priority 0 is never promoted, even when it is the only other standby.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgquorum_tests::cluster::{primary_of, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maintenance_and_candidate_priority() {
    // node3 may never be promoted.
    let c = Cluster::start_with(3, |i| {
        if i == 2 {
            vec!["--candidate-priority".into(), "0".into()]
        } else {
            Vec::new()
        }
    })
    .await;
    let first = c.primary().await;
    assert_eq!(first, "node1");
    let w = c.writer();
    w.wait_progress(100, "before maintenance").await;

    // A standby in maintenance: writes go on.
    let (ok, out) = c.cli(&[
        "enable",
        "maintenance",
        "--node",
        "node2",
        "--timeout",
        "60",
    ]);
    assert!(ok, "{out}\n{}", c.logs());
    w.wait_progress(100, "with node2 in maintenance").await;
    let (ok, out) = c.cli(&[
        "disable",
        "maintenance",
        "--node",
        "node2",
        "--timeout",
        "60",
    ]);
    assert!(ok, "{out}\n{}", c.logs());
    c.wait_healthy(2).await;

    // The primary in maintenance: node2 takes over (node3 has priority 0).
    let (ok, out) = c.cli(&[
        "enable",
        "maintenance",
        "--node",
        "node1",
        "--timeout",
        "60",
    ]);
    assert!(ok, "{out}\n{}", c.logs());
    let ns = c
        .wait_state("node2 primary, node1 in maintenance", |ns| {
            primary_of(ns).as_deref() == Some("node2")
                && ns
                    .iter()
                    .any(|n| n.name == "node1" && n.reported_state == "maintenance")
        })
        .await;
    assert_ne!(primary_of(&ns).as_deref(), Some("node3"));
    w.wait_progress(100, "with node1 in maintenance").await;
    let (ok, out) = c.cli(&[
        "disable",
        "maintenance",
        "--node",
        "node1",
        "--timeout",
        "60",
    ]);
    assert!(ok, "{out}\n{}", c.logs());
    c.wait_healthy(2).await;

    // A switchover with node3 as the only other candidate-worthy choice must not pick it.
    let (ok, out) = c.cli(&["perform", "switchover", "--candidate", "node3"]);
    assert!(!ok, "a priority-0 node accepted as candidate: {out}");
    w.wait_progress(50, "after the refused switchover").await;
    let acked = w.stop().await;
    let ns = c.wait_healthy(2).await;
    assert_eq!(primary_of(&ns).as_deref(), Some("node2"));
    for n in ["node1", "node2", "node3"] {
        c.assert_rows_on(n, &acked).await;
    }
}
