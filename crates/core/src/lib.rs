//! pgquorum-core: the cluster state machine.
//!
//! Its job: hold the replicated cluster state (formations, groups, nodes, settings,
//! events), apply commands to it deterministically, and decide — on the monitor
//! leader — which goal state every node must reach (bootstrap, failover, switchover,
//! maintenance), under the invariants of DESIGN.md.
//!
//! What it must never do: read a clock, sleep, touch the network or the disk, or use
//! tokio. Time comes in as an argument (`Millis`, milliseconds since the Unix epoch as
//! seen by the monitor leader that proposed the command). The monitor replicates
//! [`Command`]s through Raft and calls [`ClusterState::apply`] on every member; the
//! result must be the same on all of them.

mod candidate;
mod command;
mod decide;
mod error;
mod health;
mod input;
mod lease;
mod lsn;
mod model;
mod orchestrate;
mod order;
mod protocol;
mod sync;

pub use candidate::{fast_forward_source, target_lsn, witnesses};
pub use command::{
    Command, FormationSetting, NodeSetting, Outcome, MAX_EVENT_DESCRIPTION, MAX_GROUP_NODES,
    MAX_SYNC_STANDBYS,
};
pub use decide::{
    assignable_goals, decide, reportable_states, target, Action, DataDir, Decision, Observed,
    Target,
};
pub use error::{CoreError, ErrorClass};
pub use health::{keeper_events, Health, HealthTable, NodeReport, ReplicationPeer, REORDER_WINDOW};
pub use input::{
    check_formation_name, check_node_name, quote_prefix, HostName, InvalidValue,
    MAX_FORMATION_NAME_LEN, MAX_HOST_LEN, MAX_NODE_NAME_LEN,
};
pub use lease::{
    joint_quorum_acked_at, lease_base, lease_surely_expired, lease_surely_expired_at,
    may_grant_lease, quorum_acked_at,
};
pub use lsn::{zero_is_none, Lsn, LsnParseError};
pub use model::*;
pub use orchestrate::{
    assignment, on_heartbeat, orchestrate, orchestrate_group, unhealthy_after, Assignment,
    PeerNode, CATCHUP_LAG_BYTES,
};
pub use order::{ReportOrder, ReportStamp, StaleReport};
pub use protocol::{Heartbeat, Proposed, Refusal, Rounds, Step, DECIDE_ROUNDS};
pub use sync::{desired_sync, render as render_sync_names, requirement, Requirement, NO_STANDBY};
