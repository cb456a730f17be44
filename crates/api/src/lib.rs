//! pgquorum-api: the only crate that sees prost/tonic message types.
//!
//! Its job: expose the generated Monitor API and Raft transport, convert wire
//! messages into core types with validation (`TryFrom`), map core errors to
//! `tonic::Status` in one place, and offer a client that finds the leader among
//! several monitor endpoints. It must never hold cluster state or make decisions.

#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod pb {
    pub mod monitor {
        tonic::include_proto!("pgquorum.monitor.v1");
    }
    pub mod raft {
        tonic::include_proto!("pgquorum.raft.v1");
    }
}

pub mod client;
mod convert;
mod status;

pub use convert::{
    check_formation_filter, member_address, node_status, node_status_live, settings, ConvertError,
    NodeActive, MAX_REPLICATION_PEERS, MAX_REQUEST_BYTES,
};
pub use status::{
    leader_hint, leader_hint_in, no_leader, refusal_class, refusal_code, refused, status_from_core,
    HOPS_HEADER, LEADER_HEADER, LOCAL_READ_HEADER, MAX_FORWARD_HOPS, REFUSAL_HEADER,
};
