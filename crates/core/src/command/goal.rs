//! Changing a node's goal under the structural invariants (one writer, a writable goal
//! only when every other node is fenced).

use super::Outcome;
use crate::error::CoreError;
use crate::lsn::Lsn;
use crate::model::{ClusterState, Failover, Group, GroupId, Millis, Node, NodeId, NodeState};

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
    /// goal only when every other node is fenced. Checked and planned on the state as
    /// it is ([`ClusterState::plan_goal`]), then recorded ([`ClusterState::record_goal`]):
    /// a refusal changes nothing.
    pub(crate) fn set_goal(
        &mut self,
        node_id: NodeId,
        goal: NodeState,
        now: Millis,
        reason: &str,
    ) -> Result<(), CoreError> {
        let change = self.plan_goal(node_id, goal)?;
        self.record_goal(change, now, reason);
        Ok(())
    }

    /// The checks and everything the change needs to know, read before anything
    /// changes: whether `goal` may be given to the node at all
    /// ([`check_goal_allowed`]), then, for a new writable goal, the group's rules
    /// ([`ClusterState::check_promotion`]) and the epoch it starts
    /// ([`ClusterState::promotion`]).
    fn plan_goal(&self, node_id: NodeId, goal: NodeState) -> Result<GoalChange, CoreError> {
        let node = self
            .nodes
            .get(&node_id)
            .ok_or_else(|| CoreError::UnknownNode(node_id.to_string()))?;
        check_goal_allowed(node, goal)?;
        let group = self
            .group(&node.formation, node.group_id)
            .cloned()
            .unwrap_or_default();
        let was_writable = node.goal_state.is_writable();
        let promotion = if goal.is_writable() && !was_writable {
            self.check_promotion(node, &group)?;
            Some(self.promotion(node, &group))
        } else {
            None
        };
        Ok(GoalChange {
            node_id,
            goal,
            formation: node.formation.clone(),
            group_id: node.group_id,
            name: node.name.clone(),
            was_writable,
            sync_seq: group.sync_history.last().map(|c| c.seq).unwrap_or(0),
            promotion,
            // Fast-forward source: the most advanced witness (lowest id among equals).
            ff_source: if goal == NodeState::FastForward {
                crate::candidate::fast_forward_source(self, &node.formation, node.group_id)
            } else {
                None
            },
        })
    }

    /// A new writable goal for `node` (it holds none): no other node of the group holds
    /// one or may still take writes unfenced, no other node holds the floor unknown,
    /// and the node holds the floor (the old primary restarted in place without a
    /// known position excepted).
    fn check_promotion(&self, node: &Node, group: &Group) -> Result<(), CoreError> {
        for other in self.group_nodes(&node.formation, node.group_id) {
            if other.id == node.id {
                continue;
            }
            if other.goal_state.is_writable() {
                return Err(CoreError::NotAllowed(format!(
                    "node {} is already the primary of group {}",
                    other.name, node.group_id
                )));
            }
            let fenced = other.goal_state.is_fenced() || other.reported_state.is_stopped();
            let may_write = other.reported_state.is_writable() || other.goal_state.is_demoting();
            if may_write && !fenced {
                return Err(CoreError::NotAllowed(format!(
                    "node {} may still accept writes: it has neither confirmed its demotion nor let its lease expire",
                    other.name
                )));
            }
        }
        // The old primary restarted in place may not know its position (it crashed);
        // its data directory held the floor when it was promoted and a primary only
        // appends.
        let restart_in_place = group
            .failover
            .as_ref()
            .is_some_and(|f| f.old_primary == node.id)
            && !node.position_known();
        if let Some(holder) = group.floor_unknown.filter(|h| *h != node.id) {
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
                "node {} has lsn {} but acknowledged commits may reach {}",
                node.name,
                Lsn::or_unknown(node.reported_lsn),
                Lsn::or_unknown(group.lsn_floor)
            )));
        }
        Ok(())
    }

    /// The epoch `node` starts as the new primary.
    fn promotion(&self, node: &Node, group: &Group) -> Promotion {
        // Every acknowledged commit of the ending epoch lies at or below: the most
        // advanced witness when enough of them reported, else the new primary's own
        // LSN (the old primary restarted in place: nothing else is known). None: no
        // position is known, and the floor stays.
        let fo = group.failover.as_ref();
        let wit: Vec<&Node> =
            crate::candidate::witnesses(self, &node.formation, node.group_id, fo).collect();
        let ids: Vec<NodeId> = wit.iter().map(|n| n.id).collect();
        let target = wit.iter().filter_map(|n| n.reported_lsn).max();
        let proven = match crate::sync::requirement(&group.sync_history, &ids) {
            crate::sync::Requirement::Met => target,
            _ => None,
        };
        Promotion {
            // Its own WAL counts too: the old primary restarted in place holds commits
            // it acknowledged without a synchronous standby, above any witness.
            floor: Lsn::max_known(proven, node.reported_lsn),
            at_lsn: node.reported_lsn,
            at_timeline: node.timeline,
        }
    }

    /// Record a checked change: the node's goal, the group's failover record, the
    /// event, a new primary's epoch, and the synchronous configuration that follows.
    fn record_goal(&mut self, change: GoalChange, now: Millis, reason: &str) {
        let GoalChange {
            node_id,
            goal,
            ref formation,
            group_id,
            ref name,
            was_writable,
            sync_seq,
            promotion,
            ff_source,
        } = change;
        if let Some(n) = self.nodes.get_mut(&node_id) {
            if n.goal_state != goal {
                n.goal_since = now;
            }
            n.goal_state = goal;
            n.goal_sync_seq = sync_seq;
            if promotion.is_some() {
                n.in_sync_set = false;
            }
        }
        if let Some(g) = self.group_mut(formation, group_id) {
            record_failover(g, node_id, goal, was_writable, ff_source, now);
        }
        self.node_event(
            now,
            node_id,
            format!("node {name} assigned {goal}: {reason}"),
        );
        self.tag_last(Some(goal), None);
        if let Some(p) = promotion {
            self.start_epoch(formation, group_id, node_id, p);
        }
        self.refresh_sync(formation, group_id, now);
        if goal.is_writable() {
            // The goal's sync seq must name the configuration current after the refresh.
            let seq = self
                .group(formation, group_id)
                .and_then(|g| g.sync_history.last())
                .map(|c| c.seq)
                .unwrap_or(0);
            if let Some(n) = self.nodes.get_mut(&node_id) {
                n.goal_sync_seq = seq;
            }
        }
    }

    /// A new primary: the synchronous set starts from the standbys that were in sync
    /// with the old one, the failover is over, and the old epoch's commits all lie below
    /// the new floor.
    fn start_epoch(&mut self, formation: &str, group_id: GroupId, node_id: NodeId, p: Promotion) {
        let old = self
            .group(formation, group_id)
            .and_then(|g| g.failover.as_ref())
            .map(|f| f.old_primary);
        if let Some(o) = old.and_then(|old| self.nodes.get_mut(&old)) {
            o.in_sync_set = false;
        }
        if let Some(g) = self.group_mut(formation, group_id) {
            g.failover = None;
            g.sync_history.clear();
            if let Some(l) = p.floor {
                g.raise_floor(l);
            }
            g.promoted_at_lsn = p.at_lsn;
            g.promoted_at_timeline = p.at_timeline;
            g.floor_unknown = p.at_lsn.is_none().then_some(node_id);
        }
    }
}

/// Whether `goal` may be given to `node` at all, whatever its group: init is no goal, a
/// node being dropped gets no other, and the primary must be demoted before anything
/// else.
fn check_goal_allowed(node: &Node, goal: NodeState) -> Result<(), CoreError> {
    if goal == NodeState::Init {
        return Err(CoreError::NotAllowed("init is not a goal".into()));
    }
    if node.goal_state == NodeState::Dropped {
        return Err(CoreError::BeingDropped {
            node: node.name.clone(),
        });
    }
    if node.goal_state.is_writable() && !allowed_from_writable(goal) {
        return Err(CoreError::NotAllowed(format!(
            "node {} is the primary: it must be demoted before it can be {goal}",
            node.name
        )));
    }
    Ok(())
}

/// The group's failover record after `node_id` is given `goal`: a primary leaving its
/// writable goal opens one; the old primary's fenced goal fences it; a fast-forward
/// names its source.
fn record_failover(
    g: &mut Group,
    node_id: NodeId,
    goal: NodeState,
    was_writable: bool,
    ff_source: Option<NodeId>,
    now: Millis,
) {
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

/// A checked goal change, planned on the state before it.
struct GoalChange {
    node_id: NodeId,
    goal: NodeState,
    formation: String,
    group_id: GroupId,
    name: String,
    was_writable: bool,
    /// The newest synchronous configuration now: the goal's `goal_sync_seq`.
    sync_seq: u64,
    /// Set for a new writable goal (the node held none).
    promotion: Option<Promotion>,
    ff_source: Option<NodeId>,
}

/// The epoch a new primary starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Promotion {
    /// Every acknowledged commit of the ending epoch lies at or below (None: unknown;
    /// the floor stays).
    floor: Option<Lsn>,
    /// The new primary's position and timeline when promoted.
    at_lsn: Option<Lsn>,
    at_timeline: u32,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{failover, group, T0};
    use super::super::Command;
    use super::*;
    use crate::{ClusterState, CoreError, ErrorClass, Lsn, NodeState, DEFAULT_FORMATION};

    fn id(c: &ClusterState, name: &str) -> NodeId {
        c.node_by_name(DEFAULT_FORMATION, name).unwrap().id
    }

    fn node<'a>(c: &'a mut ClusterState, name: &str) -> &'a mut Node {
        let id = id(c, name);
        c.nodes.get_mut(&id).unwrap()
    }

    fn group_of(c: &mut ClusterState) -> &mut Group {
        c.group_mut(DEFAULT_FORMATION, 0).unwrap()
    }

    /// `a`, the first primary, demoted and confirmed: the group is ready for a new one.
    fn after_demotion(names: &[&str]) -> ClusterState {
        let mut c = group(names);
        let a = id(&c, "a");
        c.set_goal(a, NodeState::Demoted, T0, "test").unwrap();
        node(&mut c, "a").reported_state = NodeState::Demoted;
        c
    }

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

    /// Validation: whatever the group, init is no goal, a dropping node gets no other
    /// goal, and a primary goes nowhere but through demotion.
    #[test]
    fn check_goal_allowed_refuses_init_a_dropping_node_and_an_undemoted_primary() {
        let mut c = group(&["a", "b"]);
        let primary = c.nodes[&id(&c, "a")].clone();
        assert!(primary.goal_state.is_writable());
        let err = check_goal_allowed(&primary, NodeState::Secondary).unwrap_err();
        assert!(
            matches!(&err, CoreError::NotAllowed(m) if m.contains("must be demoted")),
            "{err:?}"
        );
        for ok in [NodeState::Draining, NodeState::Demoted, NodeState::Primary] {
            check_goal_allowed(&primary, ok).unwrap();
        }
        assert!(check_goal_allowed(&primary, NodeState::Init).is_err());
        node(&mut c, "b").goal_state = NodeState::Dropped;
        let b = c.nodes[&id(&c, "b")].clone();
        assert!(matches!(
            check_goal_allowed(&b, NodeState::Secondary),
            Err(CoreError::BeingDropped { .. })
        ));
    }

    /// The promotion rules: a node may take a writable goal only with every other node
    /// fenced, and only holding the floor; an unknown position holds no floor.
    #[test]
    fn check_promotion_needs_the_others_fenced_and_the_floor() {
        let c = group(&["a", "b"]);
        let b = c.nodes[&id(&c, "b")].clone();
        let g = c.group(DEFAULT_FORMATION, 0).unwrap().clone();
        let err = c.check_promotion(&b, &g).unwrap_err();
        assert!(err.to_string().contains("already the primary"), "{err}");

        let mut c = after_demotion(&["a", "b"]);
        group_of(&mut c).lsn_floor = Lsn::new(100);
        for (lsn, ok) in [(None, false), (Lsn::new(99), false), (Lsn::new(100), true)] {
            node(&mut c, "b").reported_lsn = lsn;
            let b = c.nodes[&id(&c, "b")].clone();
            let g = c.group(DEFAULT_FORMATION, 0).unwrap().clone();
            assert_eq!(c.check_promotion(&b, &g).is_ok(), ok, "b at {lsn:?}");
        }
        // No floor: any position will do, an unknown one included.
        group_of(&mut c).lsn_floor = None;
        node(&mut c, "b").reported_lsn = None;
        let b = c.nodes[&id(&c, "b")].clone();
        let g = c.group(DEFAULT_FORMATION, 0).unwrap().clone();
        c.check_promotion(&b, &g).unwrap();

        // A demoting old primary that has not confirmed may still take writes.
        node(&mut c, "a").reported_state = NodeState::Primary;
        node(&mut c, "a").goal_state = NodeState::Draining;
        let err = c.check_promotion(&b, &g).unwrap_err();
        assert!(err.to_string().contains("may still accept writes"), "{err}");
    }

    /// The old primary restarted in place may not know its position: that is no reason
    /// to refuse it, but until it reports one no other node may be promoted.
    #[test]
    fn the_old_primary_restarts_in_place_without_a_position_and_holds_the_floor() {
        let mut c = after_demotion(&["a", "b"]);
        group_of(&mut c).lsn_floor = Lsn::new(100);
        node(&mut c, "a").reported_lsn = None;
        let a = id(&c, "a");
        c.set_goal(a, NodeState::WaitPrimary, T0 + 10, "restart in place")
            .unwrap();
        let g = c.group(DEFAULT_FORMATION, 0).unwrap();
        assert_eq!(g.floor_unknown, Some(a));
        assert_eq!(g.lsn_floor, Lsn::new(100), "the floor never goes down");
        assert_eq!(g.promoted_at_lsn, None);
        assert!(g.failover.is_none());

        let mut c = after_demotion(&["a", "b", "c"]);
        group_of(&mut c).floor_unknown = Some(id(&c, "a"));
        node(&mut c, "b").reported_lsn = Lsn::new(500);
        let b = c.nodes[&id(&c, "b")].clone();
        let g = c.group(DEFAULT_FORMATION, 0).unwrap().clone();
        let err = c.check_promotion(&b, &g).unwrap_err();
        assert!(
            err.to_string().contains("without a known position"),
            "{err}"
        );
    }

    /// The epoch a new primary starts: the floor is the most advanced witness when the
    /// witnesses prove it, the node's own position too, and nothing when nothing is
    /// known.
    #[test]
    fn promotion_takes_the_floor_from_proven_witnesses_and_the_own_position() {
        let mut c = group(&["a", "b", "c"]);
        group_of(&mut c).sync_history.clear();
        for (name, lsn) in [("b", 200), ("c", 300)] {
            let n = node(&mut c, name);
            n.reported_state = NodeState::ReportLsn;
            n.goal_state = NodeState::ReportLsn;
            n.reported_lsn = Lsn::new(lsn);
            n.timeline = 2;
        }
        let g = c.group(DEFAULT_FORMATION, 0).unwrap().clone();
        let b = c.nodes[&id(&c, "b")].clone();
        assert_eq!(
            c.promotion(&b, &g),
            Promotion {
                floor: Lsn::new(300),
                at_lsn: Lsn::new(200),
                at_timeline: 2
            }
        );
        // c's position unknown: no witness proves anything, b's own position counts.
        node(&mut c, "c").reported_lsn = None;
        assert_eq!(c.promotion(&b, &g).floor, Lsn::new(200));
        node(&mut c, "b").reported_lsn = None;
        let b = c.nodes[&id(&c, "b")].clone();
        assert_eq!(c.promotion(&b, &g).floor, None);
    }

    /// The bookkeeping: a primary leaving its writable goal opens the failover record,
    /// its fenced goal fences it, and the next primary closes it and starts its epoch.
    #[test]
    fn record_goal_opens_fences_and_closes_the_failover() {
        let mut c = group(&["a", "b"]);
        let (a, b) = (id(&c, "a"), id(&c, "b"));
        c.set_goal(a, NodeState::Draining, T0 + 1, "test").unwrap();
        let f = failover(&c);
        assert_eq!(
            (f.old_primary, f.started_at, f.fenced_at),
            (a, T0 + 1, None)
        );
        c.set_goal(a, NodeState::Demoted, T0 + 2, "test").unwrap();
        let f = failover(&c);
        assert_eq!((f.started_at, f.fenced_at), (T0 + 1, Some(T0 + 2)));
        assert_eq!(c.nodes[&a].goal_since, T0 + 2);

        group_of(&mut c).lsn_floor = Lsn::new(150);
        node(&mut c, "a").reported_state = NodeState::Demoted;
        node(&mut c, "a").in_sync_set = true;
        node(&mut c, "b").reported_lsn = Lsn::new(200);
        node(&mut c, "b").timeline = 3;
        c.set_goal(b, NodeState::WaitPrimary, T0 + 3, "test")
            .unwrap();
        let g = c.group(DEFAULT_FORMATION, 0).unwrap();
        assert!(g.failover.is_none());
        assert_eq!(g.lsn_floor, Lsn::new(200));
        assert_eq!(
            (g.promoted_at_lsn, g.promoted_at_timeline),
            (Lsn::new(200), 3)
        );
        assert_eq!(g.floor_unknown, None);
        assert!(!c.nodes[&a].in_sync_set && !c.nodes[&b].in_sync_set);
        let newest = g.sync_history.last().map_or(0, |s| s.seq);
        assert_eq!(c.nodes[&b].goal_sync_seq, newest);
    }
}
