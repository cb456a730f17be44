use serde::{Deserialize, Serialize};

use crate::error::CoreError;
use crate::model::{
    ClusterState, Formation, FormationSettings, GroupId, Lsn, Millis, NodeId, NodeState,
    QuorumLossPolicy,
};

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
        host: String,
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
}

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

fn valid_formation_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl ClusterState {
    /// Apply one command. Deterministic; on error the state is unchanged.
    pub fn apply(&mut self, cmd: &Command, _now: Millis) -> Result<Outcome, CoreError> {
        match cmd {
            Command::CreateFormation {
                name,
                number_sync_standbys,
            } => {
                if !valid_formation_name(name) {
                    return Err(CoreError::InvalidFormationName(name.clone()));
                }
                if self.formations.contains_key(name) {
                    return Err(CoreError::FormationExists(name.clone()));
                }
                let mut settings = FormationSettings::default();
                if let Some(n) = number_sync_standbys {
                    settings.number_sync_standbys = *n;
                }
                self.formations.insert(
                    name.clone(),
                    Formation {
                        name: name.clone(),
                        settings,
                    },
                );
                Ok(Outcome::Done {
                    description: format!("formation {name} created"),
                })
            }
            Command::DropFormation { name } => {
                if self.nodes.values().any(|n| &n.formation == name) {
                    return Err(CoreError::FormationNotEmpty(name.clone()));
                }
                if self.formations.remove(name).is_none() {
                    return Err(CoreError::UnknownFormation(name.clone()));
                }
                Ok(Outcome::Done {
                    description: format!("formation {name} dropped"),
                })
            }
            other => Err(CoreError::NotAllowed(format!(
                "{other:?} is not implemented yet"
            ))),
        }
    }
}
