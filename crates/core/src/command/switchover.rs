//! An operator switchover or failover.

use super::Outcome;
use crate::error::CoreError;
use crate::model::{ClusterState, GroupId, Millis, Node, NodeState};

impl ClusterState {
    pub(super) fn switchover(
        &mut self,
        formation: &str,
        group_id: GroupId,
        candidate: Option<&str>,
        now: Millis,
        what: &str,
    ) -> Result<Outcome, CoreError> {
        if !self.formations.contains_key(formation) {
            return Err(CoreError::UnknownFormation(formation.to_string()));
        }
        let requested = match candidate {
            Some(name) if !name.is_empty() => Some(self.lookup(formation, name)?),
            _ => None,
        };
        if self
            .group(formation, group_id)
            .and_then(|g| g.failover.as_ref())
            .is_some()
        {
            return Err(CoreError::FailoverInProgress { group: group_id });
        }
        let Some(primary) = self.primary_of(formation, group_id) else {
            return Err(CoreError::NotAllowed(format!(
                "group {group_id} of formation {formation} has no primary"
            )));
        };
        if primary.reported_state != primary.goal_state {
            return Err(CoreError::StillMoving {
                node: primary.name.clone(),
                goal: primary.goal_state,
                reported: primary.reported_state,
            });
        }
        let pid = primary.id;
        let pname = primary.name.clone();
        let ready = |n: &Node| {
            n.id != pid
                && n.candidate_priority > 0
                && n.reported_state == NodeState::Secondary
                && n.goal_state == NodeState::Secondary
        };
        if let Some(r) = requested {
            let n = self
                .nodes
                .get(&r)
                .ok_or_else(|| CoreError::UnknownNode(r.to_string()))?;
            if n.group_id != group_id {
                return Err(CoreError::NotAllowed(format!(
                    "node {} is not in group {group_id}",
                    n.name
                )));
            }
            if r == pid {
                return Err(CoreError::NotAllowed(format!(
                    "node {} is already the primary",
                    n.name
                )));
            }
            if n.candidate_priority == 0 {
                return Err(CoreError::NotAllowed(format!(
                    "node {} has candidate priority 0: it is never promoted",
                    n.name
                )));
            }
            if !ready(n) {
                return Err(CoreError::NotAllowed(format!(
                    "node {} is not a healthy secondary (it reports {}, goal {})",
                    n.name, n.reported_state, n.goal_state
                )));
            }
        } else if !self.group_nodes(formation, group_id).any(ready) {
            return Err(CoreError::NotAllowed(format!(
                "no secondary with a candidate priority above 0 can take over from {pname}"
            )));
        }
        self.set_goal(
            pid,
            NodeState::Draining,
            now,
            &format!("operator asked for a {what}"),
        )?;
        if let Some(f) = self
            .group_mut(formation, group_id)
            .and_then(|g| g.failover.as_mut())
        {
            f.planned = true;
            f.requested = requested;
        }
        Ok(Outcome::Done {
            description: format!("{what} started: {pname} is draining"),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{failover, id, refused, steady, switchover, T0};
    use super::super::Command;
    use crate::{CoreError, ErrorClass, NodeState, DEFAULT_FORMATION};

    #[test]
    fn a_switchover_drains_the_primary_in_a_planned_failover() {
        let mut c = steady(&["a", "b", "c"]);
        let (a, c3) = (id(&c, "a"), id(&c, "c"));
        c.apply(&switchover(Some("c")), T0).unwrap();
        assert_eq!(c.nodes[&a].goal_state, NodeState::Draining);
        let f = failover(&c);
        assert_eq!(f.old_primary, a);
        assert!(f.planned);
        assert_eq!(f.requested, Some(c3));
        // One at a time.
        let e = refused(&mut c, &switchover(None), ErrorClass::NotAllowedNow);
        assert!(
            matches!(e, CoreError::FailoverInProgress { group: 0 }),
            "{e:?}"
        );
        // A failover is the same, with no candidate named.
        let mut c = steady(&["a", "b"]);
        c.apply(
            &Command::PerformFailover {
                formation: DEFAULT_FORMATION.into(),
                group_id: 0,
            },
            T0,
        )
        .unwrap();
        let f = failover(&c);
        assert!(f.planned);
        assert_eq!(f.requested, None);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut c = steady(&["a", "b", "c"]);
        let e = refused(
            &mut c,
            &Command::PerformSwitchover {
                formation: "nope".into(),
                group_id: 0,
                candidate: None,
            },
            ErrorClass::NotFound,
        );
        assert!(matches!(e, CoreError::UnknownFormation(_)), "{e:?}");
        let e = refused(&mut c, &switchover(Some("zz")), ErrorClass::NotFound);
        assert!(matches!(e, CoreError::UnknownNode(_)), "{e:?}");
        let e = refused(&mut c, &switchover(Some("a")), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("already the primary"), "{e}");
        let b = id(&c, "b");
        c.nodes.get_mut(&b).unwrap().candidate_priority = 0;
        let e = refused(&mut c, &switchover(Some("b")), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("candidate priority 0"), "{e}");
        let c3 = id(&c, "c");
        c.nodes.get_mut(&c3).unwrap().reported_state = NodeState::Catchingup;
        let e = refused(&mut c, &switchover(Some("c")), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("not a healthy secondary"), "{e}");
        // Neither b (priority 0) nor c (catching up) can take over.
        let e = refused(&mut c, &switchover(None), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("can take over"), "{e}");

        // The primary between two states: retried later.
        let mut c = steady(&["a", "b"]);
        let a = id(&c, "a");
        c.nodes.get_mut(&a).unwrap().reported_state = NodeState::ApplySettings;
        let e = refused(&mut c, &switchover(None), ErrorClass::RetryLater);
        assert!(matches!(e, CoreError::StillMoving { .. }), "{e:?}");
        // No primary at all.
        c.nodes.get_mut(&a).unwrap().goal_state = NodeState::Demoted;
        let e = refused(&mut c, &switchover(None), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("has no primary"), "{e}");
    }
}
