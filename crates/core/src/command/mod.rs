//! Commands: the changes to the cluster state that go through Raft, and
//! [`ClusterState::apply`], which validates each before it mutates anything (a refused
//! command changes nothing) and dispatches it to its handler, one module per command
//! family (openraft's `engine/handler/` layout): `formation`, `register`, `report`,
//! `goal` (AssignGoal and the structural invariants every goal change keeps),
//! `settings`, `switchover`, `maintenance`, `drop` (DropNode, ForgetNode), `reinit`.

use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::input::HostName;
use crate::lsn::Lsn;
use crate::model::{
    ClusterState, Event, Group, GroupId, Millis, NodeId, NodeState, QuorumLossPolicy,
    DEFAULT_FORMATION, MAX_EVENTS,
};
use crate::sync::{desired_sync, render};

mod drop;
mod formation;
mod goal;
mod maintenance;
mod register;
mod reinit;
mod report;
mod settings;
mod switchover;

/// A change to the cluster state. Replicated through Raft; applied on every member by
/// [`ClusterState::apply`] with the time the leader proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateFormation {
        name: String,
        number_sync_standbys: Option<u32>,
    },
    DropFormation {
        name: String,
    },
    /// A keeper registers (idempotent by formation + name).
    RegisterNode {
        formation: String,
        name: String,
        host: HostName,
        port: u16,
        candidate_priority: u8,
        replication_quorum: bool,
        system_identifier: u64,
        pg_major_version: u32,
        current_state: NodeState,
    },
    /// A keeper reached a new state (proposed by the leader from a heartbeat; LSN and
    /// timeline are recorded only at such changes, never per beat).
    ReportState {
        node_id: NodeId,
        state: NodeState,
        /// None: the keeper cannot know where its WAL ends (stored as 0).
        #[serde(with = "crate::lsn::zero_is_none")]
        lsn: Option<Lsn>,
        timeline: u32,
        pg_running: bool,
        /// The keeper's sequence of the report this comes from (0: unstamped, applied
        /// unjudged; entries written before it existed read as 0).
        #[serde(default, skip_serializing_if = "crate::model::is_zero")]
        sequence: u64,
    },
    /// The orchestrator's decision, with the reason that goes into the event history.
    AssignGoal {
        node_id: NodeId,
        goal: NodeState,
        reason: String,
        /// The node's goal when the decision was made: the command is refused if it
        /// changed since (an operator command applied in between, e.g. maintenance,
        /// must not be overwritten by a decision taken without it). None: no check.
        #[serde(default)]
        expected: Option<NodeState>,
    },
    SetNodeSetting {
        formation: String,
        node: String,
        setting: NodeSetting,
    },
    SetFormationSetting {
        formation: String,
        setting: FormationSetting,
    },
    PerformSwitchover {
        formation: String,
        group_id: GroupId,
        candidate: Option<String>,
    },
    PerformFailover {
        formation: String,
        group_id: GroupId,
    },
    SetMaintenance {
        formation: String,
        node: String,
        enable: bool,
    },
    DropNode {
        formation: String,
        node: String,
    },
    /// A node reported its PostgreSQL system identifier (proposed by the leader once per
    /// node, from a heartbeat). The group learns its identifier from the first node that
    /// reports one while holding a writable goal; after that, a node reporting another
    /// one is refused (it runs another cluster's data directory).
    RecordSystemIdentifier {
        node_id: NodeId,
        system_identifier: u64,
    },
    /// The operator asks for a standby to be rebuilt from the primary (its keeper wipes
    /// the data directory and takes a fresh base backup).
    ReinitNode {
        formation: String,
        node: String,
    },
    /// The leader removes a node being dropped whose keeper has been silent for a lease
    /// and its margin: it cannot acknowledge, and nothing should wait for it.
    ForgetNode {
        node_id: NodeId,
        reason: String,
    },
    /// Something the leader observed that changes no state but belongs in the history
    /// (a postmaster restarted in place, a keeper that fenced itself, a new monitor
    /// leader). Proposed only by the leader's own code, for rare occurrences.
    RecordEvent {
        formation: String,
        group_id: GroupId,
        node_id: Option<NodeId>,
        description: String,
    },
}

/// The longest description a [`Command::RecordEvent`] may carry.
pub const MAX_EVENT_DESCRIPTION: usize = 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeSetting {
    CandidatePriority(u8),
    ReplicationQuorum(bool),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FormationSetting {
    NumberSyncStandbys(u32),
    HeartbeatIntervalMs(u64),
    LeaseMs(u64),
    LeaseMarginMs(u64),
    OnQuorumLoss(QuorumLossPolicy),
}

/// What an applied command produced, returned to the client that proposed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    Done {
        description: String,
    },
    Registered {
        node_id: NodeId,
        group_id: GroupId,
        description: String,
    },
}

/// Nodes per group: the primary keeps a replication slot and a WAL sender for each
/// other node, and the keeper configures 16 of each (with room for a clone and a
/// rewind running at once). A rogue or left-behind registration costs one of them.
pub const MAX_GROUP_NODES: usize = 12;

fn valid_name(name: &str) -> bool {
    crate::input::check_formation_name(name).is_ok()
}

fn formation_name(name: &str) -> &str {
    if name.is_empty() {
        DEFAULT_FORMATION
    } else {
        name
    }
}

impl ClusterState {
    /// Apply one command. Deterministic; on error the state is unchanged.
    /// [`ClusterState::apply`], recording in every event the command produces who asked
    /// for it (the authenticated caller; None for the monitor's own decisions).
    pub fn apply_by(
        &mut self,
        cmd: &Command,
        now: Millis,
        by: Option<&str>,
    ) -> Result<Outcome, CoreError> {
        let first_new = self.next_event_id + 1;
        let outcome = self.apply(cmd, now)?;
        if let Some(by) = by {
            for e in self.events.iter_mut().rev() {
                if e.id < first_new {
                    break;
                }
                e.by = by.to_owned();
            }
        }
        Ok(outcome)
    }

    pub fn apply(&mut self, cmd: &Command, now: Millis) -> Result<Outcome, CoreError> {
        // Every command validates before it mutates, so an error leaves nothing behind.
        match cmd {
            Command::CreateFormation {
                name,
                number_sync_standbys,
            } => self.create_formation(name, *number_sync_standbys),
            Command::DropFormation { name } => self.drop_formation(name),
            Command::RegisterNode {
                formation,
                name,
                host,
                port,
                candidate_priority,
                replication_quorum,
                system_identifier,
                pg_major_version,
                current_state,
            } => self.register(
                formation_name(formation),
                name,
                host,
                *port,
                *candidate_priority,
                *replication_quorum,
                *system_identifier,
                *pg_major_version,
                *current_state,
                now,
            ),
            Command::ReportState {
                node_id,
                state,
                lsn,
                timeline,
                pg_running,
                sequence,
            } => self.report_state(
                *node_id,
                report::Report {
                    state: *state,
                    lsn: *lsn,
                    timeline: *timeline,
                    pg_running: *pg_running,
                    sequence: *sequence,
                },
                now,
            ),
            Command::RecordSystemIdentifier {
                node_id,
                system_identifier,
            } => self.record_system_identifier(*node_id, *system_identifier, now),
            Command::AssignGoal {
                node_id,
                goal,
                reason,
                expected,
            } => self.assign_goal(*node_id, *goal, reason, *expected, now),
            Command::SetNodeSetting {
                formation,
                node,
                setting,
            } => self.set_node_setting(formation_name(formation), node, setting, now),
            Command::SetFormationSetting { formation, setting } => {
                self.set_formation_setting(formation_name(formation), setting, now)
            }
            Command::PerformSwitchover {
                formation,
                group_id,
                candidate,
            } => self.switchover(
                formation_name(formation),
                *group_id,
                candidate.as_deref(),
                now,
                "switchover",
            ),
            Command::PerformFailover {
                formation,
                group_id,
            } => self.switchover(formation_name(formation), *group_id, None, now, "failover"),
            Command::SetMaintenance {
                formation,
                node,
                enable,
            } => self.set_maintenance(formation_name(formation), node, *enable, now),
            Command::DropNode { formation, node } => {
                self.drop_node(formation_name(formation), node, now)
            }
            Command::ReinitNode { formation, node } => {
                self.reinit_node(formation_name(formation), node, now)
            }
            Command::ForgetNode { node_id, reason } => self.forget_node(*node_id, reason, now),
            Command::RecordEvent {
                formation,
                group_id,
                node_id,
                description,
            } => self.record_event(formation, *group_id, *node_id, description, now),
        }
    }

    fn record_event(
        &mut self,
        formation: &str,
        group_id: GroupId,
        node_id: Option<NodeId>,
        description: &str,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        if description.is_empty() || description.len() > MAX_EVENT_DESCRIPTION {
            return Err(CoreError::InvalidSetting(format!(
                "an event description has 1-{MAX_EVENT_DESCRIPTION} bytes"
            )));
        }
        let node = node_id
            .and_then(|id| self.nodes.get(&id))
            .map(|n| (n.id, n.name.clone()));
        self.push_event(
            now,
            formation,
            group_id,
            node.as_ref().map(|(id, n)| (*id, n.as_str())),
            description.to_owned(),
        );
        Ok(Outcome::Done {
            description: description.to_owned(),
        })
    }

    pub(crate) fn push_event(
        &mut self,
        now: Millis,
        formation: &str,
        group_id: GroupId,
        node: Option<(NodeId, &str)>,
        description: String,
    ) {
        self.next_event_id += 1;
        self.events.push_back(Event {
            id: self.next_event_id,
            at: now,
            formation: formation.to_string(),
            group_id,
            node_id: node.map(|(id, _)| id),
            node_name: node.map(|(_, n)| n.to_string()).unwrap_or_default(),
            description,
            by: String::new(),
            assigned: None,
            reached: None,
        });
        while self.events.len() > MAX_EVENTS {
            self.events.pop_front();
        }
    }

    /// Marks the event just pushed as a node's change of goal or of reported state.
    fn tag_last(&mut self, assigned: Option<NodeState>, reached: Option<NodeState>) {
        if let Some(e) = self.events.back_mut() {
            e.assigned = assigned;
            e.reached = reached;
        }
    }

    fn node_event(&mut self, now: Millis, id: NodeId, description: String) {
        if let Some(n) = self.nodes.get(&id) {
            let (f, g, name) = (n.formation.clone(), n.group_id, n.name.clone());
            self.push_event(now, &f, g, Some((id, &name)), description);
        }
    }

    fn lookup(&self, formation: &str, name: &str) -> Result<NodeId, CoreError> {
        if !self.formations.contains_key(formation) {
            return Err(CoreError::UnknownFormation(formation.to_string()));
        }
        self.node_by_name(formation, name)
            .map(|n| n.id)
            .ok_or_else(|| CoreError::UnknownNode(name.to_string()))
    }

    /// [`Self::lookup`], and a copy of the node (the handler goes on to mutate `self`).
    fn lookup_node(
        &self,
        formation: &str,
        name: &str,
    ) -> Result<(NodeId, crate::model::Node), CoreError> {
        let id = self.lookup(formation, name)?;
        let n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or_else(|| CoreError::UnknownNode(name.to_string()))?;
        Ok((id, n))
    }

    fn group_mut(&mut self, formation: &str, group_id: GroupId) -> Option<&mut Group> {
        self.formations
            .get_mut(formation)
            .map(|f| f.groups.entry(group_id).or_default())
    }

    /// Recompute the synchronous configuration the primary should run; a change is
    /// appended to the history (older entries stay until the primary confirms).
    pub(crate) fn refresh_sync(&mut self, formation: &str, group_id: GroupId, now: Millis) {
        let Some(mut desired) = desired_sync(self, formation, group_id) else {
            return;
        };
        let Some(group) = self.group_mut(formation, group_id) else {
            return;
        };
        if group
            .sync_history
            .last()
            .is_some_and(|c| c.same_rule(&desired))
        {
            return;
        }
        group.next_sync_seq += 1;
        desired.seq = group.next_sync_seq;
        group.sync_history.push(desired.clone());
        let names = render(self, &desired);
        let text = if names.is_empty() {
            if desired.async_by_choice {
                "synchronous replication off by choice (number_sync_standbys = 0 or on_quorum_loss = continue): commits are acknowledged without any standby".to_string()
            } else {
                "no synchronous standby yet: commits are acknowledged by the primary alone"
                    .to_string()
            }
        } else if desired.members.is_empty() {
            format!("synchronous_standby_names now '{names}': no standby may count toward synchronous commit, so commits wait (on_quorum_loss = block) until a quorum standby joins")
        } else if desired
            .members
            .iter()
            .all(|m| self.nodes.get(m).is_none_or(|n| !n.in_sync_set))
        {
            format!("synchronous_standby_names now '{names}': no standby is in sync yet, so commits wait until one of these has joined")
        } else {
            format!("synchronous_standby_names now '{names}'")
        };
        self.push_event(now, formation, group_id, None, text);
    }
}

/// Upper bound for number_sync_standbys.
pub const MAX_SYNC_STANDBYS: u32 = 16;

/// What the handlers' unit tests start from.
#[cfg(test)]
pub(super) mod fixture {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::{Command, Outcome};
    use crate::model::{ClusterState, NodeId, NodeState, DEFAULT_FORMATION};

    pub const T0: u64 = 1_000_000;

    /// Registers `name` in the default formation with the given system identifier.
    pub fn register(
        c: &mut ClusterState,
        name: &str,
        sysid: u64,
    ) -> Result<NodeId, crate::CoreError> {
        let out = c.apply(
            &Command::RegisterNode {
                formation: DEFAULT_FORMATION.into(),
                name: name.into(),
                host: "10.0.0.1".parse().unwrap(),
                port: 5432,
                candidate_priority: 50,
                replication_quorum: true,
                system_identifier: sysid,
                pg_major_version: 15,
                current_state: NodeState::Init,
            },
            T0,
        )?;
        match out {
            Outcome::Registered { node_id, .. } => Ok(node_id),
            other => panic!("{other:?}"),
        }
    }

    /// A group of registered nodes (the first one single, the others waiting).
    pub fn group(names: &[&str]) -> ClusterState {
        let mut c = ClusterState::default();
        for n in names {
            register(&mut c, n, 0).unwrap();
        }
        c
    }

    /// The id of node `name` of the default formation.
    pub fn id(c: &ClusterState, name: &str) -> NodeId {
        c.node_by_name(DEFAULT_FORMATION, name).unwrap().id
    }

    /// A healthy group: the first node a primary, the others secondaries, each in its
    /// goal (the default settings: one synchronous standby, `on_quorum_loss = block`).
    pub fn steady(names: &[&str]) -> ClusterState {
        let mut c = group(names);
        for (i, n) in names.iter().enumerate() {
            let st = if i == 0 {
                NodeState::Primary
            } else {
                NodeState::Secondary
            };
            let id = id(&c, n);
            let node = c.nodes.get_mut(&id).unwrap();
            node.goal_state = st;
            node.reported_state = st;
        }
        c
    }

    /// A switchover of the default formation's group 0, to `candidate` or any.
    pub fn switchover(candidate: Option<&str>) -> Command {
        Command::PerformSwitchover {
            formation: DEFAULT_FORMATION.into(),
            group_id: 0,
            candidate: candidate.map(Into::into),
        }
    }

    /// The failover record of the default formation's group 0, which must be open.
    pub fn failover(c: &ClusterState) -> crate::model::Failover {
        c.group(DEFAULT_FORMATION, 0)
            .unwrap()
            .failover
            .clone()
            .unwrap()
    }

    /// Applies `cmd`, which must be refused with `class`, and checks that the refusal
    /// changed nothing; returns the error.
    pub fn refused(
        c: &mut ClusterState,
        cmd: &Command,
        class: crate::ErrorClass,
    ) -> crate::CoreError {
        let before = c.clone();
        let e = c.apply(cmd, T0).unwrap_err();
        assert_eq!(e.class(), class, "{e:?}");
        assert!(*c == before, "the refusal of {cmd:?} changed the state");
        e
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::fixture::{group, T0};
    use super::*;

    #[test]
    fn an_event_description_is_bounded_and_recorded_as_given() {
        let mut c = group(&["a"]);
        for bad in [String::new(), "x".repeat(MAX_EVENT_DESCRIPTION + 1)] {
            let e = c
                .apply(
                    &Command::RecordEvent {
                        formation: DEFAULT_FORMATION.into(),
                        group_id: 0,
                        node_id: None,
                        description: bad,
                    },
                    T0,
                )
                .unwrap_err();
            assert!(matches!(e, CoreError::InvalidSetting(_)), "{e:?}");
        }
        let before = c.events.len();
        c.apply(
            &Command::RecordEvent {
                formation: DEFAULT_FORMATION.into(),
                group_id: 0,
                node_id: None,
                description: "backup taken".into(),
            },
            T0,
        )
        .unwrap();
        assert_eq!(c.events.len(), before + 1);
        assert_eq!(
            c.events.back().map(|e| e.description.as_str()),
            Some("backup taken")
        );
    }
}
