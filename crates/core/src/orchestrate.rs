use serde::{Deserialize, Serialize};

use crate::command::Command;
use crate::error::CoreError;
use crate::health::{HealthTable, NodeReport};
use crate::model::{ClusterState, Millis, NodeId, NodeState};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerNode {
    pub node_id: NodeId,
    pub name: String,
    pub host: String,
    pub port: u16,
}

/// What a keeper is told in answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub goal_state: NodeState,
    pub primary: Option<PeerNode>,
    pub synchronous_standby_names: String,
    pub peers: Vec<PeerNode>,
    pub lease_ms: u64,
    pub heartbeat_interval_ms: u64,
    pub on_quorum_loss: String,
}

/// Commands a heartbeat makes necessary (a reported state change), to be proposed by
/// the leader. Empty in steady state: heartbeats alone never cost a Raft write.
pub fn on_heartbeat(
    _state: &ClusterState,
    _health: &HealthTable,
    _report: &NodeReport,
    _now: Millis,
) -> Vec<Command> {
    Vec::new()
}

/// The leader's periodic decision: goal assignments (failover, promotion, ...).
pub fn orchestrate(_state: &ClusterState, _health: &HealthTable, _now: Millis) -> Vec<Command> {
    Vec::new()
}

/// What `node` must do now.
pub fn assignment(
    _state: &ClusterState,
    node: NodeId,
    _now: Millis,
) -> Result<Assignment, CoreError> {
    Err(CoreError::UnknownNode(node.to_string()))
}
