//! Changing a node's goal under the structural invariants (one writer, a writable goal
//! only when every other node is fenced).

use super::Outcome;
use crate::error::CoreError;
use crate::lsn::Lsn;
use crate::model::{ClusterState, Failover, Millis, Node, NodeId, NodeState};

/// Goals a node holding a writable goal may be given next.
fn allowed_from_writable(goal: NodeState) -> bool {
    goal.is_writable() || goal.is_demoting() || goal == NodeState::Demoted
}

impl ClusterState {
    /// `AssignGoal`: refused when the goal it was decided against (`expected`) changed
    /// since (an operator command applied in between wins).
    pub(super) fn assign_goal(
        &mut self,
        node_id: NodeId,
        goal: NodeState,
        reason: &str,
        expected: Option<NodeState>,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let Some(n) = self.nodes.get(&node_id) else {
            return Err(CoreError::UnknownNode(node_id.to_string()));
        };
        if let Some(e) = expected {
            if n.goal_state != e {
                return Err(CoreError::StaleDecision {
                    node: n.name.clone(),
                    expected: e,
                    goal: n.goal_state,
                });
            }
        }
        if goal == NodeState::Dropped {
            return Err(CoreError::NotAllowed(
                "a node is dropped with DropNode, not by a goal".into(),
            ));
        }
        self.set_goal(node_id, goal, now, reason)?;
        Ok(Outcome::Done {
            description: format!("node {node_id} assigned {goal}: {reason}"),
        })
    }

    /// Change a node's goal, keeping the structural invariants whatever state the
    /// proposal was computed on: at most one writable goal per group, and a writable
    /// goal only when every other node is fenced.
    pub(crate) fn set_goal(
        &mut self,
        node_id: NodeId,
        goal: NodeState,
        now: Millis,
        reason: &str,
    ) -> Result<(), CoreError> {
        let node = self
            .nodes
            .get(&node_id)
            .ok_or_else(|| CoreError::UnknownNode(node_id.to_string()))?;
        if goal == NodeState::Init {
            return Err(CoreError::NotAllowed("init is not a goal".into()));
        }
        let (formation, group_id, name) =
            (node.formation.clone(), node.group_id, node.name.clone());
        let was_writable = node.goal_state.is_writable();
        if node.goal_state == NodeState::Dropped {
            return Err(CoreError::BeingDropped { node: name });
        }
        if was_writable && !allowed_from_writable(goal) {
            return Err(CoreError::NotAllowed(format!(
                "node {name} is the primary: it must be demoted before it can be {goal}"
            )));
        }
        let group = self
            .group(&formation, group_id)
            .cloned()
            .unwrap_or_default();
        if goal.is_writable() && !was_writable {
            for other in self.group_nodes(&formation, group_id) {
                if other.id == node_id {
                    continue;
                }
                if other.goal_state.is_writable() {
                    return Err(CoreError::NotAllowed(format!(
                        "node {} is already the primary of group {group_id}",
                        other.name
                    )));
                }
                let fenced = other.goal_state.is_fenced() || other.reported_state.is_stopped();
                let may_write =
                    other.reported_state.is_writable() || other.goal_state.is_demoting();
                if may_write && !fenced {
                    return Err(CoreError::NotAllowed(format!(
                        "node {} may still accept writes: it has neither confirmed its demotion nor let its lease expire",
                        other.name
                    )));
                }
            }
            // The old primary restarted in place may not know its position (it
            // crashed); its data directory held the floor when it was promoted and a
            // primary only appends.
            let restart_in_place = group
                .failover
                .as_ref()
                .is_some_and(|f| f.old_primary == node_id)
                && !node.position_known();
            if let Some(holder) = group.floor_unknown.filter(|h| *h != node_id) {
                let holder = self
                    .nodes
                    .get(&holder)
                    .map_or_else(|| holder.to_string(), |h| h.name.clone());
                return Err(CoreError::NotAllowed(format!(
                    "node {holder} restarted as primary without a known position: until it reports one, no other node is known to hold every acknowledged commit"
                )));
            }
            if !group.floor_met_by(node.reported_lsn) && !restart_in_place {
                return Err(CoreError::NotAllowed(format!(
                    "node {name} has lsn {} but acknowledged commits may reach {}",
                    Lsn::or_unknown(node.reported_lsn),
                    Lsn::or_unknown(group.lsn_floor)
                )));
            }
        }
        let next_seq = group.sync_history.last().map(|c| c.seq).unwrap_or(0);
        let (own_lsn, own_timeline, own_known) =
            (node.reported_lsn, node.timeline, node.position_known());
        // Every acknowledged commit of the ending epoch lies at or below: the most
        // advanced witness when enough of them reported, else the new primary's own
        // LSN (the old primary restarted in place: nothing else is known). None: no
        // position is known, and the floor stays.
        let promoted_lsn = {
            let fo = group.failover.as_ref();
            let wit: Vec<&Node> =
                crate::candidate::witnesses(self, &formation, group_id, fo).collect();
            let ids: Vec<NodeId> = wit.iter().map(|n| n.id).collect();
            let target = wit.iter().filter_map(|n| n.reported_lsn).max();
            let proven = match crate::sync::requirement(&group.sync_history, &ids) {
                crate::sync::Requirement::Met => target,
                _ => None,
            };
            // Its own WAL counts too: the old primary restarted in place holds commits it
            // acknowledged without a synchronous standby, above any witness.
            Lsn::max_known(proven, node.reported_lsn)
        };
        // Fast-forward source: the most advanced witness (lowest id among equals).
        let ff_source = if goal == NodeState::FastForward {
            crate::candidate::fast_forward_source(self, &formation, group_id)
        } else {
            None
        };

        // Mutate.
        if let Some(n) = self.nodes.get_mut(&node_id) {
            if n.goal_state != goal {
                n.goal_since = now;
            }
            n.goal_state = goal;
            n.goal_sync_seq = next_seq;
            if goal.is_writable() && !was_writable {
                n.in_sync_set = false;
            }
        }
        if let Some(g) = self.group_mut(&formation, group_id) {
            if was_writable && !goal.is_writable() && g.failover.is_none() {
                g.failover = Some(Failover {
                    old_primary: node_id,
                    started_at: now,
                    requested: None,
                    planned: false,
                    fenced_at: None,
                    fast_forward_source: None,
                });
            }
            if let Some(f) = g.failover.as_mut() {
                if f.old_primary == node_id && goal.is_fenced() && f.fenced_at.is_none() {
                    f.fenced_at = Some(now);
                }
                if goal == NodeState::FastForward {
                    f.fast_forward_source = ff_source;
                }
            }
        }
        self.node_event(
            now,
            node_id,
            format!("node {name} assigned {goal}: {reason}"),
        );
        self.tag_last(Some(goal), None);
        if goal.is_writable() && !was_writable {
            // A new primary: the synchronous set starts from the standbys that were in
            // sync with the old one, and the old epoch's commits all lie below its LSN.
            let old = self
                .group(&formation, group_id)
                .and_then(|g| g.failover.as_ref())
                .map(|f| f.old_primary);
            if let Some(old) = old {
                if let Some(o) = self.nodes.get_mut(&old) {
                    o.in_sync_set = false;
                }
            }
            if let Some(g) = self.group_mut(&formation, group_id) {
                g.failover = None;
                g.sync_history.clear();
                if let Some(l) = promoted_lsn {
                    g.raise_floor(l);
                }
                g.promoted_at_lsn = own_lsn;
                g.promoted_at_timeline = own_timeline;
                g.floor_unknown = (!own_known).then_some(node_id);
            }
        }
        self.refresh_sync(&formation, group_id, now);
        if goal.is_writable() {
            // The goal's sync seq must name the configuration current after the refresh.
            let seq = self
                .group(&formation, group_id)
                .and_then(|g| g.sync_history.last())
                .map(|c| c.seq)
                .unwrap_or(0);
            if let Some(n) = self.nodes.get_mut(&node_id) {
                n.goal_sync_seq = seq;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{group, T0};
    use super::super::Command;
    use crate::{CoreError, ErrorClass, NodeState, DEFAULT_FORMATION};

    fn assign(
        c: &mut crate::ClusterState,
        node_id: u64,
        goal: NodeState,
        expected: Option<NodeState>,
    ) -> Result<(), CoreError> {
        c.apply(
            &Command::AssignGoal {
                node_id,
                goal,
                reason: "test".into(),
                expected,
            },
            T0,
        )
        .map(|_| ())
    }

    /// A decision computed on an older state loses to whatever changed the goal since.
    #[test]
    fn a_goal_decided_against_an_older_goal_is_refused_and_changes_nothing() {
        let mut c = group(&["a", "b"]);
        let b = c.node_by_name(DEFAULT_FORMATION, "b").unwrap().id;
        let was = c.nodes[&b].goal_state;
        let e = assign(&mut c, b, NodeState::Demoted, Some(NodeState::Secondary)).unwrap_err();
        assert!(
            matches!(&e, CoreError::StaleDecision { expected: NodeState::Secondary, goal, .. } if *goal == was),
            "{e:?}"
        );
        assert_eq!(e.class(), ErrorClass::NotAllowedNow);
        assert_eq!(c.nodes[&b].goal_state, was);
        assign(&mut c, b, NodeState::Demoted, Some(was)).unwrap();
        assert_eq!(c.nodes[&b].goal_state, NodeState::Demoted);
    }

    #[test]
    fn dropped_and_init_are_never_assigned_as_goals() {
        let mut c = group(&["a", "b"]);
        let b = c.node_by_name(DEFAULT_FORMATION, "b").unwrap().id;
        assert!(matches!(
            assign(&mut c, b, NodeState::Dropped, None),
            Err(CoreError::NotAllowed(_))
        ));
        assert!(matches!(
            assign(&mut c, b, NodeState::Init, None),
            Err(CoreError::NotAllowed(_))
        ));
        assert!(matches!(
            assign(&mut c, 99, NodeState::Demoted, None),
            Err(CoreError::UnknownNode(_))
        ));
    }

    /// Invariant 1: a second writable goal in a group is refused whoever proposes it.
    #[test]
    fn a_second_writable_goal_in_a_group_is_refused() {
        let mut c = group(&["a", "b"]);
        let a = c.node_by_name(DEFAULT_FORMATION, "a").unwrap().id;
        let b = c.node_by_name(DEFAULT_FORMATION, "b").unwrap().id;
        assert!(c.nodes[&a].goal_state.is_writable());
        assert!(assign(&mut c, b, NodeState::WaitPrimary, None).is_err());
        assert!(!c.nodes[&b].goal_state.is_writable());
    }
}
