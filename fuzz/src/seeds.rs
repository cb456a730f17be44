//! Seed inputs: valid messages and scenarios, written to `fuzz/corpus/<target>/seed-*`
//! by `PGQUORUM_WRITE_SEEDS=1 cargo test --manifest-path fuzz/Cargo.toml` (see
//! fuzz/README.md). libFuzzer starts from them and mutates.

use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{BasicNode, CommittedLeaderId, Entry, EntryPayload, Membership, Vote};
use pgquorum_api::pb::monitor as pb;
use pgquorum_api::pb::raft as rpb;
use pgquorum_core::{
    Command, FormationSetting, HostName, Lsn, NodeSetting, NodeState, QuorumLossPolicy,
};
use pgquorum_monitor::store::{Applied, Header};
use pgquorum_monitor::types::{LogId, Request, SnapshotMeta, StoredMembership, TypeConfig};
use prost::Message;

use crate::script::{run_world, Script, World};
use NodeState::*;

/// A bootstrapped group: `a` primary, `b` and `c` secondaries, in the default formation.
pub fn bootstrap_script() -> Script {
    let mut s = Script::default();
    s.register("a").settle(&["a"], 4);
    s.register("b").register("c").settle(&["a", "b", "c"], 6);
    s
}

pub fn running_cluster() -> World {
    run_world(&bootstrap_script().0)
}

/// Named scripts for the `apply` target.
pub fn scripts() -> Vec<(&'static str, Vec<u8>)> {
    let mut out = vec![("bootstrap", bootstrap_script().0)];
    let mut s = bootstrap_script();
    s.switchover(Some("b")).settle(&["a", "b", "c"], 6);
    out.push(("switchover", s.0));
    let mut s = bootstrap_script();
    s.beat_down("a", Primary)
        .tick(3000)
        .beat("b", Secondary, 20)
        .beat("c", Secondary, 18)
        .orchestrate()
        .tick(3000)
        .settle(&["b", "c"], 6);
    out.push(("primary-lost", s.0));
    let mut s = bootstrap_script();
    s.maintenance("c", true)
        .settle(&["a", "b", "c"], 3)
        .maintenance("c", false)
        .settle(&["a", "b", "c"], 3);
    out.push(("maintenance", s.0));
    let mut s = bootstrap_script();
    s.failover()
        .settle(&["a", "b", "c"], 5)
        .drop_node("a")
        .settle(&["b", "c"], 2);
    out.push(("failover-drop", s.0));
    let mut s = bootstrap_script();
    s.priority("b", 0)
        .number_sync(2)
        .settle(&["a", "b", "c"], 2)
        .new_leader()
        .tick(5000)
        .orchestrate();
    out.push(("settings-new-leader", s.0));
    let mut s = Script::default();
    s.create_formation(2)
        .json(&Command::RegisterNode {
            formation: "sales".into(),
            name: "x".into(),
            host: HostName::parse("10.1.1.1").expect("valid"),
            port: 6543,
            candidate_priority: 100,
            replication_quorum: false,
            system_identifier: 7,
            pg_major_version: 15,
            current_state: Init,
        })
        .json(&Command::AssignGoal {
            node_id: 1,
            goal: Single,
            reason: "r".into(),
            expected: Some(Init),
        });
    out.push(("json", s.0));
    out
}

fn sel(i: usize, m: impl Message) -> Vec<u8> {
    let mut v = vec![i as u8];
    v.extend(m.encode_to_vec());
    v
}

/// Named messages for the `convert` target (selector byte, then the protobuf).
pub fn messages() -> Vec<(&'static str, Vec<u8>)> {
    let register = pb::RegisterNodeRequest {
        formation: "".into(),
        name: "a".into(),
        host: "db-1.example.com".into(),
        port: 5432,
        candidate_priority: 50,
        replication_quorum: true,
        system_identifier: 7,
        pg_major_version: 15,
        current_state: "secondary".into(),
    };
    let peer = |name: &str, host: &str| pb::PeerNode {
        node_id: 2,
        name: name.into(),
        host: host.into(),
        port: 5432,
        streamed: true,
    };
    vec![
        (
            "create-formation",
            sel(
                0,
                pb::CreateFormationRequest {
                    name: "sales".into(),
                    number_sync_standbys: Some(1),
                },
            ),
        ),
        (
            "drop-formation",
            sel(
                1,
                pb::DropFormationRequest {
                    name: "sales".into(),
                },
            ),
        ),
        ("register", sel(2, register.clone())),
        (
            "register-hba-injection",
            sel(
                2,
                pb::RegisterNodeRequest {
                    host: "127.0.0.7/32 trust\nhost all all 127.0.0.7/32 trust\n#".into(),
                    ..register
                },
            ),
        ),
        (
            "node-setting",
            sel(
                3,
                pb::SetNodeSettingRequest {
                    formation: "".into(),
                    node: "b".into(),
                    name: "candidate-priority".into(),
                    value: "0".into(),
                },
            ),
        ),
        (
            "formation-setting",
            sel(
                4,
                pb::SetFormationSettingRequest {
                    formation: "default".into(),
                    name: "on-quorum-loss".into(),
                    value: "continue".into(),
                },
            ),
        ),
        (
            "switchover",
            sel(
                5,
                pb::PerformSwitchoverRequest {
                    formation: "".into(),
                    group_id: 0,
                    candidate: "b".into(),
                },
            ),
        ),
        (
            "failover",
            sel(
                6,
                pb::PerformFailoverRequest {
                    formation: "".into(),
                    group_id: 0,
                },
            ),
        ),
        (
            "maintenance",
            sel(
                7,
                pb::SetMaintenanceRequest {
                    formation: "".into(),
                    node: "c".into(),
                    enable: true,
                },
            ),
        ),
        (
            "drop-node",
            sel(
                8,
                pb::DropNodeRequest {
                    formation: "".into(),
                    node: "c".into(),
                },
            ),
        ),
        (
            "reinit-node",
            sel(
                14,
                pb::ReinitNodeRequest {
                    formation: "".into(),
                    node: "c".into(),
                },
            ),
        ),
        (
            "node-active",
            sel(
                9,
                pb::NodeActiveRequest {
                    node_id: 1,
                    formation: "".into(),
                    name: "a".into(),
                    current_state: "primary".into(),
                    pg_running: true,
                    pg_in_recovery: false,
                    current_lsn: 0x300_0060,
                    received_lsn: 0,
                    replayed_lsn: 0,
                    timeline: 1,
                    system_identifier: 7,
                    replication: vec![pb::ReplicationPeer {
                        application_name: "b".into(),
                        state: "streaming".into(),
                        sync_state: "quorum".into(),
                        write_lsn: 0x300_0060,
                        flush_lsn: 0x300_0060,
                        replay_lsn: 0x300_0000,
                        write_lag_ms: Some(1),
                        flush_lag_ms: Some(2),
                        replay_lag_ms: None,
                    }],
                    sequence: 1_700_000_000_000,
                    keeper_instance: 99,
                    sent_ms: 1_700_000_000_000,
                    pg_restarts: 1,
                    fences: 0,
                },
            ),
        ),
        (
            "assignment",
            sel(
                10,
                pb::Assignment {
                    goal_state: "secondary".into(),
                    primary: Some(peer("a", "10.0.0.1")),
                    synchronous_standby_names: "ANY 1 (\"b\", \"c\")".into(),
                    peers: vec![peer("b", "::1"), peer("c", "db-3")],
                    lease_ms: 1500,
                    heartbeat_interval_ms: 200,
                    on_quorum_loss: "block".into(),
                    reinit: 0,
                },
            ),
        ),
        (
            "add-member",
            sel(
                11,
                pb::AddMemberRequest {
                    id: 4,
                    address: "[::1]:7004".into(),
                },
            ),
        ),
        (
            "get-state",
            sel(
                12,
                pb::GetStateRequest {
                    formation: "sales".into(),
                    linearizable: true,
                },
            ),
        ),
        (
            "get-events",
            sel(
                13,
                pb::GetEventsRequest {
                    formation: "default".into(),
                    limit: 10,
                },
            ),
        ),
    ]
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

/// One command of every kind, as the leader proposes them.
pub fn commands() -> Vec<Command> {
    vec![
        Command::CreateFormation {
            name: "sales".into(),
            number_sync_standbys: Some(2),
        },
        Command::DropFormation {
            name: "sales".into(),
        },
        Command::RegisterNode {
            formation: "default".into(),
            name: "d".into(),
            host: HostName::parse("fe80::1").expect("valid"),
            port: 5433,
            candidate_priority: 0,
            replication_quorum: false,
            system_identifier: 7,
            pg_major_version: 15,
            current_state: Init,
        },
        Command::ReportState {
            node_id: 2,
            state: Secondary,
            lsn: Lsn::new(0x300_0060),
            timeline: 1,
            pg_running: true,
            sequence: 1_764_000_000_123,
        },
        Command::AssignGoal {
            node_id: 3,
            goal: PreparePromotion,
            reason: "fuzz".into(),
            expected: Some(Secondary),
        },
        Command::SetNodeSetting {
            formation: "default".into(),
            node: "b".into(),
            setting: NodeSetting::CandidatePriority(10),
        },
        Command::SetFormationSetting {
            formation: "default".into(),
            setting: FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue),
        },
        Command::PerformSwitchover {
            formation: "default".into(),
            group_id: 0,
            candidate: Some("b".into()),
        },
        Command::PerformFailover {
            formation: "default".into(),
            group_id: 0,
        },
        Command::SetMaintenance {
            formation: "default".into(),
            node: "c".into(),
            enable: true,
        },
        Command::DropNode {
            formation: "default".into(),
            node: "c".into(),
        },
        Command::RecordSystemIdentifier {
            node_id: 1,
            system_identifier: 7,
        },
    ]
}

fn json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("seeds serialise")
}

fn kind(i: usize, body: Vec<u8>) -> Vec<u8> {
    let mut v = vec![i as u8];
    v.extend(body);
    v
}

fn payload(data: Vec<u8>, error: Vec<u8>) -> Vec<u8> {
    rpb::RaftPayload { data, error }.encode_to_vec()
}

/// Named inputs for the `raft_payload` target.
pub fn raft_payloads() -> Vec<(String, Vec<u8>)> {
    let vote = Vote::new_committed(3, 1);
    let members: std::collections::BTreeMap<u64, BasicNode> = (1..=3)
        .map(|i| (i, BasicNode::new(format!("127.0.0.1:{}", 7000 + i))))
        .collect();
    let membership = Membership::new(vec![members.keys().copied().collect()], members.clone());
    let entries: Vec<Entry<TypeConfig>> = commands()
        .into_iter()
        .enumerate()
        .map(|(i, cmd)| Entry {
            log_id: log_id(3, 10 + i as u64),
            payload: EntryPayload::Normal(Request {
                at_ms: 1_700_000_000_000,
                cmd,
                by: Some("operator/alice".into()),
            }),
        })
        .collect();
    let mut out: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote,
            prev_log_id: Some(log_id(3, 9 + i as u64)),
            leader_commit: Some(log_id(3, 9)),
            entries: vec![e.clone()],
        };
        out.push((format!("append-{i}"), kind(0, payload(json(&req), vec![]))));
        out.push((format!("entry-{i}"), kind(7, json(e))));
    }
    let blank = Entry::<TypeConfig> {
        log_id: log_id(3, 1),
        payload: EntryPayload::Blank,
    };
    let member_entry = Entry::<TypeConfig> {
        log_id: log_id(3, 2),
        payload: EntryPayload::Membership(membership.clone()),
    };
    out.push(("entry-blank".into(), kind(7, json(&blank))));
    out.push(("entry-membership".into(), kind(7, json(&member_entry))));
    let heartbeat = AppendEntriesRequest::<TypeConfig> {
        vote,
        prev_log_id: Some(log_id(3, 2)),
        leader_commit: Some(log_id(3, 2)),
        entries: vec![blank, member_entry],
    };
    out.push((
        "append-blank-membership".into(),
        kind(0, payload(json(&heartbeat), vec![])),
    ));
    let vreq = VoteRequest::new(Vote::new(4, 2), Some(log_id(3, 20)));
    out.push(("vote".into(), kind(1, payload(json(&vreq), vec![]))));
    let meta = SnapshotMeta {
        last_log_id: Some(log_id(3, 20)),
        last_membership: StoredMembership::new(Some(log_id(3, 2)), membership),
        snapshot_id: "3-1-20-1700000000000".into(),
    };
    let world = running_cluster();
    let applied = Applied {
        last_applied: Some(log_id(3, 20)),
        last_membership: meta.last_membership.clone(),
        state: world.state,
    };
    let chunk = rpb::SnapshotChunk {
        vote: json(&vote),
        meta: json(&meta),
        offset: 0,
        data: json(&applied),
        done: true,
    };
    out.push(("install-snapshot".into(), kind(2, chunk.encode_to_vec())));
    let ae_ok: AppendEntriesResponse<u64> = AppendEntriesResponse::Success;
    let ae_hv: AppendEntriesResponse<u64> = AppendEntriesResponse::HigherVote(Vote::new(5, 2));
    out.push((
        "append-reply".into(),
        kind(3, payload(json(&ae_ok), vec![])),
    ));
    out.push((
        "append-reply-higher".into(),
        kind(3, payload(json(&ae_hv), vec![])),
    ));
    let vresp = VoteResponse::new(Vote::new(4, 2), Some(log_id(3, 20)), true);
    out.push(("vote-reply".into(), kind(4, payload(json(&vresp), vec![]))));
    let isr = InstallSnapshotResponse { vote };
    out.push((
        "install-snapshot-reply".into(),
        kind(5, payload(json(&isr), vec![])),
    ));
    out.push(("snapshot-data".into(), kind(6, json(&applied))));
    let header = Header {
        format_version: 1,
        group_id: "g-1".into(),
    };
    out.push(("meta-header".into(), kind(8, json(&header))));
    out.push(("meta-vote".into(), kind(8, json(&vote))));
    out.push(("meta-log-id".into(), kind(8, json(&Some(log_id(3, 20))))));
    out.push(("meta-snapshot".into(), kind(8, json(&meta))));
    out
}

/// Every seed: (target, name, bytes).
pub fn all() -> Vec<(&'static str, String, Vec<u8>)> {
    let mut out = Vec::new();
    for (n, b) in messages() {
        out.push(("convert", n.to_owned(), b));
    }
    for (n, b) in raft_payloads() {
        out.push(("raft_payload", n, b));
    }
    for (n, b) in scripts() {
        out.push(("apply", n.to_owned(), b));
    }
    out
}
