//! Golden files of everything a monitor member persists: Raft log entries (one per
//! `Command` variant, plus blank and membership entries), the state-machine snapshot,
//! and the values it keeps in its sled `meta` tree (header, vote, committed, purged,
//! snapshot metadata). Every file under tests/golden/<label>/ was written by an older
//! (or this) version; this version must decode each one, and re-encoding must keep
//! everything it says (`pgquorum_testkit::golden::keeps`).
//!
//! A new generation: `PGQUORUM_BLESS=<label> cargo test -p pgquorum-monitor --test golden`
//! writes tests/golden/<label>/ from the fixtures below, and refuses a label that
//! exists. Commit it; never edit or delete an older one (docs/operations.md, "Rolling
//! upgrades").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use openraft::{BasicNode, CommittedLeaderId, EntryPayload, Membership, Vote};
use pgquorum_core::{
    on_heartbeat, orchestrate, ClusterState, Command, FormationSetting, HealthTable, HostName, Lsn,
    NodeReport, NodeSetting, NodeState, QuorumLossPolicy, ReplicationPeer, DEFAULT_FORMATION,
};
use pgquorum_monitor::store::{Applied, Header, FORMAT_VERSION};
use pgquorum_monitor::types::{Entry, LogId, Request, SnapshotMeta, StoredMembership};
use pgquorum_testkit::golden;
use serde::de::DeserializeOwned;
use serde::Serialize;
use NodeState::*;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// The name of a command's variant, as its golden file is named. Exhaustive on
/// purpose: a new variant does not compile until it has a fixture here.
fn variant(c: &Command) -> &'static str {
    match c {
        Command::CreateFormation { .. } => "create_formation",
        Command::DropFormation { .. } => "drop_formation",
        Command::RegisterNode { .. } => "register_node",
        Command::ReportState { .. } => "report_state",
        Command::AssignGoal { .. } => "assign_goal",
        Command::SetNodeSetting { .. } => "set_node_setting",
        Command::SetFormationSetting { .. } => "set_formation_setting",
        Command::PerformSwitchover { .. } => "perform_switchover",
        Command::PerformFailover { .. } => "perform_failover",
        Command::SetMaintenance { .. } => "set_maintenance",
        Command::DropNode { .. } => "drop_node",
        Command::RecordSystemIdentifier { .. } => "record_system_identifier",
        Command::ReinitNode { .. } => "reinit_node",
        Command::ForgetNode { .. } => "forget_node",
        Command::RecordEvent { .. } => "record_event",
    }
}

/// One command of every variant, with every optional field set (so that its name is
/// in the bytes, and a rename shows).
fn commands() -> Vec<Command> {
    vec![
        Command::CreateFormation {
            name: "sales".into(),
            number_sync_standbys: Some(2),
        },
        Command::DropFormation {
            name: "sales".into(),
        },
        Command::RegisterNode {
            formation: DEFAULT_FORMATION.into(),
            name: "pg-1".into(),
            host: HostName::parse("db-1.example.com").unwrap(),
            port: 5432,
            candidate_priority: 50,
            replication_quorum: true,
            system_identifier: 7_300_000_000_000_000_001,
            pg_major_version: 15,
            current_state: Init,
        },
        Command::ReportState {
            node_id: 2,
            state: Secondary,
            lsn: Lsn::new(0x3_0000_0060),
            timeline: 2,
            pg_running: true,
            // A keeper's sequence counts from the wall clock (ms) at its start.
            sequence: 1_764_000_000_123,
        },
        Command::AssignGoal {
            node_id: 3,
            goal: PreparePromotion,
            reason: "primary pg-1 is unhealthy".into(),
            expected: Some(Secondary),
        },
        Command::SetNodeSetting {
            formation: DEFAULT_FORMATION.into(),
            node: "pg-2".into(),
            setting: NodeSetting::CandidatePriority(10),
        },
        Command::SetFormationSetting {
            formation: DEFAULT_FORMATION.into(),
            setting: FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue),
        },
        Command::PerformSwitchover {
            formation: DEFAULT_FORMATION.into(),
            group_id: 0,
            candidate: Some("pg-2".into()),
        },
        Command::PerformFailover {
            formation: DEFAULT_FORMATION.into(),
            group_id: 0,
        },
        Command::SetMaintenance {
            formation: DEFAULT_FORMATION.into(),
            node: "pg-3".into(),
            enable: true,
        },
        Command::DropNode {
            formation: DEFAULT_FORMATION.into(),
            node: "pg-3".into(),
        },
        Command::RecordSystemIdentifier {
            node_id: 1,
            system_identifier: 7_300_000_000_000_000_001,
        },
        Command::ReinitNode {
            formation: DEFAULT_FORMATION.into(),
            node: "pg-3".into(),
        },
        Command::ForgetNode {
            node_id: 3,
            reason: "its keeper was silent for a lease and its margin".into(),
        },
        Command::RecordEvent {
            formation: DEFAULT_FORMATION.into(),
            group_id: 0,
            node_id: Some(1),
            description: "the keeper of pg-1 restarted PostgreSQL in place".into(),
        },
    ]
}

/// The settings variants a command can carry besides the ones above: each gets an
/// entry file too, since a renamed setting breaks reading an old log as surely.
fn setting_commands() -> Vec<(&'static str, Command)> {
    let f = || DEFAULT_FORMATION.to_string();
    vec![
        (
            "set_node_setting-replication_quorum",
            Command::SetNodeSetting {
                formation: f(),
                node: "pg-2".into(),
                setting: NodeSetting::ReplicationQuorum(false),
            },
        ),
        (
            "set_formation_setting-number_sync_standbys",
            Command::SetFormationSetting {
                formation: f(),
                setting: FormationSetting::NumberSyncStandbys(2),
            },
        ),
        (
            "set_formation_setting-heartbeat_interval_ms",
            Command::SetFormationSetting {
                formation: f(),
                setting: FormationSetting::HeartbeatIntervalMs(250),
            },
        ),
        (
            "set_formation_setting-lease_ms",
            Command::SetFormationSetting {
                formation: f(),
                setting: FormationSetting::LeaseMs(2000),
            },
        ),
        (
            "set_formation_setting-lease_margin_ms",
            Command::SetFormationSetting {
                formation: f(),
                setting: FormationSetting::LeaseMarginMs(400),
            },
        ),
    ]
}

fn log_id(term: u64, index: u64) -> LogId {
    LogId::new(CommittedLeaderId::new(term, 1), index)
}

fn membership() -> Membership<u64, BasicNode> {
    let nodes: BTreeMap<u64, BasicNode> = (1..=4)
        .map(|i| (i, BasicNode::new(format!("10.0.0.{i}:7000"))))
        .collect();
    // Members 1-3 vote; 4 is a learner catching up (as during add-member).
    Membership::new(vec![BTreeSet::from([1, 2, 3])], nodes)
}

/// A monitor leader's view while it drives a group: the state, its health table, its clock.
struct Leader {
    state: ClusterState,
    health: HealthTable,
    now: u64,
    seq: u64,
}

impl Leader {
    fn op(&mut self, cmd: Command, by: &str) {
        self.state.apply_by(&cmd, self.now, Some(by)).unwrap();
    }

    fn register(&mut self, formation: &str, name: &str, host: &str, priority: u8) {
        self.op(
            Command::RegisterNode {
                formation: formation.into(),
                name: name.into(),
                host: HostName::parse(host).unwrap(),
                port: 5432,
                candidate_priority: priority,
                replication_quorum: true,
                system_identifier: 0,
                pg_major_version: 15,
                current_state: Init,
            },
            &format!("keeper/{name}"),
        );
    }

    /// Every node of `formation` reports having reached its goal, then the
    /// orchestrator decides; `rounds` times, 200 ms apart.
    fn settle(&mut self, formation: &str, rounds: usize) {
        for _ in 0..rounds {
            let nodes: Vec<(u64, NodeState, String)> = self
                .state
                .nodes
                .values()
                .filter(|n| n.formation == formation)
                .map(|n| (n.id, n.goal_state, n.name.clone()))
                .collect();
            for (id, goal, _) in &nodes {
                self.seq += 1;
                let streaming = if goal.is_writable() {
                    nodes
                        .iter()
                        .filter(|(o, g, _)| o != id && *g != Maintenance)
                        .map(|(_, _, name)| ReplicationPeer {
                            application_name: name.clone(),
                            state: "streaming".into(),
                            sync_state: "quorum".into(),
                            write_lsn: Lsn::new(0x300_0060),
                            flush_lsn: Lsn::new(0x300_0060),
                            replay_lsn: Lsn::new(0x300_0060),
                            write_lag_ms: Some(1),
                            flush_lag_ms: Some(2),
                            replay_lag_ms: Some(3),
                        })
                        .collect()
                } else {
                    vec![]
                };
                let report = NodeReport {
                    node_id: *id,
                    current_state: *goal,
                    pg_running: *goal != Maintenance,
                    pg_in_recovery: !goal.is_writable(),
                    current_lsn: Lsn::new(0x300_0060),
                    received_lsn: Lsn::new(0x300_0060),
                    replayed_lsn: Lsn::new(0x300_0060),
                    timeline: 1,
                    system_identifier: 7_300_000_000_000_000_001,
                    replication: streaming,
                    sequence: self.seq,
                    pg_restarts: 0,
                    fences: 0,
                };
                self.health.observe(report.clone(), self.now);
                for c in on_heartbeat(&self.state, &self.health, &report, self.now) {
                    let _ = self.state.apply(&c, self.now);
                }
            }
            for c in orchestrate(&self.state, &self.health, self.now) {
                let _ = self.state.apply(&c, self.now);
            }
            self.now += 200;
        }
    }
}

/// A cluster state with two formations, nodes in several states (primary, secondary,
/// maintenance, single), changed settings, a switchover under way and events with
/// their authors: as much of the snapshot format as a running cluster fills in.
fn cluster_state() -> ClusterState {
    const T0: u64 = 1_764_460_800_000; // 2025-11-30T00:00:00Z
    let mut l = Leader {
        state: ClusterState::default(),
        health: HealthTable::new(T0),
        now: T0,
        seq: 0,
    };
    l.register(DEFAULT_FORMATION, "pg-1", "10.0.0.11", 50);
    l.settle(DEFAULT_FORMATION, 4);
    l.register(DEFAULT_FORMATION, "pg-2", "db-2.example.com", 50);
    l.register(DEFAULT_FORMATION, "pg-3", "fe80::3", 30);
    l.settle(DEFAULT_FORMATION, 8);
    l.op(
        Command::SetFormationSetting {
            formation: DEFAULT_FORMATION.into(),
            setting: FormationSetting::LeaseMs(2000),
        },
        "operator/alice",
    );
    l.op(
        Command::SetMaintenance {
            formation: DEFAULT_FORMATION.into(),
            node: "pg-3".into(),
            enable: true,
        },
        "operator/alice",
    );
    l.settle(DEFAULT_FORMATION, 4);
    l.op(
        Command::CreateFormation {
            name: "sales".into(),
            number_sync_standbys: Some(0),
        },
        "operator/alice",
    );
    l.op(
        Command::SetFormationSetting {
            formation: "sales".into(),
            setting: FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue),
        },
        "operator/bob",
    );
    l.register("sales", "s-1", "10.1.0.1", 100);
    l.settle("sales", 4);
    l.op(
        Command::SetNodeSetting {
            formation: DEFAULT_FORMATION.into(),
            node: "pg-2".into(),
            setting: NodeSetting::CandidatePriority(70),
        },
        "operator/alice",
    );
    l.op(
        Command::PerformSwitchover {
            formation: DEFAULT_FORMATION.into(),
            group_id: 0,
            candidate: Some("pg-2".into()),
        },
        "operator/alice",
    );
    l.settle(DEFAULT_FORMATION, 1);
    let mut s = l.state;
    // Fields a short run leaves at their defaults are given values, so that their
    // names are in the bytes too (a snapshot is read back as it is, not re-checked).
    let g = s
        .formations
        .get_mut(DEFAULT_FORMATION)
        .and_then(|f| f.groups.get_mut(&0))
        .expect("group 0 of the default formation");
    if let Some(f) = g.failover.as_mut() {
        f.fenced_at.get_or_insert(T0 + 5_000);
        f.fast_forward_source.get_or_insert(1);
    }
    g.floor_unknown.get_or_insert(1);
    // `perform reinit` was asked of pg-3 once.
    if let Some(n) = s.nodes.values_mut().find(|n| n.name == "pg-3") {
        n.reinit_seq = 1;
    }
    s
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).unwrap()
}

/// Every golden file of this version: (file name, bytes exactly as the store writes them).
fn fixtures() -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let entry = |i: u64, cmd: Command, by: Option<&str>| Entry {
        log_id: log_id(3, i),
        payload: EntryPayload::Normal(Request {
            at_ms: 1_764_460_800_000 + i,
            cmd,
            by: by.map(Into::into),
        }),
    };
    for (i, cmd) in commands().into_iter().enumerate() {
        let name = variant(&cmd);
        let by = (i % 2 == 0).then_some("operator/alice");
        out.push((
            format!("entry-{name}.json"),
            json(&entry(10 + i as u64, cmd, by)),
        ));
    }
    for (i, (name, cmd)) in setting_commands().into_iter().enumerate() {
        out.push((
            format!("entry-{name}.json"),
            json(&entry(30 + i as u64, cmd, Some("operator/bob"))),
        ));
    }
    // Every node state, as a report would log it: a renamed state breaks old logs and
    // snapshots alike.
    for (i, st) in NodeState::ALL.into_iter().enumerate() {
        let cmd = Command::ReportState {
            node_id: 1,
            state: st,
            lsn: Lsn::new(0x300_0060),
            timeline: 1,
            pg_running: true,
            sequence: 0,
        };
        out.push((
            format!("entry-report_state-{st}.json"),
            json(&entry(50 + i as u64, cmd, None)),
        ));
    }
    out.push((
        "entry-blank.json".into(),
        json(&Entry {
            log_id: log_id(3, 1),
            payload: EntryPayload::Blank,
        }),
    ));
    out.push((
        "entry-membership.json".into(),
        json(&Entry {
            log_id: log_id(3, 2),
            payload: EntryPayload::Membership(membership()),
        }),
    ));
    let stored = StoredMembership::new(Some(log_id(3, 2)), membership());
    let applied = Applied {
        last_applied: Some(log_id(3, 40)),
        last_membership: stored.clone(),
        state: cluster_state(),
    };
    out.push(("snapshot.json".into(), json(&applied)));
    out.push((
        "meta-header.json".into(),
        json(&Header {
            format_version: FORMAT_VERSION,
            group_id: "a3f1c2d4-group".into(),
        }),
    ));
    out.push(("meta-vote.json".into(), json(&Vote::new_committed(3, 1))));
    out.push(("meta-committed.json".into(), json(&Some(log_id(3, 40)))));
    out.push(("meta-last_purged.json".into(), json(&log_id(2, 9))));
    out.push((
        "meta-snapshot_meta.json".into(),
        json(&SnapshotMeta {
            last_log_id: Some(log_id(3, 40)),
            last_membership: stored,
            snapshot_id: "T3-N1-40-1764460900000".into(),
        }),
    ));
    out
}

/// Decodes with the current code, re-encodes, decodes again: the value must be stable
/// and keep everything the old bytes said.
fn check<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(path: &Path) -> T {
    let bytes = std::fs::read(path).unwrap();
    let v: T = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("{}: this version cannot read it: {e}", path.display()));
    let again = json(&v);
    let back: T = serde_json::from_slice(&again)
        .unwrap_or_else(|e| panic!("{}: re-encoded, it no longer reads: {e}", path.display()));
    assert_eq!(back, v, "{}: re-encoding changed the value", path.display());
    let old: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let new: serde_json::Value = serde_json::from_slice(&again).unwrap();
    golden::keeps(&old, &new).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    v
}

#[test]
fn every_golden_file_reads_with_this_version() {
    if std::env::var_os(golden::BLESS_VAR).is_some() {
        return; // a writing run: the next plain run reads what it wrote
    }
    let gens = golden::generations(&root());
    assert!(!gens.is_empty(), "no goldens under {}", root().display());
    let mut files = 0;
    for (label, paths) in gens {
        for p in paths {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            match name.as_str() {
                n if n.starts_with("entry-") => {
                    let e: Entry = check(&p);
                    if let EntryPayload::Normal(req) = &e.payload {
                        // The state machine applies it: refused or not, no panic.
                        let mut s = ClusterState::default();
                        let _ = s.apply_by(&req.cmd, req.at_ms, req.by.as_deref());
                    }
                }
                "snapshot.json" => {
                    // Applied has no PartialEq: compare its parts.
                    let bytes = std::fs::read(&p).unwrap();
                    let a: Applied = serde_json::from_slice(&bytes)
                        .unwrap_or_else(|e| panic!("{label}/{name}: cannot read it: {e}"));
                    let again = json(&a);
                    let b: Applied = serde_json::from_slice(&again).unwrap();
                    assert_eq!(a.state, b.state);
                    assert_eq!(a.last_applied, b.last_applied);
                    assert_eq!(a.last_membership, b.last_membership);
                    golden::keeps(
                        &serde_json::from_slice(&bytes).unwrap(),
                        &serde_json::from_slice(&again).unwrap(),
                    )
                    .unwrap_or_else(|e| panic!("{label}/{name}: {e}"));
                    assert!(!a.state.nodes.is_empty(), "{label}/{name}: no nodes read");
                }
                "meta-header.json" => {
                    let h: Header = check(&p);
                    assert_eq!(
                        h.format_version, FORMAT_VERSION,
                        "{label}: a data directory of format {} is refused by this version \
                         (store::open): migrate it, or keep reading that version",
                        h.format_version
                    );
                }
                "meta-vote.json" => {
                    check::<Vote<u64>>(&p);
                }
                "meta-committed.json" => {
                    check::<Option<LogId>>(&p);
                }
                "meta-last_purged.json" => {
                    check::<LogId>(&p);
                }
                "meta-snapshot_meta.json" => {
                    check::<SnapshotMeta>(&p);
                }
                other => panic!("{label}/{other}: a golden file no test reads"),
            }
            files += 1;
        }
    }
    assert!(files > 0);
}

/// Every command variant and setting this version can log is pinned by some
/// generation: a new one needs a new generation (bless), or old logs are untested
/// against it once a later change renames it.
#[test]
fn every_command_variant_has_a_golden() {
    if std::env::var_os(golden::BLESS_VAR).is_some() {
        return; // being written by fixtures_round_trip_and_bless
    }
    let present: BTreeSet<String> = golden::generations(&root())
        .into_iter()
        .flat_map(|(_, files)| files)
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for (name, _) in fixtures() {
        assert!(
            present.contains(&name),
            "no golden {name}: run `PGQUORUM_BLESS=<label> cargo test -p pgquorum-monitor \
             --test golden` and commit tests/golden/<label>/ (see docs/operations.md)"
        );
    }
}

/// The fixtures of this version decode as they were built (no field is lost on the
/// way), and writes a new generation when `PGQUORUM_BLESS` is set.
#[test]
fn fixtures_round_trip_and_bless() {
    let files = fixtures();
    let state = cluster_state();
    let snapshot = files
        .iter()
        .find(|(n, _)| n == "snapshot.json")
        .map(|(_, b)| b.clone())
        .unwrap();
    let a: Applied = serde_json::from_slice(&snapshot).unwrap();
    assert_eq!(a.state, state);
    // The snapshot shows what it is meant to: primary, secondary, maintenance, single,
    // a switchover under way, changed settings, events with authors.
    let goals: BTreeSet<NodeState> = state.nodes.values().map(|n| n.goal_state).collect();
    assert!(goals.contains(&Maintenance), "{goals:?}");
    assert!(goals.contains(&Single), "{goals:?}");
    assert!(state.formations.len() == 2);
    assert!(state.events.iter().any(|e| !e.by.is_empty()));
    golden::bless(&root(), &files);
}
