//! The keeper's decision: from what it observes of its PostgreSQL, the state it last
//! reached and the assignment it holds, the one action it performs next and the state it
//! reports once that action is done ([`decide`]).
//!
//! The real keeper (crates/keeper) executes the action on PostgreSQL; the seeded
//! simulation (crates/core/tests/sim) executes the same action on its simulated
//! PostgreSQL. Nothing else in either decides what to do, so the simulation's keepers run
//! the production decision code.
//!
//! The keeper goes straight to its goal: one idempotent action turns what is there into
//! the shape the goal asks for ([`Target`]), and the goal is then the reached state. It
//! does not walk intermediate states (pg_auto_failover's keeper knows a fixed list of
//! (current, goal) pairs and gives up on the others; here every goal is reached from
//! every observation, which a property test proves). The orchestrator orders the steps of
//! a failover itself, by assigning the next goal only once it hears the previous one.
//!
//! # What reaching a goal means (the keeper's contract)
//!
//! | goal | target: the keeper has ... |
//! |---|---|
//! | `single`, `wait_primary` | a running primary (initdb'd if no data, promoted if a standby, started if stopped) with the assignment's `synchronous_standby_names` |
//! | `primary`, `join_primary`, `apply_settings` | the same, **and** seen a commit it issued *after* applying those names acknowledged (when they are non-empty: every earlier commit is then on the new standbys too) |
//! | `draining`, `demote_timeout`, `demoted`, `prepare_maintenance` | PostgreSQL stopped (a clean shutdown: connected standbys get all WAL) |
//! | `catchingup`, `secondary`, `join_secondary` | a standby streaming from the assignment's `primary`: base backup if no data, pg_rewind (or a fresh clone) when it followed another node or was a primary |
//! | `fast_forward` | a standby streaming from the assignment's `primary` (the most advanced standby); the orchestrator waits for the reported LSN to reach its target |
//! | `prepare_promotion` | a standby replaying what still arrives from the assignment's `primary` (none once the old primary is fenced), not waiting for a stream |
//! | `report_lsn`, `stop_replication` | a standby in recovery that streams from no one: its LSN is final |
//! | `init`, `wait_standby`, `wait_maintenance` | nothing done, except that a running primary is stopped |
//! | `maintenance` | nothing: the operator's hands; the keeper neither starts nor stops PostgreSQL |
//! | `dropped` | PostgreSQL stopped; the keeper exits |
//!
//! # `stop_replication` is not writable
//!
//! pg_auto_failover promotes in `stop_replication`. Here promotion happens only in a
//! writable goal ([`NodeState::is_writable`]), and the orchestrator assigns a writable goal
//! only after the old primary is fenced (it demoted, or its lease surely expired), and the
//! monitor's view of who may write ([`crate::ClusterState::primary_of`]) is the node whose
//! goal is writable. A node promoted in `stop_replication` would take writes that view
//! does not see. The orchestrator never assigns `stop_replication` (a promoting standby
//! goes `prepare_promotion` → `wait_primary`); a keeper told it by hand stops streaming
//! and waits in recovery, like `report_lsn`.
//!
//! In every writable goal the keeper applies the `synchronous_standby_names` of each
//! answer, and stops taking writes when its lease (`lease_ms` from sending the last
//! answered heartbeat) runs out.

use crate::model::NodeState;
use crate::orchestrate::{Assignment, PeerNode};

/// The data directory the keeper finds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataDir {
    /// None yet (or an empty one).
    Empty,
    /// A primary's: PostgreSQL starts out of recovery.
    Primary,
    /// A standby's (standby.signal): PostgreSQL starts, or runs, in recovery.
    Standby,
}

/// What the keeper observes of its PostgreSQL, and remembers of its own work (persisted
/// in its state file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub data: DataDir,
    pub running: bool,
    /// The node this standby was last made to stream from (by name), recorded once it
    /// streamed; `None` after it ran as a primary or followed no one.
    pub following: Option<String>,
    /// The highest rebuild request (`perform reinit`) completed by a fresh clone.
    pub reinit_done: u64,
}

/// The shape of PostgreSQL a goal asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Leave a standby or a stopped server as it is (init, wait_standby, wait_maintenance).
    Keep,
    /// A running, writable primary with the assigned synchronous_standby_names.
    Primary,
    /// A running standby in recovery, streaming from `upstream` when given; `wait` says
    /// the goal counts as reached only once the WAL receiver streams.
    Standby {
        upstream: Option<PeerNode>,
        wait: bool,
    },
    /// PostgreSQL stopped (draining, demote_timeout, demoted, prepare_maintenance).
    Stopped,
    /// Maintenance: the keeper neither starts nor stops PostgreSQL.
    HandsOff,
    /// Dropped: PostgreSQL stopped; the keeper exits.
    Dropped,
}

/// The one thing the keeper does next. Each is idempotent and restartable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// initdb, then as [`Action::StartPrimary`]; refused when another node is named
    /// primary (this node must join as a standby).
    InitPrimary,
    StartPrimary,
    /// A standby data directory made a primary: `pg_promote` (a new timeline).
    Promote,
    /// A running primary given (possibly) new settings.
    ConfigurePrimary,
    /// A fresh base backup of the upstream replaces the data directory.
    CloneStandby,
    /// Stop, pg_rewind onto the upstream (a fresh clone when that fails), start as standby.
    RewindToStandby,
    StartStandby,
    /// A running standby given (possibly) another upstream or settings.
    ConfigureStandby,
    Stop,
    /// Stop, and the keeper exits.
    Drop,
}

impl Action {
    /// The action leaves a PostgreSQL that takes writes.
    pub fn makes_writable(self) -> bool {
        matches!(
            self,
            Action::InitPrimary | Action::StartPrimary | Action::Promote | Action::ConfigurePrimary
        )
    }

    /// The action starts a stopped PostgreSQL (or makes one out of nothing).
    pub fn starts_postgres(self) -> bool {
        matches!(
            self,
            Action::InitPrimary
                | Action::StartPrimary
                | Action::Promote
                | Action::CloneStandby
                | Action::RewindToStandby
                | Action::StartStandby
        )
    }
}

/// The decision for one (observation, reached state, assignment).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub target: Target,
    pub action: Action,
    /// The action counts as done only once a commit the keeper issued after applying the
    /// assignment's synchronous_standby_names is acknowledged.
    pub confirm_sync: bool,
    /// The state to report once the action is done: the goal.
    pub reached: NodeState,
    /// Whether the keeper is moving into the goal (not keeping it): a keeper already in its
    /// goal only restarts a PostgreSQL that died ([`Decision::restart`]) until its
    /// assignment changes.
    pub transition: bool,
}

impl Decision {
    /// A keeper already in its goal restarts a PostgreSQL that stopped under it (a crash,
    /// the fence): this is the action to take then, if any.
    pub fn restart(&self) -> Option<Action> {
        (!self.transition && matches!(self.action, Action::StartPrimary | Action::StartStandby))
            .then_some(self.action)
    }

    /// What the keeper records as the node it follows ([`Observed::following`]) once the
    /// action succeeded, given what it recorded `before`. Only a standby goal that waits
    /// for its stream records an upstream; a goal that streams from no one, runs a
    /// primary, stops PostgreSQL or leaves it to the operator forgets it: the upstream's
    /// history may change unseen meanwhile (a primary rewound onto another while this
    /// node was in maintenance), and the next standby goal must then rewind rather than
    /// wait for a stream that cannot start (found by the simulation).
    pub fn following_after(&self, before: Option<&str>) -> Option<String> {
        match &self.target {
            Target::Standby {
                upstream: Some(p),
                wait: true,
            } => Some(p.name.clone()),
            Target::Standby {
                upstream: Some(_),
                wait: false,
            } => before.map(Into::into),
            _ => None,
        }
    }
}

impl Decision {
    /// What the keeper records as the node it follows when this decision's action
    /// failed because the standby did not come to stream from an upstream that was up.
    /// A standby goal decided without a rewind (the recorded upstream is the assigned
    /// one) forgets it, so that the next attempt rewinds: the upstream's history may have
    /// changed while this node was down or cut off (it was demoted, rewound onto another
    /// node and promoted again, under the same name), and a standby that no longer holds
    /// a prefix of its WAL waits for a stream that cannot start (found by the simulation,
    /// seed 8383 with a deposed monitor leader). pg_rewind onto an upstream that did not
    /// diverge changes nothing, so a wrong guess costs a restart, never data.
    pub fn following_after_failure(&self, before: Option<&str>) -> Option<String> {
        match (&self.target, self.action) {
            (
                Target::Standby {
                    upstream: Some(_),
                    wait: true,
                },
                Action::StartStandby | Action::ConfigureStandby,
            ) => None,
            _ => before.map(Into::into),
        }
    }
}

/// The shape of PostgreSQL that `a`'s goal asks for.
pub fn target(a: &Assignment) -> Target {
    use NodeState::*;
    match a.goal_state {
        Init | WaitStandby | WaitMaintenance => Target::Keep,
        Single | WaitPrimary | Primary | JoinPrimary | ApplySettings => Target::Primary,
        Catchingup | Secondary | JoinSecondary | FastForward => Target::Standby {
            upstream: a.primary.clone(),
            wait: true,
        },
        // Waiting for the old primary to be fenced: keep replaying what arrives, but a
        // dead upstream must not stop the node from reporting this state.
        PreparePromotion => Target::Standby {
            upstream: a.primary.clone(),
            wait: false,
        },
        // Not writable (see the module documentation): stop streaming, stay in recovery.
        ReportLsn | StopReplication => Target::Standby {
            upstream: None,
            wait: false,
        },
        Draining | DemoteTimeout | Demoted | PrepareMaintenance => Target::Stopped,
        Maintenance => Target::HandsOff,
        Dropped => Target::Dropped,
    }
}

/// The keeper's next action: from what it observes (`o`), the state it last reached
/// (`current`) and its assignment (`a`). See the module documentation.
pub fn decide(o: &Observed, current: NodeState, a: &Assignment) -> Decision {
    let t = target(a);
    let following_changed = match &t {
        // The fast-forward source is a standby on this node's timeline and ahead of it:
        // following it never needs a rewind, and stopping postgres for one made the
        // chosen candidate look unhealthy mid-switchover, so that another node was
        // promoted instead of the one the operator asked for (found end to end).
        _ if a.goal_state == NodeState::FastForward => false,
        Target::Standby {
            upstream: Some(p), ..
        } => o.following.as_deref() != Some(p.name.as_str()),
        _ => false,
    };
    let mut action = plan(o, &t, following_changed);
    // An operator asked for this standby to be rebuilt (`perform reinit`): a fresh base
    // backup replaces the data directory, whatever it holds. Only towards a standby of a
    // primary: the monitor refuses a rebuild of anything else.
    if a.reinit > o.reinit_done
        && a.goal_state == NodeState::Catchingup
        && matches!(
            t,
            Target::Standby {
                upstream: Some(_),
                ..
            }
        )
        && o.data != DataDir::Empty
    {
        action = Action::CloneStandby;
    }
    Decision {
        confirm_sync: a.goal_state.confirms_sync() && !a.synchronous_standby_names.is_empty(),
        target: t,
        action,
        reached: a.goal_state,
        transition: current != a.goal_state,
    }
}

/// The action for (what is there, what is wanted).
fn plan(o: &Observed, t: &Target, following_changed: bool) -> Action {
    use Action::*;
    use DataDir as D;
    match (t, o.data, o.running) {
        // A goal that is not writable never leaves a primary running: the lease is
        // renewed with every answer, whatever the goal, so nothing else would stop it.
        (Target::Keep, D::Primary, true) => Stop,
        (Target::Keep | Target::HandsOff, _, _) => Nothing,
        (Target::Primary, D::Empty, _) => InitPrimary,
        (Target::Primary, D::Primary, false) => StartPrimary,
        (Target::Primary, D::Primary, true) => ConfigurePrimary,
        (Target::Primary, D::Standby, _) => Promote,
        (
            Target::Standby {
                upstream: Some(_), ..
            },
            D::Empty,
            _,
        ) => CloneStandby,
        (Target::Standby { upstream: None, .. }, D::Empty, _) => Nothing,
        (Target::Standby { .. }, D::Primary, _) => RewindToStandby,
        (Target::Standby { wait: true, .. }, D::Standby, _) if following_changed => RewindToStandby,
        (Target::Standby { .. }, D::Standby, false) => StartStandby,
        (Target::Standby { .. }, D::Standby, true) => ConfigureStandby,
        (Target::Stopped, _, false) => Nothing,
        (Target::Stopped, _, true) => Stop,
        (Target::Dropped, _, _) => Drop,
    }
}

/// Goals the orchestrator (or an operator command) can assign.
pub fn assignable_goals() -> impl Iterator<Item = NodeState> {
    NodeState::ALL.into_iter().filter(|s| *s != NodeState::Init)
}

/// States a keeper can report (a dropped node is removed once it reports `dropped`).
pub fn reportable_states() -> impl Iterator<Item = NodeState> {
    NodeState::ALL
        .into_iter()
        .filter(|s| *s != NodeState::Dropped)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn a(goal: NodeState, primary: Option<&str>) -> Assignment {
        Assignment {
            goal_state: goal,
            primary: primary.map(|name| PeerNode {
                node_id: 1,
                name: name.into(),
                host: "h".parse().unwrap(),
                port: 1,
                streamed: false,
            }),
            synchronous_standby_names: String::new(),
            peers: vec![],
            lease_ms: 1500,
            heartbeat_interval_ms: 200,
            on_quorum_loss: "block".into(),
            reinit: 0,
        }
    }

    fn obs(data: DataDir, running: bool, following: Option<&str>) -> Observed {
        Observed {
            data,
            running,
            following: following.map(Into::into),
            reinit_done: 0,
        }
    }

    fn action(o: &Observed, goal: NodeState, primary: Option<&str>) -> Action {
        decide(o, NodeState::Init, &a(goal, primary)).action
    }

    #[test]
    fn the_decision_table() {
        use Action::*;
        use DataDir::*;
        use NodeState as S;
        assert_eq!(
            action(&obs(Empty, false, None), S::Single, None),
            InitPrimary
        );
        assert_eq!(
            action(&obs(Standby, true, Some("a")), S::WaitPrimary, None),
            Promote
        );
        assert_eq!(
            action(&obs(Empty, false, None), S::Secondary, Some("a")),
            CloneStandby
        );
        assert_eq!(
            action(&obs(Primary, true, None), S::Catchingup, Some("b")),
            RewindToStandby
        );
        assert_eq!(
            action(&obs(Standby, true, Some("a")), S::Secondary, Some("a")),
            ConfigureStandby
        );
        // Another primary to follow: rewind (the timelines may have diverged).
        assert_eq!(
            action(&obs(Standby, true, Some("a")), S::Secondary, Some("b")),
            RewindToStandby
        );
        // Not the fast-forward source, a standby ahead on this node's timeline.
        assert_eq!(
            action(&obs(Standby, true, Some("a")), S::FastForward, Some("b")),
            ConfigureStandby
        );
        assert_eq!(action(&obs(Primary, true, None), S::Draining, None), Stop);
        assert_eq!(
            action(&obs(Primary, true, None), S::Maintenance, None),
            Nothing
        );
        assert_eq!(
            action(&obs(Primary, true, None), S::WaitStandby, None),
            Stop
        );
        assert_eq!(
            action(&obs(Standby, true, None), S::WaitStandby, None),
            Nothing
        );
    }

    #[test]
    fn stop_replication_stays_in_recovery() {
        let o = obs(DataDir::Standby, true, Some("a"));
        let d = decide(
            &o,
            NodeState::PreparePromotion,
            &a(NodeState::StopReplication, None),
        );
        assert_eq!(
            d.target,
            Target::Standby {
                upstream: None,
                wait: false
            }
        );
        assert_eq!(d.action, Action::ConfigureStandby);
        assert!(!NodeState::StopReplication.is_writable());
    }

    #[test]
    fn a_rebuild_clones_afresh_once() {
        let mut o = obs(DataDir::Standby, true, Some("a"));
        let mut asg = a(NodeState::Catchingup, Some("a"));
        asg.reinit = 1;
        assert_eq!(
            decide(&o, NodeState::Secondary, &asg).action,
            Action::CloneStandby
        );
        o.reinit_done = 1;
        assert_eq!(
            decide(&o, NodeState::Secondary, &asg).action,
            Action::ConfigureStandby
        );
    }

    #[test]
    fn in_its_goal_the_keeper_only_restarts() {
        let asg = a(NodeState::Primary, None);
        let stopped = obs(DataDir::Primary, false, None);
        assert_eq!(
            decide(&stopped, NodeState::Primary, &asg).restart(),
            Some(Action::StartPrimary)
        );
        assert_eq!(
            decide(&stopped, NodeState::WaitPrimary, &asg).restart(),
            None
        );
        let running = obs(DataDir::Primary, true, None);
        assert_eq!(decide(&running, NodeState::Primary, &asg).restart(), None);
    }
}
