//! The one place where errors become `tonic::Status`.

use pgquorum_core::{CoreError, ErrorKind};
use tonic::{Code, Status};

/// Request metadata: how many times a request has been forwarded between members.
pub const HOPS_HEADER: &str = "x-pgquorum-hops";
/// Request metadata on a non-linearizable GetState: answer from this member's own
/// applied state instead of asking the leader (tests checking what a member applied).
pub const LOCAL_READ_HEADER: &str = "x-pgquorum-local-read";
/// Error metadata: the leader's address (`HOST:PORT`), when this member knows it.
pub const LEADER_HEADER: &str = "x-pgquorum-leader";
/// A request is forwarded at most this many times; more means members disagree on
/// who leads, and the client is better served by an error it can retry.
pub const MAX_FORWARD_HOPS: u32 = 2;

/// A refused command: the code says what kind of refusal, the message says what to do.
pub fn status_from_core(e: &CoreError) -> Status {
    let code = match e.kind() {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
    };
    Status::new(code, e.to_string())
}

/// UNAVAILABLE with the leader's address in both the message and the metadata, so
/// that a client can retry there.
pub fn no_leader(message: impl Into<String>, leader: Option<(u64, &str)>) -> Status {
    let mut message = message.into();
    if let Some((id, addr)) = leader {
        message.push_str(&format!(" (the leader is member {id} at {addr})"));
    }
    let mut status = Status::unavailable(message);
    if let Some((_, addr)) = leader {
        if let Ok(v) = addr.parse() {
            status.metadata_mut().insert(LEADER_HEADER, v);
        }
    }
    status
}

/// The leader address a member put into an error, if any.
pub fn leader_hint(status: &Status) -> Option<String> {
    leader_hint_in(status.metadata())
}

/// The leader address in an error's or an answer's metadata (a follower that forwarded
/// a request names the leader in the answer), if any.
pub fn leader_hint_in(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(LEADER_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn core_errors_keep_their_meaning_on_the_wire() {
        let s = status_from_core(&CoreError::FormationExists("f".into()));
        assert_eq!(s.code(), Code::AlreadyExists);
        assert!(s.message().contains("already exists"));
        let s = status_from_core(&CoreError::UnknownNode("n".into()));
        assert_eq!(s.code(), Code::NotFound);
    }

    #[test]
    fn leader_hint_round_trips() {
        let s = no_leader("not the leader", Some((2, "127.0.0.1:7002")));
        assert_eq!(s.code(), Code::Unavailable);
        assert_eq!(leader_hint(&s).as_deref(), Some("127.0.0.1:7002"));
        assert!(s.message().contains("member 2 at 127.0.0.1:7002"));
        assert_eq!(leader_hint(&no_leader("x", None)), None);
    }
}
