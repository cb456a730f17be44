//! Putting a node into maintenance and taking it out.

use super::Outcome;
use crate::error::CoreError;
use crate::model::{ClusterState, Millis, NodeState};

impl ClusterState {
    pub(super) fn set_maintenance(
        &mut self,
        formation: &str,
        node: &str,
        enable: bool,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let (id, n) = self.lookup_node(formation, node)?;
        let group_id = n.group_id;
        let in_maint = n.goal_state.is_maintenance();
        if n.is_dropping() {
            return Err(CoreError::BeingDropped {
                node: node.to_string(),
            });
        }
        let failover = self
            .group(formation, group_id)
            .and_then(|g| g.failover.clone());
        if !enable {
            if !in_maint {
                return Err(CoreError::NotAllowed(format!(
                    "node {node} is not in maintenance"
                )));
            }
            let old_primary = failover.as_ref().filter(|f| f.old_primary == id);
            if old_primary.is_some_and(|f| f.fenced_at.is_none()) {
                // Giving it `demoted` now would count as fencing it, and it may still
                // be taking writes.
                return Err(CoreError::NotAllowed(format!(
                    "node {node} is still handing over its primary role; end its maintenance once the failover is complete"
                )));
            }
            let goal = if old_primary.is_some() {
                NodeState::Demoted
            } else {
                NodeState::Catchingup
            };
            self.set_goal(id, goal, now, "operator ended maintenance")?;
            if let Some(x) = self.nodes.get_mut(&id) {
                x.in_sync_set = false;
            }
            return Ok(Outcome::Done {
                description: format!("node {node} leaves maintenance"),
            });
        }
        if in_maint {
            return Err(CoreError::NotAllowed(format!(
                "node {node} is already in maintenance"
            )));
        }
        if failover.is_some() {
            return Err(CoreError::FailoverInProgress { group: group_id });
        }
        let others = self
            .group_nodes(formation, group_id)
            .filter(|x| x.id != id && !x.is_dropping())
            .count();
        if others == 0 {
            return Err(CoreError::NotAllowed(format!(
                "node {node} is the only node of group {group_id}: maintenance would stop the service"
            )));
        }
        self.check_capacity(
            formation,
            group_id,
            Some(id),
            None,
            false,
            &format!("maintenance on {node}"),
        )?;
        if n.goal_state.is_writable() {
            let has_candidate = self.group_nodes(formation, group_id).any(|x| {
                x.id != id
                    && x.candidate_priority > 0
                    && x.reported_state == NodeState::Secondary
                    && x.goal_state == NodeState::Secondary
            });
            if n.reported_state != n.goal_state {
                // The same refusal as a switchover's: the CLI waits while the primary
                // moves.
                return Err(CoreError::StillMoving {
                    node: node.to_string(),
                    goal: n.goal_state,
                    reported: n.reported_state,
                });
            }
            if !has_candidate {
                return Err(CoreError::NotAllowed(format!(
                    "maintenance on the primary {node} needs a healthy secondary with candidate priority above 0 to take over"
                )));
            }
            self.set_goal(
                id,
                NodeState::PrepareMaintenance,
                now,
                "operator asked for maintenance on the primary",
            )?;
            if let Some(f) = self
                .group_mut(formation, group_id)
                .and_then(|g| g.failover.as_mut())
            {
                f.planned = true;
            }
        } else {
            let listed = self
                .group(formation, group_id)
                .is_some_and(|g| g.sync_history.iter().any(|c| c.members.contains(&id)));
            let goal = if listed {
                NodeState::WaitMaintenance
            } else {
                NodeState::Maintenance
            };
            self.set_goal(id, goal, now, "operator asked for maintenance")?;
        }
        Ok(Outcome::Done {
            description: format!("node {node} goes into maintenance"),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{failover, group, id, refused, steady, switchover, T0};
    use super::super::Command;
    use crate::{CoreError, ErrorClass, NodeState, DEFAULT_FORMATION};

    fn maint(node: &str, enable: bool) -> Command {
        Command::SetMaintenance {
            formation: DEFAULT_FORMATION.into(),
            node: node.into(),
            enable,
        }
    }

    #[test]
    fn a_secondary_goes_into_maintenance_and_comes_back_catching_up() {
        let mut c = steady(&["a", "b", "c"]);
        let b = id(&c, "b");
        c.apply(&maint("b", true), T0).unwrap();
        // Not in any synchronous configuration: straight to maintenance.
        assert_eq!(c.nodes[&b].goal_state, NodeState::Maintenance);
        c.nodes.get_mut(&b).unwrap().in_sync_set = true;
        c.apply(&maint("b", false), T0).unwrap();
        assert_eq!(c.nodes[&b].goal_state, NodeState::Catchingup);
        assert!(
            !c.nodes[&b].in_sync_set,
            "it must catch up before it counts"
        );
    }

    #[test]
    fn a_standby_named_in_a_synchronous_configuration_waits_first() {
        let mut c = steady(&["a", "b", "c"]);
        let b = id(&c, "b");
        c.refresh_sync(DEFAULT_FORMATION, 0, T0);
        let listed = c
            .group(DEFAULT_FORMATION, 0)
            .unwrap()
            .sync_history
            .iter()
            .any(|s| s.members.contains(&b));
        assert!(listed, "the fixture names b as a synchronous standby");
        c.apply(&maint("b", true), T0).unwrap();
        assert_eq!(c.nodes[&b].goal_state, NodeState::WaitMaintenance);
    }

    #[test]
    fn the_primary_hands_over_in_a_planned_failover() {
        let mut c = steady(&["a", "b", "c"]);
        let a = id(&c, "a");
        c.apply(&maint("a", true), T0).unwrap();
        assert_eq!(c.nodes[&a].goal_state, NodeState::PrepareMaintenance);
        let f = failover(&c);
        assert_eq!(f.old_primary, a);
        assert!(f.planned);
        // Until the old primary is fenced it cannot leave maintenance (`demoted` would
        // count as fencing it).
        let e = refused(&mut c, &maint("a", false), ErrorClass::NotAllowedNow);
        assert!(matches!(e, CoreError::NotAllowed(_)), "{e:?}");
        // Fenced: it leaves as demoted, to rejoin as a standby.
        c.group_mut(DEFAULT_FORMATION, 0)
            .unwrap()
            .failover
            .as_mut()
            .unwrap()
            .fenced_at = Some(T0);
        c.nodes.get_mut(&a).unwrap().goal_state = NodeState::Maintenance;
        c.apply(&maint("a", false), T0).unwrap();
        assert_eq!(c.nodes[&a].goal_state, NodeState::Demoted);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut c = steady(&["a", "b", "c"]);
        let e = refused(&mut c, &maint("zz", true), ErrorClass::NotFound);
        assert!(matches!(e, CoreError::UnknownNode(_)), "{e:?}");
        let e = refused(&mut c, &maint("b", false), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("not in maintenance"), "{e}");
        c.apply(&maint("b", true), T0).unwrap();
        let e = refused(&mut c, &maint("b", true), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("already in maintenance"), "{e}");

        // A failover in progress (here a switchover).
        let mut c = steady(&["a", "b", "c"]);
        c.apply(&switchover(None), T0).unwrap();
        let e = refused(&mut c, &maint("c", true), ErrorClass::NotAllowedNow);
        assert!(
            matches!(e, CoreError::FailoverInProgress { group: 0 }),
            "{e:?}"
        );

        // The only node of its group.
        let mut c = steady(&["a"]);
        let e = refused(&mut c, &maint("a", true), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("only node"), "{e}");

        // A primary still moving to its goal: retried later.
        let mut c = steady(&["a", "b", "c"]);
        let a = id(&c, "a");
        c.nodes.get_mut(&a).unwrap().reported_state = NodeState::ApplySettings;
        let e = refused(&mut c, &maint("a", true), ErrorClass::RetryLater);
        assert!(matches!(e, CoreError::StillMoving { .. }), "{e:?}");

        // A primary with no healthy candidate to take over.
        let mut c = steady(&["a", "b", "c"]);
        for n in ["b", "c"] {
            let x = id(&c, n);
            c.nodes.get_mut(&x).unwrap().reported_state = NodeState::Catchingup;
        }
        let e = refused(&mut c, &maint("a", true), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("healthy secondary"), "{e}");

        // Not enough quorum standbys left for number_sync_standbys under `block`.
        let mut c = steady(&["a", "b"]);
        let e = refused(&mut c, &maint("b", true), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("number_sync_standbys"), "{e}");
    }

    #[test]
    fn a_node_being_dropped_is_refused() {
        let mut c = group(&["a", "b", "c"]);
        c.apply(
            &Command::DropNode {
                formation: DEFAULT_FORMATION.into(),
                node: "c".into(),
            },
            T0,
        )
        .unwrap();
        assert!(c
            .node_by_name(DEFAULT_FORMATION, "c")
            .unwrap()
            .is_dropping());
        let e = refused(&mut c, &maint("c", true), ErrorClass::NotAllowedNow);
        assert!(matches!(e, CoreError::BeingDropped { .. }), "{e:?}");
    }
}
