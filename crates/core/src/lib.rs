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

mod command;
mod error;
mod health;
mod model;
mod orchestrate;

pub use command::{Command, FormationSetting, NodeSetting, Outcome};
pub use error::{CoreError, ErrorKind};
pub use health::{Health, HealthTable, NodeReport, ReplicationPeer};
pub use model::*;
pub use orchestrate::{assignment, on_heartbeat, orchestrate, Assignment, PeerNode};
