//! Dropping a node, and forgetting it once its keeper confirmed.

use super::Outcome;
use crate::error::CoreError;
use crate::model::{ClusterState, Millis, NodeId, NodeState};

impl ClusterState {
    pub(super) fn drop_node(
        &mut self,
        formation: &str,
        node: &str,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let (id, n) = self.lookup_node(formation, node)?;
        if n.is_dropping() {
            self.remove_node(
                id,
                now,
                "dropped again by the operator: removed without waiting for its keeper",
            );
            return Ok(Outcome::Done {
                description: format!("node {node} removed"),
            });
        }
        let others = self
            .group_nodes(formation, n.group_id)
            .filter(|x| x.id != id && !x.is_dropping())
            .count();
        let never_initialised =
            matches!(n.reported_state, NodeState::Init | NodeState::WaitStandby);
        if n.goal_state.is_writable() && others > 0 && !never_initialised {
            return Err(CoreError::NotAllowed(format!(
                "node {node} is the primary: perform a switchover first"
            )));
        }
        if let Some(f) = self
            .group(formation, n.group_id)
            .and_then(|g| g.failover.as_ref())
        {
            if f.old_primary == id && f.fenced_at.is_none() {
                return Err(CoreError::NotAllowed(format!(
                    "node {node} is the old primary and is not fenced yet; wait for its demotion or lease expiry"
                )));
            }
        }
        self.check_capacity(
            formation,
            n.group_id,
            Some(id),
            None,
            true,
            &format!("dropping {node}"),
        )?;
        if let Some(x) = self.nodes.get_mut(&id) {
            x.goal_state = NodeState::Dropped;
            x.goal_since = now;
            x.in_sync_set = false;
        }
        if let Some(f) = self
            .group_mut(formation, n.group_id)
            .and_then(|g| g.failover.as_mut())
        {
            if f.old_primary == id {
                f.fenced_at.get_or_insert(now);
            }
        }
        self.node_event(
            now,
            id,
            format!("node {node} assigned dropped: operator dropped it"),
        );
        self.tag_last(Some(NodeState::Dropped), None);
        self.refresh_sync(formation, n.group_id, now);
        Ok(Outcome::Done {
            description: format!("node {node} is being dropped"),
        })
    }

    /// `ForgetNode`: removes a dropped node once its keeper confirmed (or the operator
    /// gave up on it).
    pub(super) fn forget_node(
        &mut self,
        node_id: NodeId,
        reason: &str,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let Some(n) = self.nodes.get(&node_id) else {
            return Err(CoreError::UnknownNode(node_id.to_string()));
        };
        if !n.is_dropping() {
            return Err(CoreError::NotAllowed(format!(
                "node {} is not being dropped: only a dropped node is forgotten",
                n.name
            )));
        }
        let name = n.name.clone();
        self.remove_node(node_id, now, reason);
        Ok(Outcome::Done {
            description: format!("node {name} removed"),
        })
    }

    pub(super) fn remove_node(&mut self, node_id: NodeId, now: Millis, why: &str) {
        let Some(node) = self.nodes.remove(&node_id) else {
            return;
        };
        self.unindex_node(&node.formation, node.group_id, node_id);
        self.push_event(
            now,
            &node.formation,
            node.group_id,
            Some((node_id, &node.name)),
            format!("node {} removed: {why}", node.name),
        );
        let empty = self
            .group_nodes(&node.formation, node.group_id)
            .next()
            .is_none();
        if let Some(f) = self.formations.get_mut(&node.formation) {
            if empty {
                f.groups.remove(&node.group_id);
            } else if let Some(g) = f.groups.get_mut(&node.group_id) {
                // Dropping it is the operator's choice to give up what only it held.
                if g.floor_unknown == Some(node_id) {
                    g.floor_unknown = None;
                }
                if g.failover
                    .as_ref()
                    .is_some_and(|fo| fo.old_primary == node_id)
                {
                    if let Some(fo) = g.failover.as_mut() {
                        fo.fenced_at.get_or_insert(now);
                    }
                }
            }
        }
        self.refresh_sync(&node.formation, node.group_id, now);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{group, T0};
    use super::super::Command;
    use crate::{CoreError, DEFAULT_FORMATION};

    #[test]
    fn only_a_node_being_dropped_is_forgotten() {
        let mut c = group(&["a", "b"]);
        let b = c.node_by_name(DEFAULT_FORMATION, "b").unwrap().id;
        let forget = |c: &mut crate::ClusterState, node_id| {
            c.apply(
                &Command::ForgetNode {
                    node_id,
                    reason: "test".into(),
                },
                T0,
            )
        };
        assert!(matches!(forget(&mut c, b), Err(CoreError::NotAllowed(_))));
        assert!(matches!(forget(&mut c, 99), Err(CoreError::UnknownNode(_))));
        c.apply(
            &Command::DropNode {
                formation: "".into(),
                node: "b".into(),
            },
            T0,
        )
        .unwrap();
        forget(&mut c, b).unwrap();
        assert!(!c.nodes.contains_key(&b));
    }
}
