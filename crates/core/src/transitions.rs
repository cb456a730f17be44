//! The keeper's transition table: which state a keeper may move to directly from which,
//! and the path it takes from any state it can report to any goal the orchestrator can
//! assign. pg_auto_failover's keeper knows a fixed list of (current, goal) pairs and
//! gives up on the others ("does not know how to reach state X from Y"); here the keeper
//! walks a path through direct transitions instead, and a property test proves every
//! assignable goal is reachable from every reportable state.
//!
//! # What reaching a state means for the keeper (its contract)
//!
//! The keeper performs the action of `next_step(current, goal)`, persists the new state,
//! and reports it in its next heartbeat. Actions are idempotent "make it so" steps:
//!
//! | state | the keeper has ... |
//! |---|---|
//! | `single` | initdb'd (if no data) and started PostgreSQL as a primary |
//! | `wait_primary` | a primary running (promoted if it was a standby; started if stopped), applying the assignment's `synchronous_standby_names` |
//! | `primary`, `join_primary`, `apply_settings` | the same, **and** seen a commit it issued *after* applying those names acknowledged (when they are non-empty: this proves every earlier commit is on the new standbys too); `join_primary` also allowed the new peers in pg_hba / slots |
//! | `draining`, `prepare_maintenance` | stopped taking writes and shut PostgreSQL down cleanly (connected standbys get all WAL) |
//! | `demote_timeout`, `demoted`, `maintenance`, `dropped` | PostgreSQL stopped; never restarted as a primary unless given a writable goal |
//! | `wait_standby` | nothing: waits for its primary to accept it |
//! | `catchingup`, `join_secondary`, `secondary`, `wait_maintenance` | a standby streaming from the assignment's `primary`: base backup if no data, pg_rewind if the timelines diverged |
//! | `report_lsn` | a standby that stopped streaming (so its LSN is final), reporting that LSN |
//! | `fast_forward` | fetched WAL from the assignment's `primary` (the most advanced standby) up to its end, then stopped streaming |
//! | `prepare_promotion`, `stop_replication` | a standby not streaming from anyone, ready to be promoted |
//!
//! In every writable state it applies the `synchronous_standby_names` of each answer, and
//! stops taking writes when its lease (`lease_ms` from sending the last answered heartbeat)
//! runs out.

use crate::model::NodeState;
use NodeState::*;

/// States from which the keeper can move directly to `to` (one keeper action).
fn predecessors(to: NodeState) -> &'static [NodeState] {
    match to {
        // Never a goal: the state of a node the keeper has not initialised yet.
        Init => &[],
        // initdb and start (a fresh node, or a waiting one whose primary never came); or a
        // primary left alone after its standbys were dropped.
        Single => &[
            Init,
            WaitStandby,
            WaitPrimary,
            Primary,
            JoinPrimary,
            ApplySettings,
        ],
        // Start taking writes: a single primary with standbys coming, a promoted
        // standby, a demoted old primary restarted in place (the orchestrator's last
        // resort when no standby can take over), or a primary whose quorum is lost.
        WaitPrimary => &[
            Single,
            Primary,
            JoinPrimary,
            ApplySettings,
            PreparePromotion,
            StopReplication,
            Demoted,
        ],
        // Reaching these three means a synchronous commit was acknowledged under the
        // synchronous_standby_names of the assignment.
        Primary => &[
            Single,
            WaitPrimary,
            JoinPrimary,
            ApplySettings,
            PreparePromotion,
            StopReplication,
        ],
        JoinPrimary => &[Single, WaitPrimary, Primary, ApplySettings],
        ApplySettings => &[WaitPrimary, Primary, JoinPrimary],
        // Stop taking writes and shut down cleanly, so connected standbys get all WAL.
        // (Already stopped: nothing to do.)
        Draining | PrepareMaintenance => &[
            Single,
            WaitPrimary,
            Primary,
            JoinPrimary,
            ApplySettings,
            Demoted,
            DemoteTimeout,
        ],
        // Stop PostgreSQL (now, or as the universal safe state): possible from
        // anywhere. `LIVE` also holds the state itself, which changes nothing: a
        // state is always allowed to itself.
        DemoteTimeout | Demoted => &NodeState::LIVE,
        // A fresh node waits for its primary to accept it.
        WaitStandby => &[Init, Demoted],
        // Base backup (no data), rewind (diverged), or just (re)start streaming from
        // the assigned primary.
        Catchingup => &[
            WaitStandby,
            Demoted,
            Secondary,
            ReportLsn,
            FastForward,
            PreparePromotion,
            JoinSecondary,
            WaitMaintenance,
            Maintenance,
        ],
        Secondary => &[Catchingup, JoinSecondary, ReportLsn, WaitMaintenance],
        // Report the LSN this standby holds, after the old primary was fenced.
        ReportLsn => &[
            Secondary,
            Catchingup,
            JoinSecondary,
            FastForward,
            PreparePromotion,
            WaitMaintenance,
        ],
        // Fetch the WAL this node misses from the most advanced standby.
        FastForward => &[ReportLsn],
        PreparePromotion => &[ReportLsn, FastForward],
        StopReplication => &[PreparePromotion],
        // Follow the new primary (rewinding if needed) after a failover.
        JoinSecondary => &[
            ReportLsn,
            FastForward,
            PreparePromotion,
            Secondary,
            Catchingup,
        ],
        WaitMaintenance => &[Secondary, Catchingup],
        Maintenance => &[
            WaitMaintenance,
            PrepareMaintenance,
            Demoted,
            Secondary,
            Catchingup,
        ],
        // Leave the group: possible from anywhere.
        Dropped => &NodeState::LIVE,
    }
}

/// Whether the keeper may move from `from` to `to` in one action.
pub fn transition_allowed(from: NodeState, to: NodeState) -> bool {
    from == to || predecessors(to).contains(&from)
}

fn index(s: NodeState) -> usize {
    NodeState::ALL.iter().position(|x| *x == s).unwrap_or(0)
}

/// The states a keeper in `from` passes through to reach the goal `to`, ending with `to`
/// (empty when `from == to`). The shortest such path; ties go to the state listed first
/// in [`NodeState::ALL`]. `None` only when `to` cannot be reached at all (`init`, or
/// anything from `dropped`).
///
/// The keeper executes one step at a time: it performs the action of the first state of
/// the path, reports that state, and asks again at the next heartbeat (the goal may have
/// changed meanwhile).
pub fn keeper_path(from: NodeState, to: NodeState) -> Option<Vec<NodeState>> {
    if from == to {
        return Some(Vec::new());
    }
    const N: usize = NodeState::ALL.len();
    // Breadth-first search backwards from the goal, so the first step is found directly.
    let mut next: [Option<NodeState>; N] = [None; N];
    let mut seen = [false; N];
    let mut queue = std::collections::VecDeque::new();
    seen[index(to)] = true;
    queue.push_back(to);
    while let Some(cur) = queue.pop_front() {
        for &p in predecessors(cur) {
            // Never pass through a state that takes writes on the way to one that
            // does not: a keeper told to stop must not start a primary first.
            if p != from && p.is_writable() && !to.is_writable() {
                continue;
            }
            if !seen[index(p)] {
                seen[index(p)] = true;
                next[index(p)] = Some(cur);
                queue.push_back(p);
            }
        }
    }
    if !seen[index(from)] {
        return None;
    }
    let mut path = Vec::new();
    let mut cur = from;
    while cur != to {
        cur = next[index(cur)]?;
        path.push(cur);
    }
    Some(path)
}

/// The first state a keeper in `from` must reach on its way to `to`.
pub fn next_step(from: NodeState, to: NodeState) -> Option<NodeState> {
    keeper_path(from, to).and_then(|p| p.first().copied())
}

/// Goals the orchestrator (or an operator command) can assign.
pub fn assignable_goals() -> impl Iterator<Item = NodeState> {
    NodeState::ALL.into_iter().filter(|s| *s != Init)
}

/// States a keeper can report (a dropped node is removed once it reports `dropped`).
pub fn reportable_states() -> impl Iterator<Item = NodeState> {
    NodeState::LIVE.into_iter()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn demoted_primary_returns_by_rewind() {
        assert_eq!(keeper_path(Primary, Demoted), Some(vec![Demoted]));
        assert_eq!(
            keeper_path(Demoted, Secondary),
            Some(vec![Catchingup, Secondary])
        );
    }

    #[test]
    fn failover_path_of_a_standby() {
        assert_eq!(keeper_path(Secondary, ReportLsn), Some(vec![ReportLsn]));
        assert_eq!(keeper_path(ReportLsn, FastForward), Some(vec![FastForward]));
        assert_eq!(
            keeper_path(FastForward, WaitPrimary),
            Some(vec![PreparePromotion, WaitPrimary])
        );
    }

    #[test]
    fn primary_to_secondary_goes_through_demotion() {
        assert_eq!(
            keeper_path(Primary, Secondary),
            Some(vec![Demoted, Catchingup, Secondary])
        );
    }

    #[test]
    fn nothing_leads_to_init_or_out_of_dropped() {
        assert_eq!(keeper_path(Secondary, Init), None);
        assert_eq!(keeper_path(Dropped, Secondary), None);
        assert_eq!(keeper_path(Dropped, Dropped), Some(vec![]));
    }

    #[test]
    fn every_step_of_a_path_is_an_allowed_transition() {
        for from in reportable_states() {
            for to in assignable_goals() {
                let path =
                    keeper_path(from, to).unwrap_or_else(|| panic!("no path {from} -> {to}"));
                let mut cur = from;
                for s in &path {
                    assert!(transition_allowed(cur, *s), "{cur} -> {s}");
                    assert!(
                        to.is_writable() || !s.is_writable(),
                        "{from} -> {to} passes through writable {s}: {path:?}"
                    );
                    cur = *s;
                }
                assert_eq!(cur, to);
            }
        }
    }
}
