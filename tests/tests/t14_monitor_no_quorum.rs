//! Two of three members stopped: writes fail fast with an error that says there is no
//! quorum; once the members are back, writes succeed.
//! Needs the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgquorum_tests::monitor_group::{create_formation, MonitorGroup};

const WAIT: Duration = Duration::from_secs(30);
/// Generous for a loaded machine; the member itself bounds a write at 3 s.
const FAST: Duration = Duration::from_secs(10);

/// Returns the names of writes refused outright (never proposed): those must never
/// appear. A write that timed out waiting for a quorum may still take effect later.
async fn assert_refused_fast(g: &MonitorGroup, survivor: u64, prefix: &str) -> Vec<String> {
    // One RPC per attempt: a client retry could re-propose a write that timed out.
    let c = g.client_of(survivor).retry_for(Duration::ZERO);
    // The first attempt may still see the old leader; within the deadline every
    // attempt must come back quickly, and the answer must be "no quorum".
    let deadline = Instant::now() + WAIT;
    let mut refused = Vec::new();
    for i in 0.. {
        let name = format!("{prefix}-{i}");
        let started = Instant::now();
        let err = create_formation(&c, &name)
            .await
            .expect_err("a write without quorum must fail");
        let took = started.elapsed();
        assert!(took < FAST, "a write without quorum took {took:?}");
        assert_eq!(err.code(), Some(tonic::Code::Unavailable), "{err}");
        if err.to_string().contains("no quorum") {
            assert!(
                err.to_string().contains("of 3 monitor members reachable"),
                "{err}"
            );
            if !err.to_string().contains("not confirmed") {
                refused.push(name);
                return refused;
            }
        }
        assert!(
            Instant::now() < deadline,
            "never refused a write outright: {err}\n{}",
            g.logs()
        );
    }
    refused
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_fast_without_quorum_and_resume_when_it_is_back() {
    let mut g = MonitorGroup::new(3);
    for id in [1, 2, 3] {
        g.start(id);
    }
    let leader = g.wait_leader(WAIT).await;
    create_formation(&g.client(), "before").await.unwrap();

    // The leader survives, both followers die.
    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
    for f in &followers {
        g.kill(*f);
    }
    let mut refused = assert_refused_fast(&g, leader, "lost-a").await;
    for f in &followers {
        g.start(*f);
    }
    g.wait_leader(WAIT).await;
    create_formation(&g.client(), "back-1")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", g.logs()));

    // The leader and one follower die.
    let leader = g.wait_leader(WAIT).await;
    let survivor = [1, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    let other = [1, 2, 3]
        .into_iter()
        .find(|i| *i != leader && *i != survivor)
        .unwrap();
    g.kill(leader);
    g.kill(other);
    refused.extend(assert_refused_fast(&g, survivor, "lost-b").await);
    g.start(leader);
    g.start(other);
    g.wait_leader(WAIT).await;
    create_formation(&g.client(), "back-2").await.unwrap();

    // Nothing refused was applied.
    let have = g.formations_on(survivor).await.unwrap();
    assert_eq!(refused.len(), 2);
    for r in &refused {
        assert!(!have.contains(r), "{r} was refused yet applied: {have:?}");
    }
}
