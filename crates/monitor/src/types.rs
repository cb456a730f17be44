//! The Raft type configuration: what a log entry carries and what applying it returns.

use std::io::Cursor;

use openraft::BasicNode;
use pgquorum_core::{Command, CoreError, Outcome};
use serde::{Deserialize, Serialize};

/// A log entry's payload: a command and the leader's wall clock when it proposed it,
/// so that every member applies it with the same time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub at_ms: u64,
    pub cmd: Command,
    /// Who asked (`ROLE/NAME`), recorded in the events the command produces. Absent in
    /// entries written before authentication existed and in the monitor's own decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
}

/// What applying an entry produced. Only ever handed to the local proposer, never
/// sent over the wire (proposals are forwarded at the gRPC level), hence `skip`:
/// `CoreError` need not be serialisable. `None` for blank and membership entries.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    #[serde(skip)]
    pub result: Option<Result<Outcome, CoreError>>,
}

openraft::declare_raft_types!(
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = u64,
        Node = BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        Responder = openraft::impls::OneshotResponder<TypeConfig>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StoredMembership = openraft::StoredMembership<NodeId, BasicNode>;
pub type SnapshotMeta = openraft::SnapshotMeta<NodeId, BasicNode>;
pub type StorageError = openraft::StorageError<NodeId>;
pub type Entry = openraft::Entry<TypeConfig>;
