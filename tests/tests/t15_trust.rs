//! Trust, tried as an attacker would: every forbidden call from every wrong identity is
//! refused and changes nothing (checked on the state afterwards), against a real
//! cluster running with mutual TLS; then the operator's own call works and the event
//! names who asked for it.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use pgquorum_api::client::MonitorClient;
use pgquorum_api::pb::monitor as pb;
use pgquorum_api::pb::raft as rpb;
use pgquorum_api::pb::raft::raft_transport_client::RaftTransportClient;
use pgquorum_testkit::{temp_dir, TestCerts};
use pgquorum_tests::cluster::{primary_of, Cluster};
use pgquorum_trust::{Dial, Identity, Security, Validity, CALLER_HEADER};
use tonic::Code;

/// What an attack must not change: nodes (address, goal), settings, the monitor group's
/// voters and term, and the event history.
#[derive(Debug, PartialEq)]
struct Snapshot {
    nodes: Vec<(String, String, u32, String)>,
    settings: String,
    voters: Vec<u64>,
    term: u64,
    last_event: u64,
}

async fn snapshot(c: &Cluster) -> Snapshot {
    let client = c.monitors.client();
    let state = client
        .call(|mut raw| async move {
            raw.get_state(pb::GetStateRequest {
                formation: String::new(),
                linearizable: true,
            })
            .await
        })
        .await
        .unwrap();
    let mut nodes: Vec<_> = state
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.host.clone(), n.port, n.goal_state.clone()))
        .collect();
    nodes.sort();
    let settings = client
        .call(|mut raw| async move {
            raw.get_settings(pb::GetSettingsRequest {
                formation: String::new(),
            })
            .await
        })
        .await
        .unwrap();
    let events = client
        .call(|mut raw| async move {
            raw.get_events(pb::GetEventsRequest {
                formation: String::new(),
                limit: 1,
            })
            .await
        })
        .await
        .unwrap();
    let leader = c.monitors.wait_leader(Duration::from_secs(10)).await;
    let st = c.monitors.status(leader).await.unwrap();
    let mut voters: Vec<u64> = st
        .members
        .iter()
        .filter(|m| m.role == "voter")
        .map(|m| m.id)
        .collect();
    voters.sort();
    Snapshot {
        nodes,
        settings: format!("{:?}", settings.settings),
        voters,
        term: st.term,
        last_event: events.events.last().map(|e| e.id).unwrap_or(0),
    }
}

fn raw_client(addr: &str, security: Security) -> pgquorum_api::client::Raw {
    MonitorClient::new([addr.to_owned()], security)
        .unwrap()
        .raw(addr)
        .unwrap()
}

fn raft_client(addr: &str, security: &Security) -> RaftTransportClient<tonic::transport::Channel> {
    RaftTransportClient::new(pgquorum_trust::channel(addr, security, &Dial::default()).unwrap())
}

fn switchover() -> pb::PerformSwitchoverRequest {
    pb::PerformSwitchoverRequest {
        formation: String::new(),
        group_id: 0,
        candidate: String::new(),
    }
}

/// A Vote claiming `candidate` with an absurd term: what once panicked the survivors.
fn forged_vote(candidate: u64) -> rpb::RaftPayload {
    let vote = serde_json::json!({
        "vote": {"leader_id": {"term": u64::MAX - 1, "node_id": candidate, "voted_for": candidate}, "committed": false},
        "last_log_id": null
    });
    rpb::RaftPayload {
        data: serde_json::to_vec(&vote).unwrap(),
        error: vec![],
    }
}

fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>, codes: &[Code]) {
    match r {
        Ok(v) => panic!("{what}: accepted ({v:?})"),
        // An empty list: any refusal (a failed handshake surfaces as whatever the
        // transport makes of it: UNAVAILABLE, CANCELLED, UNKNOWN).
        Err(s) => assert!(
            codes.is_empty() || codes.contains(&s.code()),
            "{what}: refused with {:?} {:?}, expected one of {codes:?}",
            s.code(),
            s.message()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forbidden_call_is_refused_and_changes_nothing() {
    let c = Cluster::start(3).await;
    let Some(certs) = c.monitors.certs.clone() else {
        eprintln!("SKIPPED t15_trust: PGQUORUM_TEST_INSECURE=1 runs the cluster without TLS");
        return;
    };
    let leader = c.monitors.wait_leader(Duration::from_secs(10)).await;
    let leader_addr = c.monitors.addr(leader);
    let follower = [1u64, 2, 3].into_iter().find(|i| *i != leader).unwrap();
    let follower_addr = c.monitors.addr(follower);
    // A settled cluster (the primary done applying its synchronous standbys), so that
    // nothing but an attack could change the snapshot.
    c.wait_healthy(2).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.wait_healthy(2).await;
    let before = snapshot(&c).await;
    let state = c.state().await.unwrap();
    let primary = c.primary().await;
    let node2 = state.iter().find(|n| n.name == "node2").unwrap().clone();
    let denied = [Code::PermissionDenied];
    // No TLS session comes up: any refusal.
    let no_tls: [Code; 0] = [];

    // No certificate at all: plain gRPC to a TLS port.
    let mut anon = raw_client(&follower_addr, Security::Insecure);
    refused(
        "switchover without a certificate",
        anon.perform_switchover(switchover()).await,
        &no_tls,
    );
    refused(
        "state without a certificate",
        anon.get_state(pb::GetStateRequest::default()).await,
        &no_tls,
    );

    // A certificate from another CA (an operator there).
    let other_dir = temp_dir("pgquorum-other-ca-");
    let other = TestCerts::new(other_dir.path());
    let mut foreign = raw_client(
        &leader_addr,
        other.security(Identity::Operator("admin".into())),
    );
    refused(
        "switchover with another CA's operator",
        foreign.perform_switchover(switchover()).await,
        &no_tls,
    );

    // An expired operator certificate of our own CA.
    let expired = Identity::Operator("expired".into());
    let now = SystemTime::now();
    certs.reissue(
        &expired,
        Validity {
            not_before: now - Duration::from_secs(3 * 86_400),
            not_after: now - Duration::from_secs(86_400),
        },
    );
    let mut old = raw_client(&leader_addr, certs.security(expired));
    refused(
        "switchover with an expired certificate",
        old.perform_switchover(switchover()).await,
        &no_tls,
    );

    // A viewer: reads, but may not change anything, also through a follower.
    let viewer = certs.security(Identity::Viewer("viewer".into()));
    let mut v = raw_client(&follower_addr, viewer.clone());
    assert!(v.get_state(pb::GetStateRequest::default()).await.is_ok());
    refused(
        "viewer switchover",
        v.perform_switchover(switchover()).await,
        &denied,
    );
    refused(
        "viewer number-sync-standbys 0",
        v.set_formation_setting(pb::SetFormationSettingRequest {
            formation: String::new(),
            name: "number-sync-standbys".into(),
            value: "0".into(),
        })
        .await,
        &denied,
    );
    refused(
        "viewer drop node",
        v.drop_node(pb::DropNodeRequest {
            formation: String::new(),
            node: "node2".into(),
        })
        .await,
        &denied,
    );
    refused(
        "viewer reinit node",
        v.reinit_node(pb::ReinitNodeRequest {
            formation: String::new(),
            node: "node2".into(),
        })
        .await,
        &denied,
    );
    // The event stream is a read: a viewer may follow it, nobody without a certificate.
    let mut stream = v
        .watch_events(pb::WatchEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(stream.message().await.unwrap().is_some());
    drop(stream);
    refused(
        "event stream without a certificate",
        anon.watch_events(pb::WatchEventsRequest::default()).await,
        &no_tls,
    );
    // A viewer naming an operator as the original caller (only members forward).
    let mut req = tonic::Request::new(switchover());
    req.metadata_mut()
        .insert(CALLER_HEADER, "operator/admin".parse().unwrap());
    refused(
        "viewer forging the caller header",
        v.perform_switchover(req).await,
        &denied,
    );

    // A keeper certificate for node1 acting as node2: register at an attacker's address,
    // heartbeat with node2's id (to keep a dead node "healthy"), or call operator APIs.
    let k1 = certs.security(Identity::Keeper("node1".into()));
    let mut k = raw_client(&leader_addr, k1.clone());
    refused(
        "node1's keeper registering node2",
        k.register_node(pb::RegisterNodeRequest {
            name: "node2".into(),
            host: "127.0.0.7".into(),
            port: 5999,
            candidate_priority: 50,
            replication_quorum: true,
            current_state: "secondary".into(),
            ..Default::default()
        })
        .await,
        &denied,
    );
    for name in ["node2", "node1"] {
        refused(
            &format!("node1's keeper beating with node2's id as {name}"),
            k.node_active(pb::NodeActiveRequest {
                node_id: node2.node_id,
                name: name.into(),
                current_state: "secondary".into(),
                pg_running: true,
                pg_in_recovery: true,
                sequence: u64::MAX,
                ..Default::default()
            })
            .await,
            &denied,
        );
    }
    refused(
        "keeper switchover",
        k.perform_switchover(switchover()).await,
        &denied,
    );

    // The Raft transport: keepers and operators may not speak it; a member may not
    // speak in another member's name.
    let admin = certs.security(Identity::Operator("admin".into()));
    for (who, sec) in [("keeper", &k1), ("operator", &admin)] {
        let mut r = raft_client(&follower_addr, sec);
        refused(
            &format!("{who} Vote"),
            r.vote(forged_vote(follower)).await,
            &denied,
        );
        refused(
            &format!("{who} AppendEntries"),
            r.append_entries(rpb::RaftPayload::default()).await,
            &denied,
        );
        refused(
            &format!("{who} InstallSnapshot"),
            r.install_snapshot(rpb::SnapshotChunk {
                data: vec![0xde, 0xad],
                ..Default::default()
            })
            .await,
            &denied,
        );
    }
    let impostor = certs.security(Identity::Member(leader));
    let mut r = raft_client(&follower_addr, &impostor);
    let victim = [1u64, 2, 3]
        .into_iter()
        .find(|i| *i != leader && *i != follower)
        .unwrap();
    refused(
        "a member voting in another member's name",
        r.vote(forged_vote(victim)).await,
        &denied,
    );

    // An operator adding a rogue voter: an address whose certificate is another CA's
    // "member 4". Refused before the group changes.
    let rogue = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let rogue_addr = rogue.local_addr().unwrap().to_string();
    let mut rogue_conns = pgquorum_trust::incoming(
        rogue,
        other.security(Identity::Member(4)),
        pgquorum_trust::Serve::default(),
    );
    let drain = tokio::spawn(async move {
        use tokio_stream::StreamExt;
        while rogue_conns.next().await.is_some() {}
    });
    // The leader gives a starting member a few seconds to answer: wait longer.
    let mut op = MonitorClient::new([leader_addr.clone()], admin.clone())
        .unwrap()
        .request_timeout(Duration::from_secs(30))
        .raw(&leader_addr)
        .unwrap();
    refused(
        "operator adding a member without a member certificate",
        op.add_member(pb::AddMemberRequest {
            id: 4,
            address: rogue_addr,
        })
        .await,
        &[Code::FailedPrecondition],
    );
    drain.abort();

    // A revoked operator: refused once the members reloaded the CRL (within 5 s).
    let gone = Identity::Operator("gone".into());
    certs.issue(&gone);
    let gone_sec = certs.security(gone.clone());
    certs.dir.revoke(&gone).unwrap();
    // Every member reloads the CRL on its own (within 5 s): wait until each refuses a
    // fresh connection, then try the forbidden call on each.
    let members: Vec<String> = [1u64, 2, 3].iter().map(|i| c.monitors.addr(*i)).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for addr in &members {
        loop {
            let mut g = raw_client(addr, gone_sec.clone());
            match g.get_state(pb::GetStateRequest::default()).await {
                Err(_) => break,
                Ok(_) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(500)).await
                }
                Ok(_) => panic!("{addr} still accepts a revoked certificate after 15 s"),
            }
        }
    }
    for addr in &members {
        let mut g = raw_client(addr, gone_sec.clone());
        refused(
            "switchover with a revoked certificate",
            g.perform_switchover(switchover()).await,
            &no_tls,
        );
    }

    // Nothing changed.
    c.wait_healthy(2).await;
    let after = snapshot(&c).await;
    assert_eq!(before, after, "an attack changed the state");
    assert_eq!(
        primary_of(&c.state().await.unwrap()).as_deref(),
        Some(primary.as_str())
    );
    for id in [1u64, 2, 3] {
        assert!(
            !c.monitors.log(id).contains("panicked"),
            "member {id} panicked:\n{}",
            c.monitors.log(id)
        );
    }

    // The operator's own switchover works, and its events name the operator.
    let (ok, out) = c.cli(&["perform", "switchover", "--timeout", "60"]);
    assert!(ok, "{out}\n{}", c.logs());
    let events = c
        .monitors
        .client()
        .call(|mut raw| async move {
            raw.get_events(pb::GetEventsRequest {
                formation: String::new(),
                limit: 200,
            })
            .await
        })
        .await
        .unwrap();
    assert!(
        events
            .events
            .iter()
            .any(|e| e.by == "operator/admin" && e.description.contains("switchover")),
        "no switchover event names operator/admin: {:?}",
        events.events
    );
}
