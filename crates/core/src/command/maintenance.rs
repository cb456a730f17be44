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
