//! The monitor leader's heartbeat protocol, without I/O: what the leader does with one
//! keeper's report, from the first check to the answer that grants a lease.
//!
//! The steps, in order:
//! 1. prove leadership (refuse early: a member cut off from the others cannot commit);
//! 2. look the node up and refuse another cluster's data directory;
//! 3. admit the report by its stamp ([`crate::ReportOrder`]) or refuse it as stale;
//! 4. record what it changed: keeper events (restarts, fences), [`HealthTable::observe`],
//!    [`on_heartbeat`]: proposed as one batch;
//! 5. decide for the node's group, up to [`DECIDE_ROUNDS`] rounds ([`Rounds`]);
//! 6. prove leadership again, at the moment the lease is granted;
//! 7. answer with [`assignment`].
//!
//! Proving leadership, admitting a report and proposing commands need the caller's
//! world (openraft's metrics, a Raft write, a monotonic clock): [`Heartbeat::next`]
//! returns a [`Step`] saying what to do, and the caller does it, reports the outcome
//! ([`Heartbeat::proved`], [`Heartbeat::admitted`], [`Heartbeat::proposed`]) and calls
//! `next` again. The monitor service drives it with real Raft writes; the simulation
//! drives it synchronously, for a leader that may be deposed; the rule tests and the
//! scale benchmark drive it too, so all of them run this one sequence.

use crate::command::Command;
use crate::error::CoreError;
use crate::health::{keeper_events, HealthTable, NodeReport};
use crate::model::{ClusterState, GroupId, Millis, NodeId};
use crate::orchestrate::{assignment, on_heartbeat, orchestrate, orchestrate_group, Assignment};
use crate::order::StaleReport;

/// How many rounds of decide-then-apply the leader runs at once, after a heartbeat and
/// on its periodic tick. One decision often enables the next (the last candidate's
/// report_lsn lets the winner be told to prepare_promotion); more rounds than this wait
/// for the next heartbeat or tick, which bounds the Raft writes one request can cause.
pub const DECIDE_ROUNDS: usize = 3;

/// The rounds of decisions for one group, or for all (`scope` None), driven by the
/// caller: [`Rounds::next`] decides, the caller proposes, [`Rounds::proposed`] says
/// whether any of it was applied.
#[derive(Debug, Clone)]
pub struct Rounds {
    scope: Option<(String, GroupId)>,
    done: usize,
    finished: bool,
}

impl Rounds {
    pub fn new(scope: Option<(String, GroupId)>) -> Self {
        Rounds {
            scope,
            done: 0,
            finished: false,
        }
    }

    /// The decisions of the current round; None when there is nothing more to decide
    /// now. Deciding is pure: calling it again before [`Rounds::proposed`] decides
    /// afresh (the monitor does, after waiting for its turn).
    pub fn next(
        &self,
        state: &ClusterState,
        health: &HealthTable,
        now: Millis,
    ) -> Option<Vec<Command>> {
        if self.finished || self.done >= DECIDE_ROUNDS {
            return None;
        }
        let cmds = match &self.scope {
            Some((formation, group)) => orchestrate_group(state, health, now, formation, *group),
            None => orchestrate(state, health, now),
        };
        (!cmds.is_empty()).then_some(cmds)
    }

    /// The round's decisions were proposed. When none of them was applied (refused, or
    /// the leader cannot commit), deciding again would only repeat them.
    pub fn proposed(&mut self, outcome: Proposed) {
        self.done += 1;
        if outcome != Proposed::Applied {
            self.finished = true;
        }
    }
}

/// What became of a batch of proposed commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proposed {
    /// At least one was committed and applied.
    Applied,
    /// Each was refused by the state machine (it changed nothing).
    NoneApplied,
    /// The leader could not commit (no quorum, no longer the leader).
    CannotCommit,
}

/// Why a heartbeat gets no answer (and so no lease).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The node is not registered (dropped?): its keeper must register it again.
    UnknownNode(NodeId),
    /// The report contradicts the state (another cluster's data directory).
    Rejected(CoreError),
    /// Reordered, from a replaced keeper process, too late, or the first of a process.
    Stale(StaleReport),
    /// This member cannot prove that it leads.
    NoLeadershipProof,
    /// What the report changed could not be committed.
    CannotCommit,
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    /// Check the leadership proof now (a quorum acknowledged this leader less than the
    /// election timeout's minimum ago, [`crate::may_grant_lease`]) and pass the result
    /// to [`Heartbeat::proved`].
    ProveLeadership,
    /// Judge the report's stamp (e.g. [`crate::ReportOrder::admit`] with this delay
    /// bound, the formation's lease) and pass the result to [`Heartbeat::admitted`].
    /// `name` is the node's name, for a caller that also checks who sent it.
    Admit {
        node: NodeId,
        name: String,
        max_delay_ms: Millis,
    },
    /// Propose what the report changed, in order, then call [`Heartbeat::proposed`].
    Record(Vec<Command>),
    /// Propose one round of decisions for the node's group, then call
    /// [`Heartbeat::proposed`]. Calling `next` again first decides afresh.
    Decide(Vec<Command>),
    /// The answer: the node's assignment, which grants its lease.
    Answer(Assignment),
    Refuse(Refusal),
}

#[derive(Debug, Clone)]
enum Phase {
    Start,
    Lookup,
    /// Waiting for [`Heartbeat::admitted`]; asked again, the same step.
    Admitting(Step),
    Record,
    /// Waiting for [`Heartbeat::proposed`]; asked again, the same step.
    Recording(Step),
    Deciding(Rounds),
    Grant,
    Granting,
    Done(Step),
}

/// One heartbeat, from the report to the answer. See the module documentation.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    report: NodeReport,
    /// The node's formation and group, learned at lookup.
    group: Option<(String, GroupId)>,
    phase: Phase,
}

impl Heartbeat {
    pub fn new(report: NodeReport) -> Self {
        Heartbeat {
            report,
            group: None,
            phase: Phase::Start,
        }
    }

    /// The next thing to do. `state` is the replicated state as applied now, `health`
    /// the leader's table of this term, `now` the leader's clock.
    pub fn next(&mut self, state: &ClusterState, health: &mut HealthTable, now: Millis) -> Step {
        loop {
            match &self.phase {
                Phase::Start | Phase::Grant => return Step::ProveLeadership,
                Phase::Lookup => {
                    let id = self.report.node_id;
                    let Some(node) = state.nodes.get(&id) else {
                        return self.finish(Step::Refuse(Refusal::UnknownNode(id)));
                    };
                    // Another cluster's data directory gets no lease and no assignment.
                    if let Err(e) = state.check_system_identifier(id, self.report.system_identifier)
                    {
                        return self.finish(Step::Refuse(Refusal::Rejected(e)));
                    }
                    self.group = Some((node.formation.clone(), node.group_id));
                    let step = Step::Admit {
                        node: id,
                        name: node.name.clone(),
                        max_delay_ms: state.settings(&node.formation).lease_ms,
                    };
                    self.phase = Phase::Admitting(step.clone());
                    return step;
                }
                Phase::Record => {
                    let cmds = self.record(state, health, now);
                    if cmds.is_empty() {
                        // A steady heartbeat proposes nothing: no Raft write.
                        self.phase = Phase::Deciding(Rounds::new(self.group.clone()));
                        continue;
                    }
                    let step = Step::Record(cmds);
                    self.phase = Phase::Recording(step.clone());
                    return step;
                }
                Phase::Deciding(rounds) => match rounds.next(state, health, now) {
                    Some(cmds) => return Step::Decide(cmds),
                    None => self.phase = Phase::Grant,
                },
                Phase::Granting => {
                    let step = match assignment(state, self.report.node_id, now) {
                        Ok(a) => Step::Answer(a),
                        Err(e) => Step::Refuse(Refusal::Rejected(e)),
                    };
                    return self.finish(step);
                }
                Phase::Admitting(step) | Phase::Recording(step) | Phase::Done(step) => {
                    return step.clone()
                }
            }
        }
    }

    /// The outcome of [`Step::ProveLeadership`].
    pub fn proved(&mut self, holds: bool) {
        self.phase = match (&self.phase, holds) {
            (_, false) => Phase::Done(Step::Refuse(Refusal::NoLeadershipProof)),
            (Phase::Start, true) => Phase::Lookup,
            (Phase::Grant, true) => Phase::Granting,
            (p, true) => p.clone(),
        };
    }

    /// The outcome of [`Step::Admit`].
    pub fn admitted(&mut self, result: Result<(), StaleReport>) {
        if let Phase::Admitting(_) = self.phase {
            self.phase = match result {
                Ok(()) => Phase::Record,
                Err(e) => Phase::Done(Step::Refuse(Refusal::Stale(e))),
            };
        }
    }

    /// The outcome of proposing a [`Step::Record`] or a [`Step::Decide`]. A decision
    /// that cannot be committed still gets the answer: the heartbeat itself was heard
    /// and recorded, the keeper's current assignment is still right, and the periodic
    /// tick decides again. A report whose changes cannot be committed gets none.
    pub fn proposed(&mut self, outcome: Proposed) {
        match &mut self.phase {
            Phase::Recording(_) => {
                self.phase = if outcome == Proposed::CannotCommit {
                    Phase::Done(Step::Refuse(Refusal::CannotCommit))
                } else {
                    Phase::Deciding(Rounds::new(self.group.clone()))
                };
            }
            Phase::Deciding(rounds) => rounds.proposed(outcome),
            _ => {}
        }
    }

    fn finish(&mut self, step: Step) -> Step {
        self.phase = Phase::Done(step.clone());
        step
    }

    /// Step 4: keeper events, the health table, and the state change the report implies.
    fn record(&self, state: &ClusterState, health: &mut HealthTable, now: Millis) -> Vec<Command> {
        let report = &self.report;
        let Some(node) = state.nodes.get(&report.node_id) else {
            return Vec::new();
        };
        // A keeper's crash restarts and fences show as counters that grow: recorded
        // once, as events, when the leader sees one grow.
        let mut cmds: Vec<Command> = if health.is_reordered(report) {
            Vec::new()
        } else {
            keeper_events(health.report(node.id), report, &node.name)
                .into_iter()
                .map(|description| Command::RecordEvent {
                    formation: node.formation.clone(),
                    group_id: node.group_id,
                    node_id: Some(node.id),
                    description,
                })
                .collect()
        };
        health.observe(report.clone(), now);
        cmds.extend(on_heartbeat(state, health, report, now));
        cmds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::tests::report;
    use crate::model::{NodeState, DEFAULT_FORMATION};
    use crate::Outcome;

    fn register(s: &mut ClusterState, name: &str) -> NodeId {
        let out = s.apply(
            &Command::RegisterNode {
                formation: DEFAULT_FORMATION.into(),
                name: name.into(),
                host: "10.0.0.1".parse().unwrap_or_else(|_| unreachable!()),
                port: 5432,
                candidate_priority: 50,
                replication_quorum: true,
                system_identifier: 0,
                pg_major_version: 15,
                current_state: NodeState::Init,
            },
            0,
        );
        match out {
            Ok(Outcome::Registered { node_id, .. }) => node_id,
            other => panic!("{other:?}"),
        }
    }

    fn one_node() -> (ClusterState, NodeId) {
        let mut s = ClusterState::default();
        let id = register(&mut s, "a");
        (s, id)
    }

    fn beat(s: &ClusterState, id: NodeId, st: NodeState) -> NodeReport {
        let mut r = report(id);
        r.current_state = st;
        r.pg_in_recovery = !st.is_writable();
        r.system_identifier = s.nodes[&id].system_identifier.max(1);
        r.current_lsn = crate::Lsn::new(10);
        r
    }

    /// Drives a heartbeat with every outside step succeeding; returns the steps seen.
    fn drive(s: &mut ClusterState, h: &mut HealthTable, r: NodeReport, proof: bool) -> Vec<Step> {
        let mut hb = Heartbeat::new(r);
        let mut seen = Vec::new();
        for _ in 0..20 {
            let step = hb.next(s, h, 10);
            seen.push(step.clone());
            match step {
                Step::ProveLeadership => hb.proved(proof),
                Step::Admit { .. } => hb.admitted(Ok(())),
                Step::Record(cmds) | Step::Decide(cmds) => {
                    let applied = cmds.iter().filter(|c| s.apply(c, 10).is_ok()).count();
                    let any = applied > 0;
                    hb.proposed(if any {
                        Proposed::Applied
                    } else {
                        Proposed::NoneApplied
                    });
                }
                Step::Answer(_) | Step::Refuse(_) => return seen,
            }
        }
        panic!("no answer after 20 steps: {seen:?}");
    }

    #[test]
    fn a_first_heartbeat_is_recorded_and_answered_under_proof() {
        let (mut s, id) = one_node();
        let mut h = HealthTable::new(0);
        let r = beat(&s, id, NodeState::Init);
        let seen = drive(&mut s, &mut h, r, true);
        assert_eq!(seen[0], Step::ProveLeadership);
        assert!(matches!(seen[1], Step::Admit { node, .. } if node == id));
        assert!(matches!(seen[2], Step::Record(_)), "{seen:?}");
        assert_eq!(s.nodes[&id].reported_state, NodeState::Init);
        // The proof is asked for again just before the answer.
        assert_eq!(seen[seen.len() - 2], Step::ProveLeadership);
        let Some(Step::Answer(a)) = seen.last() else {
            panic!("{seen:?}")
        };
        // The lone node was told to become single.
        assert_eq!(a.goal_state, NodeState::Single);
        assert!(h.report(id).is_some(), "observed");
    }

    #[test]
    fn a_heartbeat_that_enables_a_decision_is_answered_with_it() {
        let (mut s, a) = one_node();
        let mut h = HealthTable::new(0);
        let r = beat(&s, a, NodeState::Single);
        drive(&mut s, &mut h, r, true);
        assert_eq!(s.nodes[&a].reported_state, NodeState::Single);
        let b = register(&mut s, "b");
        let r = beat(&s, b, NodeState::WaitStandby);
        let seen = drive(&mut s, &mut h, r, true);
        assert!(
            seen.iter().any(|s| matches!(s, Step::Decide(_))),
            "{seen:?}"
        );
        assert_eq!(s.nodes[&a].goal_state, NodeState::WaitPrimary);
        // The primary's next heartbeat hears its new goal at once.
        let r = beat(&s, a, NodeState::Single);
        let Some(Step::Answer(x)) = drive(&mut s, &mut h, r, true).pop() else {
            panic!("no answer")
        };
        assert_eq!(x.goal_state, NodeState::WaitPrimary);
    }

    #[test]
    fn no_proof_no_answer_and_nothing_observed() {
        let (mut s, id) = one_node();
        let mut h = HealthTable::new(0);
        let seen = drive(&mut s, &mut h, report(id), false);
        assert_eq!(
            seen,
            vec![
                Step::ProveLeadership,
                Step::Refuse(Refusal::NoLeadershipProof)
            ]
        );
        assert!(h.report(id).is_none());
    }

    #[test]
    fn a_stale_report_is_refused_before_it_is_observed() {
        let (s, id) = one_node();
        let mut h = HealthTable::new(0);
        let mut hb = Heartbeat::new(report(id));
        assert_eq!(hb.next(&s, &mut h, 10), Step::ProveLeadership);
        hb.proved(true);
        assert!(matches!(hb.next(&s, &mut h, 10), Step::Admit { .. }));
        let stale = StaleReport::Superseded {
            sequence: 1,
            newest: 2,
        };
        hb.admitted(Err(stale.clone()));
        assert_eq!(hb.next(&s, &mut h, 10), Step::Refuse(Refusal::Stale(stale)));
        assert!(h.report(id).is_none());
    }

    #[test]
    fn an_unknown_node_is_refused() {
        let (s, _) = one_node();
        let mut h = HealthTable::new(0);
        let mut hb = Heartbeat::new(report(99));
        hb.next(&s, &mut h, 10);
        hb.proved(true);
        assert_eq!(
            hb.next(&s, &mut h, 10),
            Step::Refuse(Refusal::UnknownNode(99))
        );
    }

    #[test]
    fn changes_that_cannot_be_committed_get_no_answer_but_decisions_do() {
        let (s, id) = one_node();
        let mut h = HealthTable::new(0);
        let mut hb = Heartbeat::new(beat(&s, id, NodeState::Init));
        hb.next(&s, &mut h, 10);
        hb.proved(true);
        hb.next(&s, &mut h, 10);
        hb.admitted(Ok(()));
        // The first report records the system identifier and pg_running: changes.
        assert!(matches!(hb.next(&s, &mut h, 10), Step::Record(_)));
        hb.proposed(Proposed::CannotCommit);
        assert_eq!(hb.next(&s, &mut h, 10), Step::Refuse(Refusal::CannotCommit));
        // A decision that cannot be committed: the answer still comes.
        let mut s = s;
        let r = beat(&s, id, NodeState::Single);
        drive(&mut s, &mut h, r, true);
        let b = register(&mut s, "b");
        let mut hb = Heartbeat::new(beat(&s, b, NodeState::WaitStandby));
        let mut decided = false;
        let last = loop {
            match hb.next(&s, &mut h, 20) {
                Step::ProveLeadership => hb.proved(true),
                Step::Admit { .. } => hb.admitted(Ok(())),
                Step::Record(cmds) => {
                    for c in &cmds {
                        let _ = s.apply(c, 20);
                    }
                    hb.proposed(Proposed::Applied)
                }
                Step::Decide(_) => {
                    decided = true;
                    hb.proposed(Proposed::CannotCommit)
                }
                other => break other,
            }
        };
        assert!(decided);
        assert!(matches!(last, Step::Answer(_)), "{last:?}");
    }

    #[test]
    fn rounds_stop_after_the_constant_or_when_nothing_applies() {
        let (mut s, a) = one_node();
        let mut h = HealthTable::new(0);
        h.observe(beat(&s, a, NodeState::Single), 5);
        let single = Command::ReportState {
            node_id: a,
            state: NodeState::Single,
            lsn: crate::Lsn::new(10),
            timeline: 1,
            pg_running: true,
            sequence: 0,
        };
        assert!(s.apply(&single, 5).is_ok());
        let b = register(&mut s, "b");
        h.observe(beat(&s, b, NodeState::WaitStandby), 5);
        // Nothing is applied here, so every round decides the same again.
        let mut r = Rounds::new(None);
        for _ in 0..DECIDE_ROUNDS {
            assert!(r.next(&s, &h, 10).is_some());
            r.proposed(Proposed::Applied);
        }
        assert_eq!(r.next(&s, &h, 10), None);
        let mut r = Rounds::new(None);
        r.proposed(Proposed::NoneApplied);
        assert_eq!(r.next(&s, &h, 10), None);
    }
}
