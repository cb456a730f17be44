use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch, as passed in by the caller.
pub type Millis = u64;
pub type NodeId = u64;
pub type GroupId = u32;
/// A PostgreSQL WAL position (pg_lsn as u64).
pub type Lsn = u64;

pub const DEFAULT_FORMATION: &str = "default";

/// The states of a PostgreSQL node, after pg_auto_failover's state machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    Init,
    Single,
    WaitPrimary,
    Primary,
    JoinPrimary,
    ApplySettings,
    WaitStandby,
    Catchingup,
    Secondary,
    PreparePromotion,
    StopReplication,
    DemoteTimeout,
    Demoted,
    Draining,
    ReportLsn,
    FastForward,
    JoinSecondary,
    PrepareMaintenance,
    WaitMaintenance,
    Maintenance,
    Dropped,
}

impl NodeState {
    pub const ALL: [NodeState; 21] = [
        NodeState::Init,
        NodeState::Single,
        NodeState::WaitPrimary,
        NodeState::Primary,
        NodeState::JoinPrimary,
        NodeState::ApplySettings,
        NodeState::WaitStandby,
        NodeState::Catchingup,
        NodeState::Secondary,
        NodeState::PreparePromotion,
        NodeState::StopReplication,
        NodeState::DemoteTimeout,
        NodeState::Demoted,
        NodeState::Draining,
        NodeState::ReportLsn,
        NodeState::FastForward,
        NodeState::JoinSecondary,
        NodeState::PrepareMaintenance,
        NodeState::WaitMaintenance,
        NodeState::Maintenance,
        NodeState::Dropped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Init => "init",
            NodeState::Single => "single",
            NodeState::WaitPrimary => "wait_primary",
            NodeState::Primary => "primary",
            NodeState::JoinPrimary => "join_primary",
            NodeState::ApplySettings => "apply_settings",
            NodeState::WaitStandby => "wait_standby",
            NodeState::Catchingup => "catchingup",
            NodeState::Secondary => "secondary",
            NodeState::PreparePromotion => "prepare_promotion",
            NodeState::StopReplication => "stop_replication",
            NodeState::DemoteTimeout => "demote_timeout",
            NodeState::Demoted => "demoted",
            NodeState::Draining => "draining",
            NodeState::ReportLsn => "report_lsn",
            NodeState::FastForward => "fast_forward",
            NodeState::JoinSecondary => "join_secondary",
            NodeState::PrepareMaintenance => "prepare_maintenance",
            NodeState::WaitMaintenance => "wait_maintenance",
            NodeState::Maintenance => "maintenance",
            NodeState::Dropped => "dropped",
        }
    }

    pub fn parse(s: &str) -> Option<NodeState> {
        NodeState::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl std::fmt::Display for NodeState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a primary does when it has lost its last quorum standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuorumLossPolicy {
    /// Keep synchronous_standby_names: commits wait (keeps invariant 2). The default.
    Block,
    /// Clear synchronous_standby_names: commits go on unsynchronised (explicit choice).
    Continue,
}

/// Per-formation settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormationSettings {
    pub number_sync_standbys: u32,
    pub heartbeat_interval_ms: u64,
    /// A primary's lease: the keeper stops taking writes when it has not renewed it
    /// for this long.
    pub lease_ms: u64,
    /// Extra wait on the monitor side before a lease counts as surely expired
    /// (covers clock-rate drift and message delay).
    pub lease_margin_ms: u64,
    pub on_quorum_loss: QuorumLossPolicy,
}

impl Default for FormationSettings {
    fn default() -> Self {
        FormationSettings {
            number_sync_standbys: 1,
            heartbeat_interval_ms: 200,
            lease_ms: 1500,
            lease_margin_ms: 300,
            on_quorum_loss: QuorumLossPolicy::Block,
        }
    }
}

/// One PostgreSQL node and its keeper.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub id: NodeId,
    pub formation: String,
    pub group_id: GroupId,
    pub name: String,
    pub host: String,
    pub port: u16,
    /// 0 = never promote; 1-100.
    pub candidate_priority: u8,
    /// Counts toward synchronous commit.
    pub replication_quorum: bool,
    pub reported_state: NodeState,
    pub goal_state: NodeState,
    pub reported_lsn: Lsn,
    pub timeline: u32,
    pub pg_running: bool,
    pub system_identifier: u64,
    pub pg_major_version: u32,
}

/// An entry of the bounded event history: what changed and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub id: u64,
    pub at: Millis,
    pub formation: String,
    pub group_id: GroupId,
    pub node_id: Option<NodeId>,
    pub node_name: String,
    pub description: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Formation {
    pub name: String,
    pub settings: FormationSettings,
}

/// The whole replicated state. Plain data: cloning and serialising it is how the
/// monitor takes snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterState {
    pub formations: BTreeMap<String, Formation>,
    pub nodes: BTreeMap<NodeId, Node>,
    pub next_node_id: NodeId,
    /// Bounded: the oldest entries are dropped.
    pub events: std::collections::VecDeque<Event>,
    pub next_event_id: u64,
}
