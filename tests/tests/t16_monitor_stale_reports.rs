//! A keeper's report is never applied after a newer one from the same keeper process,
//! nor when it arrives much later than that process's previous reports (stuck in TCP
//! retransmission towards a member that was cut off): it is refused with ABORTED and
//! changes nothing. The first report the leader hears from a keeper process is only
//! recorded (ABORTED; the keeper retries at once) and the next one is judged against it,
//! so a report stuck in flight since before an election is not applied by the new
//! leader. A restarted keeper (a new process instance) is heard from its second report,
//! and its old process no longer.
//! Needs the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use pgquorum_api::client::MonitorClient;
use pgquorum_api::pb::monitor as pb;
use pgquorum_tests::monitor_group::MonitorGroup;

const WAIT: Duration = Duration::from_secs(30);

/// One report as a keeper process `instance` stamps it.
async fn report(
    c: &MonitorClient,
    node_id: u64,
    (instance, sequence, sent_ms): (u64, u64, u64),
    pg_running: bool,
) -> Result<(), tonic::Code> {
    c.call(|mut raw| {
        let req = pb::NodeActiveRequest {
            node_id,
            formation: "default".into(),
            name: "a".into(),
            current_state: "single".into(),
            pg_running,
            current_lsn: 0x100_0000,
            timeline: 1,
            system_identifier: 7,
            sequence,
            keeper_instance: instance,
            sent_ms,
            ..Default::default()
        };
        async move { raw.node_active(req).await }
    })
    .await
    .map(|_| ())
    .map_err(|e| e.code().unwrap_or(tonic::Code::Unknown))
}

async fn pg_running(c: &MonitorClient) -> Option<bool> {
    let r = c
        .call(|mut raw| async move {
            raw.get_state(pb::GetStateRequest {
                formation: String::new(),
                linearizable: true,
            })
            .await
        })
        .await
        .ok()?;
    r.nodes
        .iter()
        .find(|n| n.name == "a" && n.reported_state == "single")
        .map(|n| n.pg_running)
}

async fn wait_pg_running(g: &MonitorGroup, c: &MonitorClient, want: bool) {
    let deadline = Instant::now() + WAIT;
    while pg_running(c).await != Some(want) {
        assert!(
            Instant::now() < deadline,
            "the group never recorded pg_running = {want}\n{}",
            g.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_reports_are_refused_and_change_nothing() {
    let mut g = MonitorGroup::new(3);
    for id in [1, 2, 3] {
        g.start(id);
    }
    g.wait_leader(WAIT).await;
    // Reports as the keeper of node "a"; reads as the operator.
    let k = g.keeper_client("a").retry_for(WAIT);
    let c = g.client().retry_for(WAIT);
    let node_id = g.register_node(&k, "a").await;

    // Process 0xA of the keeper, its clock at 21 s now.
    let started = Instant::now();
    let clock = |base: u64| base + started.elapsed().as_millis() as u64;
    // Its first report reaching this leader was stuck in flight for 20 s (sent at the
    // keeper's 0.5 s): nothing to judge its age by, so it is recorded, not applied.
    assert_eq!(
        report(&k, node_id, (0xA, 5, 500), false).await,
        Err(tonic::Code::Aborted)
    );
    assert_eq!(pg_running(&c).await, None);
    // The keeper's next report, judged against it, is applied.
    report(&k, node_id, (0xA, 10, clock(21_000)), true)
        .await
        .unwrap();
    wait_pg_running(&g, &c, true).await;

    // Reordered (sent before the one applied), and a retry of the one applied: refused.
    assert_eq!(
        report(&k, node_id, (0xA, 9, 900), false).await,
        Err(tonic::Code::Aborted)
    );
    assert_eq!(
        report(&k, node_id, (0xA, 10, 1_000), false).await,
        Err(tonic::Code::Aborted)
    );
    // Sent 200 ms after the applied one by the keeper's clock, delivered 2.5 s later:
    // more than the lease (1.5 s) late.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert_eq!(
        report(&k, node_id, (0xA, 11, 21_200), false).await,
        Err(tonic::Code::Aborted)
    );
    // None of them changed anything.
    assert_eq!(pg_running(&c).await, Some(true));
    // A report on time from the same process is applied.
    report(&k, node_id, (0xA, 12, clock(21_000)), false)
        .await
        .unwrap();
    wait_pg_running(&g, &c, false).await;

    // The keeper restarts: a new process, its clock afresh and its sequence counted from
    // the wall clock (above its previous life's), is heard from its second report; the
    // old process's late reports no longer.
    assert_eq!(
        report(&k, node_id, (0xB, 1_000, 5), true).await,
        Err(tonic::Code::Aborted)
    );
    report(&k, node_id, (0xB, 1_001, 10), true).await.unwrap();
    wait_pg_running(&g, &c, true).await;
    assert_eq!(
        report(&k, node_id, (0xA, 13, clock(21_000)), false).await,
        Err(tonic::Code::Aborted)
    );
    assert_eq!(pg_running(&c).await, Some(true));
    let log: String = [1, 2, 3].iter().map(|id| g.log(*id)).collect();
    assert!(log.contains("stale heartbeat refused"), "{}", g.logs());
}
