//! A keeper's report of the state its node reached.

use super::Outcome;
use crate::error::CoreError;
use crate::lsn::Lsn;
use crate::model::{ClusterState, Millis, NodeId, NodeState};

impl ClusterState {
    pub(super) fn report_state(
        &mut self,
        node_id: NodeId,
        state: NodeState,
        lsn: Option<Lsn>,
        timeline: u32,
        pg_running: bool,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let Some(node) = self.nodes.get_mut(&node_id) else {
            return Err(CoreError::UnknownNode(node_id.to_string()));
        };
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
