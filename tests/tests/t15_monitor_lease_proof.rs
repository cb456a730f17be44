//! A monitor leader cut off from the other members stops granting leases (answering
//! NodeActive) within the election timeout's minimum, long before the majority could
//! elect another leader; it grants them again once the members are back.
//! The followers are SIGSTOPped: the leader's process keeps running and keeps believing
//! it leads (openraft 0.9 does not step it down), which is the case that matters.
//! Needs the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgquorum_api::pb::monitor as pb;
use pgquorum_tests::monitor_group::MonitorGroup;

const WAIT: Duration = Duration::from_secs(30);
/// `pgquorum monitor run`'s default election timeout minimum (3 x the 75 ms heartbeat).
const ELECTION_MIN: Duration = Duration::from_millis(225);
/// Time for SIGSTOP to take effect and for an acknowledgement already written by a
/// follower to arrive: not a performance figure, a bound far below what a new leader
/// needs (election_timeout_max = 450 ms of silence before any vote).
const SLACK: Duration = Duration::from_millis(100);

struct Beat {
    sent: Instant,
    result: Result<(), tonic::Status>,
}

/// One NodeActive to member `id` only (never forwarded elsewhere by the client).
async fn beat(g: &MonitorGroup, id: u64, node_id: u64, seq: u64) -> Beat {
    let c = g.keeper_client_of(id, "a");
    let mut raw = c.raw(&g.addr(id)).unwrap();
    let mut req = tonic::Request::new(pb::NodeActiveRequest {
        node_id,
        formation: "default".into(),
        name: "a".into(),
        current_state: "single".into(),
        pg_running: true,
        current_lsn: 0x100_0000,
        timeline: 1,
        system_identifier: 7,
        sequence: seq,
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(3));
    let sent = Instant::now();
    let result = raw.node_active(req).await.map(|_| ());
    Beat { sent, result }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_leader_stops_granting_leases_before_a_new_leader_can_exist() {
    let mut g = MonitorGroup::new(3);
    for id in [1, 2, 3] {
        g.start(id);
    }
    let leader = g.wait_leader(WAIT).await;
    let node_id = g.register_node(&g.keeper_client("a"), "a").await;
    let mut seq = 1_000;

    // With the group whole, the leader answers every beat (grants the lease).
    let leader = {
        let mut ok = 0;
        let deadline = Instant::now() + WAIT;
        let mut leader = leader;
        while ok < 10 {
            seq += 1;
            match beat(&g, leader, node_id, seq).await.result {
                Ok(()) => ok += 1,
                Err(s) => {
                    assert!(Instant::now() < deadline, "{s}\n{}", g.logs());
                    leader = g.wait_leader(WAIT).await;
                    ok = 0;
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        leader
    };

    let followers: Vec<u64> = [1, 2, 3].into_iter().filter(|i| *i != leader).collect();
    for f in &followers {
        g.pause(*f);
    }
    let stopped = Instant::now();
    // Beat as a keeper does (every 50 ms here) for 3 s: no beat sent after the proof has
    // surely gone stale may be answered.
    let mut beats = Vec::new();
    while stopped.elapsed() < Duration::from_secs(3) {
        seq += 1;
        beats.push(beat(&g, leader, node_id, seq).await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Still the leader in its own eyes: the refusal is the proof check, not a step-down.
    let st = g
        .status(leader)
        .await
        .expect("the leader answers MemberStatus");
    let still_leads = st.server_state == "leader";
    for f in &followers {
        g.resume(*f);
    }

    let last_granted = beats
        .iter()
        .filter(|b| b.result.is_ok())
        .map(|b| b.sent.duration_since(stopped))
        .max();
    let first_refused = beats
        .iter()
        .find(|b| b.result.is_err())
        .map(|b| b.sent.duration_since(stopped));
    eprintln!(
        "leader {leader} (still leader: {still_leads}): last lease granted to a beat sent {last_granted:?} after the stop, first refusal for one sent {first_refused:?} after"
    );
    let refusal = beats
        .iter()
        .find_map(|b| b.result.as_ref().err())
        .unwrap_or_else(|| panic!("an isolated leader kept granting leases\n{}", g.logs()));
    assert_eq!(refusal.code(), tonic::Code::Unavailable, "{refusal}");
    assert!(
        pgquorum_api::leader_hint(refusal).is_none(),
        "a refusal must not send the keeper back to this member: {refusal:?}"
    );
    if let Some(late) = last_granted {
        assert!(
            late < ELECTION_MIN + SLACK,
            "a lease was granted to a beat sent {late:?} after both followers stopped\n{}",
            g.logs()
        );
    }
    // Every beat after the last granted one was refused (no flapping back to "granted").
    assert!(beats
        .iter()
        .filter(|b| b.sent.duration_since(stopped) >= ELECTION_MIN + SLACK)
        .all(|b| b.result.is_err()));

    // The group back together: some member grants leases again.
    let deadline = Instant::now() + WAIT;
    loop {
        let l = g.wait_leader(WAIT).await;
        seq += 1;
        if beat(&g, l, node_id, seq).await.result.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no lease granted after the group healed\n{}",
            g.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
