//! A keeper's report of the state its node reached.

use super::Outcome;
use crate::error::CoreError;
use crate::lsn::Lsn;
use crate::model::{ClusterState, Millis, NodeId, NodeState};

/// What one `Command::ReportState` says of its node.
pub(super) struct Report {
    pub state: NodeState,
    pub lsn: Option<Lsn>,
    pub timeline: u32,
    pub pg_running: bool,
    pub sequence: u64,
}

impl ClusterState {
    pub(super) fn report_state(
        &mut self,
        node_id: NodeId,
        report: Report,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let Report {
            state,
            lsn,
            timeline,
            pg_running,
            sequence,
        } = report;
        let Some(node) = self.nodes.get_mut(&node_id) else {
            return Err(CoreError::UnknownNode(node_id.to_string()));
        };
        // Issue 13 item 4: never applied after a newer report of the same keeper,
        // whichever leader admitted either (see `Node::report_sequence`).
        if sequence != 0 {
            if sequence <= node.report_sequence {
                return Err(CoreError::StaleReport {
                    node: node.name.clone(),
                    sequence,
                    newest: node.report_sequence,
                });
            }
            node.report_sequence = sequence;
        }
        let changed = node.reported_state != state;
        let pg_flipped = node.pg_running != pg_running;
        node.reported_state = state;
        node.reported_lsn = lsn;
        // A timeline of 0 is "unknown" (PostgreSQL down after a crash, or never
        // started): the last known timeline stays, so that a crashed old primary still
        // tells which standbys share its history. An unknown LSN stays unknown: a stale
        // position could pass for a final one.
        if timeline != 0 {
            node.timeline = timeline;
        }
        node.pg_running = pg_running;
        node.lsn_at = now;
        let goal = node.goal_state;
        let (formation, group_id, name) =
            (node.formation.clone(), node.group_id, node.name.clone());
        let goal_sync_seq = node.goal_sync_seq;

        // A primary restarted in place without a known position reports its first
        // (running, or from a clean shutdown): everything it acknowledged lies below it.
        if let Some(lsn) = lsn {
            if let Some(g) = self.group_mut(&formation, group_id) {
                if g.floor_unknown == Some(node_id) {
                    g.raise_floor(lsn);
                    g.floor_unknown = None;
                }
            }
        }
        if state == NodeState::Dropped && goal == NodeState::Dropped {
            self.remove_node(node_id, now, "its keeper confirmed it left");
            return Ok(Outcome::Done {
                description: format!("node {name} removed"),
            });
        }
        if changed {
            self.push_event(
                now,
                &formation,
                group_id,
                Some((node_id, &name)),
                format!("node {name} reached {state} (lsn {})", Lsn::or_unknown(lsn)),
            );
            self.tag_last(None, Some(state));
        } else if pg_flipped {
            // PostgreSQL stopped or started without a change of state: a crash, a fence
            // or a restart in place, which an operator wants to see in the history.
            let text = if pg_running {
                format!("PostgreSQL on node {name} is running again ({state})")
            } else {
                format!("PostgreSQL on node {name} is not running ({state})")
            };
            self.push_event(now, &formation, group_id, Some((node_id, &name)), text);
        }
        let has_primary = self.primary_of(&formation, group_id).is_some();
        if state == NodeState::Secondary && goal == NodeState::Secondary && has_primary {
            if let Some(n) = self.nodes.get_mut(&node_id) {
                n.in_sync_set = true;
            }
        }
        // A primary that reached a goal confirming synchronous commit no longer runs
        // configurations older than the one current when that goal was assigned.
        if state == goal && state.confirms_sync() {
            if let Some(g) = self.group_mut(&formation, group_id) {
                // Only a synchronous commit proves anything: under a configuration
                // with no synchronous standby, older ones stay (their commits keep
                // their protection).
                let confirmed = g
                    .sync_history
                    .iter()
                    .filter(|c| c.seq >= goal_sync_seq)
                    .all(|c| c.number > 0);
                if g.sync_history.len() > 1 && confirmed {
                    g.sync_history.retain(|c| c.seq >= goal_sync_seq);
                }
            }
        }
        // An old primary that reports PostgreSQL stopped is fenced (confirmed demotion).
        if state.is_stopped() {
            if let Some(f) = self
                .group_mut(&formation, group_id)
                .and_then(|g| g.failover.as_mut())
            {
                if f.old_primary == node_id && f.fenced_at.is_none() {
                    f.fenced_at = Some(now);
                }
            }
        }
        self.refresh_sync(&formation, group_id, now);
        Ok(Outcome::Done {
            description: format!("node {name} reported {state}"),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{id, refused, steady, switchover, T0};
    use super::super::Command;
    use crate::{CoreError, ErrorClass, Lsn, NodeId, NodeState, DEFAULT_FORMATION};

    fn report(node_id: NodeId, state: NodeState, lsn: u64, timeline: u32) -> Command {
        Command::ReportState {
            node_id,
            state,
            lsn: Lsn::new(lsn),
            timeline,
            pg_running: true,
            sequence: 0,
        }
    }

    /// Issue 13 item 4, on the state every member applies: a report older than one
    /// already applied (by this leader or an earlier one) changes nothing.
    #[test]
    fn a_report_not_newer_than_the_last_applied_is_refused_and_changes_nothing() {
        let mut s = steady(&["a", "b"]);
        let b = id(&s, "b");
        let stamped = |seq: u64, state: NodeState, lsn: u64| Command::ReportState {
            node_id: b,
            state,
            lsn: Lsn::new(lsn),
            timeline: 1,
            pg_running: true,
            sequence: seq,
        };
        s.apply(&stamped(1_000, NodeState::Secondary, 500), T0 + 1)
            .unwrap();
        for seq in [999, 1_000] {
            // `refused` also checks that the state is unchanged.
            let e = refused(
                &mut s,
                &stamped(seq, NodeState::Catchingup, 100),
                ErrorClass::NotAllowedNow,
            );
            assert!(matches!(e, CoreError::StaleReport { .. }), "{e:?}");
        }
        // Newer: applied. Unstamped (an old keeper): applied unjudged.
        s.apply(&stamped(1_001, NodeState::Secondary, 600), T0 + 2)
            .unwrap();
        assert_eq!(s.nodes[&b].reported_lsn, Lsn::new(600));
        assert_eq!(s.nodes[&b].report_sequence, 1_001);
        s.apply(&report(b, NodeState::Secondary, 700, 1), T0 + 3)
            .unwrap();
        assert_eq!(s.nodes[&b].reported_lsn, Lsn::new(700));
        assert_eq!(s.nodes[&b].report_sequence, 1_001);
    }

    #[test]
    fn a_report_records_what_the_keeper_reached() {
        let mut c = steady(&["a", "b", "c"]);
        let b = id(&c, "b");
        c.nodes.get_mut(&b).unwrap().goal_state = NodeState::Catchingup;
        c.nodes.get_mut(&b).unwrap().reported_state = NodeState::WaitStandby;
        let events = c.events.len();
        c.apply(&report(b, NodeState::Catchingup, 40, 3), T0 + 7)
            .unwrap();
        let n = &c.nodes[&b];
        assert_eq!(n.reported_state, NodeState::Catchingup);
        assert_eq!(n.reported_lsn, Lsn::new(40));
        assert_eq!(n.timeline, 3);
        assert_eq!(n.lsn_at, T0 + 7);
        assert!(!n.in_sync_set, "not a secondary yet");
        assert!(c.events.len() > events, "a change of state is an event");
        // Unknown timeline (0) and position: the timeline stays, the position is unknown.
        c.apply(&report(b, NodeState::Catchingup, 0, 0), T0 + 8)
            .unwrap();
        assert_eq!(c.nodes[&b].timeline, 3);
        assert_eq!(c.nodes[&b].reported_lsn, None);
    }

    #[test]
    fn a_secondary_in_its_goal_joins_the_synchronous_set() {
        let mut c = steady(&["a", "b", "c"]);
        let b = id(&c, "b");
        c.nodes.get_mut(&b).unwrap().in_sync_set = false;
        c.apply(&report(b, NodeState::Secondary, 40, 1), T0)
            .unwrap();
        assert!(c.nodes[&b].in_sync_set);
    }

    #[test]
    fn an_old_primary_reporting_postgresql_stopped_is_fenced() {
        let mut c = steady(&["a", "b", "c"]);
        let a = id(&c, "a");
        c.apply(&switchover(None), T0).unwrap();
        let fenced = |c: &crate::ClusterState| {
            c.group(DEFAULT_FORMATION, 0)
                .and_then(|g| g.failover.as_ref())
                .and_then(|f| f.fenced_at)
        };
        // Still reporting primary: not fenced.
        c.apply(&report(a, NodeState::Primary, 50, 1), T0 + 1)
            .unwrap();
        assert_eq!(fenced(&c), None);
        c.nodes.get_mut(&a).unwrap().goal_state = NodeState::Demoted;
        c.apply(&report(a, NodeState::Demoted, 50, 1), T0 + 2)
            .unwrap();
        assert_eq!(fenced(&c), Some(T0 + 2));
    }

    #[test]
    fn a_dropped_node_confirming_is_removed() {
        let mut c = steady(&["a", "b", "c"]);
        let c3 = id(&c, "c");
        c.apply(
            &Command::DropNode {
                formation: DEFAULT_FORMATION.into(),
                node: "c".into(),
            },
            T0,
        )
        .unwrap();
        assert!(c.nodes.contains_key(&c3));
        c.apply(&report(c3, NodeState::Dropped, 0, 0), T0).unwrap();
        assert!(!c.nodes.contains_key(&c3));
    }

    #[test]
    fn a_report_of_an_unknown_node_is_refused_and_changes_nothing() {
        let mut c = steady(&["a", "b"]);
        let e = refused(
            &mut c,
            &report(99, NodeState::Secondary, 1, 1),
            ErrorClass::NotFound,
        );
        assert_eq!(e, CoreError::UnknownNode("99".into()));
    }
}
