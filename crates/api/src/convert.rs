//! Validated conversions between wire messages and core types. Every request that
//! reaches the state machine went through one of these; a bad one is refused here
//! with INVALID_ARGUMENT and changes nothing.

use pgquorum_core::{
    Assignment, Command, Event, Formation, FormationSetting, Health, Node, NodeReport, NodeSetting,
    NodeState, PeerNode, QuorumLossPolicy, ReplicationPeer, ReportStamp, DEFAULT_FORMATION,
};
use thiserror::Error;

use crate::pb::monitor as pb;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConvertError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        tonic::Status::invalid_argument(e.to_string())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConvertError {
    ConvertError::Invalid {
        field,
        reason: reason.into(),
    }
}

fn formation_or_default(f: String) -> String {
    if f.is_empty() {
        DEFAULT_FORMATION.to_owned()
    } else {
        f
    }
}

fn non_empty(field: &'static str, v: String) -> Result<String, ConvertError> {
    if v.trim().is_empty() {
        Err(invalid(field, "must not be empty"))
    } else {
        Ok(v)
    }
}

fn port(field: &'static str, p: u32) -> Result<u16, ConvertError> {
    match u16::try_from(p) {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(field, format!("{p} is not a TCP port (1-65535)"))),
    }
}

fn priority(p: u32) -> Result<u8, ConvertError> {
    match u8::try_from(p) {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(invalid(
            "candidate_priority",
            format!("{p} is out of range 0-100"),
        )),
    }
}

fn node_state(field: &'static str, s: &str) -> Result<NodeState, ConvertError> {
    NodeState::parse(s).ok_or_else(|| invalid(field, format!("{s:?} is not a node state")))
}

fn parse_bool(field: &'static str, v: &str) -> Result<bool, ConvertError> {
    match v {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(invalid(field, format!("{v:?} is not true or false"))),
    }
}

fn parse_u64(field: &'static str, v: &str) -> Result<u64, ConvertError> {
    v.parse()
        .map_err(|_| invalid(field, format!("{v:?} is not a non-negative integer")))
}

impl TryFrom<pb::CreateFormationRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::CreateFormationRequest) -> Result<Self, ConvertError> {
        Ok(Command::CreateFormation {
            name: non_empty("name", r.name)?,
            number_sync_standbys: r.number_sync_standbys.filter(|n| *n > 0),
        })
    }
}

impl TryFrom<pb::DropFormationRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::DropFormationRequest) -> Result<Self, ConvertError> {
        Ok(Command::DropFormation {
            name: non_empty("name", r.name)?,
        })
    }
}

impl TryFrom<pb::RegisterNodeRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::RegisterNodeRequest) -> Result<Self, ConvertError> {
        let current_state = if r.current_state.is_empty() {
            NodeState::Init
        } else {
            node_state("current_state", &r.current_state)?
        };
        Ok(Command::RegisterNode {
            formation: formation_or_default(r.formation),
            name: non_empty("name", r.name)?,
            host: non_empty("host", r.host)?,
            port: port("port", r.port)?,
            candidate_priority: priority(r.candidate_priority)?,
            replication_quorum: r.replication_quorum,
            system_identifier: r.system_identifier,
            pg_major_version: r.pg_major_version,
            current_state,
        })
    }
}

impl TryFrom<pb::SetNodeSettingRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::SetNodeSettingRequest) -> Result<Self, ConvertError> {
        let setting = match r.name.as_str() {
            "candidate-priority" => {
                NodeSetting::CandidatePriority(priority(parse_u64("value", &r.value)? as u32)?)
            }
            "replication-quorum" => NodeSetting::ReplicationQuorum(parse_bool("value", &r.value)?),
            other => {
                return Err(invalid(
                    "name",
                    format!(
                    "unknown node setting {other:?}; use candidate-priority or replication-quorum"
                ),
                ))
            }
        };
        Ok(Command::SetNodeSetting {
            formation: formation_or_default(r.formation),
            node: non_empty("node", r.node)?,
            setting,
        })
    }
}

impl TryFrom<pb::SetFormationSettingRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::SetFormationSettingRequest) -> Result<Self, ConvertError> {
        let v = r.value.as_str();
        let setting = match r.name.as_str() {
            "number-sync-standbys" => FormationSetting::NumberSyncStandbys(
                u32::try_from(parse_u64("value", v)?).map_err(|_| invalid("value", "too large"))?,
            ),
            "heartbeat-interval-ms" => FormationSetting::HeartbeatIntervalMs(parse_u64("value", v)?),
            "lease-ms" => FormationSetting::LeaseMs(parse_u64("value", v)?),
            "lease-margin-ms" => FormationSetting::LeaseMarginMs(parse_u64("value", v)?),
            "on-quorum-loss" => FormationSetting::OnQuorumLoss(match v {
                "block" => QuorumLossPolicy::Block,
                "continue" => QuorumLossPolicy::Continue,
                _ => return Err(invalid("value", format!("{v:?}: use block or continue"))),
            }),
            other => {
                return Err(invalid(
                    "name",
                    format!("unknown formation setting {other:?}; use number-sync-standbys, heartbeat-interval-ms, lease-ms, lease-margin-ms or on-quorum-loss"),
                ))
            }
        };
        Ok(Command::SetFormationSetting {
            formation: formation_or_default(r.formation),
            setting,
        })
    }
}

impl TryFrom<pb::PerformSwitchoverRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::PerformSwitchoverRequest) -> Result<Self, ConvertError> {
        Ok(Command::PerformSwitchover {
            formation: formation_or_default(r.formation),
            group_id: r.group_id,
            candidate: Some(r.candidate).filter(|c| !c.is_empty()),
        })
    }
}

impl TryFrom<pb::PerformFailoverRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::PerformFailoverRequest) -> Result<Self, ConvertError> {
        Ok(Command::PerformFailover {
            formation: formation_or_default(r.formation),
            group_id: r.group_id,
        })
    }
}

impl TryFrom<pb::SetMaintenanceRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::SetMaintenanceRequest) -> Result<Self, ConvertError> {
        Ok(Command::SetMaintenance {
            formation: formation_or_default(r.formation),
            node: non_empty("node", r.node)?,
            enable: r.enable,
        })
    }
}

impl TryFrom<pb::DropNodeRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::DropNodeRequest) -> Result<Self, ConvertError> {
        Ok(Command::DropNode {
            formation: formation_or_default(r.formation),
            node: non_empty("node", r.node)?,
        })
    }
}

/// A validated heartbeat: who sent it and what it reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeActive {
    pub formation: String,
    pub name: String,
    pub report: NodeReport,
    /// Which keeper process sent it, and when by that process's clock.
    pub stamp: ReportStamp,
}

impl TryFrom<pb::NodeActiveRequest> for NodeActive {
    type Error = ConvertError;
    fn try_from(r: pb::NodeActiveRequest) -> Result<Self, ConvertError> {
        if r.node_id == 0 {
            return Err(invalid("node_id", "must be set (register the node first)"));
        }
        Ok(NodeActive {
            formation: formation_or_default(r.formation),
            name: r.name,
            report: NodeReport {
                node_id: r.node_id,
                current_state: node_state("current_state", &r.current_state)?,
                pg_running: r.pg_running,
                pg_in_recovery: r.pg_in_recovery,
                current_lsn: r.current_lsn,
                received_lsn: r.received_lsn,
                replayed_lsn: r.replayed_lsn,
                timeline: r.timeline,
                system_identifier: r.system_identifier,
                replication: r
                    .replication
                    .into_iter()
                    .map(|p| ReplicationPeer {
                        application_name: p.application_name,
                        state: p.state,
                        sync_state: p.sync_state,
                        write_lsn: p.write_lsn,
                        flush_lsn: p.flush_lsn,
                        replay_lsn: p.replay_lsn,
                    })
                    .collect(),
                sequence: r.sequence,
            },
            stamp: ReportStamp {
                instance: r.keeper_instance,
                sequence: r.sequence,
                sent_ms: r.sent_ms,
            },
        })
    }
}

impl From<NodeActive> for pb::NodeActiveRequest {
    fn from(a: NodeActive) -> Self {
        let r = a.report;
        pb::NodeActiveRequest {
            node_id: r.node_id,
            formation: a.formation,
            name: a.name,
            current_state: r.current_state.as_str().to_owned(),
            pg_running: r.pg_running,
            pg_in_recovery: r.pg_in_recovery,
            current_lsn: r.current_lsn,
            received_lsn: r.received_lsn,
            replayed_lsn: r.replayed_lsn,
            timeline: r.timeline,
            system_identifier: r.system_identifier,
            replication: r
                .replication
                .into_iter()
                .map(|p| pb::ReplicationPeer {
                    application_name: p.application_name,
                    state: p.state,
                    sync_state: p.sync_state,
                    write_lsn: p.write_lsn,
                    flush_lsn: p.flush_lsn,
                    replay_lsn: p.replay_lsn,
                })
                .collect(),
            sequence: r.sequence,
            keeper_instance: a.stamp.instance,
            sent_ms: a.stamp.sent_ms,
        }
    }
}

impl From<PeerNode> for pb::PeerNode {
    fn from(p: PeerNode) -> Self {
        pb::PeerNode {
            node_id: p.node_id,
            name: p.name,
            host: p.host,
            port: u32::from(p.port),
        }
    }
}

impl TryFrom<pb::PeerNode> for PeerNode {
    type Error = ConvertError;
    fn try_from(p: pb::PeerNode) -> Result<Self, ConvertError> {
        Ok(PeerNode {
            node_id: p.node_id,
            name: p.name,
            host: p.host,
            port: port("peer.port", p.port)?,
        })
    }
}

impl From<Assignment> for pb::Assignment {
    fn from(a: Assignment) -> Self {
        pb::Assignment {
            goal_state: a.goal_state.as_str().to_owned(),
            primary: a.primary.map(Into::into),
            synchronous_standby_names: a.synchronous_standby_names,
            peers: a.peers.into_iter().map(Into::into).collect(),
            lease_ms: a.lease_ms,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            on_quorum_loss: a.on_quorum_loss,
        }
    }
}

impl TryFrom<pb::Assignment> for Assignment {
    type Error = ConvertError;
    fn try_from(a: pb::Assignment) -> Result<Self, ConvertError> {
        Ok(Assignment {
            goal_state: node_state("goal_state", &a.goal_state)?,
            primary: a.primary.map(PeerNode::try_from).transpose()?,
            synchronous_standby_names: a.synchronous_standby_names,
            peers: a
                .peers
                .into_iter()
                .map(PeerNode::try_from)
                .collect::<Result<_, _>>()?,
            lease_ms: a.lease_ms,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            on_quorum_loss: a.on_quorum_loss,
        })
    }
}

/// A node as an operator sees it, with the answering leader's view of its health.
pub fn node_status(n: &Node, health: Health, last_heartbeat_ms_ago: Option<u64>) -> pb::NodeStatus {
    pb::NodeStatus {
        node_id: n.id,
        formation: n.formation.clone(),
        group_id: n.group_id,
        name: n.name.clone(),
        host: n.host.clone(),
        port: u32::from(n.port),
        reported_state: n.reported_state.as_str().to_owned(),
        goal_state: n.goal_state.as_str().to_owned(),
        reported_lsn: n.reported_lsn,
        timeline: n.timeline,
        health: match health {
            Health::Healthy => "healthy",
            Health::Unhealthy => "unhealthy",
            Health::Unknown => "unknown",
        }
        .to_owned(),
        candidate_priority: u32::from(n.candidate_priority),
        replication_quorum: n.replication_quorum,
        last_heartbeat_ms_ago,
        pg_running: n.pg_running,
    }
}

impl From<&Formation> for pb::FormationStatus {
    fn from(f: &Formation) -> Self {
        pb::FormationStatus {
            name: f.name.clone(),
            number_sync_standbys: f.settings.number_sync_standbys,
        }
    }
}

impl From<&Event> for pb::Event {
    fn from(e: &Event) -> Self {
        pb::Event {
            id: e.id,
            at_unix_ms: e.at,
            formation: e.formation.clone(),
            group_id: e.group_id,
            node_id: e.node_id,
            node_name: e.node_name.clone(),
            description: e.description.clone(),
            by: e.by.clone(),
        }
    }
}

/// Every setting of a formation and of its nodes, as `SetFormationSetting` /
/// `SetNodeSetting` accept them back.
pub fn settings(f: &Formation, nodes: &[&Node]) -> Vec<pb::Setting> {
    let s = &f.settings;
    let fs = |name: &str, value: String| pb::Setting {
        scope: "formation".into(),
        target: f.name.clone(),
        name: name.into(),
        value,
    };
    let mut out = vec![
        fs("number-sync-standbys", s.number_sync_standbys.to_string()),
        fs("heartbeat-interval-ms", s.heartbeat_interval_ms.to_string()),
        fs("lease-ms", s.lease_ms.to_string()),
        fs("lease-margin-ms", s.lease_margin_ms.to_string()),
        fs(
            "on-quorum-loss",
            match s.on_quorum_loss {
                QuorumLossPolicy::Block => "block",
                QuorumLossPolicy::Continue => "continue",
            }
            .into(),
        ),
    ];
    for n in nodes {
        let ns = |name: &str, value: String| pb::Setting {
            scope: "node".into(),
            target: n.name.clone(),
            name: name.into(),
            value,
        };
        out.push(ns("candidate-priority", n.candidate_priority.to_string()));
        out.push(ns("replication-quorum", n.replication_quorum.to_string()));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use pgquorum_core::FormationSettings;

    #[test]
    fn create_formation_validates_and_defaults() {
        let c = Command::try_from(pb::CreateFormationRequest {
            name: "sales".into(),
            number_sync_standbys: Some(0),
        })
        .unwrap();
        assert_eq!(
            c,
            Command::CreateFormation {
                name: "sales".into(),
                number_sync_standbys: None
            }
        );
        assert!(Command::try_from(pb::CreateFormationRequest {
            name: "".into(),
            number_sync_standbys: None
        })
        .is_err());
    }

    #[test]
    fn register_node_refuses_bad_port_priority_and_state() {
        let good = pb::RegisterNodeRequest {
            formation: "".into(),
            name: "a".into(),
            host: "127.0.0.1".into(),
            port: 5432,
            candidate_priority: 50,
            replication_quorum: true,
            system_identifier: 7,
            pg_major_version: 15,
            current_state: "".into(),
        };
        match Command::try_from(good.clone()).unwrap() {
            Command::RegisterNode {
                formation,
                port,
                current_state,
                ..
            } => {
                assert_eq!(formation, DEFAULT_FORMATION);
                assert_eq!(port, 5432);
                assert_eq!(current_state, NodeState::Init);
            }
            other => panic!("{other:?}"),
        }
        let mut bad = good.clone();
        bad.port = 70000;
        assert!(Command::try_from(bad)
            .unwrap_err()
            .to_string()
            .contains("port"));
        let mut bad = good.clone();
        bad.candidate_priority = 101;
        assert!(Command::try_from(bad).is_err());
        let mut bad = good;
        bad.current_state = "flying".into();
        assert!(Command::try_from(bad).is_err());
    }

    #[test]
    fn settings_round_trip_through_their_setters() {
        let f = Formation {
            name: "default".into(),
            settings: FormationSettings::default(),
            groups: Default::default(),
        };
        for s in settings(&f, &[]) {
            let c = Command::try_from(pb::SetFormationSettingRequest {
                formation: s.target.clone(),
                name: s.name.clone(),
                value: s.value.clone(),
            })
            .unwrap_or_else(|e| panic!("{s:?}: {e}"));
            assert!(matches!(c, Command::SetFormationSetting { .. }));
        }
        assert!(Command::try_from(pb::SetFormationSettingRequest {
            formation: "".into(),
            name: "lease-ms".into(),
            value: "-1".into()
        })
        .is_err());
        assert!(Command::try_from(pb::SetNodeSettingRequest {
            formation: "".into(),
            node: "a".into(),
            name: "colour".into(),
            value: "red".into()
        })
        .is_err());
    }

    #[test]
    fn node_active_round_trips() {
        let a = NodeActive {
            formation: "default".into(),
            name: "a".into(),
            report: NodeReport {
                node_id: 3,
                current_state: NodeState::Secondary,
                pg_running: true,
                pg_in_recovery: true,
                current_lsn: 100,
                received_lsn: 90,
                replayed_lsn: 80,
                timeline: 2,
                system_identifier: 42,
                replication: vec![ReplicationPeer {
                    application_name: "b".into(),
                    state: "streaming".into(),
                    sync_state: "sync".into(),
                    write_lsn: 1,
                    flush_lsn: 2,
                    replay_lsn: 3,
                }],
                sequence: 9,
            },
            stamp: ReportStamp {
                instance: 77,
                sequence: 9,
                sent_ms: 12_345,
            },
        };
        let wire = pb::NodeActiveRequest::from(a.clone());
        assert_eq!(NodeActive::try_from(wire).unwrap(), a);
        let mut bad = pb::NodeActiveRequest::from(a);
        bad.node_id = 0;
        assert!(NodeActive::try_from(bad).is_err());
    }

    #[test]
    fn assignment_round_trips() {
        let p = PeerNode {
            node_id: 1,
            name: "a".into(),
            host: "h".into(),
            port: 5432,
        };
        let a = Assignment {
            goal_state: NodeState::Primary,
            primary: Some(p.clone()),
            synchronous_standby_names: "ANY 1 (b)".into(),
            peers: vec![p],
            lease_ms: 1500,
            heartbeat_interval_ms: 200,
            on_quorum_loss: "block".into(),
        };
        assert_eq!(
            Assignment::try_from(pb::Assignment::from(a.clone())).unwrap(),
            a
        );
    }
}
