//! Properties over the whole input space.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgquorum_core::*;
use proptest::prelude::*;

fn any_state() -> impl Strategy<Value = NodeState> {
    (0..NodeState::ALL.len()).prop_map(|i| NodeState::ALL[i])
}

fn any_observed() -> impl Strategy<Value = Observed> {
    (
        prop_oneof![
            Just(DataDir::Empty),
            Just(DataDir::Primary),
            Just(DataDir::Standby)
        ],
        any::<bool>(),
        proptest::option::of(prop_oneof![Just("a"), Just("b")]),
        0u64..2,
    )
        .prop_map(|(data, running, following, reinit_done)| Observed {
            data,
            running: running && data != DataDir::Empty,
            following: following.map(Into::into),
            reinit_done,
        })
}

fn any_assignment() -> impl Strategy<Value = Assignment> {
    (
        any_state(),
        proptest::option::of(prop_oneof![Just("a"), Just("b")]),
        any::<bool>(),
        0u64..2,
    )
        .prop_map(|(goal, primary, names, reinit)| Assignment {
            goal_state: goal,
            primary: primary.map(|name| PeerNode {
                node_id: 1,
                name: name.into(),
                host: "h".parse().unwrap(),
                port: 5432,
                streamed: true,
            }),
            synchronous_standby_names: if names {
                "ANY 1 (\"b\")".into()
            } else {
                String::new()
            },
            peers: vec![],
            lease_ms: 1500,
            heartbeat_interval_ms: 200,
            on_quorum_loss: "block".into(),
            reinit,
        })
}

/// What PostgreSQL looks like once the keeper has done `d.action` (it succeeded), as the
/// keeper records it: a model of crates/keeper's execution of each action.
fn after(o: &Observed, d: &Decision, a: &Assignment) -> Observed {
    let mut o = o.clone();
    o.following = d.following_after(o.following.as_deref());
    match d.action {
        Action::Nothing => {}
        Action::InitPrimary | Action::StartPrimary | Action::Promote | Action::ConfigurePrimary => {
            o.data = DataDir::Primary;
            o.running = true;
        }
        Action::CloneStandby
        | Action::RewindToStandby
        | Action::StartStandby
        | Action::ConfigureStandby => {
            if d.action == Action::CloneStandby {
                o.reinit_done = o.reinit_done.max(a.reinit);
            }
            o.data = DataDir::Standby;
            o.running = true;
        }
        Action::Stop | Action::Drop => o.running = false,
    }
    o
}

proptest! {
    /// The keeper's decision, for every (observation, reached state, assignment): it never
    /// makes PostgreSQL writable when the goal is not writable, and done action after
    /// action it reaches the goal's shape and stays there within three actions.
    #[test]
    fn the_keeper_reaches_every_goal_and_writes_only_in_writable_ones(
        o in any_observed(),
        current in any_state(),
        a in any_assignment(),
    ) {
        let goal = a.goal_state;
        prop_assume!(current != NodeState::Dropped && goal != NodeState::Init);
        let (mut o, mut cur) = (o, current);
        let mut settled = false;
        for step in 0..3 {
            let d = decide(&o, cur, &a);
            prop_assert_eq!(d.reached, goal);
            prop_assert_eq!(&d.target, &target(&a));
            if !goal.is_writable() {
                prop_assert!(!d.action.makes_writable(), "{} towards {}: {:?}", cur, goal, d.action);
            }
            prop_assert_eq!(d.confirm_sync, goal.confirms_sync() && !a.synchronous_standby_names.is_empty());
            let next = after(&o, &d, &a);
            if !goal.is_writable() && goal != NodeState::Maintenance {
                prop_assert!(
                    !(next.data == DataDir::Primary && next.running),
                    "a primary runs after {:?} towards {}", d.action, goal
                );
            }
            if cur == goal && next == o {
                settled = true;
                // Settled in the shape the goal asks for.
                match &d.target {
                    Target::Primary => prop_assert!(o.data == DataDir::Primary && o.running),
                    Target::Standby { upstream: Some(p), wait: true } => {
                        prop_assert!(o.data == DataDir::Standby && o.running);
                        prop_assert_eq!(o.following.as_deref(), Some(p.name.as_str()));
                    }
                    Target::Standby { upstream, .. } => {
                        prop_assert!(
                            o.data == DataDir::Empty || (o.data == DataDir::Standby && o.running)
                        );
                        if upstream.is_none() {
                            prop_assert!(o.following.is_none() || o.data == DataDir::Empty);
                        }
                    }
                    Target::Stopped | Target::Dropped => prop_assert!(!o.running),
                    Target::Keep => prop_assert!(!(o.data == DataDir::Primary && o.running)),
                    Target::HandsOff => {}
                }
                prop_assert!(step <= 2);
                break;
            }
            o = next;
            cur = d.reached;
        }
        prop_assert!(settled, "{} towards {} not settled after 3 actions: {:?}", current, goal, o);
    }

    /// A keeper in its goal restarts only a server that stopped under it, and only
    /// where the goal runs one.
    #[test]
    fn in_its_goal_the_keeper_restarts_only_what_the_goal_runs(o in any_observed(), a in any_assignment()) {
        let d = decide(&o, a.goal_state, &a);
        if let Some(r) = d.restart() {
            prop_assert!(!o.running);
            let runs = matches!(d.target, Target::Primary | Target::Standby { .. });
            prop_assert!(runs);
            prop_assert_eq!(r.makes_writable(), a.goal_state.is_writable());
        }
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
            lsn: Lsn::new(*l as u64),
            timeline: 1,
            pg_running: true,
            sequence: 0,
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

proptest! {
    /// An LSN reads back from what it writes, in PostgreSQL's text form, and any
    /// `X/X` text of 1-8 hex digits each reads as its value (0/0 refused as no position).
    #[test]
    fn lsn_text_round_trips(v in 1u64.., hi in "[0-9a-fA-F]{1,8}", lo in "[0-9a-fA-F]{1,8}") {
        let l = Lsn::new(v).unwrap();
        let text = l.to_string();
        prop_assert_eq!(text.parse::<Lsn>(), Ok(l));
        prop_assert_eq!(text, format!("{:X}/{:X}", v >> 32, v & 0xffff_ffff));
        let raw = (u64::from_str_radix(&hi, 16).unwrap() << 32) | u64::from_str_radix(&lo, 16).unwrap();
        let parsed = format!("{hi}/{lo}").parse::<Lsn>();
        match Lsn::new(raw) {
            Some(l) => prop_assert_eq!(parsed, Ok(l)),
            None => prop_assert_eq!(parsed, Err(LsnParseError::Zero)),
        }
    }

    /// An `Option<Lsn>` is stored as the u64 it always was, 0 for unknown, and reads
    /// back as itself: every stored entry and snapshot keeps its bytes.
    #[test]
    fn optional_lsn_is_stored_as_u64_with_zero_for_unknown(v in prop_oneof![Just(0u64), any::<u64>()]) {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Stored {
            #[serde(with = "zero_is_none")]
            lsn: Option<Lsn>,
        }
        let stored = Stored { lsn: Lsn::new(v) };
        prop_assert_eq!(stored.lsn.is_none(), v == 0);
        let bytes = serde_json::to_string(&stored).unwrap();
        prop_assert_eq!(&bytes, &format!(r#"{{"lsn":{v}}}"#));
        let back: Stored = serde_json::from_str(&bytes).unwrap();
        prop_assert_eq!(back, stored);
    }
}
