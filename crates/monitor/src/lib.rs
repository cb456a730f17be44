//! pgquorum-monitor: one member of the monitor group.
//!
//! Its job: replicate `pgquorum_core::ClusterState` over Raft (openraft over tonic,
//! stored in sled), serve the Monitor API on every member (forwarding writes to the
//! leader), and — on the leader only — keep the in-memory health table and run the
//! orchestrator. It must never acknowledge a write before it is flushed to disk, nor
//! let a wire type into the core.

pub mod member;
mod metrics;
pub mod network;
pub mod node;
pub mod service;
pub mod store;
pub mod types;

pub use node::{parse_peer, peer_map, run, MemberConfig, MonitorError, Timing};
