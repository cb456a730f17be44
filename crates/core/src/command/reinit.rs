//! Rebuilding a standby from its primary.

use super::Outcome;
use crate::error::CoreError;
use crate::model::{ClusterState, Millis, NodeState};

impl ClusterState {
    /// `perform reinit`: the standby's keeper rebuilds it from the primary. Refused on
    /// the primary (nothing to rebuild it from), on a node that is not a standby now, and
    /// when the node is needed for synchronous commit under `on_quorum_loss = block`
    /// (commits would wait for the whole rebuild).
    pub(super) fn reinit_node(
        &mut self,
        formation: &str,
        node: &str,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let (id, n) = self.lookup_node(formation, node)?;
        if n.goal_state.is_writable() {
            return Err(CoreError::NotAllowed(format!(
                "node {node} is the primary: there is nothing to rebuild it from; perform a switchover first"
            )));
        }
        if !matches!(
            n.goal_state,
            NodeState::Secondary | NodeState::Catchingup | NodeState::JoinSecondary
        ) {
            return Err(CoreError::NotAllowed(format!(
                "node {node} is {} (goal {}): only a standby (secondary or catching up) is rebuilt",
                n.reported_state, n.goal_state
            )));
        }
        let Some((pname, preported, pgoal)) = self
            .primary_of(formation, n.group_id)
            .map(|p| (p.name.clone(), p.reported_state, p.goal_state))
        else {
            return Err(CoreError::NotAllowed(format!(
                "group {} has no primary to rebuild {node} from",
                n.group_id
            )));
        };
        if !preported.is_writable() {
            return Err(CoreError::StillMoving {
                node: pname,
                goal: pgoal,
                reported: preported,
            });
        }
        self.check_capacity(
            formation,
            n.group_id,
            Some(id),
            None,
            false,
            &format!("rebuilding {node}"),
        )?;
        let seq = n.reinit_seq + 1;
        if let Some(x) = self.nodes.get_mut(&id) {
            x.reinit_seq = seq;
            if x.goal_state != NodeState::Catchingup {
                x.goal_since = now;
            }
            // Back to catching up: it is secondary again only once it streams and has
            // caught up after the rebuild.
            x.goal_state = NodeState::Catchingup;
        }
        self.node_event(
            now,
            id,
            format!(
                "node {node} assigned catchingup: operator asked for a rebuild from primary {pname} (reinit #{seq})"
            ),
        );
        self.tag_last(Some(NodeState::Catchingup), None);
        self.refresh_sync(formation, n.group_id, now);
        Ok(Outcome::Done {
            description: format!("node {node} is being rebuilt from primary {pname}"),
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{id, refused, steady, T0};
    use super::super::Command;
    use crate::{CoreError, ErrorClass, FormationSetting, NodeState, DEFAULT_FORMATION};

    fn reinit(node: &str) -> Command {
        Command::ReinitNode {
            formation: DEFAULT_FORMATION.into(),
            node: node.into(),
        }
    }

    #[test]
    fn a_secondary_is_rebuilt_catching_up() {
        let mut c = steady(&["a", "b", "c"]);
        let b = id(&c, "b");
        let seq = c.nodes[&b].reinit_seq;
        c.apply(&reinit("b"), T0 + 5).unwrap();
        assert_eq!(c.nodes[&b].goal_state, NodeState::Catchingup);
        assert_eq!(c.nodes[&b].reinit_seq, seq + 1);
        assert_eq!(c.nodes[&b].goal_since, T0 + 5);
        // Asked again while catching up: another rebuild.
        c.apply(&reinit("b"), T0 + 9).unwrap();
        assert_eq!(c.nodes[&b].reinit_seq, seq + 2);
        assert_eq!(c.nodes[&b].goal_since, T0 + 5);
    }

    #[test]
    fn refusals_change_nothing() {
        let mut c = steady(&["a", "b", "c"]);
        let e = refused(&mut c, &reinit("zz"), ErrorClass::NotFound);
        assert!(matches!(e, CoreError::UnknownNode(_)), "{e:?}");
        let e = refused(&mut c, &reinit("a"), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("is the primary"), "{e}");
        let b = id(&c, "b");
        c.nodes.get_mut(&b).unwrap().goal_state = NodeState::Maintenance;
        let e = refused(&mut c, &reinit("b"), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("only a standby"), "{e}");

        // The primary between two states: retried later.
        let mut c = steady(&["a", "b", "c"]);
        let a = id(&c, "a");
        c.nodes.get_mut(&a).unwrap().reported_state = NodeState::Secondary;
        let e = refused(&mut c, &reinit("b"), ErrorClass::RetryLater);
        assert!(matches!(e, CoreError::StillMoving { .. }), "{e:?}");

        // No primary to rebuild from.
        let mut c = steady(&["a", "b", "c"]);
        c.nodes.get_mut(&a).unwrap().goal_state = NodeState::Demoted;
        let e = refused(&mut c, &reinit("b"), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("no primary"), "{e}");

        // The only synchronous standby under `block`: commits would wait.
        let mut c = steady(&["a", "b"]);
        let e = refused(&mut c, &reinit("b"), ErrorClass::NotAllowedNow);
        assert!(e.to_string().contains("number_sync_standbys"), "{e}");
        c.apply(
            &Command::SetFormationSetting {
                formation: DEFAULT_FORMATION.into(),
                setting: FormationSetting::NumberSyncStandbys(0),
            },
            T0,
        )
        .unwrap();
        c.apply(&reinit("b"), T0).unwrap();
    }
}
