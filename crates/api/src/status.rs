//! The one place where errors become `tonic::Status`.

use pgquorum_core::{CoreError, ErrorClass};
use tonic::{Code, Status};

/// Request metadata: how many times a request has been forwarded between members.
pub const HOPS_HEADER: &str = "x-pgquorum-hops";
/// Request metadata on a non-linearizable GetState: answer from this member's own
/// applied state instead of asking the leader (tests checking what a member applied).
pub const LOCAL_READ_HEADER: &str = "x-pgquorum-local-read";
/// Error metadata: the leader's address (`HOST:PORT`), when this member knows it.
pub const LEADER_HEADER: &str = "x-pgquorum-leader";
/// Error metadata on a refusal: its [`ErrorClass`] by name (`retry_later`, ...), so a
/// client tells "retry" from "not allowed now" without reading the message.
pub const REFUSAL_HEADER: &str = "x-pgquorum-refusal";
/// A request is forwarded at most this many times; more means members disagree on
/// who leads, and the client is better served by an error it can retry.
pub const MAX_FORWARD_HOPS: u32 = 2;

/// The gRPC code of a refusal class. RetryLater is ABORTED ("retry at a higher
/// level"), not UNAVAILABLE: the member did answer, and the CLI's exit code for it
/// stays "not allowed" (docs/cli.md).
pub const fn refusal_code(class: ErrorClass) -> Code {
    match class {
        ErrorClass::RetryLater => Code::Aborted,
        ErrorClass::NotAllowedNow => Code::FailedPrecondition,
        ErrorClass::Invalid => Code::InvalidArgument,
        ErrorClass::NotFound => Code::NotFound,
        ErrorClass::AlreadyExists => Code::AlreadyExists,
    }
}

/// A refusal: the code says what kind, the metadata names the class, the message says
/// what to do. Every refusal the monitor gives goes through here.
pub fn refused(class: ErrorClass, message: impl Into<String>) -> Status {
    let mut status = Status::new(refusal_code(class), message.into());
    if let Ok(v) = class.name().parse() {
        status.metadata_mut().insert(REFUSAL_HEADER, v);
    }
    status
}

/// A refused command, as [`refused`] with the error's class and its message.
pub fn status_from_core(e: &CoreError) -> Status {
    refused(e.class(), e.to_string())
}

/// The class of a refusal, from its metadata; `None` when the status is not a
/// refusal (UNAVAILABLE, a transport error) or came from a member that does not name
/// classes.
pub fn refusal_class(status: &Status) -> Option<ErrorClass> {
    let class = status
        .metadata()
        .get(REFUSAL_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(ErrorClass::from_name)?;
    // A class that disagrees with the code was not put there by `refused`.
    (refusal_code(class) == status.code()).then_some(class)
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

    /// One test per class: its code (which decides the CLI's exit code) and its name in
    /// the metadata, read back as the same class.
    #[test]
    fn each_refusal_class_has_its_code_and_reads_back() {
        let cases = [
            (
                CoreError::StillMoving {
                    node: "a".into(),
                    goal: pgquorum_core::NodeState::Primary,
                    reported: pgquorum_core::NodeState::ApplySettings,
                },
                Code::Aborted,
            ),
            (
                CoreError::FailoverInProgress { group: 0 },
                Code::FailedPrecondition,
            ),
            (CoreError::InvalidSetting("x".into()), Code::InvalidArgument),
            (CoreError::UnknownFormation("f".into()), Code::NotFound),
            (CoreError::FormationExists("f".into()), Code::AlreadyExists),
        ];
        for (e, code) in cases {
            let s = status_from_core(&e);
            assert_eq!(s.code(), code, "{e:?}");
            assert_eq!(s.message(), e.to_string());
            assert_eq!(refusal_class(&s), Some(e.class()), "{e:?}");
        }
        let seen: std::collections::HashSet<_> =
            ErrorClass::ALL.iter().map(|c| refusal_code(*c)).collect();
        assert_eq!(
            seen.len(),
            ErrorClass::ALL.len(),
            "two classes share a code"
        );
    }

    #[test]
    fn a_status_without_a_refusal_class_is_not_a_refusal() {
        assert_eq!(refusal_class(&Status::aborted("stale heartbeat")), None);
        assert_eq!(refusal_class(&no_leader("x", None)), None);
        // The class must agree with the code.
        let mut s = Status::failed_precondition("x");
        s.metadata_mut().insert(
            REFUSAL_HEADER,
            tonic::metadata::MetadataValue::from_static("retry_later"),
        );
        assert_eq!(refusal_class(&s), None);
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
