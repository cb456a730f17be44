//! One test per orchestration rule: build a cluster state, run the orchestrator, and
//! assert on the goals it assigns (and on what the keepers are told).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use pgquorum_core::*;
use NodeState::*;

const T0: Millis = 1_000_000;

struct Cluster {
    state: ClusterState,
    health: HealthTable,
    now: Millis,
    seq: u64,
}

impl Cluster {
    fn new() -> Self {
        Cluster {
            state: ClusterState::default(),
            health: HealthTable::new(T0),
            now: T0,
            seq: 0,
        }
    }

    fn id(&self, name: &str) -> NodeId {
        self.state.node_by_name(DEFAULT_FORMATION, name).unwrap().id
    }

    fn node(&self, name: &str) -> &Node {
        self.state.node_by_name(DEFAULT_FORMATION, name).unwrap()
    }

    fn register(&mut self, name: &str, priority: u8) -> NodeId {
        let out = self
            .state
            .apply(
                &Command::RegisterNode {
                    formation: DEFAULT_FORMATION.into(),
                    name: name.into(),
                    host: "10.0.0.1".parse().unwrap(),
                    port: 5432,
                    candidate_priority: priority,
                    replication_quorum: true,
                    system_identifier: 0,
                    pg_major_version: 15,
                    current_state: Init,
                },
                self.now,
            )
            .unwrap();
        match out {
            Outcome::Registered { node_id, .. } => node_id,
            other => panic!("{other:?}"),
        }
    }

    fn apply(&mut self, cmd: Command) -> Result<Outcome, CoreError> {
        self.state.apply(&cmd, self.now)
    }

    /// A heartbeat through the core's heartbeat protocol, as the monitor leader answers
    /// it: observed, and the state change it implies applied. Its decisions are left to
    /// [`Cluster::orchestrate`] (proposed and refused here), so that each test sees
    /// which rule decided what. The answer (the node's assignment), None when refused
    /// (the last beat of a dropped node, which the monitor answers with NOT_FOUND).
    fn beat_full(
        &mut self,
        name: &str,
        st: NodeState,
        pg_running: bool,
        lsn: u64,
        timeline: u32,
        streaming: &[(&str, u64)],
    ) -> Option<Assignment> {
        // Positions as a keeper sends them: 0 for unknown.
        let lsn = Lsn::new(lsn);
        self.seq += 1;
        let report = NodeReport {
            node_id: self.id(name),
            current_state: st,
            pg_running,
            pg_in_recovery: !st.is_writable(),
            current_lsn: lsn,
            received_lsn: lsn,
            replayed_lsn: lsn,
            timeline,
            system_identifier: 7,
            replication: streaming
                .iter()
                .map(|(n, l)| ReplicationPeer {
                    application_name: n.to_string(),
                    state: "streaming".into(),
                    sync_state: "quorum".into(),
                    write_lsn: Lsn::new(*l),
                    flush_lsn: Lsn::new(*l),
                    replay_lsn: Lsn::new(*l),
                    write_lag_ms: None,
                    flush_lag_ms: None,
                    replay_lag_ms: None,
                })
                .collect(),
            sequence: self.seq,
            pg_restarts: 0,
            fences: 0,
        };
        let mut hb = Heartbeat::new(report);
        loop {
            match hb.next(&self.state, &mut self.health, self.now) {
                Step::ProveLeadership => hb.proved(true),
                Step::Admit { .. } => hb.admitted(Ok(())),
                Step::Record(cmds) => {
                    for c in cmds {
                        self.state.apply(&c, self.now).unwrap();
                    }
                    hb.proposed(Proposed::Applied);
                }
                Step::Decide(_) => hb.proposed(Proposed::NoneApplied),
                Step::Answer(a) => return Some(a),
                Step::Refuse(_) => return None,
            }
        }
    }

    fn beat(&mut self, name: &str, st: NodeState, lsn: u64) {
        self.beat_full(name, st, true, lsn, 1, &[]);
    }

    /// The leader's periodic decisions, in rounds as the monitor runs them ([`Rounds`]:
    /// again after applying, up to [`DECIDE_ROUNDS`]); the assignments in order.
    fn orchestrate(&mut self) -> Vec<(String, NodeState)> {
        let mut out = Vec::new();
        let mut rounds = Rounds::new(None);
        while let Some(cmds) = rounds.next(&self.state, &self.health, self.now) {
            for c in cmds {
                if let Command::AssignGoal { node_id, goal, .. } = &c {
                    out.push((self.state.nodes[node_id].name.clone(), *goal));
                }
                self.state.apply(&c, self.now).unwrap();
            }
            rounds.proposed(Proposed::Applied);
        }
        out
    }

    fn advance(&mut self, ms: Millis) {
        self.now += ms;
    }

    fn assigned(list: &[(&str, NodeState)]) -> Vec<(String, NodeState)> {
        list.iter().map(|(n, g)| (n.to_string(), *g)).collect()
    }

    /// Every node reaches its goal and reports it.
    fn settle(&mut self, lsn: u64) {
        let names: Vec<(String, NodeState)> = self
            .state
            .nodes
            .values()
            .map(|n| (n.name.clone(), n.goal_state))
            .collect();
        let primary = names
            .iter()
            .find(|(_, g)| g.is_writable())
            .map(|(n, _)| n.clone());
        let standbys: Vec<(String, u64)> = names
            .iter()
            .filter(|(n, _)| Some(n) != primary.as_ref())
            .map(|(n, _)| (n.clone(), lsn))
            .collect();
        for (n, g) in &names {
            if Some(n) == primary.as_ref() {
                let s: Vec<(&str, u64)> = standbys.iter().map(|(n, l)| (n.as_str(), *l)).collect();
                self.beat_full(n, *g, true, lsn, 1, &s);
            } else {
                self.beat(n, *g, lsn);
            }
        }
    }

    /// Drive the cluster (all keepers reaching their goals at once) until nothing changes.
    fn converge(&mut self, lsn: u64) {
        for _ in 0..20 {
            self.settle(lsn);
            self.advance(100);
            if self.orchestrate().is_empty() {
                self.settle(lsn);
                if self.orchestrate().is_empty() {
                    return;
                }
            }
        }
        panic!(
            "did not converge: {:?}",
            self.state
                .nodes
                .values()
                .map(|n| (&n.name, n.reported_state, n.goal_state))
                .collect::<Vec<_>>()
        );
    }

    /// a primary, b and c secondaries, synchronous replication on.
    fn three() -> Cluster {
        let mut c = Cluster::new();
        c.register("a", 50);
        c.register("b", 50);
        c.register("c", 50);
        c.converge(100);
        assert_eq!(c.node("a").goal_state, Primary);
        assert_eq!(c.node("b").goal_state, Secondary);
        assert_eq!(c.node("c").goal_state, Secondary);
        c
    }
}

#[test]
fn first_node_is_single_and_later_ones_wait_standby() {
    let mut c = Cluster::new();
    c.register("a", 50);
    assert_eq!(c.node("a").goal_state, Single);
    c.register("b", 50);
    assert_eq!(c.node("b").goal_state, WaitStandby);
    // The formation `default` was created on the fly.
    assert!(c.state.formations.contains_key(DEFAULT_FORMATION));
}

#[test]
fn registration_is_idempotent_by_formation_and_name() {
    let mut c = Cluster::new();
    let a = c.register("a", 50);
    assert_eq!(c.register("a", 50), a);
    assert_eq!(c.state.nodes.len(), 1);
}

#[test]
fn single_becomes_wait_primary_when_a_standby_joins() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.beat("a", Single, 10);
    c.register("b", 50);
    c.beat("b", WaitStandby, 0);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("a", WaitPrimary)]));
}

#[test]
fn waiting_standby_catches_up_once_the_primary_accepts_it() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.beat("a", WaitPrimary, 10);
    c.apply(Command::AssignGoal {
        node_id: c.id("a"),
        goal: WaitPrimary,
        reason: "t".into(),
        expected: None,
    })
    .unwrap();
    c.beat("a", WaitPrimary, 10);
    c.beat("b", WaitStandby, 0);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("b", Catchingup)]));
}

#[test]
fn catching_up_standby_becomes_secondary_only_when_streaming_close_to_the_primary() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.converge(100);
    assert_eq!(c.node("b").goal_state, Secondary);
    // b falls silent: unhealthy.
    c.advance(5_000);
    c.beat_full("a", Primary, true, 200, 1, &[]);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("b", Catchingup)]));
    c.beat("b", Catchingup, 50);
    // Streaming but far behind: not yet.
    c.beat_full(
        "a",
        Primary,
        true,
        50 + CATCHUP_LAG_BYTES + 1,
        1,
        &[("b", 50)],
    );
    assert_eq!(c.orchestrate(), vec![]);
    c.beat_full("a", Primary, true, 60, 1, &[("b", 50)]);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("b", Secondary)]));
}

#[test]
fn primary_runs_synchronous_replication_on_every_quorum_standby() {
    let c = Cluster::three();
    let a = assignment(&c.state, c.id("a"), c.now).unwrap();
    assert_eq!(a.synchronous_standby_names, r#"ANY 1 ("b", "c")"#);
    assert_eq!(a.on_quorum_loss, "block");
    assert_eq!(a.peers.len(), 2);
    let b = assignment(&c.state, c.id("b"), c.now).unwrap();
    assert_eq!(b.primary.unwrap().name, "a");
    assert_eq!(b.synchronous_standby_names, "");
}

#[test]
fn a_third_node_passes_the_primary_through_join_primary() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.converge(100);
    c.register("c", 50);
    c.beat("c", WaitStandby, 0);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("a", JoinPrimary)]));
    c.beat("a", JoinPrimary, 100);
    let got = c.orchestrate();
    assert!(got.contains(&("c".into(), Catchingup)), "{got:?}");
    assert!(got.contains(&("a".into(), Primary)), "{got:?}");
}

#[test]
fn a_change_of_synchronous_standbys_goes_through_apply_settings() {
    let mut c = Cluster::three();
    c.apply(Command::SetNodeSetting {
        formation: "".into(),
        node: "c".into(),
        setting: NodeSetting::ReplicationQuorum(false),
    })
    .unwrap();
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("a", ApplySettings)]));
    assert_eq!(
        assignment(&c.state, c.id("a"), c.now)
            .unwrap()
            .synchronous_standby_names,
        r#"ANY 1 ("b")"#
    );
    c.beat("a", ApplySettings, 100);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("a", Primary)]));
    // Once confirmed, only the new configuration remains to be satisfied.
    assert_eq!(
        c.state
            .group(DEFAULT_FORMATION, 0)
            .unwrap()
            .sync_history
            .len(),
        1
    );
}

#[test]
fn silent_primary_is_demoted_only_when_its_lease_has_surely_expired() {
    let mut c = Cluster::three();
    let s = c.state.settings(DEFAULT_FORMATION);
    let last = c.now;
    c.advance(s.lease_ms + s.lease_margin_ms - 100);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    assert_eq!(c.orchestrate(), vec![], "lease may still be valid");
    c.now = last + s.lease_ms + s.lease_margin_ms;
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    let got = c.orchestrate();
    assert_eq!(got[0], ("a".into(), Demoted));
    assert!(
        got.contains(&("b".into(), ReportLsn)) && got.contains(&("c".into(), ReportLsn)),
        "{got:?}"
    );
}

#[test]
fn failover_promotes_by_priority_and_fast_forwards_a_candidate_that_is_behind() {
    let mut c = Cluster::three();
    c.apply(Command::SetNodeSetting {
        formation: "".into(),
        node: "c".into(),
        setting: NodeSetting::CandidatePriority(90),
    })
    .unwrap();
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    c.orchestrate();
    c.beat("b", ReportLsn, 120);
    c.beat("c", ReportLsn, 110);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("c", FastForward)]));
    let a = assignment(&c.state, c.id("c"), c.now).unwrap();
    assert_eq!(a.primary.unwrap().name, "b", "fetch from the most advanced");
    c.beat("c", FastForward, 120);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("c", PreparePromotion)])
    );
    c.beat("c", PreparePromotion, 120);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("c", WaitPrimary), ("b", JoinSecondary)])
    );
    // The new primary keeps synchronous replication: no unprotected window.
    assert_eq!(
        assignment(&c.state, c.id("c"), c.now)
            .unwrap()
            .synchronous_standby_names,
        r#"ANY 1 ("b")"#
    );
}

#[test]
fn failover_waits_for_enough_lsn_reports_and_never_promotes_blindly() {
    let mut c = Cluster::three();
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.orchestrate();
    c.beat("b", ReportLsn, 100);
    // ANY 1 (b, c): c may hold the only copy of the last commit.
    assert_eq!(c.orchestrate(), vec![]);
    c.beat("c", ReportLsn, 130);
    let got = c.orchestrate();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].1, PreparePromotion);
}

#[test]
fn a_standby_dying_during_report_lsn_does_not_block_when_the_others_suffice() {
    // ANY 2 (b, c, d): two reports out of three cover every acknowledged commit.
    let mut c = Cluster::new();
    for n in ["a", "b", "c", "d"] {
        c.register(n, 50);
    }
    c.converge(100);
    c.apply(Command::SetFormationSetting {
        formation: "".into(),
        setting: FormationSetting::NumberSyncStandbys(2),
    })
    .unwrap();
    c.converge(100);
    assert_eq!(
        assignment(&c.state, c.id("a"), c.now)
            .unwrap()
            .synchronous_standby_names,
        r#"ANY 2 ("b", "c", "d")"#
    );
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    c.orchestrate();
    c.beat("b", ReportLsn, 100);
    c.beat("c", ReportLsn, 100);
    // d died before reporting (report_lsn stuck forever in pg_auto_failover #1060).
    let got = c.orchestrate();
    assert_eq!(got, Cluster::assigned(&[("b", PreparePromotion)]));
}

#[test]
fn a_new_leader_counts_an_unseen_primary_lease_from_its_own_election() {
    let mut c = Cluster::three();
    c.advance(60_000);
    c.health = HealthTable::new(c.now);
    let s = c.state.settings(DEFAULT_FORMATION);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    assert_eq!(c.orchestrate(), vec![], "unknown is not down");
    c.advance(s.lease_ms + s.lease_margin_ms);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    assert_eq!(c.orchestrate()[0], ("a".into(), Demoted));
}

#[test]
fn an_unknown_standby_is_never_counted_as_down() {
    let mut c = Cluster::three();
    c.health = HealthTable::new(c.now);
    c.advance(60_000);
    c.beat_full("a", Primary, true, 100, 1, &[]);
    assert_eq!(c.orchestrate(), vec![]);
}

#[test]
fn postgres_down_on_a_live_primary_leads_to_demote_timeout() {
    let mut c = Cluster::three();
    let s = c.state.settings(DEFAULT_FORMATION);
    c.beat_full("a", Primary, false, 100, 1, &[]);
    c.orchestrate();
    c.advance(s.lease_ms + s.lease_margin_ms);
    c.beat_full("a", Primary, false, 100, 1, &[]);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("a", DemoteTimeout)]));
    c.beat_full("a", DemoteTimeout, false, 100, 1, &[]);
    let got = c.orchestrate();
    assert!(got.contains(&("a".into(), Demoted)));
    assert!(got.contains(&("b".into(), ReportLsn)));
}

#[test]
fn switchover_to_a_named_node() {
    let mut c = Cluster::three();
    c.apply(Command::PerformSwitchover {
        formation: "".into(),
        group_id: 0,
        candidate: Some("c".into()),
    })
    .unwrap();
    assert_eq!(c.node("a").goal_state, Draining);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    assert_eq!(
        c.orchestrate(),
        vec![],
        "a has not stopped yet and its lease is valid"
    );
    c.beat_full("a", Draining, false, 150, 1, &[]);
    let got = c.orchestrate();
    assert!(
        got.contains(&("a".into(), Demoted)) && got.contains(&("c".into(), ReportLsn)),
        "{got:?}"
    );
    c.beat("b", ReportLsn, 150);
    c.beat("c", ReportLsn, 150);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("c", PreparePromotion)])
    );
    c.beat("c", PreparePromotion, 150);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("c", WaitPrimary), ("b", JoinSecondary)])
    );
}

#[test]
fn the_old_primary_returns_by_rewind() {
    let mut c = Cluster::three();
    c.apply(Command::PerformSwitchover {
        formation: "".into(),
        group_id: 0,
        candidate: None,
    })
    .unwrap();
    c.beat_full("a", Draining, false, 150, 1, &[]);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    c.orchestrate();
    c.beat("b", ReportLsn, 150);
    c.beat("c", ReportLsn, 150);
    c.orchestrate();
    c.beat("b", PreparePromotion, 150);
    c.orchestrate();
    c.beat_full("b", WaitPrimary, true, 151, 2, &[]);
    c.beat_full("a", Demoted, false, 150, 1, &[]);
    let got = c.orchestrate();
    assert!(got.contains(&("a".into(), Catchingup)), "{got:?}");
    assert_eq!(
        assignment(&c.state, c.id("a"), c.now)
            .unwrap()
            .primary
            .unwrap()
            .name,
        "b"
    );
}

#[test]
fn maintenance_on_a_standby_waits_for_the_primary_to_stop_waiting_for_it() {
    let mut c = Cluster::three();
    c.apply(Command::SetMaintenance {
        formation: "".into(),
        node: "c".into(),
        enable: true,
    })
    .unwrap();
    assert_eq!(c.node("c").goal_state, WaitMaintenance);
    let got = c.orchestrate();
    assert_eq!(got, Cluster::assigned(&[("a", ApplySettings)]));
    assert_eq!(
        assignment(&c.state, c.id("a"), c.now)
            .unwrap()
            .synchronous_standby_names,
        r#"ANY 1 ("b")"#
    );
    c.beat("a", ApplySettings, 100);
    let got = c.orchestrate();
    assert!(got.contains(&("c".into(), Maintenance)), "{got:?}");
    // And back.
    c.apply(Command::SetMaintenance {
        formation: "".into(),
        node: "c".into(),
        enable: false,
    })
    .unwrap();
    assert_eq!(c.node("c").goal_state, Catchingup);
}

#[test]
fn maintenance_on_the_primary_fails_over_first() {
    let mut c = Cluster::three();
    c.apply(Command::SetMaintenance {
        formation: "".into(),
        node: "a".into(),
        enable: true,
    })
    .unwrap();
    assert_eq!(c.node("a").goal_state, PrepareMaintenance);
    c.beat_full("a", PrepareMaintenance, false, 100, 1, &[]);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    let got = c.orchestrate();
    assert!(got.contains(&("b".into(), ReportLsn)), "{got:?}");
    c.beat("b", ReportLsn, 100);
    c.beat("c", ReportLsn, 100);
    c.orchestrate();
    c.beat("b", PreparePromotion, 100);
    c.orchestrate();
    assert_eq!(c.node("b").goal_state, WaitPrimary);
    assert_eq!(
        c.node("a").goal_state,
        Maintenance,
        "a is in maintenance once b took over"
    );
}

/// The orchestrator decides from a snapshot, and an operator command can be applied
/// between that decision and its proposal (found end to end: maintenance on the primary
/// was overwritten by a stale apply_settings, and the primary never went into
/// maintenance). A decision names the goal it was taken against and is refused if the
/// goal moved since.
#[test]
fn a_stale_orchestrator_decision_does_not_undo_maintenance() {
    let mut c = Cluster::three();
    let a = c.id("a");
    // Decided while a's goal was primary...
    let stale = Command::AssignGoal {
        node_id: a,
        goal: ApplySettings,
        reason: "synchronous_standby_names must change".into(),
        expected: Some(Primary),
    };
    // ...applied after the operator's maintenance request.
    c.apply(Command::SetMaintenance {
        formation: "".into(),
        node: "a".into(),
        enable: true,
    })
    .unwrap();
    let e = refused(&mut c, stale);
    assert!(e.to_string().contains("stale"), "{e}");
    assert_eq!(c.node("a").goal_state, PrepareMaintenance);
    // Every decision the orchestrator makes carries the goal it was taken against.
    c.beat_full("a", PrepareMaintenance, false, 100, 1, &[]);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    let cmds = orchestrate(&c.state, &c.health, c.now);
    assert!(!cmds.is_empty());
    for cmd in cmds {
        if let Command::AssignGoal {
            node_id, expected, ..
        } = cmd
        {
            assert_eq!(expected, Some(c.state.nodes[&node_id].goal_state));
        }
    }
}

/// A primary between two states refuses maintenance with the same "still moving"
/// refusal (class RetryLater) as a switchover, which the CLI waits out (a plain "needs
/// a healthy secondary" made it fail right after a standby joined).
#[test]
fn maintenance_on_a_primary_in_transition_says_it_is_moving() {
    let mut c = Cluster::three();
    let a = c.id("a");
    c.apply(Command::AssignGoal {
        node_id: a,
        goal: ApplySettings,
        reason: "t".into(),
        expected: None,
    })
    .unwrap();
    let e = refused(
        &mut c,
        Command::SetMaintenance {
            formation: "".into(),
            node: "a".into(),
            enable: true,
        },
    );
    assert!(
        matches!(&e, CoreError::StillMoving { node, goal: ApplySettings, .. } if node == "a"),
        "{e:?}"
    );
    assert_eq!(e.class(), ErrorClass::RetryLater);
}

#[test]
fn dropping_a_standby_removes_it_once_its_keeper_confirms() {
    let mut c = Cluster::three();
    c.apply(Command::DropNode {
        formation: "".into(),
        node: "c".into(),
    })
    .unwrap();
    assert_eq!(c.node("c").goal_state, Dropped);
    assert_eq!(
        assignment(&c.state, c.id("a"), c.now).unwrap().peers.len(),
        1
    );
    c.beat("c", Dropped, 100);
    assert!(c.state.node_by_name(DEFAULT_FORMATION, "c").is_none());
}

#[test]
fn on_quorum_loss_block_keeps_synchronous_replication() {
    let mut c = Cluster::three();
    c.advance(10_000);
    c.beat_full("a", Primary, true, 100, 1, &[]);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("b", Catchingup), ("c", Catchingup)])
    );
    assert_eq!(
        assignment(&c.state, c.id("a"), c.now)
            .unwrap()
            .synchronous_standby_names,
        r#"ANY 1 ("b", "c")"#
    );
}

#[test]
fn on_quorum_loss_continue_is_explicit_and_recorded() {
    let mut c = Cluster::three();
    c.apply(Command::SetFormationSetting {
        formation: "".into(),
        setting: FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue),
    })
    .unwrap();
    c.advance(10_000);
    c.beat_full("a", Primary, true, 100, 1, &[]);
    let got = c.orchestrate();
    assert!(got.contains(&("a".into(), WaitPrimary)), "{got:?}");
    let a = assignment(&c.state, c.id("a"), c.now).unwrap();
    assert_eq!(a.synchronous_standby_names, "");
    assert_eq!(a.on_quorum_loss, "continue");
    assert!(c
        .state
        .events
        .iter()
        .any(|e| e.description.contains("on_quorum_loss = continue")));
}

#[test]
fn steady_state_heartbeats_cost_no_write() {
    let mut c = Cluster::three();
    let before = c.state.clone();
    for _ in 0..10 {
        c.advance(200);
        c.settle(100 + c.now);
        assert_eq!(c.orchestrate(), vec![]);
    }
    assert_eq!(
        c.state, before,
        "steady state must not change the replicated state"
    );
}

#[test]
fn events_say_what_changed_and_why() {
    let mut c = Cluster::three();
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    c.orchestrate();
    let e = c
        .state
        .events
        .iter()
        .rev()
        .find(|e| e.description.contains("node a assigned demoted"))
        .unwrap();
    assert!(e.description.contains("lease"), "{}", e.description);
    assert!(c.state.events.len() <= MAX_EVENTS);
}

// ---------------------------------------------------------------- refusals

fn refused(c: &mut Cluster, cmd: Command) -> CoreError {
    let before = c.state.clone();
    let err = c.apply(cmd).unwrap_err();
    assert_eq!(c.state, before, "a refused command changed the state");
    err
}

#[test]
fn switchover_without_a_healthy_standby_is_refused() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.converge(10);
    let e = refused(
        &mut c,
        Command::PerformSwitchover {
            formation: "".into(),
            group_id: 0,
            candidate: None,
        },
    );
    assert_eq!(e.class(), ErrorClass::NotAllowedNow);
    assert!(e.to_string().contains("no secondary"), "{e}");
}

#[test]
fn number_sync_standbys_above_the_quorum_nodes_is_refused() {
    let mut c = Cluster::three();
    let e = refused(
        &mut c,
        Command::SetFormationSetting {
            formation: "".into(),
            setting: FormationSetting::NumberSyncStandbys(3),
        },
    );
    assert!(e.to_string().contains("quorum standby"), "{e}");
    c.apply(Command::SetFormationSetting {
        formation: "".into(),
        setting: FormationSetting::NumberSyncStandbys(2),
    })
    .unwrap();
}

#[test]
fn maintenance_on_the_only_node_is_refused() {
    let mut c = Cluster::new();
    c.register("a", 50);
    let e = refused(
        &mut c,
        Command::SetMaintenance {
            formation: "".into(),
            node: "a".into(),
            enable: true,
        },
    );
    assert!(e.to_string().contains("only node"), "{e}");
}

#[test]
fn maintenance_that_would_block_writes_is_refused_under_block() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.converge(100);
    let e = refused(
        &mut c,
        Command::SetMaintenance {
            formation: "".into(),
            node: "b".into(),
            enable: true,
        },
    );
    assert!(e.to_string().contains("synchronous replication"), "{e}");
}

#[test]
fn unknown_names_and_invalid_settings_are_refused() {
    let mut c = Cluster::three();
    assert_eq!(
        refused(
            &mut c,
            Command::DropNode {
                formation: "".into(),
                node: "zz".into()
            }
        )
        .class(),
        ErrorClass::NotFound
    );
    assert_eq!(
        refused(
            &mut c,
            Command::SetMaintenance {
                formation: "nope".into(),
                node: "a".into(),
                enable: true
            }
        )
        .class(),
        ErrorClass::NotFound
    );
    assert_eq!(
        refused(
            &mut c,
            Command::SetNodeSetting {
                formation: "".into(),
                node: "a".into(),
                setting: NodeSetting::CandidatePriority(101)
            }
        )
        .class(),
        ErrorClass::Invalid
    );
    assert_eq!(
        refused(
            &mut c,
            Command::SetFormationSetting {
                formation: "".into(),
                setting: FormationSetting::LeaseMarginMs(1)
            }
        )
        .class(),
        ErrorClass::Invalid
    );
    assert_eq!(
        refused(
            &mut c,
            Command::SetFormationSetting {
                formation: "".into(),
                setting: FormationSetting::HeartbeatIntervalMs(5)
            }
        )
        .class(),
        ErrorClass::Invalid
    );
    assert_eq!(
        refused(
            &mut c,
            Command::SetFormationSetting {
                formation: "".into(),
                setting: FormationSetting::LeaseMs(100)
            }
        )
        .class(),
        ErrorClass::Invalid
    );
    assert_eq!(
        refused(
            &mut c,
            Command::DropNode {
                formation: "".into(),
                node: "a".into()
            }
        )
        .class(),
        ErrorClass::NotAllowedNow
    );
    assert_eq!(
        refused(
            &mut c,
            Command::ReportState {
                node_id: 99,
                state: Secondary,
                lsn: None,
                timeline: 1,
                pg_running: true,
                sequence: 0,
            }
        )
        .class(),
        ErrorClass::NotFound
    );
}

#[test]
fn a_second_primary_is_refused_whatever_the_proposal() {
    let mut c = Cluster::three();
    let b = c.id("b");
    let e = refused(
        &mut c,
        Command::AssignGoal {
            node_id: b,
            goal: WaitPrimary,
            reason: "stale proposal".into(),
            expected: None,
        },
    );
    assert!(e.to_string().contains("already the primary"), "{e}");
    // Even with the old primary demoting, not before it is fenced.
    let a = c.id("a");
    c.apply(Command::AssignGoal {
        node_id: a,
        goal: Draining,
        reason: "t".into(),
        expected: None,
    })
    .unwrap();
    let e = refused(
        &mut c,
        Command::AssignGoal {
            node_id: b,
            goal: WaitPrimary,
            reason: "too early".into(),
            expected: None,
        },
    );
    assert!(e.to_string().contains("may still accept writes"), "{e}");
}

#[test]
fn many_formations_are_cheap_to_create_and_drop() {
    let mut s = ClusterState::default();
    for i in 0..10_000 {
        s.apply(
            &Command::CreateFormation {
                name: format!("f{i}"),
                number_sync_standbys: None,
            },
            1,
        )
        .unwrap();
    }
    assert_eq!(s.formations.len(), 10_000);
    s.apply(&Command::DropFormation { name: "f5".into() }, 2)
        .unwrap();
    assert_eq!(
        s.apply(
            &Command::CreateFormation {
                name: "f6".into(),
                number_sync_standbys: None
            },
            3
        )
        .unwrap_err()
        .class(),
        ErrorClass::AlreadyExists
    );
}

#[test]
fn the_state_round_trips_through_json() {
    let c = Cluster::three();
    let json = serde_json::to_string(&c.state).unwrap();
    let back: ClusterState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, c.state);
}

#[test]
fn a_first_node_that_never_ran_can_be_dropped_and_the_next_one_initialises() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.beat("b", WaitStandby, 0);
    assert_eq!(c.orchestrate(), vec![], "a may still come");
    c.apply(Command::DropNode {
        formation: "".into(),
        node: "a".into(),
    })
    .unwrap();
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("b", Single)]));
    // The waiting keeper, with no data directory, initialises a primary.
    let a = assignment(&c.state, c.id("b"), c.now).unwrap();
    let empty = Observed {
        data: DataDir::Empty,
        running: false,
        following: None,
        reinit_done: 0,
    };
    assert_eq!(decide(&empty, WaitStandby, &a).action, Action::InitPrimary);
}

#[test]
fn ending_maintenance_of_a_primary_still_handing_over_is_refused() {
    let mut c = Cluster::three();
    c.apply(Command::SetMaintenance {
        formation: "".into(),
        node: "a".into(),
        enable: true,
    })
    .unwrap();
    let e = refused(
        &mut c,
        Command::SetMaintenance {
            formation: "".into(),
            node: "a".into(),
            enable: false,
        },
    );
    assert!(e.to_string().contains("handing over"), "{e}");
}

#[test]
fn a_switchover_from_an_old_primary_of_unknown_position_waits_for_every_report() {
    // The first primary was made single before it ever ran (promoted at 0/0), and a
    // keeper reports 0/0 ("unknown") while PostgreSQL is down: that must not read as
    // "stopped where it started, never took a write" (t60 lost rows that way).
    let mut c = Cluster::three();
    c.apply(Command::PerformSwitchover {
        formation: "".into(),
        group_id: 0,
        candidate: None,
    })
    .unwrap();
    c.beat_full("a", Draining, false, 0, 0, &[]);
    c.orchestrate();
    c.beat("c", ReportLsn, 150);
    assert_eq!(
        c.orchestrate(),
        vec![],
        "ANY 1 (b, c): b may hold the only copy of the last commit"
    );
    c.beat("b", ReportLsn, 160);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("b", PreparePromotion)])
    );
}

#[test]
fn a_standby_that_does_not_know_its_position_is_no_witness() {
    let mut c = Cluster::three();
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    c.orchestrate();
    c.beat("b", ReportLsn, 100);
    // c's PostgreSQL crashed: its keeper reports report_lsn with no position.
    c.beat_full("c", ReportLsn, false, 0, 0, &[]);
    assert_eq!(c.orchestrate(), vec![]);
    c.beat("c", ReportLsn, 130);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("c", PreparePromotion)])
    );
}

#[test]
fn a_crashed_old_primary_restarts_in_place_and_nobody_else_is_promoted_until_it_reports() {
    let mut c = Cluster::three();
    // a's machine is gone for a while; c died too, so ANY 1 (b, c) is never met.
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.orchestrate();
    c.beat("b", ReportLsn, 100);
    assert_eq!(c.orchestrate(), vec![]);
    // a comes back with PostgreSQL down after a crash: position unknown.
    c.beat_full("a", Demoted, false, 0, 0, &[]);
    let lease = c.state.formations[DEFAULT_FORMATION].settings.lease_ms;
    c.advance(lease);
    c.beat_full("a", Demoted, false, 0, 0, &[]);
    c.beat("b", ReportLsn, 100);
    let got = c.orchestrate();
    assert!(got.contains(&("a".into(), WaitPrimary)), "{got:?}");
    assert_eq!(c.node("a").timeline, 1, "the last known timeline is kept");
    // a dies again before reporting any position; c is back. b and c together would
    // satisfy ANY 1 (b, c), but a alone may hold what it acknowledged meanwhile.
    c.advance(10_000);
    c.beat("b", ReportLsn, 100);
    c.beat("c", ReportLsn, 100);
    let got = c.orchestrate();
    assert!(
        !got.iter()
            .any(|(_, g)| matches!(g, PreparePromotion | WaitPrimary)),
        "{got:?}"
    );
    let refused = c
        .apply(Command::AssignGoal {
            node_id: c.id("b"),
            goal: WaitPrimary,
            reason: "test".into(),
            expected: None,
        })
        .unwrap_err();
    assert!(
        refused.to_string().contains("without a known position"),
        "{refused}"
    );
    // Its first known position becomes the floor: b and c are behind it.
    c.beat_full("a", Demoted, false, 180, 1, &[]);
    c.beat("b", ReportLsn, 100);
    c.beat("c", ReportLsn, 100);
    let got = c.orchestrate();
    assert!(
        !got.iter()
            .any(|(n, g)| n != "a" && matches!(g, PreparePromotion | WaitPrimary)),
        "{got:?}"
    );
}

#[test]
fn deciding_for_one_group_decides_what_the_whole_run_decides_for_it() {
    let mut c = Cluster::three();
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    let all = orchestrate(&c.state, &c.health, c.now);
    assert!(!all.is_empty(), "the silent primary must be failed over");
    assert_eq!(
        orchestrate_group(&c.state, &c.health, c.now, DEFAULT_FORMATION, 0),
        all
    );
    assert!(orchestrate_group(&c.state, &c.health, c.now, DEFAULT_FORMATION, 7).is_empty());
    assert!(orchestrate_group(&c.state, &c.health, c.now, "nope", 0).is_empty());
}

#[test]
fn the_group_learns_its_system_identifier_and_refuses_another_cluster() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    let group = |c: &Cluster| {
        c.state
            .group(DEFAULT_FORMATION, 0)
            .unwrap()
            .system_identifier
    };
    assert_eq!(group(&c), 0);
    // A standby's report alone does not define the group.
    let b = c.id("b");
    c.apply(Command::RecordSystemIdentifier {
        node_id: b,
        system_identifier: 7,
    })
    .unwrap();
    assert_eq!(group(&c), 0);
    // The first primary's does (the beat reports 7).
    c.beat("a", Single, 100);
    assert_eq!(group(&c), 7);
    assert_eq!(c.node("a").system_identifier, 7);
    // Once learned, a beat costs no write.
    let report = NodeReport {
        node_id: c.id("a"),
        current_state: Single,
        pg_running: true,
        pg_in_recovery: false,
        current_lsn: Lsn::new(100),
        received_lsn: Lsn::new(100),
        replayed_lsn: Lsn::new(100),
        timeline: 1,
        system_identifier: 7,
        replication: vec![],
        sequence: 1000,
        pg_restarts: 0,
        fences: 0,
    };
    c.health.observe(report.clone(), c.now);
    assert_eq!(on_heartbeat(&c.state, &c.health, &report, c.now), vec![]);
    // Another cluster's data directory: refused at registration and as a report.
    let foreign = Command::RegisterNode {
        formation: DEFAULT_FORMATION.into(),
        name: "x".into(),
        host: "10.0.0.9".parse().unwrap(),
        port: 5432,
        candidate_priority: 50,
        replication_quorum: true,
        system_identifier: 8,
        pg_major_version: 15,
        current_state: Init,
    };
    let e = c.apply(foreign).unwrap_err();
    assert!(e.to_string().contains("another cluster"), "{e}");
    assert!(c.state.node_by_name(DEFAULT_FORMATION, "x").is_none());
    let e = c
        .state
        .check_system_identifier(b, 8)
        .unwrap_err()
        .to_string();
    assert!(e.contains("another cluster"), "{e}");
    assert!(c
        .apply(Command::RecordSystemIdentifier {
            node_id: b,
            system_identifier: 8,
        })
        .is_err());
    assert_eq!(c.node("b").system_identifier, 7);
}

#[test]
fn a_group_has_a_bounded_number_of_nodes() {
    let mut c = Cluster::new();
    for i in 0..MAX_GROUP_NODES {
        c.register(&format!("n{i}"), 50);
    }
    let e = c
        .apply(Command::RegisterNode {
            formation: DEFAULT_FORMATION.into(),
            name: "one-too-many".into(),
            host: "10.0.0.9".parse().unwrap(),
            port: 5432,
            candidate_priority: 50,
            replication_quorum: true,
            system_identifier: 0,
            pg_major_version: 15,
            current_state: Init,
        })
        .unwrap_err();
    assert_eq!(e.class(), ErrorClass::NotAllowedNow, "{e}");
    // A node already registered may register again (a keeper restart).
    c.register("n0", 50);
}

/// The names `name` is told to run.
fn sync_names(c: &Cluster, name: &str) -> String {
    assignment(&c.state, c.id(name), c.now)
        .unwrap()
        .synchronous_standby_names
}

#[test]
fn a_first_primary_waits_for_its_first_standby_under_block() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.beat("a", Single, 10);
    // Alone, nothing to wait for.
    assert_eq!(sync_names(&c, "a"), "");
    c.register("b", 50);
    c.beat("b", WaitStandby, 0);
    assert_eq!(c.orchestrate(), Cluster::assigned(&[("a", WaitPrimary)]));
    // b has not joined yet; commits wait for it rather than being acknowledged alone.
    assert_eq!(sync_names(&c, "a"), r#"ANY 1 ("b")"#);
    assert!(c
        .state
        .events
        .iter()
        .any(|e| e.description.contains("no standby is in sync yet")));
    c.converge(100);
    assert_eq!(c.node("a").goal_state, Primary);
    assert_eq!(sync_names(&c, "a"), r#"ANY 1 ("b")"#);
}

#[test]
fn two_failures_in_a_row_never_leave_the_next_primary_without_a_synchronous_standby() {
    let mut c = Cluster::three();
    // a's machine dies: b and c report, c is promoted and waits for b.
    c.apply(Command::SetNodeSetting {
        formation: "".into(),
        node: "c".into(),
        setting: NodeSetting::CandidatePriority(90),
    })
    .unwrap();
    c.advance(10_000);
    c.beat("b", Secondary, 100);
    c.beat("c", Secondary, 100);
    c.orchestrate();
    c.beat("b", ReportLsn, 120);
    c.beat("c", ReportLsn, 120);
    c.orchestrate();
    c.beat("c", PreparePromotion, 120);
    assert_eq!(
        c.orchestrate(),
        Cluster::assigned(&[("c", WaitPrimary), ("b", JoinSecondary)])
    );
    assert_eq!(sync_names(&c, "c"), r#"ANY 1 ("b")"#);
    // c takes writes on timeline 2 and b streams from it; then c dies right after its
    // first acknowledged write, before a came back.
    c.beat_full("c", WaitPrimary, true, 150, 2, &[("b", 150)]);
    c.beat_full("b", JoinSecondary, true, 150, 2, &[]);
    c.orchestrate();
    c.advance(10_000);
    c.beat_full("b", Secondary, true, 150, 2, &[]);
    c.orchestrate();
    c.beat_full("b", ReportLsn, true, 150, 2, &[]);
    c.orchestrate();
    c.beat_full("b", PreparePromotion, true, 150, 2, &[]);
    c.orchestrate();
    assert!(
        c.node("b").goal_state.is_writable(),
        "b should be promoted: {:?}",
        c.state
            .nodes
            .values()
            .map(|n| (&n.name, n.reported_state, n.goal_state))
            .collect::<Vec<_>>()
    );
    // Neither a nor c is in sync with b: b must still wait for one of them.
    assert_eq!(sync_names(&c, "b"), r#"ANY 1 ("a", "c")"#);
    // And once a rejoins and reaches secondary, b waits for a alone.
    for _ in 0..5 {
        c.beat_full("a", c.node("a").goal_state, true, 160, 3, &[]);
        c.beat_full("b", c.node("b").goal_state, true, 160, 3, &[("a", 160)]);
        c.orchestrate();
    }
    assert!(
        c.node("a").in_sync_set,
        "a should be in sync: {:?}",
        c.node("a")
    );
    assert_eq!(sync_names(&c, "b"), r#"ANY 1 ("a")"#);
}

#[test]
fn a_primary_whose_standbys_may_not_count_waits_for_a_standby_that_does_not_exist() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.beat("a", Single, 10);
    c.apply(Command::RegisterNode {
        formation: DEFAULT_FORMATION.into(),
        name: "b".into(),
        host: "10.0.0.2".parse().unwrap(),
        port: 5432,
        candidate_priority: 50,
        replication_quorum: false,
        system_identifier: 0,
        pg_major_version: 15,
        current_state: Init,
    })
    .unwrap();
    c.beat("b", WaitStandby, 0);
    c.orchestrate();
    assert_eq!(c.node("a").goal_state, WaitPrimary);
    let names = sync_names(&c, "a");
    assert_eq!(names, format!("ANY 1 (\"{NO_STANDBY}\")"));
    assert!(c
        .state
        .events
        .iter()
        .any(|e| e.description.contains("no standby may count")));
    // The operator's explicit choice still turns synchronous replication off.
    c.apply(Command::SetFormationSetting {
        formation: "".into(),
        setting: FormationSetting::NumberSyncStandbys(0),
    })
    .unwrap();
    assert_eq!(sync_names(&c, "a"), "");
}

#[test]
fn a_dropped_node_whose_keeper_is_silent_is_forgotten_and_its_name_starts_afresh() {
    let mut c = Cluster::three();
    c.apply(Command::DropNode {
        formation: "".into(),
        node: "c".into(),
    })
    .unwrap();
    let old_id = c.id("c");
    // Its keeper never answers again; the others beat on.
    let ua = unhealthy_after(&c.state.settings(DEFAULT_FORMATION));
    c.advance(ua / 2);
    c.beat_full("a", Primary, true, 100, 1, &[("b", 100)]);
    c.beat("b", Secondary, 100);
    c.orchestrate();
    assert!(
        c.state.node_by_name(DEFAULT_FORMATION, "c").is_some(),
        "not before its keeper has been silent for a lease and its margin"
    );
    c.advance(ua);
    c.beat_full("a", Primary, true, 100, 1, &[("b", 100)]);
    c.beat("b", Secondary, 100);
    c.orchestrate();
    assert!(c.state.node_by_name(DEFAULT_FORMATION, "c").is_none());
    assert!(c.state.events.iter().any(|e| e
        .description
        .contains("removed without its acknowledgement")));
    // A keeper of the same name that kept "dropped" as its last state registers afresh.
    let out = c
        .apply(Command::RegisterNode {
            formation: DEFAULT_FORMATION.into(),
            name: "c".into(),
            host: "10.0.0.1".parse().unwrap(),
            port: 5432,
            candidate_priority: 50,
            replication_quorum: true,
            system_identifier: 0,
            pg_major_version: 15,
            current_state: Dropped,
        })
        .unwrap();
    let Outcome::Registered { node_id, .. } = out else {
        panic!("{out:?}")
    };
    assert_ne!(node_id, old_id, "a new node, not the dropped one");
    assert_eq!(c.node("c").reported_state, Init);
    assert_eq!(c.node("c").goal_state, WaitStandby);
    c.converge(100);
    assert_eq!(c.node("c").goal_state, Secondary);
    assert_eq!(c.node("c").reported_state, Secondary);
}

#[test]
fn a_reregistration_with_a_new_address_updates_it_and_says_so() {
    let mut c = Cluster::three();
    c.apply(Command::RegisterNode {
        formation: DEFAULT_FORMATION.into(),
        name: "b".into(),
        host: "10.0.0.9".parse().unwrap(),
        port: 5433,
        candidate_priority: 50,
        replication_quorum: true,
        system_identifier: 0,
        pg_major_version: 15,
        current_state: Secondary,
    })
    .unwrap();
    assert_eq!(c.node("b").host.as_str(), "10.0.0.9");
    assert_eq!(c.node("b").port, 5433);
    let a = assignment(&c.state, c.id("a"), c.now).unwrap();
    assert!(a
        .peers
        .iter()
        .any(|p| p.name == "b" && p.host.as_str() == "10.0.0.9" && p.port == 5433));
    let e = c.state.events.back().unwrap();
    assert!(
        e.description.contains("10.0.0.9:5433") && e.description.contains("was 10.0.0.1:5432"),
        "{}",
        e.description
    );
}

#[test]
fn reinit_rebuilds_a_standby_and_is_refused_where_it_would_hurt() {
    let mut c = Cluster::three();
    let reinit = |node: &str| Command::ReinitNode {
        formation: "".into(),
        node: node.into(),
    };
    let e = refused(&mut c, reinit("a"));
    assert!(e.to_string().contains("is the primary"), "{e}");
    let e = refused(&mut c, reinit("nobody"));
    assert!(matches!(e, CoreError::UnknownNode(_)), "{e}");
    c.apply(reinit("c")).unwrap();
    assert_eq!(c.node("c").goal_state, Catchingup);
    assert_eq!(c.node("c").reinit_seq, 1);
    assert_eq!(assignment(&c.state, c.id("c"), c.now).unwrap().reinit, 1);
    assert_eq!(assignment(&c.state, c.id("b"), c.now).unwrap().reinit, 0);
    let ev = c.state.events.back().unwrap();
    assert_eq!(ev.assigned, Some(Catchingup));
    c.converge(200);
    assert_eq!(c.node("c").goal_state, Secondary);
    assert_eq!(c.node("c").reported_state, Secondary);

    // Two nodes under block: the only standby is the only synchronous candidate.
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.converge(100);
    let e = refused(&mut c, reinit("b"));
    assert!(e.to_string().contains("quorum standby"), "{e}");
    // Under continue the operator accepted commits without a standby.
    c.apply(Command::SetFormationSetting {
        formation: "".into(),
        setting: FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue),
    })
    .unwrap();
    c.apply(reinit("b")).unwrap();
}

#[test]
fn keeper_counters_that_grow_become_events() {
    let mut r = NodeReport {
        node_id: 1,
        current_state: Primary,
        pg_running: true,
        pg_in_recovery: false,
        current_lsn: Lsn::new(1),
        received_lsn: Lsn::new(1),
        replayed_lsn: Lsn::new(1),
        timeline: 1,
        system_identifier: 1,
        replication: vec![],
        sequence: 1,
        pg_restarts: 0,
        fences: 0,
    };
    assert!(keeper_events(None, &r, "a").is_empty());
    let prev = r.clone();
    r.pg_restarts = 1;
    let ev = keeper_events(Some(&prev), &r, "a");
    assert_eq!(ev.len(), 1);
    assert!(ev[0].contains("restarted it in place"), "{ev:?}");
    assert!(keeper_events(Some(&r), &r, "a").is_empty(), "once");
    let prev = r.clone();
    r.fences = 2;
    let ev = keeper_events(Some(&prev), &r, "a");
    assert!(
        ev[0].contains("fenced itself") && ev[0].contains("2 time"),
        "{ev:?}"
    );
    // A restarted keeper counts from 0 again: its counts are news.
    let mut fresh = r.clone();
    fresh.fences = 1;
    let ev = keeper_events(Some(&r), &fresh, "a");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert!(
        ev[0].contains("fenced itself") && ev[0].contains("(1 time"),
        "{ev:?}"
    );
}

#[test]
fn postgres_stopping_without_a_state_change_is_an_event() {
    let mut c = Cluster::three();
    c.beat_full("b", Secondary, false, 100, 1, &[]);
    assert!(c
        .state
        .events
        .back()
        .unwrap()
        .description
        .contains("PostgreSQL on node b is not running"));
    c.beat_full("b", Secondary, true, 100, 1, &[]);
    assert!(c
        .state
        .events
        .back()
        .unwrap()
        .description
        .contains("is running again"));
}

/// Issue 13: `replication-quorum false` on the primary of a 2-node group was accepted
/// (the primary itself counted as capacity); after a failover the new primary's only
/// standby did not count, and its commits waited for a placeholder name for good.
#[test]
fn the_primary_of_two_nodes_may_not_leave_the_quorum() {
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.converge(100);
    let before = c.state.clone();
    for node in ["a", "b"] {
        let err = c
            .apply(Command::SetNodeSetting {
                formation: "".into(),
                node: node.into(),
                setting: NodeSetting::ReplicationQuorum(false),
            })
            .unwrap_err();
        assert!(matches!(err, CoreError::NotAllowed(_)), "{err:?}");
        assert!(
            err.to_string().contains("failover to any candidate"),
            "{err}"
        );
    }
    assert_eq!(
        serde_json::to_string(&c.state).unwrap(),
        serde_json::to_string(&before).unwrap(),
        "a refused setting changed the state"
    );

    // A standby that can never be promoted may be the primary's only quorum vote, so
    // the primary may leave the quorum, but that standby may not become a candidate.
    c.apply(Command::SetNodeSetting {
        formation: "".into(),
        node: "b".into(),
        setting: NodeSetting::CandidatePriority(0),
    })
    .unwrap();
    c.apply(Command::SetNodeSetting {
        formation: "".into(),
        node: "a".into(),
        setting: NodeSetting::ReplicationQuorum(false),
    })
    .unwrap();
    let err = c
        .apply(Command::SetNodeSetting {
            formation: "".into(),
            node: "b".into(),
            setting: NodeSetting::CandidatePriority(50),
        })
        .unwrap_err();
    assert!(matches!(err, CoreError::NotAllowed(_)), "{err:?}");

    // With on-quorum-loss continue the operator chose availability: allowed.
    let mut c = Cluster::new();
    c.register("a", 50);
    c.register("b", 50);
    c.converge(100);
    c.apply(Command::SetFormationSetting {
        formation: "".into(),
        setting: FormationSetting::OnQuorumLoss(QuorumLossPolicy::Continue),
    })
    .unwrap();
    c.apply(Command::SetNodeSetting {
        formation: "".into(),
        node: "a".into(),
        setting: NodeSetting::ReplicationQuorum(false),
    })
    .unwrap();
}
