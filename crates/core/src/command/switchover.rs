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
