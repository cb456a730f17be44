//! Properties over the whole input space.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgquorum_core::*;
use proptest::prelude::*;

fn any_state() -> impl Strategy<Value = NodeState> {
    (0..NodeState::ALL.len()).prop_map(|i| NodeState::ALL[i])
}

proptest! {
    /// No dead ends: every goal the orchestrator can assign is reachable by the keeper
    /// from every state it can report, through allowed transitions, and never through a
    /// state that takes writes unless the goal itself does.
    #[test]
    fn every_assignable_goal_is_reachable_from_every_reportable_state(from in any_state(), to in any_state()) {
        prop_assume!(from != NodeState::Dropped && to != NodeState::Init);
        let path = keeper_path(from, to);
        prop_assert!(path.is_some(), "keeper cannot reach {} from {}", to, from);
        let path = path.unwrap();
        let mut cur = from;
        for s in &path {
            prop_assert!(transition_allowed(cur, *s), "{} -> {} not allowed", cur, s);
            prop_assert!(to.is_writable() || !s.is_writable(), "{} -> {} passes through {}", from, to, s);
            cur = *s;
        }
        prop_assert_eq!(cur, to);
        prop_assert_eq!(next_step(from, to), path.first().copied());
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register(u8),
    Report(u8, NodeState, u16),
    Assign(u8, NodeState),
    Switchover(Option<u8>),
    Maintenance(u8, bool),
    Drop(u8),
    Priority(u8, u8),
    Quorum(u8, bool),
    NumberSync(u32),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..5).prop_map(Op::Register),
        (0u8..5, any_state(), any::<u16>()).prop_map(|(n, s, l)| Op::Report(n, s, l)),
        (0u8..5, any_state()).prop_map(|(n, s)| Op::Assign(n, s)),
        proptest::option::of(0u8..5).prop_map(Op::Switchover),
        (0u8..5, any::<bool>()).prop_map(|(n, b)| Op::Maintenance(n, b)),
        (0u8..5).prop_map(Op::Drop),
        (0u8..5, 0u8..120).prop_map(|(n, p)| Op::Priority(n, p)),
        (0u8..5, any::<bool>()).prop_map(|(n, b)| Op::Quorum(n, b)),
        (0u32..5).prop_map(Op::NumberSync),
    ]
}

fn name(n: u8) -> String {
    format!("n{n}")
}

fn to_command(state: &ClusterState, op: &Op) -> Command {
    let f = String::new();
    let id = |n: u8| {
        state
            .node_by_name(DEFAULT_FORMATION, &name(n))
            .map(|x| x.id)
            .unwrap_or(1000)
    };
    match op {
        Op::Register(n) => Command::RegisterNode {
            formation: f,
            name: name(*n),
            host: "h".parse().unwrap(),
            port: 5432,
            candidate_priority: 50,
            replication_quorum: true,
            system_identifier: 0,
            pg_major_version: 15,
            current_state: NodeState::Init,
        },
        Op::Report(n, s, l) => Command::ReportState {
            node_id: id(*n),
            state: *s,
            lsn: *l as u64,
            timeline: 1,
            pg_running: true,
        },
        Op::Assign(n, s) => Command::AssignGoal {
            node_id: id(*n),
            goal: *s,
            reason: "random".into(),
            expected: None,
        },
        Op::Switchover(c) => Command::PerformSwitchover {
            formation: f,
            group_id: 0,
            candidate: c.map(name),
        },
        Op::Maintenance(n, b) => Command::SetMaintenance {
            formation: f,
            node: name(*n),
            enable: *b,
        },
        Op::Drop(n) => Command::DropNode {
            formation: f,
            node: name(*n),
        },
        Op::Priority(n, p) => Command::SetNodeSetting {
            formation: f,
            node: name(*n),
            setting: NodeSetting::CandidatePriority(*p),
        },
        Op::Quorum(n, b) => Command::SetNodeSetting {
            formation: f,
            node: name(*n),
            setting: NodeSetting::ReplicationQuorum(*b),
        },
        Op::NumberSync(k) => Command::SetFormationSetting {
            formation: f,
            setting: FormationSetting::NumberSyncStandbys(*k),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]
    /// Whatever commands arrive (stale or random proposals included): a refused one
    /// changes nothing, no group ever has two writable goals, a writable goal is never
    /// given while another node may still take writes unfenced, and the result is the
    /// same on every member (apply is deterministic).
    #[test]
    fn apply_keeps_structural_invariants(ops in proptest::collection::vec(op(), 1..60)) {
        let mut s = ClusterState::default();
        let mut replica = ClusterState::default();
        for (i, o) in ops.iter().enumerate() {
            let cmd = to_command(&s, o);
            let before = s.clone();
            let now = 1_000 + i as u64 * 100;
            let r = s.apply(&cmd, now);
            let r2 = replica.apply(&cmd, now);
            prop_assert_eq!(&r, &r2);
            prop_assert_eq!(&s, &replica);
            if r.is_err() {
                prop_assert_eq!(&s, &before, "refused {:?} changed the state", cmd);
            }
            let writable = s.nodes.values().filter(|n| n.goal_state.is_writable()).count();
            prop_assert!(writable <= 1, "two writable goals after {:?}", cmd);
            if let Ok(Outcome::Done { .. }) = r {
                if let Command::AssignGoal { node_id, goal, .. } = &cmd {
                    if goal.is_writable() && !before.nodes[node_id].goal_state.is_writable() {
                        for other in before.nodes.values().filter(|n| n.id != *node_id) {
                            let fenced = matches!(other.goal_state, NodeState::Demoted | NodeState::Maintenance | NodeState::Dropped)
                                || other.reported_state.is_stopped();
                            prop_assert!(fenced || !other.reported_state.is_writable(), "{} promoted while {} unfenced", node_id, other.name);
                        }
                    }
                }
            }
            if s.events.len() > MAX_EVENTS { prop_assert!(false, "events unbounded"); }
            // The derived group index agrees with a scan, and is rebuilt when read back.
            for n in s.nodes.values() {
                let scanned: Vec<NodeId> = s.nodes.values()
                    .filter(|m| m.formation == n.formation && m.group_id == n.group_id)
                    .map(|m| m.id)
                    .collect();
                let indexed: Vec<NodeId> = s.group_nodes(&n.formation, n.group_id).map(|m| m.id).collect();
                prop_assert_eq!(scanned, indexed);
            }
            let back: ClusterState = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
            prop_assert_eq!(&back, &s);
        }
    }
}
