use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::input::HostName;
use crate::model::{
    ClusterState, Event, Failover, Formation, FormationSettings, Group, GroupId, Lsn, Millis, Node,
    NodeId, NodeState, QuorumLossPolicy, DEFAULT_FORMATION, MAX_EVENTS,
};
use crate::sync::{desired_sync, render};

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
        lsn: Lsn,
        timeline: u32,
        pg_running: bool,
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

/// Writes an LSN the way PostgreSQL does (`0/3000060`).
pub fn fmt_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

/// Goals a node holding a writable goal may be given next.
fn allowed_from_writable(goal: NodeState) -> bool {
    goal.is_writable() || goal.is_demoting() || goal == NodeState::Demoted
}

/// Goals of an old primary that mean "fenced": it accepts no writes and will not.
fn fenced_goal(goal: NodeState) -> bool {
    goal.is_fenced()
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
            } => {
                if !valid_name(name) {
                    return Err(CoreError::InvalidFormationName(name.clone()));
                }
                if self.formations.contains_key(name) {
                    return Err(CoreError::FormationExists(name.clone()));
                }
                let mut settings = FormationSettings::default();
                if let Some(n) = number_sync_standbys {
                    if *n > MAX_SYNC_STANDBYS {
                        return Err(CoreError::InvalidSetting(format!(
                            "number_sync_standbys {n} is above the maximum {MAX_SYNC_STANDBYS}"
                        )));
                    }
                    settings.number_sync_standbys = *n;
                }
                self.formations.insert(
                    name.clone(),
                    Formation {
                        name: name.clone(),
                        settings,
                        groups: Default::default(),
                    },
                );
                Ok(Outcome::Done {
                    description: format!("formation {name} created"),
                })
            }
            Command::DropFormation { name } => {
                if !self.formations.contains_key(name) {
                    return Err(CoreError::UnknownFormation(name.clone()));
                }
                if self.nodes.values().any(|n| &n.formation == name) {
                    return Err(CoreError::FormationNotEmpty(name.clone()));
                }
                self.formations.remove(name);
                Ok(Outcome::Done {
                    description: format!("formation {name} dropped"),
                })
            }
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
            } => self.report_state(*node_id, *state, *lsn, *timeline, *pg_running, now),
            Command::RecordSystemIdentifier {
                node_id,
                system_identifier,
            } => self.record_system_identifier(*node_id, *system_identifier, now),
            Command::AssignGoal {
                node_id,
                goal,
                reason,
                expected,
            } => {
                let Some(n) = self.nodes.get(node_id) else {
                    return Err(CoreError::UnknownNode(node_id.to_string()));
                };
                if let Some(e) = expected {
                    if n.goal_state != *e {
                        return Err(CoreError::StaleDecision {
                            node: n.name.clone(),
                            expected: *e,
                            goal: n.goal_state,
                        });
                    }
                }
                if *goal == NodeState::Dropped {
                    return Err(CoreError::NotAllowed(
                        "a node is dropped with DropNode, not by a goal".into(),
                    ));
                }
                self.set_goal(*node_id, *goal, now, reason)?;
                Ok(Outcome::Done {
                    description: format!("node {node_id} assigned {goal}: {reason}"),
                })
            }
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
            Command::ForgetNode { node_id, reason } => {
                let Some(n) = self.nodes.get(node_id) else {
                    return Err(CoreError::UnknownNode(node_id.to_string()));
                };
                if !n.is_dropping() {
                    return Err(CoreError::NotAllowed(format!(
                        "node {} is not being dropped: only a dropped node is forgotten",
                        n.name
                    )));
                }
                let name = n.name.clone();
                self.remove_node(*node_id, now, reason);
                Ok(Outcome::Done {
                    description: format!("node {name} removed"),
                })
            }
            Command::RecordEvent {
                formation,
                group_id,
                node_id,
                description,
            } => {
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
                    *group_id,
                    node.as_ref().map(|(id, n)| (*id, n.as_str())),
                    description.clone(),
                );
                Ok(Outcome::Done {
                    description: description.clone(),
                })
            }
        }
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

    #[allow(clippy::too_many_arguments)]
    fn register(
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
                reported_lsn: 0,
                timeline: 0,
                pg_running: false,
                system_identifier,
                pg_major_version,
                lsn_at: now,
                goal_since: now,
                in_sync_set: false,
                goal_sync_seq: 0,
                reinit_seq: 0,
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

    fn record_system_identifier(
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

    fn report_state(
        &mut self,
        node_id: NodeId,
        state: NodeState,
        lsn: Lsn,
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
        // 0 is "unknown" (PostgreSQL down after a crash, or never started): the last
        // known timeline stays, so that a crashed old primary still tells which standbys
        // share its history. An LSN of 0 stays 0: a stale position could pass for a
        // final one.
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
        if lsn != 0 {
            if let Some(g) = self.group_mut(&formation, group_id) {
                if g.floor_unknown == Some(node_id) {
                    g.lsn_floor = g.lsn_floor.max(lsn);
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
                format!("node {name} reached {state} (lsn {})", fmt_lsn(lsn)),
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

    fn remove_node(&mut self, node_id: NodeId, now: Millis, why: &str) {
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

    /// Change a node's goal, keeping the structural invariants whatever state the
    /// proposal was computed on: at most one writable goal per group, and a writable
    /// goal only when every other node is fenced.
    pub(crate) fn set_goal(
        &mut self,
        node_id: NodeId,
        goal: NodeState,
        now: Millis,
        reason: &str,
    ) -> Result<(), CoreError> {
        let node = self
            .nodes
            .get(&node_id)
            .ok_or_else(|| CoreError::UnknownNode(node_id.to_string()))?;
        if goal == NodeState::Init {
            return Err(CoreError::NotAllowed("init is not a goal".into()));
        }
        let (formation, group_id, name) =
            (node.formation.clone(), node.group_id, node.name.clone());
        let was_writable = node.goal_state.is_writable();
        if node.goal_state == NodeState::Dropped {
            return Err(CoreError::BeingDropped { node: name });
        }
        if was_writable && !allowed_from_writable(goal) {
            return Err(CoreError::NotAllowed(format!(
                "node {name} is the primary: it must be demoted before it can be {goal}"
            )));
        }
        let group = self
            .group(&formation, group_id)
            .cloned()
            .unwrap_or_default();
        if goal.is_writable() && !was_writable {
            for other in self.group_nodes(&formation, group_id) {
                if other.id == node_id {
                    continue;
                }
                if other.goal_state.is_writable() {
                    return Err(CoreError::NotAllowed(format!(
                        "node {} is already the primary of group {group_id}",
                        other.name
                    )));
                }
                let fenced = fenced_goal(other.goal_state) || other.reported_state.is_stopped();
                let may_write =
                    other.reported_state.is_writable() || other.goal_state.is_demoting();
                if may_write && !fenced {
                    return Err(CoreError::NotAllowed(format!(
                        "node {} may still accept writes: it has neither confirmed its demotion nor let its lease expire",
                        other.name
                    )));
                }
            }
            // The old primary restarted in place may not know its position (0: it
            // crashed); its data directory held the floor when it was promoted and a
            // primary only appends.
            let restart_in_place = group
                .failover
                .as_ref()
                .is_some_and(|f| f.old_primary == node_id)
                && !node.position_known();
            if let Some(holder) = group.floor_unknown.filter(|h| *h != node_id) {
                let holder = self
                    .nodes
                    .get(&holder)
                    .map_or_else(|| holder.to_string(), |h| h.name.clone());
                return Err(CoreError::NotAllowed(format!(
                    "node {holder} restarted as primary without a known position: until it reports one, no other node is known to hold every acknowledged commit"
                )));
            }
            if node.reported_lsn < group.lsn_floor && !restart_in_place {
                return Err(CoreError::NotAllowed(format!(
                    "node {name} has lsn {} but acknowledged commits may reach {}",
                    fmt_lsn(node.reported_lsn),
                    fmt_lsn(group.lsn_floor)
                )));
            }
        }
        let next_seq = group.sync_history.last().map(|c| c.seq).unwrap_or(0);
        let (own_lsn, own_timeline, own_known) =
            (node.reported_lsn, node.timeline, node.position_known());
        // Every acknowledged commit of the ending epoch lies at or below: the most
        // advanced witness when enough of them reported, else the new primary's own
        // LSN (the old primary restarted in place: nothing else is known).
        let promoted_lsn = {
            let fo = group.failover.as_ref();
            let wit: Vec<&Node> =
                crate::candidate::witnesses(self, &formation, group_id, fo).collect();
            let ids: Vec<NodeId> = wit.iter().map(|n| n.id).collect();
            let target = wit.iter().map(|n| n.reported_lsn).max();
            let proven = match (crate::sync::requirement(&group.sync_history, &ids), target) {
                (crate::sync::Requirement::Met, Some(t)) => t,
                _ => 0,
            };
            // Its own WAL counts too: the old primary restarted in place holds commits it
            // acknowledged without a synchronous standby, above any witness.
            proven.max(node.reported_lsn)
        };
        // Fast-forward source: the most advanced witness (lowest id among equals).
        let ff_source = if goal == NodeState::FastForward {
            crate::candidate::fast_forward_source(self, &formation, group_id)
        } else {
            None
        };

        // Mutate.
        if let Some(n) = self.nodes.get_mut(&node_id) {
            if n.goal_state != goal {
                n.goal_since = now;
            }
            n.goal_state = goal;
            n.goal_sync_seq = next_seq;
            if goal.is_writable() && !was_writable {
                n.in_sync_set = false;
            }
        }
        if let Some(g) = self.group_mut(&formation, group_id) {
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
                if f.old_primary == node_id && fenced_goal(goal) && f.fenced_at.is_none() {
                    f.fenced_at = Some(now);
                }
                if goal == NodeState::FastForward {
                    f.fast_forward_source = ff_source;
                }
            }
        }
        self.node_event(
            now,
            node_id,
            format!("node {name} assigned {goal}: {reason}"),
        );
        self.tag_last(Some(goal), None);
        if goal.is_writable() && !was_writable {
            // A new primary: the synchronous set starts from the standbys that were in
            // sync with the old one, and the old epoch's commits all lie below its LSN.
            let old = self
                .group(&formation, group_id)
                .and_then(|g| g.failover.as_ref())
                .map(|f| f.old_primary);
            if let Some(old) = old {
                if let Some(o) = self.nodes.get_mut(&old) {
                    o.in_sync_set = false;
                }
            }
            if let Some(g) = self.group_mut(&formation, group_id) {
                g.failover = None;
                g.sync_history.clear();
                g.lsn_floor = g.lsn_floor.max(promoted_lsn);
                g.promoted_at_lsn = own_lsn;
                g.promoted_at_timeline = own_timeline;
                g.floor_unknown = (!own_known).then_some(node_id);
            }
        }
        self.refresh_sync(&formation, group_id, now);
        if goal.is_writable() {
            // The goal's sync seq must name the configuration current after the refresh.
            let seq = self
                .group(&formation, group_id)
                .and_then(|g| g.sync_history.last())
                .map(|c| c.seq)
                .unwrap_or(0);
            if let Some(n) = self.nodes.get_mut(&node_id) {
                n.goal_sync_seq = seq;
            }
        }
        Ok(())
    }

    /// How many standbys could count toward synchronous commit in a group, if `without`
    /// were out of it, whichever node is primary: the least, over every node that is or
    /// may become primary (the current primary and every candidate), of the quorum nodes
    /// not in maintenance besides it. Counting only the current primary accepted
    /// `replication-quorum false` on the primary of a 2-node group, and after a failover
    /// the new primary had no standby that counted (its commits blocked for good).
    /// `quorum_override` / `priority_override`: a setting about to change.
    fn quorum_capacity(
        &self,
        formation: &str,
        group_id: GroupId,
        without: Option<NodeId>,
        quorum_override: Option<(NodeId, bool)>,
    ) -> (usize, usize) {
        self.quorum_capacity_with(formation, group_id, without, quorum_override, None)
    }

    fn quorum_capacity_with(
        &self,
        formation: &str,
        group_id: GroupId,
        without: Option<NodeId>,
        quorum_override: Option<(NodeId, bool)>,
        priority_override: Option<(NodeId, u8)>,
    ) -> (usize, usize) {
        let mut live = 0;
        let mut members = Vec::new();
        for n in self.group_nodes(formation, group_id) {
            if n.is_dropping() {
                continue;
            }
            live += 1;
            if Some(n.id) == without {
                continue;
            }
            let quorum = match quorum_override {
                Some((id, q)) if id == n.id => q,
                _ => n.replication_quorum,
            };
            let priority = match priority_override {
                Some((id, p)) if id == n.id => p,
                _ => n.candidate_priority,
            };
            let in_maintenance = n.goal_state.is_maintenance();
            let counts = quorum && !in_maintenance;
            let may_be_primary = n.goal_state.is_writable() || (priority > 0 && !in_maintenance);
            members.push((n.id, counts, may_be_primary));
        }
        let counting = members.iter().filter(|m| m.1).count();
        let capacity = members
            .iter()
            .filter(|m| m.2)
            .map(|p| counting - usize::from(p.1))
            .min()
            .unwrap_or(counting.saturating_sub(1));
        (live, capacity)
    }

    /// Refuse a change that would leave a group with fewer quorum standbys than
    /// number_sync_standbys while the policy is to block writes.
    fn check_capacity(
        &self,
        formation: &str,
        group_id: GroupId,
        without: Option<NodeId>,
        quorum_override: Option<(NodeId, bool)>,
        leaves_group: bool,
        what: &str,
    ) -> Result<(), CoreError> {
        // Dropping down to one node leaves a single primary: explicit, and nothing to
        // synchronise with. Maintenance keeps the node in the group.
        let leaves = leaves_group;
        let settings = self.settings(formation);
        if settings.number_sync_standbys == 0
            || settings.on_quorum_loss == QuorumLossPolicy::Continue
        {
            return Ok(());
        }
        let (live, capacity) = self.quorum_capacity(formation, group_id, without, quorum_override);
        let remaining = if leaves { live.saturating_sub(1) } else { live };
        if remaining >= 2 && (capacity as u32) < settings.number_sync_standbys {
            return Err(CoreError::NotAllowed(format!(
                "{what} would leave {capacity} quorum standby(s) for number_sync_standbys = {} (counting a failover to any candidate): the primary could not keep synchronous replication. Lower number-sync-standbys or set on-quorum-loss continue first",
                settings.number_sync_standbys
            )));
        }
        Ok(())
    }

    fn set_node_setting(
        &mut self,
        formation: &str,
        node: &str,
        setting: &NodeSetting,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let id = self.lookup(formation, node)?;
        let group_id = self.nodes.get(&id).map(|n| n.group_id).unwrap_or(0);
        let text = match setting {
            NodeSetting::CandidatePriority(p) => {
                if *p > 100 {
                    return Err(CoreError::InvalidSetting(format!(
                        "candidate priority {p} is outside 0-100"
                    )));
                }
                // A node that may become primary takes its own vote out of the quorum.
                if *p > 0 {
                    let settings = self.settings(formation);
                    let (live, capacity) =
                        self.quorum_capacity_with(formation, group_id, None, None, Some((id, *p)));
                    if settings.number_sync_standbys > 0
                        && settings.on_quorum_loss != QuorumLossPolicy::Continue
                        && live >= 2
                        && (capacity as u32) < settings.number_sync_standbys
                    {
                        return Err(CoreError::NotAllowed(format!(
                            "candidate priority {p} for node {node} would let it become a primary with {capacity} quorum standby(s) for number_sync_standbys = {}: after a failover to it the primary could not keep synchronous replication. Set replication-quorum true on the other nodes, lower number-sync-standbys or set on-quorum-loss continue first",
                            settings.number_sync_standbys
                        )));
                    }
                }
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.candidate_priority = *p;
                }
                format!("node {node} candidate priority set to {p}")
            }
            NodeSetting::ReplicationQuorum(q) => {
                if !q {
                    self.check_capacity(
                        formation,
                        group_id,
                        None,
                        Some((id, false)),
                        false,
                        &format!("taking node {node} out of the replication quorum"),
                    )?;
                }
                if let Some(n) = self.nodes.get_mut(&id) {
                    n.replication_quorum = *q;
                }
                format!("node {node} replication quorum set to {q}")
            }
        };
        self.node_event(now, id, text.clone());
        self.refresh_sync(formation, group_id, now);
        Ok(Outcome::Done { description: text })
    }

    fn set_formation_setting(
        &mut self,
        formation: &str,
        setting: &FormationSetting,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let Some(f) = self.formations.get(formation) else {
            return Err(CoreError::UnknownFormation(formation.to_string()));
        };
        let mut s = f.settings.clone();
        let groups: Vec<GroupId> = {
            let mut g: Vec<GroupId> = self
                .nodes
                .values()
                .filter(|n| n.formation == formation)
                .map(|n| n.group_id)
                .collect();
            g.dedup();
            g
        };
        let text = match setting {
            FormationSetting::NumberSyncStandbys(n) => {
                if *n > MAX_SYNC_STANDBYS {
                    return Err(CoreError::InvalidSetting(format!(
                        "number_sync_standbys {n} is above the maximum {MAX_SYNC_STANDBYS}"
                    )));
                }
                for g in &groups {
                    let (live, capacity) = self.quorum_capacity(formation, *g, None, None);
                    if live >= 2 && (capacity as u32) < *n {
                        return Err(CoreError::NotAllowed(format!(
                            "number_sync_standbys {n} is more than the {capacity} quorum standby(s) of group {g}"
                        )));
                    }
                }
                s.number_sync_standbys = *n;
                format!("number_sync_standbys set to {n}")
            }
            FormationSetting::HeartbeatIntervalMs(v) => {
                if !(10..=60_000).contains(v) || v.saturating_mul(2) > s.lease_ms {
                    return Err(CoreError::InvalidSetting(format!(
                        "heartbeat interval {v} ms: use 10-60000 ms and at most half the lease ({} ms)",
                        s.lease_ms
                    )));
                }
                s.heartbeat_interval_ms = *v;
                format!("heartbeat interval set to {v} ms")
            }
            FormationSetting::LeaseMs(v) => {
                if *v > 3_600_000
                    || *v < s.heartbeat_interval_ms.saturating_mul(2)
                    || s.lease_margin_ms.saturating_mul(20) < *v
                {
                    return Err(CoreError::InvalidSetting(format!(
                        "lease {v} ms: use at least two heartbeat intervals ({} ms), at most 3600000 ms, and at most 20 times the lease margin ({} ms)",
                        s.heartbeat_interval_ms.saturating_mul(2),
                        s.lease_margin_ms
                    )));
                }
                s.lease_ms = *v;
                format!("lease set to {v} ms")
            }
            FormationSetting::LeaseMarginMs(v) => {
                if v.saturating_mul(20) < s.lease_ms || *v > s.lease_ms.max(1) {
                    return Err(CoreError::InvalidSetting(format!(
                        "lease margin {v} ms: use between a twentieth of the lease and the lease ({}-{} ms), to cover clock-rate drift and message delay",
                        s.lease_ms.div_ceil(20),
                        s.lease_ms
                    )));
                }
                s.lease_margin_ms = *v;
                format!("lease margin set to {v} ms")
            }
            FormationSetting::OnQuorumLoss(p) => {
                s.on_quorum_loss = *p;
                match p {
                    QuorumLossPolicy::Block => "on_quorum_loss set to block: a primary without quorum standby blocks commits".to_string(),
                    QuorumLossPolicy::Continue => "on_quorum_loss set to continue: a primary that loses its last quorum standby will acknowledge commits unsynchronized (they can be lost by a failover)".to_string(),
                }
            }
        };
        if let Some(f) = self.formations.get_mut(formation) {
            f.settings = s;
        }
        self.push_event(now, formation, 0, None, text.clone());
        for g in groups {
            self.refresh_sync(formation, g, now);
        }
        Ok(Outcome::Done { description: text })
    }

    fn switchover(
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

    fn set_maintenance(
        &mut self,
        formation: &str,
        node: &str,
        enable: bool,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let id = self.lookup(formation, node)?;
        let n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or_else(|| CoreError::UnknownNode(node.to_string()))?;
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

    fn drop_node(
        &mut self,
        formation: &str,
        node: &str,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let id = self.lookup(formation, node)?;
        let n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or_else(|| CoreError::UnknownNode(node.to_string()))?;
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
}

impl ClusterState {
    /// `perform reinit`: the standby's keeper rebuilds it from the primary. Refused on
    /// the primary (nothing to rebuild it from), on a node that is not a standby now, and
    /// when the node is needed for synchronous commit under `on_quorum_loss = block`
    /// (commits would wait for the whole rebuild).
    fn reinit_node(
        &mut self,
        formation: &str,
        node: &str,
        now: Millis,
    ) -> Result<Outcome, CoreError> {
        let id = self.lookup(formation, node)?;
        let n = self
            .nodes
            .get(&id)
            .cloned()
            .ok_or_else(|| CoreError::UnknownNode(node.to_string()))?;
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

/// Upper bound for number_sync_standbys.
pub const MAX_SYNC_STANDBYS: u32 = 16;
