//! Raft payload decoding: arbitrary bytes through every decoder the monitor applies to
//! what another member sends (AppendEntries, Vote, snapshot chunks, and the answers to
//! its own RPCs) and to what it reads back from its data directory (log entries, vote,
//! committed and purged ids, snapshot metadata and snapshot data).
//!
//! Input: one selector byte, then the bytes (a protobuf `RaftPayload`/`SnapshotChunk`
//! for the RPCs, the raw stored value otherwise). Nothing may panic; what decodes
//! re-encodes to an equal value; the commands of decoded entries are applied to a
//! running cluster with every state invariant checked; a decoded snapshot has its
//! derived group index rebuilt (it agrees with a scan).

use std::sync::OnceLock;

use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotResponse, VoteRequest, VoteResponse,
};
use openraft::{EntryPayload, Vote};
use pgquorum_api::pb::raft as pb;
use pgquorum_core::ClusterState;
use pgquorum_monitor::network::decode;
use pgquorum_monitor::store::{Applied, Header};
use pgquorum_monitor::types::{Entry, LogId, NodeId, SnapshotMeta, TypeConfig};
use prost::Message;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::check;

pub const KINDS: [&str; 9] = [
    "append_entries",
    "vote",
    "install_snapshot",
    "append_entries_reply",
    "vote_reply",
    "install_snapshot_reply",
    "snapshot_data",
    "log_entry",
    "meta",
];

/// The leader's clock when it proposed an entry: milliseconds since 1970, far from
/// u64's end (2^48 ms is the year 10889).
const MAX_AT_MS: u64 = 1 << 48;

fn cluster() -> &'static ClusterState {
    static STATE: OnceLock<ClusterState> = OnceLock::new();
    STATE.get_or_init(|| crate::seeds::running_cluster().state)
}

/// Decodes with the monitor's own decoder; what decodes must re-encode to an equal value.
fn roundtrip<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug>(b: &[u8]) -> Option<T> {
    let v: T = decode(b).ok()?;
    let again = serde_json::to_vec(&v).expect("a decoded value encodes");
    let back: T = decode(&again).expect("a re-encoded value decodes");
    assert_eq!(back, v, "JSON round trip");
    Some(v)
}

/// A log entry as every member applies it.
fn check_entry(e: &Entry) {
    let json = serde_json::to_vec(e).expect("entries encode");
    let back: Entry = decode(&json).expect("an encoded entry decodes");
    assert_eq!(&back, e, "entry round trip");
    if let EntryPayload::Normal(req) = &e.payload {
        if req.at_ms <= MAX_AT_MS {
            let mut s = cluster().clone();
            check::apply_once(&mut s, &req.cmd, req.at_ms, req.by.as_deref());
        }
    }
}

fn check_snapshot(a: &Applied) {
    // A node stored under another id than its own is no snapshot this code writes
    // (ClusterState::apply keys nodes by id); the index follows the ids.
    if a.state.nodes.iter().all(|(k, n)| *k == n.id) {
        check::index(&a.state);
    }
    let json = serde_json::to_vec(a).expect("snapshots encode");
    let back: Applied = decode(&json).expect("an encoded snapshot decodes");
    assert_eq!(back.state, a.state, "snapshot round trip");
    assert_eq!(back.last_applied, a.last_applied);
    assert_eq!(back.last_membership, a.last_membership);
}

fn reply<T: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug, E>(body: &[u8])
where
    E: DeserializeOwned + Serialize + PartialEq + std::fmt::Debug,
{
    // As PeerClient::answer reads it: the error when set, the data otherwise.
    if let Ok(p) = pb::RaftPayload::decode(body) {
        if p.error.is_empty() {
            let _ = roundtrip::<T>(&p.data);
        } else {
            let _ = roundtrip::<E>(&p.error);
        }
    }
}

pub fn run(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    match usize::from(sel) % KINDS.len() {
        0 => {
            let Ok(p) = pb::RaftPayload::decode(body) else {
                return;
            };
            let Ok(req) = decode::<AppendEntriesRequest<TypeConfig>>(&p.data) else {
                return;
            };
            let _ = req.vote.leader_id().voted_for();
            req.entries.iter().for_each(check_entry);
        }
        1 => {
            if let Ok(p) = pb::RaftPayload::decode(body) {
                if let Some(v) = roundtrip::<VoteRequest<NodeId>>(&p.data) {
                    let _ = v.vote.leader_id().voted_for();
                }
            }
        }
        2 => {
            if let Ok(c) = pb::SnapshotChunk::decode(body) {
                let _ = roundtrip::<Vote<NodeId>>(&c.vote);
                let _ = roundtrip::<SnapshotMeta>(&c.meta);
            }
        }
        3 => reply::<AppendEntriesResponse<NodeId>, RaftError<NodeId>>(body),
        4 => reply::<VoteResponse<NodeId>, RaftError<NodeId>>(body),
        5 => {
            reply::<InstallSnapshotResponse<NodeId>, RaftError<NodeId, InstallSnapshotError>>(body)
        }
        6 => {
            if let Ok(a) = decode::<Applied>(body) {
                check_snapshot(&a);
            }
        }
        7 => {
            if let Ok(e) = decode::<Entry>(body) {
                check_entry(&e);
            }
        }
        _ => {
            let _ = roundtrip::<Header>(body);
            let _ = roundtrip::<Vote<NodeId>>(body);
            let _ = roundtrip::<Option<LogId>>(body);
            let _ = roundtrip::<SnapshotMeta>(body);
        }
    }
}
