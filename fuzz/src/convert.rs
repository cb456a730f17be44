//! Wire → core: arbitrary bytes decoded as a Monitor API request (or, on the keeper's
//! side, an Assignment) with prost, then converted by pgquorum-api exactly as the
//! service does. Input: one selector byte (which message), then the protobuf bytes.
//!
//! Whatever the bytes, nothing panics, and what a conversion accepts obeys the
//! type-level rules: names and formations valid, hosts valid `HostName`s, ports 1-65535,
//! sizes bounded; it survives the Raft log (JSON) unchanged; converting back to the
//! wire and again gives the same value; and applying an accepted command to a running
//! cluster keeps every state invariant (`crate::check`).

use std::sync::OnceLock;

use pgquorum_api::pb::monitor as pb;
use pgquorum_api::{
    check_formation_filter, member_address, NodeActive, MAX_REPLICATION_PEERS, MAX_REQUEST_BYTES,
};
use pgquorum_core::{
    check_formation_name, check_node_name, Assignment, ClusterState, Command, HostName, PeerNode,
    MAX_HOST_LEN,
};
use prost::Message;

use crate::check;

/// Which message the rest of the input is (the selector byte modulo their number).
pub const MESSAGES: [&str; 15] = [
    "CreateFormationRequest",
    "DropFormationRequest",
    "RegisterNodeRequest",
    "SetNodeSettingRequest",
    "SetFormationSettingRequest",
    "PerformSwitchoverRequest",
    "PerformFailoverRequest",
    "SetMaintenanceRequest",
    "DropNodeRequest",
    "NodeActiveRequest",
    "Assignment",
    "AddMemberRequest",
    "GetStateRequest",
    "GetEventsRequest",
    "ReinitNodeRequest",
];

/// A Raft entry of an accepted command is small: a few hundred bytes.
const MAX_COMMAND_JSON: usize = 2048;

/// A running cluster (one formation, a primary and two standbys) that accepted
/// commands are applied to.
fn cluster() -> &'static ClusterState {
    static STATE: OnceLock<ClusterState> = OnceLock::new();
    STATE.get_or_init(|| crate::seeds::running_cluster().state)
}

fn command<M: Message + Default>(body: &[u8]) -> Option<Command>
where
    Command: TryFrom<M>,
{
    let m = M::decode(body).ok()?;
    Command::try_from(m).ok()
}

fn check_name(n: &str) {
    check_node_name(n).unwrap_or_else(|e| panic!("accepted node name: {e}"));
}

fn check_formation(f: &str) {
    check_formation_name(f).unwrap_or_else(|e| panic!("accepted formation: {e}"));
}

fn check_host(h: &HostName) {
    assert!(h.as_str().len() <= MAX_HOST_LEN);
    assert_eq!(HostName::parse(h.as_str()).as_ref(), Ok(h), "accepted host");
    // Nothing that could end a pg_hba.conf field, a conninfo value or a line.
    assert!(
        h.as_str()
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:".contains(&b)),
        "unsafe host {h:?}"
    );
}

/// The type-level rules of an accepted command, and its way through the Raft log.
fn check_command(cmd: &Command) {
    match cmd {
        Command::CreateFormation { name, .. } | Command::DropFormation { name } => {
            check_formation(name)
        }
        Command::RegisterNode {
            formation,
            name,
            host,
            port,
            candidate_priority,
            ..
        } => {
            check_formation(formation);
            check_name(name);
            check_host(host);
            assert!(*port > 0);
            assert!(*candidate_priority <= 100);
        }
        Command::SetNodeSetting {
            formation, node, ..
        }
        | Command::SetMaintenance {
            formation, node, ..
        }
        | Command::DropNode { formation, node }
        | Command::ReinitNode { formation, node } => {
            check_formation(formation);
            check_name(node);
        }
        Command::SetFormationSetting { formation, .. }
        | Command::PerformFailover { formation, .. } => check_formation(formation),
        Command::PerformSwitchover {
            formation,
            candidate,
            ..
        } => {
            check_formation(formation);
            if let Some(c) = candidate {
                check_name(c);
            }
        }
        // The API never produces these: the leader proposes them itself.
        Command::ReportState { .. }
        | Command::AssignGoal { .. }
        | Command::RecordSystemIdentifier { .. }
        | Command::ForgetNode { .. }
        | Command::RecordEvent { .. } => panic!("the API produced {cmd:?}"),
    }
    let json = serde_json::to_vec(cmd).expect("commands serialise");
    assert!(json.len() <= MAX_COMMAND_JSON, "{} bytes", json.len());
    let mut s = cluster().clone();
    check::apply_once(&mut s, cmd, crate::script::T0 + 60_000, Some("operator/o"));
    check::state_and_snapshot(&s);
}

fn check_active(a: &NodeActive) {
    if !a.name.is_empty() {
        check_name(&a.name);
    }
    check_formation(&a.formation);
    assert_ne!(a.report.node_id, 0);
    assert!(a.report.replication.len() <= MAX_REPLICATION_PEERS);
    for p in &a.report.replication {
        assert!(p.application_name.len() <= 63);
        assert!(p.state.len() <= 64 && p.sync_state.len() <= 64);
    }
    // What the leader keeps per node stays well under a request.
    let json = serde_json::to_vec(&a.report).expect("reports serialise");
    assert!(json.len() < MAX_REQUEST_BYTES, "{} bytes", json.len());
    let back = NodeActive::try_from(pb::NodeActiveRequest::from(a.clone()))
        .expect("a converted heartbeat converts again");
    assert_eq!(&back, a, "heartbeat round trip");
}

fn check_peer(p: &PeerNode) {
    check_name(&p.name);
    check_host(&p.host);
    assert!(p.port > 0);
}

/// What a keeper accepts from a monitor ends up in pg_hba.conf, postgresql.conf and
/// conninfo strings.
fn check_assignment(a: &Assignment) {
    if let Some(p) = &a.primary {
        check_peer(p);
    }
    assert!(a.peers.len() <= MAX_REPLICATION_PEERS);
    a.peers.iter().for_each(check_peer);
    assert!(
        a.synchronous_standby_names
            .bytes()
            .all(|b| b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || b" ,()\"_-".contains(&b)
                || b"ANY".contains(&b)),
        "unsafe synchronous_standby_names {:?}",
        a.synchronous_standby_names
    );
    assert!(a.lease_ms >= 1 && a.heartbeat_interval_ms >= 1);
    assert!(matches!(a.on_quorum_loss.as_str(), "block" | "continue"));
    let back = Assignment::try_from(pb::Assignment::from(a.clone()))
        .expect("a converted assignment converts again");
    assert_eq!(&back, a, "assignment round trip");
}

pub fn run(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match usize::from(sel) % MESSAGES.len() {
        0 => command::<pb::CreateFormationRequest>(body)
            .iter()
            .for_each(check_command),
        1 => command::<pb::DropFormationRequest>(body)
            .iter()
            .for_each(check_command),
        2 => command::<pb::RegisterNodeRequest>(body)
            .iter()
            .for_each(check_command),
        3 => command::<pb::SetNodeSettingRequest>(body)
            .iter()
            .for_each(check_command),
        4 => command::<pb::SetFormationSettingRequest>(body)
            .iter()
            .for_each(check_command),
        5 => command::<pb::PerformSwitchoverRequest>(body)
            .iter()
            .for_each(check_command),
        6 => command::<pb::PerformFailoverRequest>(body)
            .iter()
            .for_each(check_command),
        7 => command::<pb::SetMaintenanceRequest>(body)
            .iter()
            .for_each(check_command),
        8 => command::<pb::DropNodeRequest>(body)
            .iter()
            .for_each(check_command),
        9 => {
            if let Ok(m) = pb::NodeActiveRequest::decode(body) {
                if let Ok(a) = NodeActive::try_from(m) {
                    check_active(&a);
                }
            }
        }
        10 => {
            if let Ok(m) = pb::Assignment::decode(body) {
                if let Ok(a) = Assignment::try_from(m) {
                    check_assignment(&a);
                }
            }
        }
        11 => {
            if let Ok(m) = pb::AddMemberRequest::decode(body) {
                if member_address(&m.address).is_ok() {
                    let (h, p) = m.address.rsplit_once(':').expect("HOST:PORT");
                    let h = h.trim_start_matches('[').trim_end_matches(']');
                    check_host(&HostName::parse(h).expect("a valid host"));
                    assert!(p.parse::<u16>().is_ok_and(|p| p > 0), "port {p:?}");
                }
            }
        }
        12 => {
            if let Ok(m) = pb::GetStateRequest::decode(body) {
                if check_formation_filter(&m.formation).is_ok() && !m.formation.is_empty() {
                    check_formation(&m.formation);
                }
            }
        }
        14 => command::<pb::ReinitNodeRequest>(body)
            .iter()
            .for_each(check_command),
        _ => {
            if let Ok(m) = pb::GetEventsRequest::decode(body) {
                if check_formation_filter(&m.formation).is_ok() && !m.formation.is_empty() {
                    check_formation(&m.formation);
                }
            }
        }
    }
}
