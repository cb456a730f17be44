//! A keeper registers its node; the group learns its system identifier.

use super::{Outcome, MAX_GROUP_NODES};
use crate::error::CoreError;
use crate::input::HostName;
use crate::model::{
    ClusterState, Formation, FormationSettings, Group, GroupId, Millis, Node, NodeId, NodeState,
    DEFAULT_FORMATION,
};

impl ClusterState {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn register(
        &mut self,
        formation: &str,
        name: &str,
        host: &HostName,
        port: u16,
        candidate_priority: u8,
        replication_quorum: bool,
        system_identifier: u64,
        pg_major_version: u32,
        current_state: NodeState,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        crate::input::check_node_name(name).map_err(|e| CoreError::InvalidSetting(e.0))?;
        if port == 0 {
            return Err(CoreError::InvalidSetting(format!(
                "node {name}: port 0 is not a TCP port"
            )));
        }
        if candidate_priority > 100 {
            return Err(CoreError::InvalidSetting(format!(
                "candidate priority {candidate_priority} is outside 0-100"
            )));
        }
        if !self.formations.contains_key(formation) && formation != DEFAULT_FORMATION {
            return Err(CoreError::UnknownFormation(formation.to_string()));
        }
        let group_id: GroupId = 0;
        let other_sysid = self
            .group(formation, group_id)
            .map(|g| g.system_identifier)
            .filter(|s| *s != 0)
            .or_else(|| {
                self.group_nodes(formation, group_id)
                    .filter(|n| n.name != name)
                    .map(|n| n.system_identifier)
                    .find(|s| *s != 0)
            });
        if let Some(existing) = other_sysid {
            if system_identifier != 0 && system_identifier != existing {
                return Err(CoreError::OtherCluster {
                    node: name.to_string(),
                    system_identifier,
                    group_system_identifier: existing,
                });
            }
        }
        if let Some(id) = self.node_by_name(formation, name).map(|n| n.id) {
            let mut moved = None;
            if let Some(n) = self.nodes.get_mut(&id) {
                // The keeper's certificate names this node (the service checks it before
                // proposing), so a corrected --pg-host or --pg-port is the node's own word.
                if n.host != *host || n.port != port {
                    moved = Some(format!("{}:{}", n.host, n.port));
                }
                n.host = host.clone();
                n.port = port;
                if system_identifier != 0 {
                    n.system_identifier = system_identifier;
                }
                n.pg_major_version = pg_major_version;
            }
            if let Some(old) = moved {
                self.node_event(
                    now,
                    id,
                    format!("node {name} registered again at {host}:{port} (was {old})"),
                );
            }
            return Ok(Outcome::Registered {
                node_id: id,
                group_id,
                description: format!("node {name} already registered as node {id}"),
            });
        }
        if !self.formations.contains_key(formation) {
            self.formations.insert(
                formation.to_string(),
                Formation {
                    name: formation.to_string(),
                    settings: FormationSettings::default(),
                    groups: Default::default(),
                },
            );
        }
        let size = self.group_nodes(formation, group_id).count();
        if size >= MAX_GROUP_NODES {
            return Err(CoreError::GroupFull {
                node: name.to_string(),
                size,
            });
        }
        let first = size == 0;
        // A keeper whose node was dropped earlier starts afresh: what it last reached
        // belongs to the node that was removed.
        let current_state = if current_state == NodeState::Dropped {
            NodeState::Init
        } else {
            current_state
        };
        let goal = if first {
            NodeState::Single
        } else {
            NodeState::WaitStandby
        };
        self.next_node_id += 1;
        let id = self.next_node_id;
        self.nodes.insert(
            id,
            Node {
                id,
                formation: formation.to_string(),
                group_id,
                name: name.to_string(),
                host: host.clone(),
                port,
                candidate_priority,
                replication_quorum,
                reported_state: current_state,
                goal_state: goal,
                reported_lsn: None,
                timeline: 0,
                pg_running: false,
                system_identifier,
                pg_major_version,
                lsn_at: now,
                goal_since: now,
                in_sync_set: false,
                goal_sync_seq: 0,
                reinit_seq: 0,
                report_sequence: 0,
            },
        );
        self.index_node(formation, group_id, id);
        if first {
            if let Some(g) = self.group_mut(formation, group_id) {
                *g = Group::default();
            }
        }
        self.push_event(
            now,
            formation,
            group_id,
            Some((id, name)),
            format!("node {name} registered ({host}:{port}), assigned {goal}"),
        );
        self.tag_last(Some(goal), None);
        self.refresh_sync(formation, group_id, now);
        Ok(Outcome::Registered {
            node_id: id,
            group_id,
            description: format!(
                "node {name} registered as node {id} in group {group_id}, goal {goal}"
            ),
        })
    }

    pub(super) fn record_system_identifier(
        &mut self,
        node_id: NodeId,
        sysid: u64,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        if sysid == 0 {
            return Err(CoreError::InvalidSetting(
                "system identifier 0 is unknown, not an identifier".into(),
            ));
        }
        self.check_system_identifier(node_id, sysid)?;
        let Some(node) = self.nodes.get_mut(&node_id) else {
            return Err(CoreError::UnknownNode(node_id.to_string()));
        };
        node.system_identifier = sysid;
        let writable = node.goal_state.is_writable();
        let (formation, group_id, name) =
            (node.formation.clone(), node.group_id, node.name.clone());
        let mut learned = false;
        if writable {
            if let Some(g) = self.group_mut(&formation, group_id) {
                if g.system_identifier == 0 {
                    g.system_identifier = sysid;
                    learned = true;
                }
            }
        }
        if learned {
            self.push_event(
                now,
                &formation,
                group_id,
                Some((node_id, &name)),
                format!("the group's PostgreSQL system identifier is {sysid} (from {name})"),
            );
        }
        Ok(Outcome::Done {
            description: format!("node {name}: system identifier {sysid}"),
        })
    }

    /// Refuses a node whose data directory belongs to another cluster than its group's.
    pub fn check_system_identifier(&self, node_id: NodeId, sysid: u64) -> Result<(), CoreError> {
        let Some(node) = self.nodes.get(&node_id) else {
            return Err(CoreError::UnknownNode(node_id.to_string()));
        };
        let group = self
            .group(&node.formation, node.group_id)
            .map(|g| g.system_identifier)
            .unwrap_or(0);
        if sysid != 0 && group != 0 && sysid != group {
            return Err(CoreError::OtherCluster {
                node: node.name.clone(),
                system_identifier: sysid,
                group_system_identifier: group,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::super::fixture::{group, register};
    use super::super::MAX_GROUP_NODES;
    use crate::{CoreError, ErrorClass};

    #[test]
    fn a_group_takes_at_most_max_group_nodes() {
        let names: Vec<String> = (0..MAX_GROUP_NODES).map(|i| format!("n{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let mut c = group(&refs);
        let e = register(&mut c, "one-more", 0).unwrap_err();
        assert!(
            matches!(&e, CoreError::GroupFull { size, .. } if *size == MAX_GROUP_NODES),
            "{e:?}"
        );
        assert_eq!(e.class(), ErrorClass::NotAllowedNow);
        // Registering a node again is not a new node.
        register(&mut c, "n0", 0).unwrap();
    }

    #[test]
    fn a_data_directory_of_another_cluster_is_refused() {
        let mut c = group(&[]);
        register(&mut c, "a", 7).unwrap();
        let e = register(&mut c, "b", 8).unwrap_err();
        assert!(
            matches!(
                &e,
                CoreError::OtherCluster {
                    system_identifier: 8,
                    group_system_identifier: 7,
                    ..
                }
            ),
            "{e:?}"
        );
        register(&mut c, "b", 7).unwrap();
    }
}
