//! Bootstrap to a primary and two streaming standbys (one synchronous); rows a client
//! commits through the multi-host address are on both standbys. Then only the
//! primary's postmaster is SIGKILLed: the keeper restarts it in place, no failover, and
//! no acknowledged row is lost.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgquorum_tests::cluster::{primary_of, Cluster};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_then_postmaster_crash_restarts_in_place() {
    let c = Cluster::start(3).await;
    let primary = c.primary().await;

    // The operator's view: health comes from the leader, and the URIs name every node.
    let (ok, out) = c.cli(&["show", "state", "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect(&out);
    let nodes = v["nodes"].as_array().expect("nodes");
    assert_eq!(nodes.len(), 3, "{out}");
    // Whichever member answers, health comes from the leader's heartbeat table.
    for n in nodes {
        assert_eq!(n["health"], "healthy", "{out}");
    }
    // Asked of each member in turn (followers too), node health is the leader's.
    for (id, m) in &c.monitors.members {
        let mut raw = c.monitors.client_of(*id).raw(&m.addr).unwrap();
        let st = raw
            .get_state(pgquorum_api::pb::monitor::GetStateRequest {
                formation: String::new(),
                linearizable: false,
            })
            .await
            .unwrap()
            .into_inner();
        for n in &st.nodes {
            assert_eq!(n.health, "healthy", "member {id} says {n:?}");
        }
    }
    let (ok, out) = c.cli(&["show", "uri"]);
    assert!(
        ok && out.contains("target_session_attrs=read-write"),
        "{out}"
    );
    for n in &c.nodes {
        assert!(
            out.contains(&format!("127.0.0.1:{}", n.spec.pg_port)),
            "{out}"
        );
    }

    // One synchronous standby as pg_stat_replication shows it.
    let p = c.node(&primary).spec.connect().await.unwrap();
    let sync: i64 = p
        .query_one(
            "SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum') \
             AND state = 'streaming'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(sync >= 1, "no synchronous standby streams");

    let w = c.writer();
    w.wait_progress(200, "bootstrap").await;

    // Only the postmaster dies.
    let old_pid = c.kill_postmaster(&primary);
    w.wait_progress(100, "after the postmaster crash").await;
    let acked = w.stop().await;
    // No failover: the same node is primary, still on the first timeline.
    let ns = c.wait_healthy(2).await;
    assert_eq!(
        primary_of(&ns).as_deref(),
        Some(primary.as_str()),
        "no failover"
    );
    let p = ns.iter().find(|n| n.name == primary).unwrap();
    assert_eq!(p.timeline, 1, "a promotion happened: {p:?}");
    let new_pid = c.node(&primary).spec.postmaster_pid().expect("restarted");
    assert_ne!(new_pid, old_pid);
    for n in c
        .nodes
        .iter()
        .map(|n| n.spec.name.clone())
        .collect::<Vec<_>>()
    {
        c.assert_rows_on(&n, &acked).await;
    }
}
