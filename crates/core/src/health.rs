use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Lsn, Millis, NodeId, NodeState};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicationPeer {
    pub application_name: String,
    pub state: String,
    pub sync_state: String,
    pub write_lsn: Lsn,
    pub flush_lsn: Lsn,
    pub replay_lsn: Lsn,
}

/// One keeper heartbeat, as the monitor leader received it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node_id: NodeId,
    pub current_state: NodeState,
    pub pg_running: bool,
    pub pg_in_recovery: bool,
    pub current_lsn: Lsn,
    pub received_lsn: Lsn,
    pub replayed_lsn: Lsn,
    pub timeline: u32,
    pub system_identifier: u64,
    pub replication: Vec<ReplicationPeer>,
    pub sequence: u64,
}

/// The leader's in-memory view of node health. Never replicated: a new leader starts
/// with an empty table, and "not seen yet" means unknown, never down.
#[derive(Debug, Clone)]
pub struct HealthTable {
    pub leader_since: Millis,
    pub last_seen: BTreeMap<NodeId, (Millis, NodeReport)>,
}

impl HealthTable {
    pub fn new(leader_since: Millis) -> Self {
        HealthTable {
            leader_since,
            last_seen: BTreeMap::new(),
        }
    }

    pub fn observe(&mut self, report: NodeReport, now: Millis) {
        self.last_seen.insert(report.node_id, (now, report));
    }
}

/// Health as the current leader sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Healthy,
    Unhealthy,
    /// Not heard from since this leader took office.
    Unknown,
}

impl HealthTable {
    /// Milliseconds since the last heartbeat of `node`, if this leader has seen one.
    pub fn last_seen_ago(&self, node: NodeId, now: Millis) -> Option<Millis> {
        self.last_seen
            .get(&node)
            .map(|(at, _)| now.saturating_sub(*at))
    }

    pub fn health(&self, node: NodeId, now: Millis, unhealthy_after_ms: Millis) -> Health {
        match self.last_seen_ago(node, now) {
            None => Health::Unknown,
            Some(ago) if ago > unhealthy_after_ms => Health::Unhealthy,
            Some(_) => Health::Healthy,
        }
    }
}
