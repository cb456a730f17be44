//! Validated conversions between wire messages and core types. Every request that
//! reaches the state machine went through one of these; a bad one is refused here
//! with INVALID_ARGUMENT and changes nothing.

use pgquorum_core::{
    check_formation_name, check_node_name, quote_prefix, Assignment, Command, Event, Formation,
    FormationSetting, Health, HostName, Lsn, Node, NodeReport, NodeSetting, NodeState, PeerNode,
    QuorumLossPolicy, ReplicationPeer, ReportStamp, DEFAULT_FORMATION,
};
use thiserror::Error;

use crate::pb::monitor as pb;

/// The largest request the Monitor API decodes. Every valid request is a few KiB at
/// most (the largest, a heartbeat with [`MAX_REPLICATION_PEERS`] peers, stays under
/// 20 KiB); anything bigger is refused before it is even decoded. The Raft transport
/// has its own, larger limit for log entries and snapshot chunks.
pub const MAX_REQUEST_BYTES: usize = 128 * 1024;
/// pg_stat_replication rows a heartbeat may carry (max_wal_senders is 16 on our nodes).
pub const MAX_REPLICATION_PEERS: usize = 64;
/// PostgreSQL truncates names (application_name) to 63 bytes.
const MAX_PG_NAME: usize = 63;
/// Short words: pg_stat_replication states, setting names and values.
const MAX_WORD: usize = 64;
/// `ANY n ("a", "b", ...)` for every node of a group, with room to spare.
const MAX_SYNC_NAMES: usize = 8 * 1024;
/// The highest PostgreSQL major version a registration may report.
const MAX_PG_MAJOR: u32 = 999;
/// Leases and heartbeat intervals a keeper accepts (the core refuses settings outside).
const MAX_LEASE_MS: u64 = 3_600_000;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConvertError {
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

impl From<ConvertError> for tonic::Status {
    fn from(e: ConvertError) -> Self {
        crate::status::refused(pgquorum_core::ErrorClass::Invalid, e.to_string())
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConvertError {
    ConvertError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// "" means the default formation; anything else must be a valid formation name.
fn formation_or_default(f: String) -> Result<String, ConvertError> {
    if f.is_empty() {
        Ok(DEFAULT_FORMATION.to_owned())
    } else {
        check_formation_name(&f).map_err(|e| invalid("formation", e.0))?;
        Ok(f)
    }
}

/// A formation filter of a read ("" = every formation, or the default one): refused
/// before it is looked up, so that an unknown name is NOT_FOUND with a short echo and
/// an ill-formed one INVALID_ARGUMENT.
pub fn check_formation_filter(f: &str) -> Result<(), ConvertError> {
    if f.is_empty() {
        return Ok(());
    }
    check_formation_name(f).map_err(|e| invalid("formation", e.0))
}

fn node_name(field: &'static str, v: String) -> Result<String, ConvertError> {
    check_node_name(&v).map_err(|e| invalid(field, e.0))?;
    Ok(v)
}

fn host(field: &'static str, v: &str) -> Result<HostName, ConvertError> {
    HostName::parse(v).map_err(|e| invalid(field, e.0))
}

fn bounded(field: &'static str, v: String, max: usize) -> Result<String, ConvertError> {
    if v.len() > max {
        Err(invalid(
            field,
            format!("{} is longer than {max} bytes", quote_prefix(&v)),
        ))
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

fn priority(p: u64) -> Result<u8, ConvertError> {
    match u8::try_from(p) {
        Ok(p) if p <= 100 => Ok(p),
        _ => Err(invalid(
            "candidate_priority",
            format!("{p} is out of range 0-100"),
        )),
    }
}

fn node_state(field: &'static str, s: &str) -> Result<NodeState, ConvertError> {
    NodeState::parse(s)
        .ok_or_else(|| invalid(field, format!("{} is not a node state", quote_prefix(s))))
}

fn parse_bool(field: &'static str, v: &str) -> Result<bool, ConvertError> {
    match v {
        "true" | "on" | "yes" | "1" => Ok(true),
        "false" | "off" | "no" | "0" => Ok(false),
        _ => Err(invalid(
            field,
            format!("{} is not true or false", quote_prefix(v)),
        )),
    }
}

fn parse_u64(field: &'static str, v: &str) -> Result<u64, ConvertError> {
    v.parse().map_err(|_| {
        invalid(
            field,
            format!("{} is not an integer in 0-{}", quote_prefix(v), u64::MAX),
        )
    })
}

/// A member's address for AddMember: HOST:PORT with a valid host and port.
pub fn member_address(v: &str) -> Result<String, ConvertError> {
    let bad = || invalid("address", format!("{} is not HOST:PORT", quote_prefix(v)));
    let (h, p) = v.rsplit_once(':').ok_or_else(bad)?;
    let h = h
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(h);
    host("address", h)?;
    port("address", p.parse::<u32>().map_err(|_| bad())?)?;
    Ok(v.to_owned())
}

/// `synchronous_standby_names` as the monitor renders it: "" or `ANY n ("a", "b")`
/// with valid node names. Anything else is refused before it reaches postgresql.conf.
fn sync_names(v: String) -> Result<String, ConvertError> {
    let field = "synchronous_standby_names";
    if v.is_empty() {
        return Ok(v);
    }
    let v = bounded(field, v, MAX_SYNC_NAMES)?;
    let bad = || {
        invalid(
            field,
            format!("{} is not ANY n (\"name\", ...)", quote_prefix(&v)),
        )
    };
    let rest = v.strip_prefix("ANY ").ok_or_else(bad)?;
    let (n, list) = rest.split_once(' ').ok_or_else(bad)?;
    n.parse::<u32>().map_err(|_| bad())?;
    let list = list
        .strip_prefix('(')
        .and_then(|l| l.strip_suffix(')'))
        .ok_or_else(bad)?;
    for name in list.split(", ") {
        let name = name
            .strip_prefix('"')
            .and_then(|n| n.strip_suffix('"'))
            .unwrap_or(name);
        check_node_name(name).map_err(|e| invalid(field, e.0))?;
    }
    Ok(v)
}

impl TryFrom<pb::CreateFormationRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::CreateFormationRequest) -> Result<Self, ConvertError> {
        check_formation_name(&r.name).map_err(|e| invalid("name", e.0))?;
        Ok(Command::CreateFormation {
            name: r.name,
            number_sync_standbys: r.number_sync_standbys.filter(|n| *n > 0),
        })
    }
}

impl TryFrom<pb::DropFormationRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::DropFormationRequest) -> Result<Self, ConvertError> {
        check_formation_name(&r.name).map_err(|e| invalid("name", e.0))?;
        Ok(Command::DropFormation { name: r.name })
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
        if r.pg_major_version > MAX_PG_MAJOR {
            return Err(invalid(
                "pg_major_version",
                format!("{} is not a PostgreSQL major version", r.pg_major_version),
            ));
        }
        Ok(Command::RegisterNode {
            formation: formation_or_default(r.formation)?,
            name: node_name("name", r.name)?,
            host: host("host", &r.host)?,
            port: port("port", r.port)?,
            candidate_priority: priority(u64::from(r.candidate_priority))?,
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
                NodeSetting::CandidatePriority(priority(parse_u64("value", &r.value)?)?)
            }
            "replication-quorum" => NodeSetting::ReplicationQuorum(parse_bool("value", &r.value)?),
            other => {
                return Err(invalid(
                    "name",
                    format!(
                        "unknown node setting {}; use candidate-priority or replication-quorum",
                        quote_prefix(other)
                    ),
                ))
            }
        };
        Ok(Command::SetNodeSetting {
            formation: formation_or_default(r.formation)?,
            node: node_name("node", r.node)?,
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
                u32::try_from(parse_u64("value", v)?)
                    .map_err(|_| invalid("value", format!("{v} is out of range 0-{}", u32::MAX)))?,
            ),
            "heartbeat-interval-ms" => FormationSetting::HeartbeatIntervalMs(parse_u64("value", v)?),
            "lease-ms" => FormationSetting::LeaseMs(parse_u64("value", v)?),
            "lease-margin-ms" => FormationSetting::LeaseMarginMs(parse_u64("value", v)?),
            "on-quorum-loss" => FormationSetting::OnQuorumLoss(match v {
                "block" => QuorumLossPolicy::Block,
                "continue" => QuorumLossPolicy::Continue,
                _ => {
                    return Err(invalid(
                        "value",
                        format!("{}: use block or continue", quote_prefix(v)),
                    ))
                }
            }),
            other => {
                return Err(invalid(
                    "name",
                    format!("unknown formation setting {}; use number-sync-standbys, heartbeat-interval-ms, lease-ms, lease-margin-ms or on-quorum-loss", quote_prefix(other)),
                ))
            }
        };
        Ok(Command::SetFormationSetting {
            formation: formation_or_default(r.formation)?,
            setting,
        })
    }
}

impl TryFrom<pb::PerformSwitchoverRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::PerformSwitchoverRequest) -> Result<Self, ConvertError> {
        let candidate = if r.candidate.is_empty() {
            None
        } else {
            Some(node_name("candidate", r.candidate)?)
        };
        Ok(Command::PerformSwitchover {
            formation: formation_or_default(r.formation)?,
            group_id: r.group_id,
            candidate,
        })
    }
}

impl TryFrom<pb::PerformFailoverRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::PerformFailoverRequest) -> Result<Self, ConvertError> {
        Ok(Command::PerformFailover {
            formation: formation_or_default(r.formation)?,
            group_id: r.group_id,
        })
    }
}

impl TryFrom<pb::SetMaintenanceRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::SetMaintenanceRequest) -> Result<Self, ConvertError> {
        Ok(Command::SetMaintenance {
            formation: formation_or_default(r.formation)?,
            node: node_name("node", r.node)?,
            enable: r.enable,
        })
    }
}

impl TryFrom<pb::DropNodeRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::DropNodeRequest) -> Result<Self, ConvertError> {
        Ok(Command::DropNode {
            formation: formation_or_default(r.formation)?,
            node: node_name("node", r.node)?,
        })
    }
}

impl TryFrom<pb::ReinitNodeRequest> for Command {
    type Error = ConvertError;
    fn try_from(r: pb::ReinitNodeRequest) -> Result<Self, ConvertError> {
        Ok(Command::ReinitNode {
            formation: formation_or_default(r.formation)?,
            node: node_name("node", r.node)?,
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
        if r.replication.len() > MAX_REPLICATION_PEERS {
            return Err(invalid(
                "replication",
                format!(
                    "{} peers; at most {MAX_REPLICATION_PEERS}",
                    r.replication.len()
                ),
            ));
        }
        // The name is informational (the node id identifies the sender), but it is
        // checked like any name so that nothing unbounded reaches the leader's memory.
        let name = if r.name.is_empty() {
            r.name
        } else {
            node_name("name", r.name)?
        };
        Ok(NodeActive {
            formation: formation_or_default(r.formation)?,
            name,
            report: NodeReport {
                node_id: r.node_id,
                current_state: node_state("current_state", &r.current_state)?,
                pg_running: r.pg_running,
                pg_in_recovery: r.pg_in_recovery,
                current_lsn: Lsn::new(r.current_lsn),
                received_lsn: Lsn::new(r.received_lsn),
                replayed_lsn: Lsn::new(r.replayed_lsn),
                timeline: r.timeline,
                system_identifier: r.system_identifier,
                replication: r
                    .replication
                    .into_iter()
                    .map(|p| {
                        Ok(ReplicationPeer {
                            application_name: bounded(
                                "replication.application_name",
                                p.application_name,
                                MAX_PG_NAME,
                            )?,
                            state: bounded("replication.state", p.state, MAX_WORD)?,
                            sync_state: bounded("replication.sync_state", p.sync_state, MAX_WORD)?,
                            write_lsn: Lsn::new(p.write_lsn),
                            flush_lsn: Lsn::new(p.flush_lsn),
                            replay_lsn: Lsn::new(p.replay_lsn),
                            write_lag_ms: p.write_lag_ms,
                            flush_lag_ms: p.flush_lag_ms,
                            replay_lag_ms: p.replay_lag_ms,
                        })
                    })
                    .collect::<Result<_, ConvertError>>()?,
                sequence: r.sequence,
                pg_restarts: r.pg_restarts,
                fences: r.fences,
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
            current_lsn: Lsn::raw(r.current_lsn),
            received_lsn: Lsn::raw(r.received_lsn),
            replayed_lsn: Lsn::raw(r.replayed_lsn),
            timeline: r.timeline,
            system_identifier: r.system_identifier,
            replication: r
                .replication
                .into_iter()
                .map(|p| pb::ReplicationPeer {
                    application_name: p.application_name,
                    state: p.state,
                    sync_state: p.sync_state,
                    write_lsn: Lsn::raw(p.write_lsn),
                    flush_lsn: Lsn::raw(p.flush_lsn),
                    replay_lsn: Lsn::raw(p.replay_lsn),
                    write_lag_ms: p.write_lag_ms,
                    flush_lag_ms: p.flush_lag_ms,
                    replay_lag_ms: p.replay_lag_ms,
                })
                .collect(),
            sequence: r.sequence,
            keeper_instance: a.stamp.instance,
            sent_ms: a.stamp.sent_ms,
            pg_restarts: r.pg_restarts,
            fences: r.fences,
        }
    }
}

impl From<PeerNode> for pb::PeerNode {
    fn from(p: PeerNode) -> Self {
        pb::PeerNode {
            node_id: p.node_id,
            name: p.name,
            host: p.host.into(),
            port: u32::from(p.port),
            streamed: p.streamed,
        }
    }
}

impl TryFrom<pb::PeerNode> for PeerNode {
    type Error = ConvertError;
    fn try_from(p: pb::PeerNode) -> Result<Self, ConvertError> {
        Ok(PeerNode {
            node_id: p.node_id,
            name: node_name("peer.name", p.name)?,
            host: host("peer.host", &p.host)?,
            port: port("peer.port", p.port)?,
            streamed: p.streamed,
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
            reinit: a.reinit,
        }
    }
}

impl TryFrom<pb::Assignment> for Assignment {
    type Error = ConvertError;
    fn try_from(a: pb::Assignment) -> Result<Self, ConvertError> {
        // The keeper's side of the wire: what a monitor answers ends up in pg_hba.conf,
        // postgresql.conf and conninfo strings, so it is held to the same rules as
        // what keepers send.
        if a.peers.len() > MAX_REPLICATION_PEERS {
            return Err(invalid(
                "peers",
                format!("{} peers; at most {MAX_REPLICATION_PEERS}", a.peers.len()),
            ));
        }
        if !(1..=MAX_LEASE_MS).contains(&a.lease_ms) {
            return Err(invalid(
                "lease_ms",
                format!("{} is out of range 1-{MAX_LEASE_MS}", a.lease_ms),
            ));
        }
        if !(1..=MAX_LEASE_MS).contains(&a.heartbeat_interval_ms) {
            return Err(invalid(
                "heartbeat_interval_ms",
                format!(
                    "{} is out of range 1-{MAX_LEASE_MS}",
                    a.heartbeat_interval_ms
                ),
            ));
        }
        if !matches!(a.on_quorum_loss.as_str(), "block" | "continue") {
            return Err(invalid(
                "on_quorum_loss",
                format!(
                    "{}: expected block or continue",
                    quote_prefix(&a.on_quorum_loss)
                ),
            ));
        }
        Ok(Assignment {
            goal_state: node_state("goal_state", &a.goal_state)?,
            primary: a.primary.map(PeerNode::try_from).transpose()?,
            synchronous_standby_names: sync_names(a.synchronous_standby_names)?,
            peers: a
                .peers
                .into_iter()
                .map(PeerNode::try_from)
                .collect::<Result<_, _>>()?,
            lease_ms: a.lease_ms,
            heartbeat_interval_ms: a.heartbeat_interval_ms,
            on_quorum_loss: a.on_quorum_loss,
            reinit: a.reinit,
        })
    }
}

/// A node as an operator sees it, with the answering leader's view of its health.
pub fn node_status(n: &Node, health: Health, last_heartbeat_ms_ago: Option<u64>) -> pb::NodeStatus {
    node_status_live(n, health, last_heartbeat_ms_ago, None, None)
}

/// [`node_status`] with the live figures of the leader's health table: the node's own
/// latest report and its primary's (whose pg_stat_replication tells how this standby
/// streams, its synchronous role and its lag).
pub fn node_status_live(
    n: &Node,
    health: Health,
    last_heartbeat_ms_ago: Option<u64>,
    own: Option<&NodeReport>,
    primary: Option<&NodeReport>,
) -> pb::NodeStatus {
    let peer = primary.filter(|p| p.node_id != n.id).and_then(|p| {
        p.replication
            .iter()
            .find(|r| r.application_name == n.name)
            .map(|r| (p, r))
    });
    // Only two known positions make a lag.
    let lag =
        |theirs: Option<Lsn>| peer.and_then(|(p, _)| Some(p.current_lsn?.bytes_since(theirs?)));
    pb::NodeStatus {
        node_id: n.id,
        formation: n.formation.clone(),
        group_id: n.group_id,
        name: n.name.clone(),
        host: n.host.to_string(),
        port: u32::from(n.port),
        reported_state: n.reported_state.as_str().to_owned(),
        goal_state: n.goal_state.as_str().to_owned(),
        reported_lsn: Lsn::raw(n.reported_lsn),
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
        current_lsn: own.and_then(|r| r.current_lsn).map(Lsn::get),
        replayed_lsn: own
            .filter(|r| r.pg_in_recovery)
            .and_then(|r| r.replayed_lsn)
            .map(Lsn::get),
        replication_state: peer.map(|(_, r)| r.state.clone()).unwrap_or_default(),
        sync_state: peer.map(|(_, r)| r.sync_state.clone()).unwrap_or_default(),
        flush_lag_bytes: peer.and_then(|(_, r)| lag(r.flush_lsn)),
        replay_lag_bytes: peer.and_then(|(_, r)| lag(r.replay_lsn)),
        write_lag_ms: peer.and_then(|(_, r)| r.write_lag_ms),
        flush_lag_ms: peer.and_then(|(_, r)| r.flush_lag_ms),
        replay_lag_ms: peer.and_then(|(_, r)| r.replay_lag_ms),
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
            assigned: e
                .assigned
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
            reached: e.reached.map(|s| s.as_str().to_owned()).unwrap_or_default(),
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

    fn register(host: &str, name: &str) -> pb::RegisterNodeRequest {
        pb::RegisterNodeRequest {
            formation: "".into(),
            name: name.into(),
            host: host.into(),
            port: 5432,
            candidate_priority: 50,
            replication_quorum: true,
            system_identifier: 7,
            pg_major_version: 15,
            current_state: "".into(),
        }
    }

    #[test]
    fn register_node_refuses_an_hba_injection() {
        // The registration that gave a `trust` line on every node (issue 12).
        let e = Command::try_from(register(
            "127.0.0.7/32 trust\nhost all all 127.0.0.7/32 trust\n#",
            "evil",
        ))
        .unwrap_err();
        assert!(e.to_string().starts_with("host:"), "{e}");
        for h in ["db 1", "db'1", "db\\1", "a=b", "samenet", "all", ""] {
            assert!(Command::try_from(register(h, "a")).is_err(), "{h:?}");
        }
        for n in ["A", "a b", "a\n", "a\"b", &"a".repeat(55)] {
            assert!(Command::try_from(register("10.0.0.1", n)).is_err(), "{n:?}");
        }
        for h in ["10.0.0.1", "::1", "db-1.example.com"] {
            assert!(Command::try_from(register(h, "a")).is_ok(), "{h:?}");
        }
    }

    #[test]
    fn oversized_input_gets_a_short_error() {
        let huge = "x".repeat(5 << 20);
        for e in [
            Command::try_from(register(&huge, "a")).unwrap_err(),
            Command::try_from(register("h", &huge)).unwrap_err(),
            Command::try_from(pb::DropNodeRequest {
                formation: "".into(),
                node: huge.clone(),
            })
            .unwrap_err(),
            Command::try_from(pb::ReinitNodeRequest {
                formation: "".into(),
                node: huge.clone(),
            })
            .unwrap_err(),
            Command::try_from(pb::SetNodeSettingRequest {
                formation: "".into(),
                node: "a".into(),
                name: huge.clone(),
                value: "1".into(),
            })
            .unwrap_err(),
        ] {
            let status = tonic::Status::from(e);
            assert_eq!(status.code(), tonic::Code::InvalidArgument);
            assert!(status.message().len() < 300, "{}", status.message().len());
        }
    }

    #[test]
    fn out_of_range_numbers_are_refused_not_wrapped() {
        let set = |value: &str| {
            Command::try_from(pb::SetNodeSettingRequest {
                formation: "".into(),
                node: "a".into(),
                name: "candidate-priority".into(),
                value: value.into(),
            })
        };
        // 4294967346 = 2^32 + 50: a `u64 as u32` cast made it 50.
        for v in [
            "4294967346",
            "101",
            "256",
            "-1",
            "18446744073709551616",
            "5x",
        ] {
            let e = set(v).unwrap_err();
            assert_eq!(tonic::Status::from(e).code(), tonic::Code::InvalidArgument);
        }
        assert!(matches!(
            set("100").unwrap(),
            Command::SetNodeSetting {
                setting: NodeSetting::CandidatePriority(100),
                ..
            }
        ));
        let mut r = register("h", "a");
        r.candidate_priority = 4294967295;
        assert!(Command::try_from(r).is_err());
        assert!(Command::try_from(pb::SetFormationSettingRequest {
            formation: "".into(),
            name: "number-sync-standbys".into(),
            value: "4294967296".into(),
        })
        .is_err());
    }

    #[test]
    fn a_keeper_refuses_an_assignment_it_could_not_write_safely() {
        let good = pb::Assignment {
            goal_state: "secondary".into(),
            primary: Some(pb::PeerNode {
                node_id: 1,
                name: "a".into(),
                host: "10.0.0.1".into(),
                port: 5432,
                streamed: false,
            }),
            synchronous_standby_names: "ANY 1 (\"b\", \"c\")".into(),
            peers: vec![],
            lease_ms: 1500,
            heartbeat_interval_ms: 200,
            on_quorum_loss: "block".into(),
            reinit: 0,
        };
        assert!(Assignment::try_from(good.clone()).is_ok());
        let mut bad = good.clone();
        bad.primary.as_mut().unwrap().host = "10.0.0.1 password=x".into();
        assert!(Assignment::try_from(bad).is_err());
        let mut bad = good.clone();
        bad.peers.push(pb::PeerNode {
            node_id: 2,
            name: "b".into(),
            host: "0.0.0.0/0 trust\nhost".into(),
            port: 5432,
            streamed: false,
        });
        assert!(Assignment::try_from(bad).is_err());
        for names in [
            "'; shared_preload_libraries = 'x",
            "ANY 1 (b)\nport = 1",
            "ANY 1 (\"b\"",
            "FIRST 1 (\"b\")",
        ] {
            let mut bad = good.clone();
            bad.synchronous_standby_names = names.into();
            assert!(Assignment::try_from(bad).is_err(), "{names:?}");
        }
        let mut bad = good.clone();
        bad.on_quorum_loss = "maybe".into();
        assert!(Assignment::try_from(bad).is_err());
        let mut bad = good;
        bad.lease_ms = 0;
        assert!(Assignment::try_from(bad).is_err());
    }

    #[test]
    fn heartbeats_are_bounded() {
        let peer = pb::ReplicationPeer {
            application_name: "b".into(),
            state: "streaming".into(),
            sync_state: "sync".into(),
            write_lsn: 1,
            flush_lsn: 1,
            replay_lsn: 1,
            ..Default::default()
        };
        let beat = pb::NodeActiveRequest {
            node_id: 1,
            current_state: "primary".into(),
            replication: vec![peer.clone(); MAX_REPLICATION_PEERS],
            ..Default::default()
        };
        assert!(NodeActive::try_from(beat.clone()).is_ok());
        // The largest valid heartbeat fits the request limit many times over.
        let mut big = beat.clone();
        for p in &mut big.replication {
            p.application_name = "n".repeat(MAX_PG_NAME);
            p.state = "s".repeat(MAX_WORD);
            p.sync_state = "s".repeat(MAX_WORD);
        }
        assert!(NodeActive::try_from(big.clone()).is_ok());
        assert!(prost::Message::encoded_len(&big) * 4 < MAX_REQUEST_BYTES);
        let mut bad = beat.clone();
        bad.replication.push(peer);
        assert!(NodeActive::try_from(bad).is_err());
        let mut bad = beat;
        bad.replication[0].application_name = "x".repeat(64);
        assert!(NodeActive::try_from(bad).is_err());
    }

    #[test]
    fn member_addresses() {
        assert!(member_address("10.0.0.1:7000").is_ok());
        assert!(member_address("[::1]:7000").is_ok());
        assert!(member_address("m1.example:7000").is_ok());
        for a in ["m1", "m1:0", "m1:70000", "m 1:7000", ":7000"] {
            assert!(member_address(a).is_err(), "{a}");
        }
    }

    proptest::proptest! {
        /// Whatever a caller sends, what passes carries no character that could end
        /// a pg_hba.conf field or line, a conninfo value or a configuration literal.
        #[test]
        fn accepted_registrations_are_safe_everywhere(
            host in "\\PC{0,40}|[a-z0-9.:/ '\\\n-]{0,40}",
            name in "\\PC{0,20}|[a-z0-9_ '\"-]{0,20}",
        ) {
            if let Ok(Command::RegisterNode { host, name, .. }) =
                Command::try_from(register(&host, &name))
            {
                let unsafe_char = |c: char| !(c.is_ascii_alphanumeric() || "-_.:".contains(c));
                proptest::prop_assert!(!host.as_str().contains(unsafe_char));
                proptest::prop_assert!(!name.contains(unsafe_char));
                proptest::prop_assert!(host.as_str().len() <= 253 && name.len() <= 54);
            }
        }
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
                current_lsn: Lsn::new(100),
                // Unknown: 0 on the wire.
                received_lsn: None,
                replayed_lsn: Lsn::new(80),
                timeline: 2,
                system_identifier: 42,
                replication: vec![ReplicationPeer {
                    application_name: "b".into(),
                    state: "streaming".into(),
                    sync_state: "sync".into(),
                    write_lsn: None,
                    flush_lsn: Lsn::new(2),
                    replay_lsn: Lsn::new(3),
                    write_lag_ms: Some(4),
                    flush_lag_ms: None,
                    replay_lag_ms: Some(6),
                }],
                sequence: 9,
                pg_restarts: 2,
                fences: 1,
            },
            stamp: ReportStamp {
                instance: 77,
                sequence: 9,
                sent_ms: 12_345,
            },
        };
        let wire = pb::NodeActiveRequest::from(a.clone());
        assert_eq!((wire.current_lsn, wire.received_lsn), (100, 0));
        assert_eq!(
            (wire.replication[0].write_lsn, wire.replication[0].flush_lsn),
            (0, 2)
        );
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
            host: "h".parse().unwrap(),
            port: 5432,
            streamed: true,
        };
        let a = Assignment {
            goal_state: NodeState::Primary,
            primary: Some(p.clone()),
            synchronous_standby_names: "ANY 1 (b)".into(),
            peers: vec![p],
            lease_ms: 1500,
            heartbeat_interval_ms: 200,
            on_quorum_loss: "block".into(),
            reinit: 3,
        };
        assert_eq!(
            Assignment::try_from(pb::Assignment::from(a.clone())).unwrap(),
            a
        );
    }
}
