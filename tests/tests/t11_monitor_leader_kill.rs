//! The leader is SIGKILLed: a new leader is elected, writes go on, and the killed
//! member restarts from its data directory and catches up.
//! Needs the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use pgquorum_tests::monitor_group::{create_formation, MonitorGroup};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_killed_new_leader_takes_writes_and_the_old_one_catches_up() {
    let mut g = MonitorGroup::new(3);
    for id in [1, 2, 3] {
        g.start(id);
    }
    let old = g.wait_leader(WAIT).await;
    let c = g.client();
    let mut names = BTreeSet::new();
    for i in 0..10 {
        let n = format!("before-{i}");
        create_formation(&c, &n).await.unwrap();
        names.insert(n);
    }

    g.kill(old);
    let new = g.wait_leader(WAIT).await;
    assert_ne!(new, old);
    for i in 0..10 {
        let n = format!("after-{i}");
        create_formation(&c, &n)
            .await
            .unwrap_or_else(|e| panic!("write after failover: {e}\n{}", g.logs()));
        names.insert(n);
    }

    g.start(old);
    g.wait_applied(old, &names, WAIT).await;
    // Back as a follower of the new leader, not a second leader.
    let leader = g.wait_leader(WAIT).await;
    assert_eq!(g.running().len(), 3);
    assert!(g.status(old).await.unwrap().leader_id == Some(leader));
}
