//! Monitor group formation: 3 members from a cold start, in any start order; a write
//! sent to a follower is applied on all three.
//! Needs the binary built first: `cargo build -p pgquorum`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::time::Duration;

use pgquorum_tests::monitor_group::{create_formation, MonitorGroup};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_form_a_group_in_any_order_and_a_follower_takes_writes() {
    let mut g = MonitorGroup::new(3);
    // 3 then 1 form a majority and elect a leader before 2 even exists.
    g.start(3);
    g.start(1);
    let first = g.wait_leader(WAIT).await;
    assert!(first == 1 || first == 3);
    g.start(2);
    let leader = g.wait_leader(WAIT).await;

    let status = g.status(2).await.expect("member 2 answers");
    assert_eq!(status.members.len(), 3, "{status:?}");
    let group_ids: BTreeSet<String> = [1, 2, 3]
        .iter()
        .map(|id| futures_group_id(&g, *id))
        .collect();
    assert_eq!(group_ids.len(), 1, "one group, not several: {group_ids:?}");

    let follower = [1, 2, 3].into_iter().find(|id| *id != leader).unwrap();
    let names: BTreeSet<String> = (0..5).map(|i| format!("sales-{i}")).collect();
    let c = g.client_of(follower);
    for n in &names {
        create_formation(&c, n)
            .await
            .unwrap_or_else(|e| panic!("write to follower {follower}: {e}\n{}", g.logs()));
    }
    for id in [1, 2, 3] {
        g.wait_applied(id, &names, WAIT).await;
    }

    // A forwarded answer names the leader, so that keepers pinned to a follower move.
    let mut raw = c.raw(&g.addr(follower)).unwrap();
    let answer = raw
        .create_formation(pgquorum_api::pb::monitor::CreateFormationRequest {
            name: "sales-hint".into(),
            number_sync_standbys: None,
        })
        .await
        .unwrap_or_else(|e| panic!("write to follower {follower}: {e}"));
    assert_eq!(
        pgquorum_api::leader_hint_in(answer.metadata()),
        Some(g.addr(leader)),
        "a follower's forwarded answer must name the leader"
    );

    // A read that must be current, sent to a follower, is answered via the leader.
    let state = c
        .call(|mut raw| async move {
            raw.get_state(pgquorum_api::pb::monitor::GetStateRequest {
                formation: String::new(),
                linearizable: true,
            })
            .await
        })
        .await
        .unwrap();
    let seen: BTreeSet<String> = state.formations.into_iter().map(|f| f.name).collect();
    assert!(names.is_subset(&seen), "{seen:?}");

    // A refused write changes nothing and says why.
    let err = create_formation(&c, "sales-0").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::AlreadyExists), "{err}");
    let err = create_formation(&c, "Bad Name").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");

    // `monitor status --json` names the leader and every member.
    let all = g
        .members
        .values()
        .map(|m| m.addr.clone())
        .collect::<Vec<_>>()
        .join(",");
    let (ok, out) = g.cli(&["monitor", "status", "--monitor", &all, "--json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status --json is JSON");
    assert_eq!(v["leader"].as_u64(), Some(leader), "{out}");
    let ids: BTreeSet<u64> = v["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, BTreeSet::from([1, 2, 3]));
    assert!(v["members"][0]["address"].is_string());

    // /metrics is served on its own plain-HTTP address, so scrapers need no client
    // certificate.
    let metrics = http_get(&g.members[&leader].metrics, "/metrics").await;
    assert!(
        metrics.contains("pgquorum_monitor_is_leader{member=\""),
        "{metrics}"
    );
}

fn futures_group_id(g: &MonitorGroup, id: u64) -> String {
    let rt = tokio::runtime::Handle::current();
    tokio::task::block_in_place(|| rt.block_on(g.status(id)))
        .expect("member answers")
        .group_id
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_refuses_another_groups_directory_or_a_contradicting_peer_list() {
    let mut g = MonitorGroup::new(3);
    for id in [1, 2, 3] {
        g.start(id);
    }
    g.wait_leader(WAIT).await;
    g.kill(1);

    // Same data directory, different --peer list: refused with a way out.
    let dir = g.members[&1].data_dir.display().to_string();
    let listen = g.addr(1);
    let (ok, out) = g.cli(&[
        "monitor",
        "run",
        "--node-id",
        "1",
        "--listen",
        &listen,
        "--data-dir",
        &dir,
        "--peer",
        &format!("1={listen}"),
        "--peer",
        "2=127.0.0.1:1",
        "--peer",
        "3=127.0.0.1:2",
    ]);
    assert!(!ok);
    assert!(
        out.contains("belongs to monitor group") || out.contains("contradicts"),
        "{out}"
    );

    // A --peer list with a member missing, but the same group id cannot happen; a
    // directory of this group given the group's own list starts fine again.
    g.start(1);
    g.wait_leader(WAIT).await;
}
