//! pgquorum-api: the only crate that sees prost/tonic message types.
//!
//! Its job: expose the generated Monitor API and Raft transport, convert wire
//! messages into core types with validation (`TryFrom`), and map core errors to
//! `tonic::Status` in one place. It must never hold state or make decisions.

#[allow(clippy::all, clippy::unwrap_used, clippy::expect_used)]
pub mod pb {
    pub mod monitor {
        tonic::include_proto!("pgquorum.monitor.v1");
    }
    pub mod raft {
        tonic::include_proto!("pgquorum.raft.v1");
    }
}
